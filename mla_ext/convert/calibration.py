"""Calibration statistics for the conversion, gathered in one streaming pass over ordinary text.

Per decoder layer (ARCHITECTURE section 2):

- the 2-norm statistic of partial RoPE: the mean over tokens of the norm of every frequency pair
  of the pre-RoPE query and key vectors (pair ``j`` = dims ``j`` and ``j + d_h/2``, rotate-half);
- optionally ``X^T X`` of the attention input, which the activation-aware SVD whitens with;
- optionally ``sum_t q_t q_t^T`` of every query head (pre-RoPE), the score weights of the
  "activation-score" SVD;
- optionally the attention mass at each relative distance (the rotation-aware RoPE selection);
- optionally a small sample of one layer's pre-RoPE queries, keys and values on the first few
  sequences (the greedy RoPE selection, which measures the attention output of each choice);
- optionally the normal equations of the fitted correction of each dropped RoPE pair
  (``convert/rope_correction.py``: 4x4 + 4 numbers per query head, pair and weighting).

Forward hooks on ``self_attn.q_proj`` and ``self_attn.k_proj`` (on a fused ``qkv_proj``, one hook
that splits its output: mla_ext/families.py) fold each batch into float64 accumulators and drop
it, so memory does not grow with the number of calibration tokens.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import families
from .rope_correction import PairFitSums, pair_fit_sums

MIN_SEQUENCE_TOKENS = 16  # a shorter tail carries too little context to be worth a forward pass
# The attention sample of the greedy RoPE selection: the first SAMPLE_SEQUENCES calibration
# sequences, every SAMPLE_QUERY_STRIDE-th query of each (a query still sees all earlier keys).
SAMPLE_SEQUENCES = 4
SAMPLE_QUERY_STRIDE = 8


@dataclass
class AttentionSample:
    """One layer's attention inputs on a few calibration sequences, for selections that measure
    the attention output (the greedy RoPE selection). Per sequence ``s`` (lists, float32):

    q[s]: (H, Q_s, d_h) pre-RoPE queries (q_proj output, bias included) at positions
        ``query_pos[s]`` (int64, (Q_s,)); k[s], v[s]: (H_kv, T_s, d_h) pre-RoPE keys and values
        of every position; cos[s], sin[s]: (T_s, d_h) the model's own rotary embedding (scaled
        RoPE's ``attention_scaling`` included, so ``cos^2 + sin^2`` is its square).
    out_gram: (H, d_h, d_h) float64, ``W_o,h^T W_o,h`` of each query head's block of o_proj:
        an error ``e`` of head ``h``'s output changes the residual stream by ``e^T G_h e``.
    scaling: the softmax scale of the scores.
    """

    q: list[torch.Tensor]
    query_pos: list[torch.Tensor]
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    cos: list[torch.Tensor]
    sin: list[torch.Tensor]
    out_gram: torch.Tensor
    scaling: float
    # memo of the greedy selection's order per (num_heads, num_kv_heads): it only depends on
    # this sample, and a budget asks for every r in turn
    orders: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class LayerStats:
    """Statistics of one decoder layer.

    q_pair_norm: (H, d_h/2) float64, mean over tokens of ``||q_t[pair j]||`` (q_proj output, bias
        included, before RoPE).
    k_pair_norm: (H_kv, d_h/2) float64, the same for the k_proj output.
    xtx: (d, d) float64, ``sum_t x_t x_t^T`` of the attention input; None if not collected.
    num_tokens: tokens that went into the statistics.
    distance_mass: (H, L) float64, for each query head the attention probability at relative
        distance ``0..L-1`` (original model, RoPE applied), averaged over query positions: each
        row sums to 1. None if not collected.
    inv_freq: (d_h/2,) float64, the rotary frequency of each pair (radians per position).
    attention_sample: an :class:`AttentionSample` of this layer; None if not collected.
    rope_fit: the :class:`PairFitSums` of the fitted RoPE correction; None if not collected.
    query_gram: (H, d_h, d_h) float64, ``sum_t q_t q_t^T`` of every query head (q_proj output,
        bias included, before RoPE); None if not collected.
    """

    q_pair_norm: torch.Tensor
    k_pair_norm: torch.Tensor
    xtx: torch.Tensor | None
    num_tokens: int
    distance_mass: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    attention_sample: AttentionSample | None = None
    rope_fit: PairFitSums | None = None
    query_gram: torch.Tensor | None = None


@dataclass
class Calibration:
    """Statistics of every decoder layer, plus the shapes they were taken at."""

    layers: list[LayerStats]
    num_tokens: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # The token ids the statistics came from (a few hundred sequences of ints): a cache budget
    # that picks each layer's RoPE/latent split runs the original model on some of them again.
    sequences: list[list[int]] | None = None

    def check_matches(self, model_config) -> None:
        """Raise ValueError unless this calibration was taken on a model of this shape.

        model_config: a transformers config, or a model (its ``.config`` is used).
        """
        is_model = hasattr(model_config, "config")
        if is_model and not hasattr(model_config, "num_attention_heads"):
            model_config = model_config.config
        shape = _attention_shape(model_config, "model_config")
        expected = {
            "hidden_size": shape[0],
            "num_heads": shape[1],
            "num_kv_heads": shape[2],
            "head_dim": shape[3],
            "num_layers": getattr(model_config, "num_hidden_layers", len(self.layers)),
        }
        got = {
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_layers": len(self.layers),
        }
        diff = [f"{k}: calibration {got[k]}, model {expected[k]}"
                for k in got if got[k] != expected[k]]
        if diff:
            raise ValueError("calibration does not match model_config (" + "; ".join(diff) + ")")


def _attention_shape(config, arg_name: str) -> tuple[int, int, int, int]:
    try:
        d = int(config.hidden_size)
        h = int(config.num_attention_heads)
    except AttributeError as e:
        raise ValueError(f"{arg_name} has no hidden_size / num_attention_heads: {e}") from None
    h_kv = getattr(config, "num_key_value_heads", None) or h
    head_dim = getattr(config, "head_dim", None) or d // h
    return d, h, int(h_kv), int(head_dim)


def token_sequences(tokenizer, texts: str | Iterable[str], *, max_length: int = 512,
                    max_sequences: int = 128) -> list[list[int]]:
    """Tokenize ``texts`` into calibration sequences.

    Documents are joined with the tokenizer's EOS (no separator if it has none) and cut into
    sequences of ``max_length`` tokens; a last partial sequence is kept if it has at least
    ``MIN_SEQUENCE_TOKENS`` tokens; at most ``max_sequences``. ``texts`` is consumed lazily:
    reading stops once enough tokens are in hand, so a large corpus iterator is fine.
    """
    _check_positive_int(max_length, "max_length")
    _check_positive_int(max_sequences, "max_sequences")
    if max_length < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"max_length must be >= {MIN_SEQUENCE_TOKENS}, got {max_length}")
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, Iterable):
        raise ValueError(f"texts must be a str or an iterable of str, got {type(texts).__name__}")
    eos = getattr(tokenizer, "eos_token_id", None)
    budget = max_length * max_sequences
    ids: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts must contain str, item {i} is {type(text).__name__}")
        if not text:
            continue
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(_encode(tokenizer, text))
        if len(ids) >= budget:
            break
    if len(ids) < MIN_SEQUENCE_TOKENS:
        raise ValueError(f"texts give {len(ids)} tokens; calibration needs at least "
                         f"{MIN_SEQUENCE_TOKENS}")
    seqs = [ids[s:s + max_length] for s in range(0, min(len(ids), budget), max_length)]
    if len(seqs[-1]) < MIN_SEQUENCE_TOKENS:
        seqs.pop()
    return seqs


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: whole documents exceed model_max_length by design; they are cut afterwards.
    out = tokenizer(text, add_special_tokens=False, verbose=False)
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(t) for t in ids]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-style model (``LlamaForCausalLM`` or ``LlamaModel``)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"model ({type(model).__name__}) has no decoder layers at "
                         "model.base_model.layers; a Llama-style model is needed")
    return layers


def _projections(layers: nn.ModuleList) -> list[tuple]:
    """Per layer, the modules to hook: (q_proj, k_proj), or (qkv_proj, split sizes) for a family
    with a fused projection."""
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        family = families.family_of(attn)
        if family is not None and family.fused_qkv is not None:
            out.append((getattr(attn, family.fused_qkv), families.qkv_sizes(attn.config)))
            continue
        q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
        if not isinstance(q, nn.Module) or not isinstance(k, nn.Module):
            raise ValueError(f"model layer {i} has no self_attn.q_proj / self_attn.k_proj; "
                             "calibrate the original model, not an already converted one")
        out.append((q, k))
    return out


class _Accumulator:
    """Running sums of one layer, kept on the device the layer's activations arrive on."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, collect_xtx: bool,
                 max_length: int | None = None, sample_sequences: int = 0,
                 collect_rope_fit: bool = False, collect_query_gram: bool = False):
        self.collect_query_gram = collect_query_gram
        self.query_gram: torch.Tensor | None = None
        self.shape_q = (num_heads, 2, head_dim // 2)
        self.shape_k = (num_kv_heads, 2, head_dim // 2)
        self.collect_xtx = collect_xtx
        self.max_length = max_length            # set: collect attention mass per distance
        self.collect_rope_fit = collect_rope_fit
        self.rope_fit: PairFitSums | None = None
        self.rotary = None
        self.last_q: torch.Tensor | None = None
        self.distance_sum: torch.Tensor | None = None
        self.queries = 0
        self.q_sum: torch.Tensor | None = None
        self.k_sum: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None
        self.q_tokens = 0
        self.k_tokens = 0
        self.sample_sequences = sample_sequences
        self.sample: dict[str, list] = {name: [] for name in
                                        ("q", "query_pos", "k", "v", "cos", "sin")}
        self.sample_attn = None

    @staticmethod
    def _pair_norm_sum(y: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        # The two dims of pair j sit d_h/2 apart (rotate-half), hence the (2, d_h/2) split.
        y = y.reshape(-1, *shape).to(torch.float64)
        return torch.linalg.vector_norm(y, dim=2).sum(dim=0)

    @property
    def needs_attention(self) -> bool:
        """Whether the original attention probabilities are recomputed (distances, fit)."""
        return bool(self.max_length) or self.collect_rope_fit

    def attn_pre_hook(self, module, args, kwargs):
        self.rotary = kwargs.get("position_embeddings")

    def q_hook(self, module, args, output):
        if self.needs_attention:
            self.last_q = output.detach()
        s = self._pair_norm_sum(output.detach(), self.shape_q)
        self.q_sum = s if self.q_sum is None else self.q_sum.add_(s)
        if self.collect_query_gram:
            h, d_h = self.shape_q[0], 2 * self.shape_q[2]
            q = output.detach().reshape(-1, h, d_h).transpose(0, 1).to(torch.float64)
            gram = q.transpose(1, 2) @ q                                   # (H, d_h, d_h)
            self.query_gram = gram if self.query_gram is None else self.query_gram.add_(gram)
        self.q_tokens += output.numel() // (self.shape_q[0] * 2 * self.shape_q[2])

    def k_hook(self, module, args, kwargs, output):
        s = self._pair_norm_sum(output.detach(), self.shape_k)
        self.k_sum = s if self.k_sum is None else self.k_sum.add_(s)
        self.k_tokens += output.numel() // (self.shape_k[0] * 2 * self.shape_k[2])
        if self.collect_xtx:
            x = args[0] if args else kwargs["input"]
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if self.xtx is None:
                self.xtx = x.T @ x
            else:
                self.xtx.addmm_(x.T, x)
        if self.needs_attention:
            self._add_attention_stats(self.last_q, output.detach())
            self.last_q = None

    def fused_hook(self, sizes, module, args, kwargs, output):
        """A fused q/k/v projection: its query and key rows, in the order of the q and k hooks."""
        q, k, _ = output.split(sizes, dim=-1)
        self.q_hook(module, args, q)
        self.k_hook(module, args, kwargs, k)

    def sample_pre_hook(self, module, args, kwargs):
        """Keep the attention inputs of the first ``sample_sequences`` sequences. The
        projections are recomputed from the weights (calling the modules would run the q/k
        hooks twice)."""
        taken = len(self.sample["q"])
        if taken >= self.sample_sequences:
            return
        from torch.nn.functional import linear

        x = (args[0] if args else kwargs["hidden_states"]).detach()
        x = x[:self.sample_sequences - taken]
        cos, sin = kwargs["position_embeddings"]
        h, h_kv, d_h = self.shape_q[0], self.shape_k[0], 2 * self.shape_q[2]
        b, t = x.shape[0], x.shape[1]
        queries = torch.arange(SAMPLE_QUERY_STRIDE - 1, t, SAMPLE_QUERY_STRIDE, device=x.device)

        proj = families.projections(module)

        def heads(p, n):
            y = linear(x, p[0], p[1]).view(b, t, n, d_h).transpose(1, 2)
            return y.to("cpu", torch.float32)

        q, k, v = heads(proj.q, h), heads(proj.k, h_kv), heads(proj.v, h_kv)
        for i in range(b):
            self.sample["q"].append(q[i][:, queries.cpu()].contiguous())
            self.sample["query_pos"].append(queries.cpu())
            self.sample["k"].append(k[i].contiguous())
            self.sample["v"].append(v[i].contiguous())
            self.sample["cos"].append(cos[min(i, cos.shape[0] - 1)].to("cpu", torch.float32))
            self.sample["sin"].append(sin[min(i, sin.shape[0] - 1)].to("cpu", torch.float32))
        self.sample_attn = module

    def _attention_sample(self) -> AttentionSample | None:
        if not self.sample["q"]:
            return None
        attn = self.sample_attn
        h, d_h = self.shape_q[0], 2 * self.shape_q[2]
        w_o = families.projections(attn).o[0].detach().to("cpu", torch.float64)
        blocks = w_o.view(w_o.shape[0], h, d_h).transpose(0, 1)              # (H, d, d_h)
        scaling = float(getattr(attn, "scaling", d_h ** -0.5))
        return AttentionSample(**self.sample, out_gram=blocks.transpose(1, 2) @ blocks,
                               scaling=scaling)

    def _add_attention_stats(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Fold the original attention's probability at each query-key distance, and the
        fitted RoPE correction's normal equations, into the sums; one sequence at a time so
        that only one (H, T, T) score tensor is alive."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if self.rotary is None:
            raise RuntimeError("self_attn was called without position_embeddings")
        h, h_kv, d_h = self.shape_q[0], self.shape_k[0], 2 * self.shape_q[2]
        b, t = q.shape[0], q.shape[1]
        cos, sin = self.rotary
        qs = q.reshape(b, t, h, d_h).transpose(1, 2).float()
        ks = k.reshape(b, t, h_kv, d_h).transpose(1, 2).float()
        cos, sin = cos.float().expand(b, -1, -1), sin.float().expand(b, -1, -1)
        pre_q, pre_k = qs, ks
        qs, ks = apply_rotary_pos_emb(qs, ks, cos, sin)
        ks = ks.repeat_interleave(h // h_kv, dim=1)
        pos = torch.arange(t, device=q.device)
        causal = pos[:, None] >= pos[None, :]
        if self.max_length and self.distance_sum is None:
            self.distance_sum = torch.zeros(h, self.max_length, dtype=torch.float64,
                                            device=q.device)
        for i in range(b):
            scores = (qs[i] @ ks[i].transpose(-1, -2)) * d_h ** -0.5
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            if self.max_length:
                self.distance_sum[:, :t] += _diagonal_sums(probs).double()
            if self.collect_rope_fit:
                sums = pair_fit_sums(pre_q[i], pre_k[i], cos[i], sin[i], probs)
                self.rope_fit = sums if self.rope_fit is None else self.rope_fit.add(sums)
        self.queries += b * t

    def result(self, layer_idx: int) -> LayerStats:
        if self.q_sum is None or self.k_sum is None or self.q_tokens != self.k_tokens:
            raise RuntimeError(f"layer {layer_idx}: q_proj/k_proj hooks saw {self.q_tokens} / "
                               f"{self.k_tokens} tokens; the layer was not run as expected")
        n = self.q_tokens
        mass = None
        if self.distance_sum is not None:
            mass = (self.distance_sum / self.queries).cpu()
        return LayerStats(
            q_pair_norm=(self.q_sum / n).cpu(),
            k_pair_norm=(self.k_sum / n).cpu(),
            xtx=None if self.xtx is None else self.xtx.cpu(),
            num_tokens=n,
            distance_mass=mass,
            attention_sample=self._attention_sample(),
            rope_fit=None if self.rope_fit is None else PairFitSums(
                gram=self.rope_fit.gram.cpu(), cross=self.rope_fit.cross.cpu()),
            query_gram=None if self.query_gram is None else self.query_gram.cpu(),
        )


def _diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """(H, T, T) lower-triangular -> (H, T): entry Delta sums probs[:, i, i - Delta] over i.

    Flipping the key axis and reading the zero-padded rows with a stride one shorter than the
    row turns every diagonal into a column (a skew view), so one sum replaces T gathers."""
    h, t, _ = probs.shape
    padded = torch.nn.functional.pad(probs.flip(-1), (0, t))             # (H, T, 2T)
    skew = padded.flatten(1)[:, :t * (2 * t - 1)].view(h, t, 2 * t - 1)  # [i, k] = Q[i, k - i]
    return skew[:, :, t - 1:].sum(1)


def _batches(seqs: list[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    # Only equal-length sequences share a batch: no padding, so no mask has to reach the hooks.
    batch: list[list[int]] = []
    for s in seqs:
        if batch and (len(batch) == batch_size or len(s) != len(batch[0])):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def calibrate(model: nn.Module, tokenizer, texts: str | Iterable[str], *, max_length: int = 512,
              max_sequences: int = 128, batch_size: int = 4, collect_xtx: bool = True,
              collect_distances: bool = False, collect_attention_sample: bool = False,
              sample_sequences: int = SAMPLE_SEQUENCES, collect_rope_fit: bool = False,
              collect_query_gram: bool = False, progress: bool = True) -> Calibration:
    """Run ``model`` over ``texts`` and collect the per-layer statistics of the conversion.

    model: a model of a supported family (mla_ext/families.py), or another Llama-style model with
        ``self_attn.q_proj``/``k_proj`` in every decoder layer, any
        dtype and device (a ``device_map``-split model works: each layer accumulates where it runs).
    tokenizer: a transformers tokenizer; ``texts``: a str or an iterable of str (read lazily).
    max_length / max_sequences: see :func:`token_sequences`.
    batch_size: sequences per forward pass (the last batches may be smaller).
    collect_xtx: also sum ``x x^T`` of the attention input (needed by the activation-aware SVD;
        costs ``d^2`` float64 per layer).
    collect_distances: also record the attention mass at each query-key distance (needed by the
        "rotation" RoPE selection; recomputes every layer's attention scores once more).
    collect_attention_sample: also keep every layer's pre-RoPE queries (every
        ``SAMPLE_QUERY_STRIDE``-th position), keys and values on the first ``sample_sequences``
        sequences (needed by the "greedy" RoPE selection; about
        ``sample_sequences * max_length * (2 H_kv + H / SAMPLE_QUERY_STRIDE) * d_h`` float32
        values per layer).
    collect_rope_fit: also sum the normal equations of the fitted correction of each dropped
        RoPE pair (``MLAConfig(rope_correction="fitted-...")``; recomputes every layer's
        attention scores once more, as collect_distances does, and shares them with it).
    collect_query_gram: also sum ``q q^T`` of every query head (needed by
        ``svd="activation-score"``; ``H d_h^2`` float64 per layer).
    Returns a :class:`Calibration` with float64 statistics on the CPU.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(sample_sequences, "sample_sequences")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model has no .config; a transformers model is needed")
    d, h, h_kv, head_dim = _attention_shape(config, "model.config")
    if head_dim % 2:
        raise ValueError(f"model head_dim must be even for RoPE pairs, got {head_dim}")
    layers = decoder_layers(model)
    projections = _projections(layers)
    seqs = token_sequences(tokenizer, texts, max_length=max_length, max_sequences=max_sequences)

    base = getattr(model, "base_model", model)
    device = base.get_input_embeddings().weight.device
    accs = [_Accumulator(h, h_kv, head_dim, collect_xtx,
                         max_length if collect_distances else None,
                         sample_sequences if collect_attention_sample else 0,
                         collect_rope_fit, collect_query_gram)
            for _ in projections]
    handles = []
    was_training = model.training
    try:
        for acc, (first, second) in zip(accs, projections):
            if isinstance(second, nn.Module):
                handles.append(first.register_forward_hook(acc.q_hook))
                handles.append(second.register_forward_hook(acc.k_hook, with_kwargs=True))
            else:
                handles.append(first.register_forward_hook(partial(acc.fused_hook, second),
                                                            with_kwargs=True))
        if collect_distances or collect_rope_fit:
            for acc, layer in zip(accs, layers):
                handles.append(layer.self_attn.register_forward_pre_hook(
                    acc.attn_pre_hook, with_kwargs=True))
        if collect_attention_sample:
            for acc, layer in zip(accs, layers):
                handles.append(layer.self_attn.register_forward_pre_hook(
                    acc.sample_pre_hook, with_kwargs=True))
        model.eval()
        batches = list(_batches(seqs, batch_size))
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                input_ids = torch.tensor(batch, dtype=torch.long, device=device)
                # The base model skips the LM head: its logits are large and not needed here.
                base(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    stats = [acc.result(i) for i, acc in enumerate(accs)]
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None and hasattr(rotary, "inv_freq"):
        for s in stats:
            s.inv_freq = rotary.inv_freq.detach().to("cpu", torch.float64).clone()
    return Calibration(layers=stats, num_tokens=stats[0].num_tokens, hidden_size=d, num_heads=h,
                       num_kv_heads=h_kv, head_dim=head_dim, sequences=seqs)
