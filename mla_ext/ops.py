"""Thin Python wrappers of the torch.ops.mla_ext ops, with their fake (meta) implementations.

Each wrapper documents shapes, then calls the registered op. Where the extension has no kernel
for the tensors' device (a CPU-only build given CUDA tensors, an op whose kernel is not built),
the wrapper runs the PyTorch reference instead, explicitly: ``has_kernel`` says which is used.
Argument errors come from the C++ entry points and name the argument.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from . import reference
from ._loader import load_extension

_EXTENSION = load_extension()

_LIB = "mla_ext"


_reference_only = threading.local()
_debug_checks = threading.local()


@contextlib.contextmanager
def _thread_flag(flag: threading.local, value: bool):
    """Set ``flag.on`` for this thread within the block; the previous value (None: unset) after."""
    previous = getattr(flag, "on", None)
    flag.on = value
    try:
        yield
    finally:
        flag.on = previous


def reference_only():
    """Within this block every wrapper runs the PyTorch reference instead of the kernels (to
    compare a model's kernel path with its reference path)."""
    return _thread_flag(_reference_only, True)


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether torch.ops.mla_ext.<op> has a compiled kernel for ``device`` (and is used).
    torch.compile takes the answer as a constant of the traced code."""
    return _has_kernel(op, torch.device(device).type)


@torch.compiler.assume_constant_result
def _has_kernel(op: str, device_type: str) -> bool:
    if getattr(_reference_only, "on", False):
        return False
    key = "CUDA" if device_type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_LIB}::{op}", key)
    except RuntimeError:
        return False


def _op(name):
    return getattr(torch.ops.mla_ext, name).default


def is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (no host reads allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


DECODE_KERNELS = ("auto", "mma", "ws")


def set_decode_kernel(name: str) -> None:
    """Which CUDA kernel mla_decode and mla_decode_plan use from now on, in every thread: "auto"
    (the default: the warp-specialized Hopper kernel where it applies, else the mma.sync one),
    "mma" or "ws" (a forced kernel that does not apply to a call is an error naming why). Read
    once per call on the host; make a plan under the setting of the decode calls that use it
    (the kernels' tiles differ). The CPU kernel ignores it."""
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode_kernel: name must be one of {DECODE_KERNELS}, got {name!r}")
    _EXTENSION.set_decode_kernel(name)


def get_decode_kernel() -> str:
    """The current set_decode_kernel setting."""
    return _EXTENSION.decode_kernel()


@contextlib.contextmanager
def decode_kernel(name: str):
    """set_decode_kernel(name) within the block (tests and benchmarks run several kernels in one
    process), the previous setting after it."""
    previous = get_decode_kernel()
    set_decode_kernel(name)
    try:
        yield
    finally:
        set_decode_kernel(previous)


def debug_checks(enabled: bool = True):
    """Within this block the model's cache writes and decode calls range-check their slots and
    block tables on the host (one sync per call), as direct calls of the ops do; off by default
    (the cache builds its tables in range) or with the environment's MLA_EXT_DEBUG_CHECKS=1."""
    return _thread_flag(_debug_checks, enabled)


def debug_checks_enabled() -> bool:
    on = getattr(_debug_checks, "on", None)
    if on is None:
        return os.environ.get("MLA_EXT_DEBUG_CHECKS", "0") not in ("", "0")
    return on


def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on compact partial-RoPE vectors.

    x: (N, heads, d_r), [x1 | x2] per head; cos, sin: (N, H_kv, r) with d_r = 2 r; head h uses
    KV head h // (heads // H_kv). Returns a new (N, heads, d_r) tensor in x's dtype.
    The compiled op has no autograd formula: where gradients flow, the differentiable reference
    computes it.
    """
    if not has_kernel("partial_rope", x.device) or (torch.is_grad_enabled() and x.requires_grad):
        return reference.partial_rope(x, cos, sin)
    return _op("partial_rope")(x, cos, sin)


def partial_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In-place partial_rope; returns x."""
    if not has_kernel("partial_rope_", x.device):
        x.copy_(reference.partial_rope(x, cos, sin))
        return x
    _op("partial_rope_")(x, cos, sin)
    return x


def _check_slots(slot_mapping: torch.Tensor, latent: torch.Tensor) -> None:
    # Device kernels cannot raise a message; check the range here unless a CUDA graph is being
    # captured (the capturing caller built slot_mapping itself, from the cache's own tables).
    if slot_mapping.numel() == 0 or is_capturing() or torch.compiler.is_compiling():
        return
    capacity = latent.shape[0] * latent.shape[1]
    lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
    if lo < -1 or hi >= capacity:
        raise ValueError(f"slot_mapping holds slots in [{lo}, {hi}], but the cache has "
                         f"{capacity} slots ({latent.shape[0]} blocks of {latent.shape[1]}); "
                         "-1 is the only negative value allowed")


def latent_cache_write(c, k_rope, slot_mapping, latent, latent_scale, latent_zero,
                       k_rope_cache, k_rope_scale, *, check_ranges: bool = True) -> None:
    """Quantize and write N tokens into the paged latent cache, in place.

    c: (N, D_c) float; k_rope: (N, H_kv, d_r) float, already rotated;
    slot_mapping: (N,) int64 = block * block_size + offset, -1 skips a token;
    latent: (num_blocks, block_size, D_c) float/int8/fp8, or (.., D_c/2) uint8 for int4;
    latent_scale, latent_zero: (num_blocks, block_size, D_c/g) fp16 or None (format of
    reference.py); k_rope_cache: (num_blocks, block_size, H_kv, d_r); k_rope_scale:
    (num_blocks, block_size, H_kv) fp16 for an fp8 k_rope_cache, else None.
    check_ranges: check slot_mapping against the cache on the host first (one sync); callers
    that built the slots from their own tables pass False.
    """
    if check_ranges:
        _check_slots(slot_mapping, latent)
    args = (c, k_rope, slot_mapping, latent, latent_scale, latent_zero, k_rope_cache,
            k_rope_scale)
    if not has_kernel("latent_cache_write", c.device):
        return reference.latent_cache_write(*args)
    _op("latent_cache_write")(*args)


def latent_project(x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent, latent_scale,
                   latent_zero, k_rope_cache, k_rope_scale, *, check_ranges: bool = True) -> None:
    """Fused ``c = x W_down^T``, ``k_r = rope(x W_kr^T + b_kr)``, quantize, write to the cache.

    x: (N, d); w_down: (D_c, d); w_kr: (H_kv d_r, d); b_kr: (H_kv d_r,) or None;
    cos, sin: (N, H_kv, r); the cache arguments and check_ranges as in latent_cache_write.
    """
    if check_ranges:
        _check_slots(slot_mapping, latent)
    args = (x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent, latent_scale, latent_zero,
            k_rope_cache, k_rope_scale)
    if not has_kernel("latent_project", x.device):
        return reference.latent_project(*args)
    _op("latent_project")(*args)


def decode_kernel_declines(q_dtype: torch.dtype, latent_dtype: torch.dtype,
                           rope_dtype: torch.dtype, d_r: int) -> str | None:
    """Why the CUDA decode kernel does not take a cache of these formats (None: it does). It
    takes 16-bit queries, a float latent of the queries' dtype (or int8 / int4 / fp8 codes),
    16-bit or fp8 RoPE keys and an even d_r up to 64 (a multiple of 4 for fp8 keys); other
    combinations run the reference, which reads lengths on the host (no graph capture)."""
    if q_dtype not in (torch.bfloat16, torch.float16):
        return f"queries in {q_dtype} (the kernel computes in bf16 or fp16)"
    if rope_dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        return f"RoPE keys in {rope_dtype}"
    if d_r % 2 != 0 or not 2 <= d_r <= 64:
        return f"d_r = {d_r} (the kernel takes even d_r up to 64)"
    if rope_dtype == torch.float8_e4m3fn and d_r % 4 != 0:
        return f"fp8 RoPE keys with d_r = {d_r} (the kernel needs a multiple of 4 for fp8 keys)"
    if latent_dtype in reference.FLOAT_DTYPES and latent_dtype != q_dtype:
        return f"a {latent_dtype} latent under {q_dtype} queries"
    return None


def _cuda_decode_unsupported(q_lat, latent, k_rope_cache) -> str | None:
    """decode_kernel_declines for these tensors (None on CPU, where the CPU kernel takes all)."""
    if not q_lat.is_cuda:
        return None
    d_r = k_rope_cache.shape[-1] if k_rope_cache.dim() == 4 else 0
    return decode_kernel_declines(q_lat.dtype, latent.dtype, k_rope_cache.dtype, d_r)


_warned_fallbacks: set[str] = set()


def _warn_reference_fallback(reason: str) -> None:
    # Once per reason: a model decodes every layer and step through here.
    if reason not in _warned_fallbacks:
        _warned_fallbacks.add(reason)
        warnings.warn(f"mla_decode: the CUDA kernel does not take {reason}; decoding through the "
                      "PyTorch reference (correct, slower)", RuntimeWarning, stacklevel=3)


def mla_decode(q_lat, q_rope, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale,
               block_table, seq_lens, softmax_scale: float, sched_meta=None, *,
               check_ranges: bool = True):
    """Absorbed MLA attention over the paged latent cache.

    q_lat: (B, s_q, H, D_c); q_rope: (B, s_q, H, d_r), rotated; cache tensors as in
    latent_cache_write; block_table: (B, max_blocks) int32; seq_lens: (B,) int32, the context
    length including the s_q new tokens (causal among them).
    sched_meta: optional int32 split plan from ``mla_decode_plan`` for these inputs' shapes and
    seq_lens; make it once per decode step and pass it to every layer (None: planned per call).
    check_ranges: check seq_lens and the used block-table entries on the host first (one sync,
    CUDA only; the CPU kernel checks them itself); a cache that built its tables passes False.
    Returns (o_lat (B, s_q, H, D_c) in q_lat's dtype, lse (B, s_q, H) fp32).
    """
    args = (q_lat, q_rope, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale,
            block_table, seq_lens, float(softmax_scale))
    if not has_kernel("mla_decode", q_lat.device):
        return reference.mla_decode(*args)
    unsupported = _cuda_decode_unsupported(q_lat, latent, k_rope_cache)
    if unsupported is not None:
        _warn_reference_fallback(unsupported)
        return reference.mla_decode(*args)
    if check_ranges and seq_lens.is_cuda:  # the CPU kernel checks these itself
        _check_block_table("mla_decode", block_table, seq_lens, latent,
                           block_table.shape[1] * latent.shape[1] if latent.dim() == 3 else 0)
    if sched_meta is not None:
        _check_sched_meta(sched_meta, q_lat)
    return _op("mla_decode")(*args, sched_meta)


# The plan's size is defined in C++ (csrc/core/split_plan.h) and linear in the batch; read as
# two numbers so that fake tensors with symbolic batch sizes can use it.
_PLAN_BASE = int(_EXTENSION.mla_decode_plan_numel(0))
_PLAN_PER_SEQUENCE = int(_EXTENSION.mla_decode_plan_numel(1)) - _PLAN_BASE
assert _EXTENSION.mla_decode_plan_numel(97) == _PLAN_BASE + 97 * _PLAN_PER_SEQUENCE


def plan_numel(batch):
    """int32 values of mla_decode_plan's tensor for ``batch`` sequences."""
    return _PLAN_BASE + _PLAN_PER_SEQUENCE * batch


def _check_sched_meta(sched_meta, q_lat) -> None:
    # Checked here as well as in C++: a plan of the wrong size is an easy mistake to make when a
    # batch changes between steps, and the message should not depend on the toolchain.
    expected = plan_numel(q_lat.shape[0])
    if (not isinstance(sched_meta, torch.Tensor) or sched_meta.dtype != torch.int32
            or sched_meta.dim() != 1 or sched_meta.numel() != expected
            or sched_meta.device != q_lat.device):
        got = (f"{tuple(sched_meta.shape)} {sched_meta.dtype} on {sched_meta.device}"
               if isinstance(sched_meta, torch.Tensor) else type(sched_meta).__name__)
        raise RuntimeError(f"mla_decode: sched_meta must be the plan mla_decode_plan made for "
                           f"inputs of these shapes: ({expected},) int32 on {q_lat.device}, "
                           f"got {got}")


def mla_decode_plan(q_lat, latent, latent_scale, k_rope_cache, seq_lens):
    """Split-KV schedule of one decode step: (plan_numel(B),) int32 on seq_lens' device.

    Depends on the shapes and dtypes of q_lat, latent, latent_scale, k_rope_cache and on the
    values of seq_lens (read on the device, no sync); reuse it for every layer of the step.
    """
    if not has_kernel("mla_decode_plan", q_lat.device):
        raise RuntimeError(f"mla_decode_plan: no kernel for device {q_lat.device} in this build")
    return _op("mla_decode_plan")(q_lat, latent, latent_scale, k_rope_cache, seq_lens)


def mla_decode_plan_if_supported(q_lat, latent, latent_scale, k_rope_cache, seq_lens):
    """``mla_decode_plan`` where mla_decode will run the CUDA kernel on these inputs, else None
    (the CPU kernel and the reference plan nothing)."""
    if (not q_lat.is_cuda or not has_kernel("mla_decode", q_lat.device)
            or not has_kernel("mla_decode_plan", q_lat.device)
            or _cuda_decode_unsupported(q_lat, latent, k_rope_cache) is not None):
        return None
    return _op("mla_decode_plan")(q_lat, latent, latent_scale, k_rope_cache, seq_lens)


class CacheIndexError(ValueError, RuntimeError):
    """A block table or sequence length outside the cache. A ValueError, and a RuntimeError
    like the C++ checks' errors, so callers may catch either."""


def _check_block_table(op: str, block_table: torch.Tensor, seq_lens: torch.Tensor,
                       latent: torch.Tensor, max_len: int) -> None:
    # The CUDA kernels cannot raise a message: check seq_lens and the block-table entries that
    # the sequences use here (one host sync), unless a CUDA graph is being captured or
    # torch.compile traces. Malformed arguments are left to the C++ checks, which name them.
    if (block_table.dim() != 2 or seq_lens.dim() != 1 or latent.dim() != 3
            or block_table.dtype != torch.int32 or seq_lens.dtype != torch.int32
            or seq_lens.numel() == 0 or is_capturing() or torch.compiler.is_compiling()):
        return
    lens = seq_lens.long()
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 0 or hi > max_len:
        raise CacheIndexError(f"{op}: seq_lens holds lengths in [{lo}, {hi}], but they must lie "
                              f"in [0, {max_len}]")
    block_size, num_blocks = latent.shape[1], latent.shape[0]
    used = (lens + block_size - 1) // block_size
    if int(used.max()) > block_table.shape[1]:
        raise CacheIndexError(f"{op}: seq_lens needs up to {int(used.max())} blocks of "
                              f"{block_size}, but block_table has {block_table.shape[1]} columns")
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    needed = cols.view(1, -1) < used.view(-1, 1)
    bad = needed & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise CacheIndexError(f"{op}: block_table[{b}, {j}] = {int(block_table[b, j])} is "
                              f"outside the cache's [0, {num_blocks}) blocks (used by "
                              f"seq_lens[{b}] = {int(lens[b])})")


def latent_gather(latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale, block_table,
                  seq_lens, max_len: int):
    """Dequantized context of each sequence: (c (B, max_len, D_c), k_rope (B, max_len, H_kv,
    d_r)), both fp32, zero at and past seq_lens[b].

    block_table: (B, max_blocks) int32; seq_lens: (B,) int32 with 0 <= seq_lens[b] <= max_len;
    the cache arguments as in latent_cache_write.
    """
    _check_block_table("latent_gather", block_table, seq_lens, latent, int(max_len))
    args = (latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale, block_table,
            seq_lens, int(max_len))
    if not has_kernel("latent_gather", latent.device):
        return reference.latent_gather(*args)
    return _op("latent_gather")(*args)


# ---------------------------------------------------------------- fake implementations

@torch.library.register_fake("mla_ext::partial_rope")
def _partial_rope_fake(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("mla_ext::partial_rope_")
def _partial_rope_inplace_fake(x, cos, sin):
    return None


@torch.library.register_fake("mla_ext::latent_cache_write")
def _latent_cache_write_fake(c, k_rope, slot_mapping, latent, latent_scale, latent_zero,
                             k_rope_cache, k_rope_scale):
    return None


@torch.library.register_fake("mla_ext::latent_project")
def _latent_project_fake(x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent, latent_scale,
                         latent_zero, k_rope_cache, k_rope_scale):
    return None


@torch.library.register_fake("mla_ext::mla_decode")
def _mla_decode_fake(q_lat, q_rope, latent, latent_scale, latent_zero, k_rope_cache,
                     k_rope_scale, block_table, seq_lens, softmax_scale, sched_meta=None):
    b, s_q, h, _ = q_lat.shape
    return (torch.empty_like(q_lat, memory_format=torch.contiguous_format),
            q_lat.new_empty((b, s_q, h), dtype=torch.float32))


@torch.library.register_fake("mla_ext::mla_decode_plan")
def _mla_decode_plan_fake(q_lat, latent, latent_scale, k_rope_cache, seq_lens):
    return seq_lens.new_empty((plan_numel(q_lat.shape[0]),), dtype=torch.int32)


@torch.library.register_fake("mla_ext::latent_gather")
def _latent_gather_fake(latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale,
                        block_table, seq_lens, max_len):
    b = block_table.shape[0]
    d_c = latent.shape[-1] * (2 if latent.dtype == torch.uint8 else 1)
    h_kv, d_r = k_rope_cache.shape[2], k_rope_cache.shape[3]
    return (latent.new_empty((b, max_len, d_c), dtype=torch.float32),
            latent.new_empty((b, max_len, h_kv, d_r), dtype=torch.float32))
