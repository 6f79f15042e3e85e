"""A cache budget instead of fixed sizes.

The budget is a number of cache bytes per token summed over the layers (the original bf16
cache holds ``2 H_kv d_h`` values of 2 bytes per layer). A layer pays what it stores, scales
and zeros included (``CacheFormat.bytes_per_token``): its RoPE keys and its latent, whose
widths move in steps of ``LATENT_STEP`` channels (what the kernels and the quantization groups
need). Two ways to spend it:

- a fixed number of RoPE pairs in every layer, bf16, the latent handed out step by step to the
  layer whose relative truncation error (the squared tail of its possibly whitened spectrum,
  ``joint_spectrum``) drops the most (``allocate_latent_widths``, in values);
- the RoPE key, latent width and cache format chosen per layer (``measure_split_errors`` +
  ``choose_splits``): every candidate of a layer is scored by the error it adds to the
  residual stream on calibration text, its latent and keys read back through its format, and a
  knapsack over the layers picks the candidates of least total error whose bytes fill the
  budget. RoPE pairs, latent channels and formats have no common unit otherwise: the measured
  error is what makes them comparable. ``rope_pair_step`` keeps each layer's ``r`` a multiple
  of a step: 1 (the default) searches every ``r``; 4 gives ``d_r = 2r`` a multiple of 8.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .. import families
from ..cache_format import CacheFormat
from .calibration import decoder_layers
from .lowrank import JOINT_METHODS, max_rank, nested_joint_factors, score_row_grams
from .rope_correction import layer_query_transform
from .rope_mixing import shared_layout, shared_rope
from .rope_selection import converted_layout, select_rope_pairs

LATENT_STEP = 8
# The split search scores this many calibration sequences (re-running the original model), and
# in each every QUERY_STRIDE-th query position: the estimate needs many tokens, not all of them,
# and the attention of a sampled query still sees every earlier key.
SPLIT_SEQUENCES = 2
QUERY_STRIDE = 16
# Candidates cost at most this multiple of the budget's mean per layer: a layer that needs much
# more than its share would starve the others anyway.
MAX_COST_FACTOR = 1.5
# Kept pairs per layer move in steps of this many pairs by default: every r (the CUDA decode
# kernel takes every even d_r up to 64; 4 would keep d_r a multiple of 8).
ROPE_PAIR_STEP = 1


def latent_budget(cache_ratio: float, num_layers: int, num_kv_heads: int, head_dim: int,
                  rope_dims: list[int]) -> int:
    """Latent channels per token summed over all layers for ``cache_ratio`` of the original
    cache (``2 H_kv d_h`` values per layer), after every layer's RoPE keys."""
    if not 0 < cache_ratio <= 1:
        raise ValueError(f"cache_ratio must be in (0, 1], got {cache_ratio}")
    total = cache_ratio * num_layers * 2 * num_kv_heads * head_dim
    rope = sum(num_kv_heads * d_r for d_r in rope_dims)
    latent = int(total - rope)
    if latent < LATENT_STEP * num_layers:
        raise ValueError(f"cache_ratio={cache_ratio} leaves {latent} latent channels for "
                         f"{num_layers} layers after the RoPE keys ({rope}); each layer needs at "
                         f"least {LATENT_STEP}: raise cache_ratio or keep fewer RoPE pairs")
    return latent


