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
from ..convert.rope_mixing import shared_layout, shared_rope
from ..cache_format import CacheFormat
from .attention import MLAAttention

# RoPE variants whose cos/sin are rotate-half over the full head (cat(freqs, freqs)); the
# conversion gathers the kept pairs from the model's own rotary output, so scaling is preserved.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
CONFIG_KEY = "mla_ext"
BF16_BYTES = 2  # the original K/V cache a budget is a fraction of is counted in bf16


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
    formats = config.format_candidates()
    stored = {} if formats is None else {"cache_format": formats[0].to_dict()}
    if config.rope_sharing == "shared":
        # the NoPE rows (and so the full rank) follow from the mix, at conversion
        most = h_kv * half
        k = most if config.rope_pairs is None else config.rope_pairs
        if k > most:
            raise ValueError(f"rope_pairs={k} exceeds the {most} mixed pairs of a shared RoPE "
                             f"key ({h_kv} KV heads x {half} pairs)")
        latent = None if config.d_kv is None else config.d_kv * h_kv
        return [{"rope_pairs": k, "latent_dim": latent, "rope_heads": 1, **stored}
                for _ in range(cfg.num_hidden_layers)]
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
    return [{"rope_pairs": r, "latent_dim": latent, **stored} for _ in range(cfg.num_hidden_layers)]


def _select_pairs(attn, config: MLAConfig, rope_pairs: int | None, stats) -> torch.Tensor:
    cfg = attn.config
    return select_rope_pairs(config.rope_strategy, rope_pairs, head_dim=_head_dim(cfg),
                             num_heads=cfg.num_attention_heads,
                             num_kv_heads=cfg.num_key_value_heads, stats=stats)


def model_rope_scaling(model) -> float:
    """The factor scaled RoPE (yarn, longrope) multiplies rotated q and k by (1 otherwise)."""
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    return float(getattr(rotary, "attention_scaling", 1.0))


def original_cache_bytes(model) -> int:
    """Bytes per token of ``model``'s original K/V cache in bf16, summed over the layers: what
    a ``cache_ratio`` is a fraction of."""
    cfg = model.config
    return len(_decoder_layers(model)) * 2 * cfg.num_key_value_heads * _head_dim(cfg) * BF16_BYTES


def cache_budget(model, config: MLAConfig) -> tuple[int, int]:
    """``(budget, max_cost)`` of ``config``'s cache budget for ``model``: bytes per token summed
    over the layers, and the most one layer's candidate may cost in the split search."""
    # int() of the product, as latent_budget does, so both modes share one budget arithmetic
    budget = config.cache_bytes_per_token or int(config.cache_ratio * original_cache_bytes(model))
    return budget, int(MAX_COST_FACTOR * budget / len(_decoder_layers(model)))


def split_search(model, config: MLAConfig, calibration,
                 rope_scaling: float | None = None) -> list[list]:
    """Every layer's split candidates of ``config``'s budget search (``rope_pairs="auto"``:
    RoPE keys, latent widths, cache formats and sharings, up to ``cache_budget``'s max_cost),
    each with its error measured on the calibration sequences (``measure_split_errors``)."""
    _, max_cost = cache_budget(model, config)
    formats = config.format_candidates()
    return measure_split_errors(model, calibration, strategy=config.rope_strategy,
                                svd=config.svd, max_cost=max_cost,
                                rope_pair_step=config.rope_pair_step,
                                rope_scaling=(model_rope_scaling(model) if rope_scaling is None
                                              else rope_scaling),
                                rope_correction=config.rope_correction,
                                key_weight=config.svd_key_weight,
                                formats=formats or (None,), sharing=config.sharings())


