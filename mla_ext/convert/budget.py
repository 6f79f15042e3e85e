"""A cache budget instead of fixed sizes: spread the latent width over the layers.

Given the total number of cached values per token that the budget allows, every layer pays its
RoPE keys (``H_kv * d_r``) and the rest is latent. The latent is handed out in steps of
``step`` channels (a multiple of 8, what the kernels and quantization groups need), each step to
the layer whose relative error drops the most: the error of a rank-``k`` truncation is the
squared tail of the layer's spectrum (``joint_spectrum``) over its total energy.
"""
from __future__ import annotations

import heapq

import torch

LATENT_STEP = 8


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