def allocate_latent_widths(spectra: list[torch.Tensor], budget: int, *,
                           step: int = LATENT_STEP, maximum: list[int] | None = None) -> list[int]:
    """Latent width per layer (multiples of ``step``, at least ``step``, summing to at most
    ``budget``) that greedily minimises the sum of the layers' relative truncation errors."""
    n = len(spectra)
    if n == 0:
        raise ValueError("no layers to allocate")
    maximum = maximum or [s.numel() for s in spectra]
    energy = [s.double().pow(2) for s in spectra]
    total = [float(e.sum()) or 1.0 for e in energy]
    tail = [torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)]) for e in energy]

    def error(layer: int, width: int) -> float:
        return float(tail[layer][min(width, energy[layer].numel())]) / total[layer]

    widths = [min(step, maximum[i]) for i in range(n)]
    left = budget - sum(widths)
    if left < 0:
        raise ValueError(f"a budget of {budget} latent channels cannot give {n} layers {step} each")
    heap = [(-(error(i, w) - error(i, w + step)), i) for i, w in enumerate(widths)
            if w + step <= maximum[i]]
    heapq.heapify(heap)
    while heap and left >= step:
        _, i = heapq.heappop(heap)
        widths[i] += step
        left -= step
        if widths[i] + step <= maximum[i]:
            gain = error(i, widths[i]) - error(i, widths[i] + step)
            heapq.heappush(heap, (-gain, i))
    return widths


def layer_row_grams(attn, stats, svd: str, kn_rows: torch.Tensor,
                    transform: torch.Tensor | None, rope_scaling: float = 1.0):
    """The ``row_grams`` the low-rank factorization of ``svd`` needs for one layer's
    attention ``attn`` (None unless "activation-score"): its queries as the converted model
    computes them (``transform``: the fitted RoPE correction, ``rope_scaling``: scaled RoPE's
    factor) and its o_proj. The conversion and the budget's scorer both call it, so the
    searched split is scored with the factorization the conversion then makes."""
    if svd != "activation-score":
        return None
    gram = getattr(stats, "query_gram", None)
    if gram is None:
        raise ValueError("svd='activation-score' needs the queries' second moments: calibrate "
                         "with collect_query_gram=True")
    cfg = attn.config
    return score_row_grams(gram, families.projections(attn).o[0], kn_rows, cfg.num_key_value_heads,
                           attn.head_dim, transform=transform, rope_scaling=rope_scaling)


@dataclass
class SplitCandidate:
    """One way to spend a layer's cache: ``rope_pairs`` kept pairs per RoPE key, a
    ``latent_dim``-wide latent, stored in ``cache_format``; ``rope_heads`` None for one RoPE key
    per KV head, 1 for one key shared by all heads (2.5, ``rope_pairs`` then counts its mixed
    components); ``cost`` bytes per token (scales included); ``error`` the squared change of the
    layer's attention output over the squared residual stream, on the calibration sequences
    scored, with the latent and the keys read back through the format (None: values as the
    model computes them, counted as bf16, no format stored with the layer)."""

    rope_pairs: int
    latent_dim: int
    cost: int
    error: float = float("nan")
    rope_heads: int | None = None
    cache_format: CacheFormat | None = None

    def sizes(self) -> dict:
        """The layer's entry of a conversion plan."""
        out = {"rope_pairs": self.rope_pairs, "latent_dim": self.latent_dim}
        if self.rope_heads is not None:
            out["rope_heads"] = self.rope_heads
        if self.cache_format is not None:
            out["cache_format"] = self.cache_format.to_dict()
        return out


def _check_pair_step(pair_step, head_dim: int | None = None) -> None:
    if isinstance(pair_step, bool) or not isinstance(pair_step, int) or pair_step < 1:
        raise ValueError(f"rope_pair_step must be a positive int, got {pair_step!r}")
    if head_dim is not None and pair_step > head_dim // 2:
        raise ValueError(f"rope_pair_step={pair_step} exceeds the {head_dim // 2} frequency pairs "
                         f"of head_dim {head_dim}: no layer could keep a multiple of it")


# The most pairs the search gives a RoPE key: d_r = 2r <= 64, what the CUDA decode kernel takes
# (csrc/cuda/mla_decode/config.h kMaxRopeSteps); a fixed rope_pairs may still ask for more.
MAX_SEARCHED_PAIRS = 32
SHARINGS = ("per-head", "shared")


