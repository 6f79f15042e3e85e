"""A cache budget instead of fixed sizes.

The budget is a number of cached values per token summed over the layers (the original cache
holds ``2 H_kv d_h`` per layer). A layer pays ``H_kv * d_r`` for its RoPE keys and ``D_c`` for
its latent; latent widths move in steps of ``LATENT_STEP`` channels (what the kernels and the
quantization groups need). Two ways to spend it:

- a fixed number of RoPE pairs in every layer, the latent handed out step by step to the layer
  whose relative truncation error (the squared tail of its possibly whitened spectrum,
  ``joint_spectrum``) drops the most (``allocate_latent_widths``);
- the split between RoPE pairs and latent chosen per layer too (``measure_split_errors`` +
  ``choose_splits``): every candidate ``(r, D_c)`` of a layer is scored by the error it adds to
  the residual stream on calibration text, and a knapsack over the layers picks the candidates
  of least total error whose cache fills the budget. RoPE pairs and latent channels have no
  common unit otherwise: the measured error is what makes them comparable. ``rope_pair_step``
  keeps each layer's ``r`` a multiple of a step: 1 (the default) searches every ``r``; 4 gives
  ``d_r = 2r`` a multiple of 8.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .. import families
from .calibration import decoder_layers
from .lowrank import JOINT_METHODS, max_rank, nested_joint_factors, score_row_grams
from .rope_correction import layer_query_transform
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
    """One way to spend a layer's cache: ``rope_pairs`` kept pairs per KV head and a
    ``latent_dim``-wide latent; ``cost`` cached values per token, ``H_kv * 2 r + D_c``; ``error``
    the squared change of the layer's attention output over the squared residual stream, on the
    calibration sequences scored."""

    rope_pairs: int
    latent_dim: int
    cost: int
    error: float = float("nan")


def _check_pair_step(pair_step, head_dim: int | None = None) -> None:
    if isinstance(pair_step, bool) or not isinstance(pair_step, int) or pair_step < 1:
        raise ValueError(f"rope_pair_step must be a positive int, got {pair_step!r}")
    if head_dim is not None and pair_step > head_dim // 2:
        raise ValueError(f"rope_pair_step={pair_step} exceeds the {head_dim // 2} frequency pairs "
                         f"of head_dim {head_dim}: no layer could keep a multiple of it")


# The most pairs the search gives a layer: d_r = 2r <= 64, what the CUDA decode kernel takes
# (csrc/cuda/mla_decode/config.h kMaxRopeSteps); a fixed rope_pairs may still ask for more.
MAX_SEARCHED_PAIRS = 32


def split_candidates(num_kv_heads: int, head_dim: int, max_cost: int,
                     max_latent: int, step: int = LATENT_STEP,
                     pair_step: int = 1) -> list[SplitCandidate]:
    """Every ``(r, D_c)`` with ``r`` a multiple of ``pair_step`` in
    ``[pair_step, min(d_h/2, MAX_SEARCHED_PAIRS)]``, ``D_c`` a multiple of ``step`` in
    ``[step, max_latent]`` and a cost of at most ``max_cost``."""
    _check_pair_step(pair_step, head_dim)
    out = []
    for r in range(pair_step, min(head_dim // 2, MAX_SEARCHED_PAIRS) + 1, pair_step):
        rope = num_kv_heads * 2 * r
        for width in range(step, max_latent + 1, step):
            if rope + width <= max_cost:
                out.append(SplitCandidate(r, width, rope + width))
    if not out:
        raise ValueError(f"no RoPE/latent split costs at most {max_cost} values per token "
                         f"(the cheapest, r={pair_step}, costs {num_kv_heads * 2 * pair_step + step})"
                         f": raise cache_ratio or lower rope_pair_step")
    return out


class _LayerSplitScorer:
    """Hooks on one decoder layer that score all of its candidates on the tokens that pass.

    For each candidate the layer's attention is recomputed as the converted layer computes it
    (kept pairs rotated, the other dims position-free, NoPE keys and values through the
    rank-``D_c`` factorization) and compared with the original attention output; errors are
    summed over the sampled query positions, next to the energy of the residual stream there.

    The work is shared between candidates: one selection and one SVD per ``r`` (every width is
    a prefix of it), the latent absorbed into the queries (``q^T W_uk c``: a ``D_c``-wide score
    per key instead of rebuilding the keys), scores grown 8 latent channels at a time from one
    width to the next, and values read as ``(P C) W_uv^T``. A NoPE key bias adds the same
    amount to every score of a query and drops out of the softmax."""

    def __init__(self, attn, stats, candidates, strategy, svd, rope_scaling,
                 rope_correction="none", key_weight=1.0):
        cfg = attn.config
        self.attn = attn
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rope_scaling = rope_scaling
        # candidates of one r by increasing width: each width's scores extend the previous ones
        order = sorted(range(len(candidates)),
                       key=lambda i: (candidates[i].rope_pairs, candidates[i].latent_dim))
        self.candidates = candidates
        self.by_r: dict[int, list[int]] = {}
        for i in order:
            self.by_r.setdefault(candidates[i].rope_pairs, []).append(i)
        self.errors = torch.zeros(len(candidates), dtype=torch.float64)
        self.residual_energy = 0.0
        self.residual = None
        h_kv, d_h = self.num_kv_heads, self.head_dim
        self.proj = proj = families.projections(attn)
        w_k = proj.k[0].detach().to("cpu", torch.float64)
        w_v = proj.v[0].detach().to("cpu", torch.float64)
        xtx = getattr(stats, "xtx", None) if svd.startswith("activation") else None
        device, dtype = proj.q[0].device, proj.q[0].dtype
        b_v = proj.v[1]
        self.value_bias = (None if b_v is None
                           else b_v.detach().view(h_kv, 1, d_h).to(device, dtype))
        self.per_r = {}
        for r, indices in self.by_r.items():
            widest = candidates[indices[-1]].latent_dim
            pairs = select_rope_pairs(strategy, r, head_dim=d_h, num_heads=self.num_heads,
                                      num_kv_heads=h_kv, stats=stats)
            kn_rows = converted_layout(pairs, d_h, self.num_heads)[2]
            # the fitted correction of the dropped pairs, as the conversion folds it into q
            transform = layer_query_transform(stats, rope_correction, pairs, self.num_heads,
                                              d_h)
            up, down = nested_joint_factors(
                w_k[kn_rows], w_v, svd, xtx=xtx,
                row_grams=layer_row_grams(attn, stats, svd, kn_rows, transform, rope_scaling),
                key_weight=key_weight)
            up, down = up[:, :widest], down[:widest]
            # up's key rows back at their places in W_k (zero at the kept dims), per KV head
            up_k = up.new_zeros(h_kv * d_h, widest).index_copy_(0, kn_rows, up[:kn_rows.numel()])
            up_v = up[kn_rows.numel():]
            kept = torch.zeros(h_kv, d_h, dtype=torch.bool)
            for g in range(h_kv):
                kept[g, pairs[g]] = kept[g, pairs[g] + d_h // 2] = True
            self.per_r[r] = (kept.view(h_kv, 1, d_h).to(device),
                             up_k.view(h_kv, d_h, widest).to(device, dtype),
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
        q_rot = q_rot.reshape(b, h_kv, group * n_q, d_h)
        visible = torch.arange(t, device=x.device)[None, :] <= queries[:, None]   # (Q, T)
        mask = torch.zeros(n_q, t, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~visible, float("-inf")).repeat(group, 1)
        for r, indices in self.by_r.items():
            kept, up_k, up_v, down, transform = self.per_r[r]
            # kept pairs rotated; the rest position-free, through the latent, keeping scaled
            # RoPE's factor (squared, as the conversion folds it into q_proj)
            scores = (q_rot * kept) @ (k_rot * kept).transpose(-1, -2)      # (b, H_kv, gQ, T)
            q_nope = q if transform is None else (
                (q_heads @ transform.transpose(-1, -2)).reshape(b, h_kv, group * n_q, d_h))
            q_lat = (q_nope * self.rope_scaling ** 2) @ up_k                 # (b, H_kv, gQ, R)
            latent = (x @ down.T)[:, None]                                   # (b, 1, T, R)
            done = 0
            for i in indices:
                width = self.candidates[i].latent_dim
                scores = scores + q_lat[..., done:width] @ latent[..., done:width].transpose(-1, -2)
                done = width
                probs = (scores * attn.scaling + mask).softmax(-1)
                out = (probs @ latent[..., :width]) @ up_v[:, :width]      # (b, H_kv, gQ, d_h)
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
                         key_weight: float = 1.0) -> list[list[SplitCandidate]]:
    """Score every RoPE/latent split of every layer of the original ``model`` on the first
    ``num_sequences`` calibration sequences; returns each layer's candidates, errors filled.

    strategy: the RoPE selection (its pairs for each r); svd: one of ``JOINT_METHODS``.
    max_cost: the largest cost (values per token) a candidate may have.
    rope_pair_step: only ``r`` that are multiples of it (1: every ``r``; 4 keeps ``d_r`` a
        multiple of 8).
    rope_correction: the MLAConfig option; a fitted correction of the dropped pairs is applied
        to the queries as the conversion folds it into q_proj.
    key_weight: the key rows' weight of svd="activation-score" (``MLAConfig.svd_key_weight``).
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
        widest = max_rank(svd, h_kv * (d_h - 2), h_kv * d_h, cfg.hidden_size)
        candidates = [c for c in split_candidates(h_kv, d_h, max_cost, widest,
                                                  pair_step=rope_pair_step)
                      if c.latent_dim <= max_rank(svd, h_kv * (d_h - 2 * c.rope_pairs),
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


def choose_splits(candidates: list[list[SplitCandidate]], budget: int, *,
                  slack: int = LATENT_STEP) -> list[SplitCandidate]:
    """One candidate per layer, of least summed error among the choices whose total cost lies
    in ``(budget - slack, budget]`` (exact knapsack over the total, by dynamic programming)."""
    if not candidates or any(not layer for layer in candidates):
        raise ValueError("every layer needs at least one candidate")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for layer in candidates:
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
        raise ValueError(f"no split of the layers costs between {low} and {budget} values per "
                         f"token (the cheapest costs {cheapest}): change cache_ratio")
    total = low + int(window.argmin())
    picked = []
    for layer, choice in zip(reversed(candidates), reversed(choices)):
        cand = layer[int(choice[total])]
        picked.append(cand)
        total -= cand.cost
    return picked[::-1]
