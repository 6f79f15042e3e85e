"""convert_to_mla: swap every attention layer of a model for an MLAAttention, in one call.

The attention weights are read through the model family's adapter (mla_ext/families.py), so
Llama, Mistral, Qwen2, Gemma and Phi-3 share this one code path.

Everything that can be wrong with the request (model type, RoPE variant, sizes, calibration) is
checked before the first module is touched, so a failed conversion leaves the model as it was.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import families
from ..checks import require_model
from ..config import MLAConfig
from ..convert import factorize_kv, max_rank, select_rope_pairs
from ..convert.rope_selection import converted_layout
from ..convert.calibration import Calibration
from ..convert.budget import (LATENT_STEP, MAX_COST_FACTOR, allocate_latent_widths,
                              choose_splits, latent_budget, layer_row_grams,
                              measure_split_errors)
from ..convert.lowrank import joint_spectrum
from ..convert.rope_correction import layer_query_transform
from .attention import MLAAttention

# RoPE variants whose cos/sin are rotate-half over the full head (cat(freqs, freqs)); the
# conversion gathers the kept pairs from the model's own rotary output, so scaling is preserved.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
CONFIG_KEY = "mla_ext"


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers; "
                         "mla_ext converts decoder-only causal LMs of the families "
                         f"{', '.join(f.causal_lm for f in families.FAMILIES)}")
    return layers


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _check_model(model) -> None:
    layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(getattr(layer, "self_attn", None), MLAAttention):
            raise ValueError(f"layer {i} is already converted to MLA")
    reason = families.unsupported_reason(model, layers)
    if reason is not None:
        raise ValueError(reason)
    supported = families.supported_attention_names()
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if families.family_of(attn) is None:
            raise ValueError(f"layer {i}'s attention is {type(attn).__name__}, not one of "
                             f"{', '.join(supported)}: mla_ext converts the attention of these "
                             "families only")
    rope = _rope_parameters(model.config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if _head_dim(model.config) % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {_head_dim(model.config)}")


def plan_layers(model, config: MLAConfig) -> list[dict]:
    """Per-layer sizes ({"rope_pairs": r, "latent_dim": D_c}) for ``config``; ValueError when a
    size does not fit the model."""
    cfg = model.config
    d_h, h_kv, d = _head_dim(cfg), cfg.num_key_value_heads, cfg.hidden_size
    half = d_h // 2
    r = half if config.rope_pairs is None else config.rope_pairs
    if r > half:
        raise ValueError(f"rope_pairs={r} exceeds the {half} frequency pairs of head_dim {d_h}")
    rows_k, rows_v = h_kv * (d_h - 2 * r), h_kv * d_h
    limit = max_rank(config.svd, rows_k, rows_v, d)
    latent = limit if config.d_kv is None else config.d_kv * h_kv
    if latent > limit:
        raise ValueError(f"d_kv={config.d_kv} gives a latent of {latent} = d_kv * {h_kv} KV heads, "
                         f"above the full rank {limit} of svd={config.svd!r} for this model "
                         f"(d_kv <= {limit // h_kv}); use d_kv=None for full rank")
    if config.svd.endswith("split") and latent % 2:
        raise ValueError(f"svd={config.svd!r} splits the latent in two halves: D_c={latent} must be even")
    return [{"rope_pairs": r, "latent_dim": latent} for _ in range(cfg.num_hidden_layers)]


def _select_pairs(attn, config: MLAConfig, rope_pairs: int | None, stats) -> torch.Tensor:
    cfg = attn.config
    return select_rope_pairs(config.rope_strategy, rope_pairs, head_dim=_head_dim(cfg),
                             num_heads=cfg.num_attention_heads,
                             num_kv_heads=cfg.num_key_value_heads, stats=stats)


def budget_plan(model, config: MLAConfig, calibration, rope_scaling: float = 1.0) -> list[dict]:
    """Per-layer sizes under ``config.cache_ratio`` (convert/budget.py). ``rope_pairs="auto"``:
    each layer's split between RoPE pairs and latent width is chosen by the error it adds on
    calibration text; otherwise every layer keeps ``rope_pairs`` pairs and the latent width is
    spread over the layers by their spectra."""
    cfg = model.config
    d_h, h, h_kv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    layers = _decoder_layers(model)
    original_values = len(layers) * 2 * h_kv * d_h
    if config.rope_pairs == "auto":
        # int() of the product, as latent_budget does, so both modes share one budget arithmetic
        budget = int(config.cache_ratio * original_values)
        max_cost = int(MAX_COST_FACTOR * budget / len(layers))
        candidates = measure_split_errors(model, calibration, strategy=config.rope_strategy,
                                          svd=config.svd, max_cost=max_cost,
                                          rope_pair_step=config.rope_pair_step,
                                          rope_scaling=rope_scaling,
                                          rope_correction=config.rope_correction,
                                          key_weight=config.svd_key_weight)
        return [{"rope_pairs": c.rope_pairs, "latent_dim": c.latent_dim}
                for c in choose_splits(candidates, budget)]
    stats = calibration.layers if calibration is not None else [None] * len(layers)
    r = d_h // 2 if config.rope_pairs is None else config.rope_pairs
    if r > d_h // 2:
        raise ValueError(f"rope_pairs={r} exceeds the {d_h // 2} frequency pairs of head_dim {d_h}")
    budget = latent_budget(config.cache_ratio, len(layers), h_kv, d_h, [2 * r] * len(layers))
    spectra, maximum = [], []
    for layer, layer_stats in zip(layers, stats):
        attn = layer.self_attn
        pairs = _select_pairs(attn, config, r, layer_stats)
        kn_rows = converted_layout(pairs, d_h, h)[2]
        proj = families.projections(attn)
        w_k = proj.k[0].detach().to("cpu", torch.float64)
        w_v = proj.v[0].detach().to("cpu", torch.float64)
        xtx = getattr(layer_stats, "xtx", None) if config.svd.startswith("activation") else None
        transform = layer_query_transform(layer_stats, config.rope_correction, pairs, h, d_h)
        grams = layer_row_grams(attn, layer_stats, config.svd, kn_rows, transform, rope_scaling)
        spectra.append(joint_spectrum(w_k[kn_rows], w_v, config.svd, xtx=xtx, row_grams=grams,
                                      key_weight=config.svd_key_weight))
        top = max_rank(config.svd, len(kn_rows), w_v.shape[0], cfg.hidden_size)
        maximum.append(top - top % LATENT_STEP)
    widths = allocate_latent_widths(spectra, budget, maximum=maximum)
    return [{"rope_pairs": r, "latent_dim": w} for w in widths]


def _convert_layer(attn, layer_idx: int, sizes: dict, config: MLAConfig,
                   stats, rope_scaling: float) -> MLAAttention:
    cfg = attn.config
    d_h, h = _head_dim(cfg), cfg.num_attention_heads
    pairs = _select_pairs(attn, config, sizes["rope_pairs"], stats)
    q_rows, kr_rows, kn_rows, q_nope_rows = converted_layout(pairs, d_h, h)

    family = families.family_of(attn)
    proj = family.projections(attn)

    def weight(p):
        return p[0].detach().to("cpu", torch.float64)

    def bias(p):
        return None if p[1] is None else p[1].detach().to("cpu", torch.float64)

    w_q, w_k, w_v = weight(proj.q), weight(proj.k), weight(proj.v)
    b_q, b_k, b_v = bias(proj.q), bias(proj.k), bias(proj.v)
    transform = layer_query_transform(stats, config.rope_correction, pairs, h, d_h)
    if transform is not None:
        # the fitted M of each dropped pair: the query's pair becomes M^T q[j]
        w_q = (transform @ w_q.view(h, d_h, -1)).reshape(h * d_h, -1)
        if b_q is not None:
            b_q = (transform @ b_q.view(h, d_h, 1)).reshape(h * d_h)
    xtx = getattr(stats, "xtx", None) if config.svd.startswith("activation") else None
    grams = layer_row_grams(attn, stats, config.svd, kn_rows, transform, rope_scaling)
    low = factorize_kv(w_k[kn_rows], w_v, sizes["latent_dim"], config.svd, xtx=xtx,
                       row_grams=grams, key_weight=config.svd_key_weight)

    new_q_w, new_q_b = w_q[q_rows].clone(), None if b_q is None else b_q[q_rows].clone()
    if rope_scaling != 1.0:
        # Scaled RoPE (yarn, longrope) multiplies every rotated q and k by the same factor; the
        # NoPE dims lose the rotation but keep that factor, folded into q once (squared).
        new_q_w[q_nope_rows] *= rope_scaling ** 2
        if new_q_b is not None:
            new_q_b[q_nope_rows] *= rope_scaling ** 2

    param = proj.q[0]
    biases = {p: getattr(proj, p)[1] is not None for p in families.PROJECTIONS}
    mla = MLAAttention(cfg, layer_idx, sizes["rope_pairs"], sizes["latent_dim"], biases=biases)
    with torch.no_grad():
        mla.q_proj.weight.copy_(new_q_w)
        mla.kr_proj.weight.copy_(w_k[kr_rows])
        mla.kv_down.weight.copy_(low.w_down)
        mla.k_up.weight.copy_(low.w_uk)
        mla.v_up.weight.copy_(low.w_uv)
        mla.o_proj.weight.copy_(proj.o[0])
        if b_q is not None:
            mla.q_proj.bias.copy_(new_q_b)
        if b_k is not None:
            mla.kr_proj.bias.copy_(b_k[kr_rows])
            mla.k_up.bias.copy_(b_k[kn_rows])
        if b_v is not None:
            mla.v_up.bias.copy_(b_v)
        if proj.o[1] is not None:
            mla.o_proj.bias.copy_(proj.o[1])
        mla.rope_pairs.copy_(pairs)
    mla.train(attn.training)
    return mla.to(device=param.device, dtype=param.dtype)


def convert_to_mla(model, config: MLAConfig | None = None, calibration=None,
                   progress: bool = True):
    """Convert ``model`` to MLA in place and return it: a transformers LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM or Phi3ForCausalLM (mla_ext/families.py;
    anything else, or attention these cannot express, is a ValueError before any change).

    config: the MLAConfig (default ``MLAConfig()``: rotation-aware RoPE and activation-aware SVD,
        the RoPE pairs and latent width of each layer chosen under a -81.25 % cache budget).
    calibration: ``mla_ext.calibrate(model, tokenizer, texts)`` of this model, needed by the
        2-norm RoPE selection and the activation-aware SVD.
    The decoder layers then call MLAAttention unchanged; ``model.config.mla_ext`` records the
    settings so that ``save_pretrained`` / ``load_pretrained`` can rebuild the model.
    """
    config = config or MLAConfig()
    if not isinstance(config, MLAConfig):
        raise TypeError(f"config must be an MLAConfig, got {type(config).__name__}")
    require_model(model)
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be what mla_ext.calibrate returns, got "
                        f"{type(calibration).__name__}")
    _check_model(model)
    plan = None if config.cache_ratio is not None else plan_layers(model, config)
    layers = _decoder_layers(model)
    if config.needs_calibration:
        if calibration is None:
            raise ValueError(f"rope_strategy={config.rope_strategy!r} / svd={config.svd!r} / "
                             f"rope_correction={config.rope_correction!r} need calibration "
                             "statistics: pass calibration=mla_ext.calibrate(model, tokenizer, "
                             "texts, **config.calibration_options())")
        calibration.check_matches(model.config)
        if config.svd.startswith("activation") and any(s.xtx is None for s in calibration.layers):
            raise ValueError(f"svd={config.svd!r} needs activation statistics: calibrate with "
                             "collect_xtx=True")
        if config.needs_distances and any(s.distance_mass is None for s in calibration.layers):
            raise ValueError('rope_strategy="rotation" needs attention distances: calibrate '
                             "with collect_distances=True")
        if config.svd == "activation-score" and any(s.query_gram is None
                                                     for s in calibration.layers):
            raise ValueError("svd='activation-score' needs the queries' second moments: "
                             "calibrate with collect_query_gram=True")
        if config.needs_rope_fit and any(s.rope_fit is None for s in calibration.layers):
            raise ValueError(f"rope_correction={config.rope_correction!r} needs the fit's "
                             "statistics: calibrate with collect_rope_fit=True")
    stats = calibration.layers if calibration is not None else [None] * len(layers)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if plan is None:
        plan = budget_plan(model, config, calibration, rope_scaling)

    converted = [
        _convert_layer(layer.self_attn, i, plan[i], config, stats[i], rope_scaling)
        for i, layer in enumerate(tqdm(layers, desc="converting layers", disable=not progress))
    ]
    for layer, mla in zip(layers, converted):  # swap only once every layer converted
        layer.self_attn = mla
    setattr(model.config, CONFIG_KEY, {"mla_config": config.to_dict(), "layers": plan})
    return model


def build_mla_structure(model, layer_sizes: list[dict]) -> None:
    """Replace each attention layer by an MLAAttention of the given sizes with uninitialised
    weights (loading a checkpoint fills them); the biases follow the model family's attention."""
    layers = _decoder_layers(model)
    if len(layer_sizes) != len(layers):
        raise ValueError(f"{len(layer_sizes)} layer sizes for a model of {len(layers)} layers")
    for i, (layer, sizes) in enumerate(zip(layers, layer_sizes)):
        old = next(layer.self_attn.parameters())
        mla = MLAAttention(model.config, i, int(sizes["rope_pairs"]), int(sizes["latent_dim"]))
        mla.train(layer.self_attn.training)
        layer.self_attn = mla.to(device=old.device, dtype=old.dtype)