def width_step(fmt: CacheFormat, step: int = LATENT_STEP) -> int:
    """Latent widths of a format move in steps of ``step`` channels, or of its group size if
    that is larger (a width must hold whole groups; and then a narrower latent of the format is
    a prefix of a wider one after the round trip, which the search relies on)."""
    return max(step, fmt.group_size or 0) if fmt.quantized else step


def split_candidates(num_kv_heads: int, head_dim: int, max_cost: int,
                     max_latent: int, step: int = LATENT_STEP,
                     pair_step: int = 1, formats=(None,),
                     sharing=("per-head",)) -> list[SplitCandidate]:
    """Every ``(RoPE key, D_c, format)`` with ``r`` a multiple of ``pair_step`` (per-head keys:
    ``r <= min(d_h/2, MAX_SEARCHED_PAIRS)``; a shared key: a multiple of ``2 pair_step`` up to
    ``min(H_kv d_h/2, MAX_SEARCHED_PAIRS)``), ``D_c`` a multiple of ``width_step`` in ``[step, max_latent]``, a
    layout the CUDA decode kernel serves in that format, and a cost of at most ``max_cost``
    bytes per token.

    formats: the candidate CacheFormats, or spec strings; None (the default) counts bf16 and
    scores the values unrounded; sharing: "per-head" and / or "shared"."""
    _check_pair_step(pair_step, head_dim)
    for mode in sharing:
        if mode not in SHARINGS:
            raise ValueError(f"sharing must hold values of {SHARINGS}, got {mode!r}")
    formats = [None if f is None else CacheFormat.parse(f) for f in formats]
    if not formats:
        raise ValueError("formats must name at least one cache format")
    out = []
    for mode in sharing:
        heads = num_kv_heads if mode == "per-head" else 1
        most = (head_dim // 2) * (1 if mode == "per-head" else num_kv_heads)
        # a shared key keeps an even number of pairs (d_r a multiple of 4, as fp8 keys need):
        # its components are many, and the search's time grows with them
        r_step = pair_step if mode == "per-head" else 2 * pair_step
        for r in range(r_step, min(most, MAX_SEARCHED_PAIRS) + 1, r_step):
            for stored in formats:
                fmt = stored or CacheFormat()
                wstep = width_step(fmt, step)
                for width in range(wstep, max_latent + 1, wstep):
                    if fmt.quantized and width % fmt.group_for(width):
                        continue
                    cost = fmt.bytes_per_token(width, heads, 2 * r)
                    # the kernel's limits bind a stored format; unrounded values keep today's
                    # search (r up to MAX_SEARCHED_PAIRS, widths in steps of 8)
                    if cost <= max_cost and (stored is None
                                             or fmt.unservable_reason(width, 2 * r) is None):
                        out.append(SplitCandidate(r, width, cost, rope_heads=None if
                                                  mode == "per-head" else 1,
                                                  cache_format=stored))
    if not out:
        cheapest = min((f or CacheFormat()).bytes_per_token(
            width_step(f or CacheFormat(), step), num_kv_heads, 2 * pair_step) for f in formats)
        raise ValueError(f"no RoPE/latent split costs at most {max_cost} bytes per token "
                         f"(the cheapest per-head one, r={pair_step}, costs {cheapest})"
                         f": raise the cache budget or lower rope_pair_step")
    return out


class _LayerSplitScorer:
    """Hooks on one decoder layer that score all of its candidates on the tokens that pass.

    For each candidate the layer's attention is recomputed as the converted layer computes it
    (kept pairs rotated, the other dims position-free, NoPE keys and values through the
    rank-``D_c`` factorization, the latent and the RoPE keys read back through the candidate's
    cache format: ``CacheFormat.latent_round_trip`` / ``rope_round_trip``, the arithmetic of
    mla_ext/reference.py) and compared with the original attention output; errors are summed
    over the sampled query positions, next to the energy of the residual stream there.

    The work is shared between candidates: one selection and one SVD per RoPE key, the latent
    absorbed into the queries (``q^T W_uk c``: a ``D_c``-wide score per key instead of
    rebuilding the keys), each format's widths grown from one to the next (its round trip at
    the widest width holds every narrower one as a prefix), and values read as
    ``(P C) W_uv^T``. A NoPE key bias adds the same amount to every score of a query and drops
    out of the softmax."""

    def __init__(self, attn, stats, candidates, strategy, svd, rope_scaling,
                 rope_correction="none", key_weight=1.0):
        cfg = attn.config
        self.attn = attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rope_scaling = rope_scaling
        self.candidates = candidates
        # candidates of one RoPE key, grouped by format, by increasing width
        self.by_key: dict[tuple, dict[tuple, list[int]]] = {}
        order = sorted(range(len(candidates)), key=lambda i: candidates[i].latent_dim)
        for i in order:
            c = candidates[i]
            key = (c.rope_heads, c.rope_pairs)
            f = c.cache_format
            fmt = (None, None, None) if f is None else (f.rope, f.latent, f.group_size)
            self.by_key.setdefault(key, {}).setdefault(fmt, []).append(i)
        self.errors = torch.zeros(len(candidates), dtype=torch.float64)
        self.residual_energy = 0.0
        self.residual = None
        h_kv, d_h, h = self.num_kv_heads, self.head_dim, self.num_heads
        self.proj = proj = families.projections(attn)
        w_q = proj.q[0].detach().to("cpu", torch.float64)
        w_k = proj.k[0].detach().to("cpu", torch.float64)
        w_v = proj.v[0].detach().to("cpu", torch.float64)
        xtx = getattr(stats, "xtx", None) if svd.startswith("activation") else None
        device, dtype = proj.q[0].device, proj.q[0].dtype
        b_v = proj.v[1]
        self.value_bias = (None if b_v is None
                           else b_v.detach().view(h_kv, 1, d_h).to(device, dtype))
        shared = None
        self.per_key = {}
        for key, by_format in self.by_key.items():
            rope_heads, r = key
            widest = max(candidates[ix[-1]].latent_dim for ix in by_format.values())
            if rope_heads is None:
                pairs = select_rope_pairs(strategy, r, head_dim=d_h, num_heads=h,
                                          num_kv_heads=h_kv, stats=stats)
                kn_rows = converted_layout(pairs, d_h, h)[2]
                for_transform, w_kn, layout = pairs, w_k[kn_rows], None
            else:
                if shared is None:
                    shared = shared_rope(stats, w_q, w_k, h, h_kv, d_h, strategy)
                layout = shared_layout(shared, r, h, h_kv, d_h)
                for_transform = layout.kept_pairs(h_kv, d_h)
                kn_rows, w_kn = layout.kn_rows(h_kv, d_h), layout.k_nope @ w_k
            # the fitted correction of the dropped pairs, as the conversion folds it into q
            transform = layer_query_transform(stats, rope_correction, for_transform, h, d_h)
            up, down = nested_joint_factors(
                w_kn, w_v, svd, xtx=xtx,
                row_grams=layer_row_grams(attn, stats, svd, kn_rows, transform, rope_scaling),
                key_weight=key_weight)
            if widest > up.shape[1]:
                # a shared key's NoPE rows are known only now: widths beyond its rank go
                widest = up.shape[1]
                for fmt, indices in list(by_format.items()):
                    for i in indices:
                        if candidates[i].latent_dim > widest:
                            self.errors[i] = float("inf")
                    kept = [i for i in indices if candidates[i].latent_dim <= widest]
                    if kept:
                        by_format[fmt] = kept
                    else:
                        del by_format[fmt]
            up, down = up[:, :widest], down[:widest]
            up_v = up[kn_rows.numel():]
            if layout is None:
                # up's key rows back at their places in W_k (zero at the kept dims), per KV head
                up_k = up.new_zeros(h_kv * d_h, widest).index_copy_(0, kn_rows,
                                                                      up[:kn_rows.numel()])
                kept = torch.zeros(h_kv, d_h, dtype=torch.bool)
                for g in range(h_kv):
                    kept[g, pairs[g]] = kept[g, pairs[g] + d_h // 2] = True
                rope = kept.view(h_kv, 1, d_h).to(device)
            else:
                # NoPE keys meet the queries' original dims (zero rows elsewhere), per KV head
                up_k = up.new_zeros(h_kv * d_h, widest).index_copy_(0, kn_rows,
                                                                      up[:kn_rows.numel()])
                rope = (layout.q_rope.to(device, dtype), layout.k_rope.to(device, dtype),
                        layout.pairs[0].to(device))
            self.per_key[key] = (rope, up_k.view(h_kv, d_h, widest).to(device, dtype),
                                 up_v.view(h_kv, d_h, widest).transpose(1, 2).to(device, dtype),
                                 down.to(device, dtype),
                                 None if transform is None else transform.to(device, dtype))

    def residual_hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.residual = hidden.detach()

    def attention_hook(self, module, args, kwargs, output):
        with torch.no_grad():
            self._score(args[0] if args else kwargs["hidden_states"],
                        kwargs["position_embeddings"], output[0])

    def _rope_scores(self, rope, x, q_heads, q_rot, k_rot, cos, sin, queries, fmt_rope):
        """RoPE part of the scores (b, H_kv, group * Q, T), keys read back through fmt_rope."""
        b, t, _ = x.shape
        h, h_kv, d_h = self.num_heads, self.num_kv_heads, self.head_dim
        group, n_q = h // h_kv, queries.numel()
        if isinstance(rope, torch.Tensor):   # per-head keys: the kept dims of q and k
            keys = k_rot * rope
            if fmt_rope is not None:
                keys = CacheFormat(rope=fmt_rope).rope_round_trip(
                    keys.transpose(1, 2)).transpose(1, 2).to(k_rot.dtype)
            return (q_rot.reshape(b, h_kv, group * n_q, d_h) * rope) @ keys.transpose(-1, -2)
        q_map, k_map, freqs = rope
        half = d_h // 2
        # compact rotate-half on the shared key's pairs, angles of their frequencies
        c, s_ = cos[..., :half][..., freqs], sin[..., :half][..., freqs]      # (1 or b, T, K)

        def rotate(v, c, s_):
            k = v.shape[-1] // 2
            v1, v2 = v[..., :k], v[..., k:]
            return torch.cat([v1 * c - v2 * s_, v2 * c + v1 * s_], dim=-1)

        k_full = families.project(self.proj.k, x)                           # (b, T, H_kv d_h)
        k_sh = rotate(k_full @ k_map.T, c, s_)                              # (b, T, 2K)
        keys = k_sh if fmt_rope is None else \
            CacheFormat(rope=fmt_rope).rope_round_trip(k_sh[:, :, None])[:, :, 0]
        q_sh = torch.einsum("bhqd,hkd->bhqk", q_heads, q_map)              # (b, H, Q, 2K)
        q_sh = rotate(q_sh, c[:, queries][:, None], s_[:, queries][:, None])
        scores = q_sh @ keys.to(q_sh.dtype)[:, None].transpose(-1, -2)     # (b, H, Q, T)
        return scores.reshape(b, h_kv, group * n_q, t)

    def _score(self, x, position_embeddings, reference):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = self.attn
        b, t, _ = x.shape
        h, h_kv, d_h = self.num_heads, self.num_kv_heads, self.head_dim
        group = h // h_kv
        queries = torch.arange(QUERY_STRIDE - 1, t, QUERY_STRIDE, device=x.device)
        n_q = queries.numel()
        if n_q == 0:
            return
        self.residual_energy += float(self.residual[:, queries].double().pow(2).sum())
        reference = reference[:, queries]
        cos, sin = position_embeddings
        q_heads = families.project(self.proj.q, x).view(b, t, h, d_h).transpose(1, 2)[:, :, queries]
        k = families.project(self.proj.k, x).view(b, t, h_kv, d_h).transpose(1, 2)
        q_rot, _ = apply_rotary_pos_emb(q_heads, q_heads, cos[:, queries], sin[:, queries])
        _, k_rot = apply_rotary_pos_emb(k, k, cos, sin)
        # the query heads of a KV head side by side: (b, H_kv, group * Q, d_h)
        q = q_heads.reshape(b, h_kv, group * n_q, d_h)
        visible = torch.arange(t, device=x.device)[None, :] <= queries[:, None]   # (Q, T)
        mask = torch.zeros(n_q, t, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~visible, float("-inf")).repeat(group, 1)
        for key, by_format in self.by_key.items():
            rope, up_k, up_v, down, transform = self.per_key[key]
            # the rest position-free, through the latent, keeping scaled RoPE's factor
            # (squared, as the conversion folds it into q_proj)
            q_nope = q if transform is None else (
                (q_heads @ transform.transpose(-1, -2)).reshape(b, h_kv, group * n_q, d_h))
            q_lat = (q_nope * self.rope_scaling ** 2) @ up_k                 # (b, H_kv, gQ, R)
            latent = x @ down.T                                              # (b, T, R)
            rope_scores, read_back = {}, {}
            for (fmt_rope, fmt_latent, group_size), indices in by_format.items():
                if fmt_rope not in rope_scores:
                    rope_scores[fmt_rope] = self._rope_scores(rope, x, q_heads, q_rot, k_rot,
                                                              cos, sin, queries, fmt_rope)
                widest = self.candidates[indices[-1]].latent_dim
                if (fmt_latent, group_size, widest) not in read_back:
                    stored = latent[..., :widest] if fmt_latent is None else CacheFormat(
                        fmt_latent, group_size).latent_round_trip(latent[..., :widest])
                    read_back[fmt_latent, group_size, widest] = \
                        stored.to(latent.dtype)[:, None]                      # (b, 1, T, widest)
                stored = read_back[fmt_latent, group_size, widest]
                scores, done = rope_scores[fmt_rope], 0
                for i in indices:
                    width = self.candidates[i].latent_dim
                    scores = scores + (q_lat[..., done:width]
                                       @ stored[..., done:width].transpose(-1, -2))
                    done = width
                    probs = (scores * attn.scaling + mask).softmax(-1)
                    out = (probs @ stored[..., :width]) @ up_v[:, :width]   # (b, H_kv, gQ, d_h)
                    if self.value_bias is not None:
                        out = out + self.value_bias
                    out = out.reshape(b, h, n_q, d_h).transpose(1, 2).reshape(b, n_q, h * d_h)
                    self.errors[i] += float((families.project(self.proj.o, out) - reference)
                                            .double().pow(2).sum())
        self.residual = None


def measure_split_errors(model, calibration, *, strategy: str, svd: str, max_cost: int,
                         num_sequences: int = SPLIT_SEQUENCES, rope_pair_step: int = 1,
                         rope_scaling: float = 1.0,
                         rope_correction: str = "none",
                         key_weight: float = 1.0, formats=(None,),
                         sharing=("per-head",)) -> list[list[SplitCandidate]]:
    """Score every RoPE/latent split of every layer of the original ``model`` on the first
    ``num_sequences`` calibration sequences; returns each layer's candidates, errors filled.

    strategy: the RoPE selection (its pairs for each r); svd: one of ``JOINT_METHODS``.
    max_cost: the largest cost (bytes per token) a candidate may have.
    rope_pair_step: only ``r`` that are multiples of it (1: every ``r``; 4 keeps ``d_r`` a
        multiple of 8).
    rope_correction: the MLAConfig option; a fitted correction of the dropped pairs is applied
        to the queries as the conversion folds it into q_proj.
    key_weight: the key rows' weight of svd="activation-score" (``MLAConfig.svd_key_weight``).
    formats, sharing: the cache formats and RoPE-key sharings searched (``split_candidates``).
    """
    if svd not in JOINT_METHODS:
        raise ValueError(f"a per-layer split needs svd in {JOINT_METHODS}, got {svd!r}")
    if not calibration.sequences:
        raise ValueError("calibration has no token sequences (it predates them): calibrate "
                         "again with mla_ext.calibrate to choose a per-layer split")
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be a positive int, got {num_sequences!r}")
    _check_pair_step(rope_pair_step)
    layers = decoder_layers(model)
    cfg = model.config
    scorers, handles = [], []
    for layer, stats in zip(layers, calibration.layers):
        attn = layer.self_attn
        h_kv, d_h = cfg.num_key_value_heads, attn.head_dim
        widest = max_rank(svd, h_kv * d_h, h_kv * d_h, cfg.hidden_size)
        # a shared key's NoPE rows are at most H_kv d_h; the scorer drops widths beyond its rank
        candidates = [c for c in split_candidates(h_kv, d_h, max_cost, widest,
                                                  pair_step=rope_pair_step, formats=formats,
                                                  sharing=sharing)
                      if c.rope_heads == 1
                      or c.latent_dim <= max_rank(svd, h_kv * (d_h - 2 * c.rope_pairs),
                                                  h_kv * d_h, cfg.hidden_size)]
        scorers.append(_LayerSplitScorer(attn, stats, candidates, strategy, svd, rope_scaling,
                                         rope_correction, key_weight))
    base = getattr(model, "base_model", model)
    device = base.get_input_embeddings().weight.device
    was_training = model.training
    try:
        for layer, scorer in zip(layers, scorers):
            handles.append(layer.register_forward_pre_hook(scorer.residual_hook,
                                                           with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(scorer.attention_hook,
                                                                 with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for seq in calibration.sequences[:num_sequences]:
                base(input_ids=torch.tensor([seq], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = []
    for scorer in scorers:
        energy = scorer.residual_energy or 1.0
        for cand, err in zip(scorer.candidates, scorer.errors.tolist()):
            cand.error = err / energy
        out.append(scorer.candidates)
    return out


def least_error_per_cost(layer: list[SplitCandidate]) -> list[SplitCandidate]:
    """For each cost, the candidate of least error (ties: the first): the knapsack needs no
    other, as any choice can swap a candidate for one of the same cost and less error."""
    best: dict[int, SplitCandidate] = {}
    for cand in layer:
        if cand.cost not in best or cand.error < best[cand.cost].error:
            best[cand.cost] = cand
    return [best[cost] for cost in sorted(best)]


def choose_splits(candidates: list[list[SplitCandidate]], budget: int, *,
                  slack: int = 2 * LATENT_STEP) -> list[SplitCandidate]:
    """One candidate per layer, of least summed error among the choices whose total cost lies
    in ``(budget - slack, budget]`` (bytes; exact knapsack over the total, by dynamic
    programming over each layer's ``least_error_per_cost``)."""
    if not candidates or any(not layer for layer in candidates):
        raise ValueError("every layer needs at least one candidate")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    fronts = [least_error_per_cost(layer) for layer in candidates]
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer in fronts:
        options = torch.full((len(layer), budget + 1), inf, dtype=torch.float64)
        for j, cand in enumerate(layer):
            if cand.cost <= budget:
                options[j, cand.cost:] = best[:budget + 1 - cand.cost] + cand.error
        best, choice = options.min(dim=0)
        choices.append(choice)
    low = max(0, budget - slack + 1)
    window = best[low:]
    if not torch.isfinite(window).any():
        cheapest = sum(min(c.cost for c in layer) for layer in candidates)
        raise ValueError(f"no split of the layers costs between {low} and {budget} bytes per "
                         f"token (the cheapest costs {cheapest}): change the cache budget")
    total = low + int(window.argmin())
    picked = []
    for layer, choice in zip(reversed(fronts), reversed(choices)):
        cand = layer[int(choice[total])]
        picked.append(cand)
        total -= cand.cost
    return picked[::-1]
