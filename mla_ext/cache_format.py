"""Storage formats of the latent cache: names, bytes per token, and the round trip of a value
through a format (ARCHITECTURE 3.3; the arithmetic is that of ``mla_ext/reference.py``).

A layer's ``CacheFormat`` is its latent format (bf16 / fp16 / fp32, int8, fp8 e4m3 or int4, with
the group size of a quantized one) and its RoPE-key format (bf16 / fp16 / fp32 or fp8 e4m3).
A conversion under a byte budget chooses one per layer and stores it with the model; a
``LatentCache`` of that model uses it unless told otherwise. A format is written as a spec
string ``"LATENT[-gG]/ROPE"``, e.g. ``"int4-g32/fp8"`` or ``"bf16/bf16"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference

CACHE_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn,
}
ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp8": torch.float8_e4m3fn}
FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
QUANTIZED = ("int8", "fp8", "int4")
SCALE_BYTES = 2  # scales and zeros are fp16
MAX_GROUP_SIZE = 64
# What the CUDA decode kernel serves (csrc/cuda/mla_decode/api.cpp, check_cuda_support): a
# latent width that is a multiple of 8 up to 2048, an even d_r up to 64 (a multiple of 4 with fp8
# keys), RoPE keys in bf16 / fp16 / fp8, a latent in the model's 16-bit dtype or quantized.
KERNEL_MAX_LATENT = 2048
KERNEL_MAX_ROPE_DIM = 64
# The formats a byte-budget search tries by default. fp8 latents cost what int8 ones cost and
# round worse (3 mantissa bits against 255 levels per group: pydoc 149.85 against 149.73 on the
# default conversion, studies/results/quality_formats_cpu.json); groups of 64 save 0.06 bytes a
# channel over 32 and need widths in steps of 64. Each format more makes the search longer
# (every candidate width is scored), so these are left out; a list in
# MLAConfig.cache_formats searches them.
SEARCH_LATENTS = ("bf16", "int8-g32", "int4-g16", "int4-g32")
SEARCH_ROPES = ("bf16", "fp8")


def default_group_size(latent_dim: int) -> int:
    """Largest even divisor of D_c that is at most 64 (ARCHITECTURE 3.3: min(64, D_c) when it
    divides); even so that an int4 byte never straddles two groups."""
    for g in range(min(MAX_GROUP_SIZE, latent_dim), 1, -1):
        if latent_dim % g == 0 and g % 2 == 0:
            return g
    raise ValueError(f"latent width {latent_dim} has no even group size <= {MAX_GROUP_SIZE}")


def latent_bytes_per_token(latent_dim: int, num_kv_heads: int, rope_dim: int,
                           latent_dtype: torch.dtype, rope_dtype: torch.dtype,
                           group_size: int) -> int:
    """Bytes one token occupies in one layer's cache, scales and zeros included
    (``num_kv_heads``: the RoPE keys stored per token, ``rope_dim`` dims each)."""
    if latent_dtype == torch.uint8:
        n = latent_dim // 2 + 2 * SCALE_BYTES * (latent_dim // group_size)
    elif latent_dtype in (torch.int8, torch.float8_e4m3fn):
        n = latent_dim + SCALE_BYTES * (latent_dim // group_size)
    else:
        n = latent_dim * latent_dtype.itemsize
    n += num_kv_heads * rope_dim * rope_dtype.itemsize
    if rope_dtype == torch.float8_e4m3fn:
        n += num_kv_heads * SCALE_BYTES
    return n


@dataclass(frozen=True)
class CacheFormat:
    """One layer's cache format: ``latent`` (a ``CACHE_DTYPES`` name), ``group_size`` (channels
    per scale of a quantized latent; None for a float one, or to take ``default_group_size``)
    and ``rope`` (a ``ROPE_DTYPES`` name)."""

    latent: str = "bf16"
    group_size: int | None = None
    rope: str = "bf16"

    def __post_init__(self):
        if self.latent not in CACHE_DTYPES:
            raise ValueError(f"latent format must be one of {sorted(CACHE_DTYPES)}, "
                             f"got {self.latent!r}")
        if self.rope not in ROPE_DTYPES:
            raise ValueError(f"RoPE-key format must be one of {sorted(ROPE_DTYPES)}, "
                             f"got {self.rope!r}")
        g = self.group_size
        if g is not None:
            if self.latent not in QUANTIZED:
                raise ValueError(f"group_size applies to a quantized latent ({QUANTIZED}), "
                                 f"not to {self.latent!r}")
            if isinstance(g, bool) or not isinstance(g, int) or g < 1:
                raise ValueError(f"group_size must be a positive int, got {g!r}")
            if self.latent == "int4" and g % 2:
                raise ValueError(f"int4 latents need an even group_size, got {g}")

    @classmethod
    def parse(cls, spec) -> "CacheFormat":
        """``"LATENT[-gG]/ROPE"`` (the RoPE part defaults to bf16), a dict or a CacheFormat."""
        if isinstance(spec, CacheFormat):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"a cache format is a string like 'int4-g32/fp8', got {spec!r}")
        latent, _, rope = spec.partition("/")
        name, _, group = latent.partition("-g")
        if group and not group.isdigit():
            raise ValueError(f"cache format {spec!r}: the group size after '-g' must be an "
                             "integer, e.g. 'int4-g32/fp8'")
        return cls(name, int(group) if group else None, rope or "bf16")

    @property
    def spec(self) -> str:
        group = f"-g{self.group_size}" if self.group_size is not None else ""
        return f"{self.latent}{group}/{self.rope}"

    def to_dict(self) -> dict:
        return {"latent": self.latent, "group_size": self.group_size, "rope": self.rope}

    @property
    def quantized(self) -> bool:
        return self.latent in QUANTIZED

    def group_for(self, latent_dim: int) -> int:
        """The group size a latent of ``latent_dim`` channels uses in this format."""
        return self.group_size or default_group_size(latent_dim)

    def bytes_per_token(self, latent_dim: int, rope_heads: int, rope_dim: int) -> int:
        """Bytes of one token in a layer of this format, scales and zeros included."""
        return latent_bytes_per_token(latent_dim, rope_heads, rope_dim, CACHE_DTYPES[self.latent],
                                      ROPE_DTYPES[self.rope], self.group_for(latent_dim))

    def unservable_reason(self, latent_dim: int, rope_dim: int) -> str | None:
        """Why the CUDA decode kernel cannot serve a layer of these sizes in this format, or
        None where it can (its checks in csrc/cuda/mla_decode/api.cpp)."""
        if self.latent == "fp32" or self.rope == "fp32":
            return "fp32 caches run on the CPU only"
        if latent_dim % 8 or latent_dim > KERNEL_MAX_LATENT:
            return f"the latent width must be a multiple of 8 up to {KERNEL_MAX_LATENT}"
        if rope_dim % 2 or not 2 <= rope_dim <= KERNEL_MAX_ROPE_DIM:
            return f"d_r must be even, from 2 to {KERNEL_MAX_ROPE_DIM}"
        if self.rope == "fp8" and rope_dim % 4:
            return "fp8 RoPE keys need d_r to be a multiple of 4"
        if self.quantized and latent_dim % self.group_for(latent_dim):
            return f"group size {self.group_for(latent_dim)} must divide the latent width"
        return None

    def latent_round_trip(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` (..., D_c) as the cache gives it back (quantized and dequantized), fp32."""
        dtype = CACHE_DTYPES[self.latent]
        stored = reference.quantize_latent(latent, dtype, self.group_for(latent.shape[-1]))
        return reference.dequantize_latent(*stored)

    def rope_round_trip(self, k_rope: torch.Tensor) -> torch.Tensor:
        """Rotated RoPE keys (..., heads, d_r) as the cache gives them back, fp32."""
        return reference.dequantize_k_rope(*reference.quantize_k_rope(k_rope,
                                                                      ROPE_DTYPES[self.rope]))


def search_formats(latents=SEARCH_LATENTS, ropes=SEARCH_ROPES) -> list[CacheFormat]:
    """Every combination of the latent and RoPE-key formats (spec strings without a RoPE part
    for ``latents``)."""
    return [CacheFormat.parse(f"{latent}/{rope}") for latent in latents for rope in ropes]