def budget_plan(model, config: MLAConfig, calibration, rope_scaling: float = 1.0) -> list[dict]:
    """Per-layer sizes under ``config.cache_ratio`` (convert/budget.py). ``rope_pairs="auto"``:
    each layer's split between RoPE pairs and latent width is chosen by the error it adds on
    calibration text; otherwise every layer keeps ``rope_pairs`` pairs and the latent width is
    spread over the layers by their spectra."""
    cfg = model.config
    d_h, h, h_kv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    layers = _decoder_layers(model)
    budget, _ = cache_budget(model, config)
    if config.rope_pairs == "auto":
        candidates = split_search(model, config, calibration, rope_scaling)
        return [c.sizes() for c in choose_splits(candidates, budget)]
    stats = calibration.layers if calibration is not None else [None] * len(layers)
    r = d_h // 2 if config.rope_pairs is None else config.rope_pairs
    if r > d_h // 2:
        raise ValueError(f"rope_pairs={r} exceeds the {d_h // 2} frequency pairs of head_dim {d_h}")
    budget = latent_budget(budget / original_cache_bytes(model), len(layers), h_kv, d_h,
                           [2 * r] * len(layers))
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


def shared_key_layout(attn, rope_pairs: int | None, strategy: str, stats):
    """The shared RoPE key layout (convert/rope_mixing.py) of one original attention layer:
    ``rope_pairs`` mixed components kept (None: all ``H_kv d_h / 2``)."""
    cfg = attn.config
    d_h, h, h_kv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    proj = families.projections(attn)
    kept = h_kv * (d_h // 2) if rope_pairs is None else rope_pairs
    order_by = "full" if kept == h_kv * (d_h // 2) else strategy
    shared = shared_rope(stats, proj.q[0], proj.k[0], h, h_kv, d_h, order_by)
    return shared_layout(shared, kept, h, h_kv, d_h)


def _layout_weights(attn, sizes: dict, config: MLAConfig, stats, rope_scaling: float):
    """The converted layer's RoPE pairs and projections, float64: (pairs, q weight, q bias,
    kr weight, kr bias, NoPE key weight, NoPE key bias, kn_rows, nope_dim, row Grams'
    transform). Per-head keys select rows of the original projections (2.1); a shared key
    maps them (2.5)."""
    cfg = attn.config
    d_h, h, h_kv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    proj = families.projections(attn)

    def weight(p):
        return p[0].detach().to("cpu", torch.float64)

    def bias(p):
        return None if p[1] is None else p[1].detach().to("cpu", torch.float64)

    w_q, w_k, b_q, b_k = weight(proj.q), weight(proj.k), bias(proj.q), bias(proj.k)
    if sizes.get("rope_heads", h_kv) == 1:
        layout = shared_key_layout(attn, sizes["rope_pairs"], config.rope_strategy, stats)
        # the fitted correction applies to the frequencies with no component kept
        for_transform = layout.kept_pairs(h_kv, d_h)
        pairs, kn_rows = layout.pairs, layout.kn_rows(h_kv, d_h)
    else:
        layout = None
        pairs = for_transform = _select_pairs(attn, config, sizes["rope_pairs"], stats)
        q_rows, kr_rows, kn_rows, q_nope_rows = converted_layout(pairs, d_h, h)
    transform = layer_query_transform(stats, config.rope_correction, for_transform, h, d_h)
    if transform is not None:
        # the fitted M of each dropped pair: the query's pair becomes M^T q[j]
        w_q = (transform @ w_q.view(h, d_h, -1)).reshape(h * d_h, -1)
        if b_q is not None:
            b_q = (transform @ b_q.view(h, d_h, 1)).reshape(h * d_h)
    if layout is None:
        new_q_w, new_q_b = w_q[q_rows].clone(), None if b_q is None else b_q[q_rows].clone()
        kr_w, kr_b = w_k[kr_rows], None if b_k is None else b_k[kr_rows]
        kn_w, kn_b = w_k[kn_rows], None if b_k is None else b_k[kn_rows]
        nope_dim = d_h - pairs.shape[1] * 2
    else:
        nope_dim, d_r = layout.nope_dim, 2 * layout.rope_pairs
        q_heads = w_q.view(h, d_h, -1)
        new_q_w = torch.cat([layout.q_rope @ q_heads, q_heads[:, layout.nope_dims]],
                            dim=1).reshape(h * (d_r + nope_dim), -1)
        new_q_b = None if b_q is None else torch.cat(
            [layout.q_rope @ b_q.view(h, d_h, 1), b_q.view(h, d_h, 1)[:, layout.nope_dims]],
            dim=1).reshape(-1)
        q_nope_rows = (torch.arange(h)[:, None] * (d_r + nope_dim) + d_r
                       + torch.arange(nope_dim)).reshape(-1)
        kr_w, kr_b = layout.k_rope @ w_k, None if b_k is None else layout.k_rope @ b_k
        kn_w, kn_b = layout.k_nope @ w_k, None if b_k is None else layout.k_nope @ b_k
    if rope_scaling != 1.0:
        # Scaled RoPE (yarn, longrope) multiplies every rotated q and k by the same factor; the
        # NoPE dims lose the rotation but keep that factor, folded into q once (squared).
        new_q_w[q_nope_rows] *= rope_scaling ** 2
        if new_q_b is not None:
            new_q_b[q_nope_rows] *= rope_scaling ** 2
    return (pairs, new_q_w, new_q_b, kr_w, kr_b, kn_w, kn_b, kn_rows, nope_dim, transform)


def _convert_layer(attn, layer_idx: int, sizes: dict, config: MLAConfig,
                   stats, rope_scaling: float) -> MLAAttention:
    cfg = attn.config
    proj = families.projections(attn)
    (pairs, new_q_w, new_q_b, kr_w, kr_b, kn_w, kn_b, kn_rows, nope_dim,
     transform) = _layout_weights(attn, sizes, config, stats, rope_scaling)
    w_v = proj.v[0].detach().to("cpu", torch.float64)
    b_v = proj.v[1]
    xtx = getattr(stats, "xtx", None) if config.svd.startswith("activation") else None
    grams = layer_row_grams(attn, stats, config.svd, kn_rows, transform, rope_scaling)
    latent = sizes["latent_dim"]
    if latent is None:  # full rank of a shared key's layout
        latent = max_rank(config.svd, kn_w.shape[0], w_v.shape[0], cfg.hidden_size)
    low = factorize_kv(kn_w, w_v, latent, config.svd, xtx=xtx,
                       row_grams=grams, key_weight=config.svd_key_weight)

    param = proj.q[0]
    biases = {p: getattr(proj, p)[1] is not None for p in families.PROJECTIONS}
    fmt = sizes.get("cache_format")
    mla = MLAAttention(cfg, layer_idx, pairs.shape[1], latent, biases=biases,
                       rope_heads=pairs.shape[0], nope_dim=nope_dim,
                       cache_format=None if fmt is None else CacheFormat.parse(fmt))
    with torch.no_grad():
        mla.q_proj.weight.copy_(new_q_w)
        mla.kr_proj.weight.copy_(kr_w)
        mla.kv_down.weight.copy_(low.w_down)
        mla.k_up.weight.copy_(low.w_uk)
        mla.v_up.weight.copy_(low.w_uv)
        mla.o_proj.weight.copy_(proj.o[0])
        if new_q_b is not None:
            mla.q_proj.bias.copy_(new_q_b)
        if kr_b is not None:
            mla.kr_proj.bias.copy_(kr_b)
            mla.k_up.bias.copy_(kn_b)
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
    plan = None if config.has_budget else plan_layers(model, config)
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
    rope_scaling = model_rope_scaling(model)
    if plan is None:
        plan = budget_plan(model, config, calibration, rope_scaling)

    converted = [
        _convert_layer(layer.self_attn, i, plan[i], config, stats[i], rope_scaling)
        for i, layer in enumerate(tqdm(layers, desc="converting layers", disable=not progress))
    ]
    for layer, mla, sizes in zip(layers, converted, plan):  # swap once every layer converted
        layer.self_attn = mla
        sizes["latent_dim"] = mla.latent_dim
        if mla.num_rope_heads != mla.num_kv_heads:
            sizes.update(rope_heads=mla.num_rope_heads, nope_dim=mla.nope_dim)
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
        fmt = sizes.get("cache_format")
        nope = sizes.get("nope_dim")
        mla = MLAAttention(model.config, i, int(sizes["rope_pairs"]), int(sizes["latent_dim"]),
                           rope_heads=sizes.get("rope_heads"),
                           nope_dim=None if nope is None else int(nope),
                           cache_format=None if fmt is None else CacheFormat.parse(fmt))
        mla.train(layer.self_attn.training)
        layer.self_attn = mla.to(device=old.device, dtype=old.dtype)
