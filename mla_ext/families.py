"""Model families: how the attention module of each supported transformers family is read.

One :class:`Family` per family says which attention class it covers, which causal-LM class
rebuilds it from a config, where the query/key/value/output weights and biases sit (separate
``q_proj``/``k_proj``/``v_proj`` or one fused ``qkv_proj``) and which projections carry a bias.
Everything else (the conversion, MLAAttention, the latent cache, checkpoints) is one code path
over these adapters. Every supported family uses the rotate-half RoPE of the full head over the
model's own ``rotary_emb`` output and the softmax scale ``1/sqrt(d_h)``; the decoder layers,
norms, MLP and embeddings of the model stay its own.

:func:`unsupported_reason` names what no adapter can convert (QK-norm, logit soft-capping, an
active sliding window, cross-attention, partial rotary, non-causal attention).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.functional import linear

PROJECTIONS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class Projections:
    """(weight, bias) of the query, key, value and output projections of one attention layer,
    as views of the live parameters (a fused projection's rows sliced apart); bias None where
    the projection has none."""

    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Family:
    """The adapter of one transformers family.

    name: the family; model_types: its ``config.model_type`` values; module: the transformers
    module (``transformers.models.<module>.modeling_<module>``); attention / causal_lm: class
    names in it; fused_qkv: the attribute of a fused query/key/value projection (rows q, k, v),
    None for separate ``q_proj``/``k_proj``/``v_proj``; bias: per projection (q, k, v, o), True,
    False, or the name of the config flag that decides it.
    """

    name: str
    model_types: tuple[str, ...]
    module: str
    attention: str
    causal_lm: str
    fused_qkv: str | None = None
    bias: dict = field(default_factory=lambda: dict.fromkeys(PROJECTIONS, "attention_bias"))
    notes: str = ""

    def _class(self, name: str):
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, name)

    @property
    def attention_class(self):
        return self._class(self.attention)

    @property
    def causal_lm_class(self):
        return self._class(self.causal_lm)

    def biases(self, config) -> dict[str, bool]:
        """Which of q, k, v, o carry a bias in this family's attention under ``config``."""
        return {p: v if isinstance(v, bool) else bool(getattr(config, v, False))
                for p, v in self.bias.items()}

    def projections(self, attn: nn.Module) -> Projections:
        if self.fused_qkv is None:
            return _separate_projections(attn)
        fused = getattr(attn, self.fused_qkv)
        sizes = qkv_sizes(attn.config)
        ws = fused.weight.split(sizes, dim=0)
        bs = (None,) * 3 if fused.bias is None else fused.bias.split(sizes, dim=0)
        return Projections(q=(ws[0], bs[0]), k=(ws[1], bs[1]), v=(ws[2], bs[2]),
                           o=(attn.o_proj.weight, attn.o_proj.bias))


FAMILIES = (
    Family("llama", ("llama",), "llama", "LlamaAttention", "LlamaForCausalLM",
           notes="biases on all four projections with attention_bias"),
    Family("mistral", ("mistral",), "mistral", "MistralAttention", "MistralForCausalLM",
           bias=dict.fromkeys(PROJECTIONS, False), notes="no biases; sliding_window must be None"),
    Family("qwen2", ("qwen2",), "qwen2", "Qwen2Attention", "Qwen2ForCausalLM",
           bias=dict(q=True, k=True, v=True, o=False), notes="biases on q/k/v, none on o_proj"),
    Family("gemma", ("gemma",), "gemma", "GemmaAttention", "GemmaForCausalLM",
           notes="head_dim 256, embeddings scaled by sqrt(hidden), tied embeddings"),
    Family("phi3", ("phi3",), "phi3", "Phi3Attention", "Phi3ForCausalLM", fused_qkv="qkv_proj",
           bias=dict.fromkeys(PROJECTIONS, False), notes="one fused qkv_proj, split at conversion"),
)


def _available(fam: Family) -> bool:
    try:
        fam.attention_class
    except (ImportError, AttributeError):
        return False
    return True


def supported_attention_names() -> list[str]:
    return [f.attention for f in FAMILIES if _available(f)]


def family_of(attn) -> Family | None:
    """The family whose attention class ``attn`` is an instance of, else None."""
    for fam in FAMILIES:
        if _available(fam) and type(attn) is fam.attention_class:
            return fam
    return None


def family_for_config(config) -> Family | None:
    """The family of a transformers config (by ``model_type``), else None."""
    model_type = getattr(config, "model_type", None)
    if isinstance(config, dict):
        model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def qkv_sizes(config) -> list[int]:
    h, d = config.num_attention_heads, config.hidden_size
    h_kv = getattr(config, "num_key_value_heads", None) or h
    d_h = getattr(config, "head_dim", None) or d // h
    return [h * d_h, h_kv * d_h, h_kv * d_h]


def _separate_projections(attn) -> Projections:
    def pair(lin):
        return lin.weight, lin.bias
    return Projections(q=pair(attn.q_proj), k=pair(attn.k_proj), v=pair(attn.v_proj),
                       o=pair(attn.o_proj))


def projections(attn) -> Projections:
    """The q/k/v/o weights and biases of an original attention layer: through its family's
    adapter, else (a Llama-style module of another class) its q_proj/k_proj/v_proj/o_proj."""
    fam = family_of(attn)
    return fam.projections(attn) if fam is not None else _separate_projections(attn)


def project(proj: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    return linear(x, proj[0], proj[1])


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


CROSS_ATTENTION_ATTRS = ("cross_attn", "encoder_attn", "crossattention", "cross_attention")


def unsupported_reason(model, layers) -> str | None:
    """Why no adapter can convert ``model`` (decoder ``layers``), or None. Checked before
    anything is modified."""
    config = model.config
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        cross = [a for a in CROSS_ATTENTION_ATTRS if isinstance(getattr(layer, a, None), nn.Module)]
        if cross or getattr(attn, "is_cross_attention", False) or getattr(
                config, "is_encoder_decoder", False):
            what = f"layer {i}'s {cross[0]}" if cross else f"layer {i}"
            return (f"cross-attention ({what}) cannot be converted: its keys and values come "
                    "from another sequence, not from a latent cache of this one")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        norms = [n for n in ("q_norm", "k_norm") if isinstance(getattr(attn, n, None), nn.Module)]
        if norms:
            return (f"QK-norm attention ({'/'.join(norms)} in layer {i}'s "
                    f"{type(attn).__name__}) cannot be converted: the norm sits between the "
                    "projection and the keys, so the latent cannot be absorbed into the query")
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is None and layers:
        cap = getattr(getattr(layers[0], "self_attn", None), "attn_logit_softcapping", None)
    if cap is not None:
        return (f"attention logit soft-capping (attn_logit_softcapping={cap}) cannot be "
                "converted: the capped scores are not a dot product with the latent")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = layer_types is None or "sliding_attention" in layer_types
    context = getattr(config, "max_position_embeddings", None)
    if window is not None and sliding and (context is None or window < context):
        return (f"sliding-window attention is active (sliding_window={window} < "
                f"max_position_embeddings={context}): MLA layers attend over the whole context; "
                "convert a config with sliding_window=None")
    rope = _rope_parameters(config)
    factor = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor",
                                                             None) or 1.0))
    if factor != 1.0:
        return ("models whose RoPE covers only part of each head "
                f"(partial_rotary_factor={factor} != 1) cannot be converted")
    if getattr(config, "use_bidirectional_attention", False) or any(
            getattr(getattr(layer, "self_attn", None), "is_causal", True) is False
            for layer in layers):
        return "bidirectional (non-causal) attention cannot be converted"
    return None
