"""LatentCache: the paged, optionally quantized latent KV cache of a converted model.

It is a transformers ``Cache`` (pass it as ``past_key_values`` to ``model(...)`` or
``model.generate(...)``) with one ``LatentCacheLayer`` per MLA layer. Each layer stores, per
token, the latent ``c`` (D_c values, shared by all heads) and the rotated RoPE keys (H_kv x d_r)
in blocks of ``block_size`` tokens addressed by a block table (ARCHITECTURE 3.3). The formats
are those of ``mla_ext/reference.py``.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops

CACHE_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn,
}
ROPE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "fp8": torch.float8_e4m3fn}
_FLOAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SCALE_BYTES = 2  # scales and zeros are fp16
DEFAULT_BLOCK_SIZE = 64
MAX_GROUP_SIZE = 64


def default_group_size(latent_dim: int) -> int:
    """Largest even divisor of D_c that is at most 64 (ARCHITECTURE 3.3: min(64, D_c) when it
    divides); even so that an int4 byte never straddles two groups."""
    for g in range(min(MAX_GROUP_SIZE, latent_dim), 1, -1):
        if latent_dim % g == 0 and g % 2 == 0:
            return g
    raise ValueError(f"latent width {latent_dim} has no even group size <= {MAX_GROUP_SIZE}")


def _resolve_dtypes(cache_dtype: str, rope_dtype: str | None, model_dtype: torch.dtype):
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cache_dtype!r}")
    latent = CACHE_DTYPES[cache_dtype]
    if rope_dtype is None:
        rope = latent if cache_dtype in ROPE_DTYPES and cache_dtype != "fp8" else model_dtype
        if rope not in _FLOAT_NAMES:
            rope = torch.float32
        return latent, rope
    if rope_dtype not in ROPE_DTYPES:
        raise ValueError(f"rope_dtype must be one of {sorted(ROPE_DTYPES)} or None, got {rope_dtype!r}")
    return latent, ROPE_DTYPES[rope_dtype]


def latent_bytes_per_token(latent_dim: int, num_kv_heads: int, rope_dim: int,
                           latent_dtype: torch.dtype, rope_dtype: torch.dtype,
                           group_size: int) -> int:
    """Bytes one token occupies in one layer's cache, scales and zeros included."""
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


class LatentCacheLayer(CacheLayerMixin):
    """One MLA layer's paged latent cache. All sequences of the batch advance together (the way
    ``generate`` uses a cache); ``seq_lens`` is still a per-sequence tensor, as the kernels take."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, latent_dim: int, num_kv_heads: int, rope_dim: int,
                 latent_dtype: torch.dtype, rope_dtype: torch.dtype, *, block_size: int,
                 group_size: int, max_length: int | None = None):
        super().__init__()
        if latent_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide the latent width {latent_dim}")
        if latent_dtype == torch.uint8 and group_size % 2:
            raise ValueError(f"int4 caches need an even group_size, got {group_size}")
        self.latent_dim, self.num_kv_heads, self.rope_dim = latent_dim, num_kv_heads, rope_dim
        self.latent_dtype, self.rope_dtype = latent_dtype, rope_dtype
        self.block_size, self.group_size, self.max_length = block_size, group_size, max_length
        self.length = 0
        self._batch = None
        self.storage: dict[str, torch.Tensor | None] = {}
        self.block_table = None
        self.seq_lens = None

    # ---------------------------------------------------------------- storage

    @property
    def batch_size(self) -> int:
        if self._batch is None:
            raise AttributeError("batch_size is known after the first write")
        return self._batch

    def _new_blocks(self, n: int, device) -> dict:
        quantized = self.latent_dtype not in _FLOAT_NAMES
        width = self.latent_dim // 2 if self.latent_dtype == torch.uint8 else self.latent_dim
        groups = self.latent_dim // self.group_size
        bs = self.block_size

        def empty(shape, dtype):
            return torch.empty((n, bs, *shape), dtype=dtype, device=device)

        return {
            "latent": empty((width,), self.latent_dtype),
            "latent_scale": empty((groups,), torch.float16) if quantized else None,
            "latent_zero": empty((groups,), torch.float16)
            if self.latent_dtype == torch.uint8 else None,
            "k_rope": empty((self.num_kv_heads, self.rope_dim), self.rope_dtype),
            "k_rope_scale": empty((self.num_kv_heads,), torch.float16)
            if self.rope_dtype == torch.float8_e4m3fn else None,
        }

    def lazy_initialization(self, batch_size: int, device) -> None:
        self._batch = batch_size
        self.device = torch.device(device)
        self.storage = self._new_blocks(0, device)
        self.block_table = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.is_initialized = True
        if self.max_length:
            self._reserve(self.max_length)

    def _reserve(self, length: int) -> None:
        """Make room for ``length`` tokens per sequence, growing geometrically."""
        if self.max_length and length > self.max_length:
            raise ValueError(f"the cache was created with max_length={self.max_length}, "
                             f"cannot hold {length} tokens")
        have = self.block_table.shape[1]
        need = -(-length // self.block_size)
        if need <= have:
            return
        want = max(need, 2 * have)
        if self.max_length:
            want = max(need, min(want, -(-self.max_length // self.block_size)))
        extra = want - have
        first = self.storage["latent"].shape[0]
        fresh = self._new_blocks(self._batch * extra, self.device)
        for name, old in self.storage.items():
            if old is not None:
                self.storage[name] = torch.cat([old, fresh[name]])
        new_ids = first + torch.arange(self._batch * extra, dtype=torch.int32, device=self.device)
        self.block_table = torch.cat([self.block_table, new_ids.view(extra, self._batch).t()], 1)

    def reserve(self, batch_size: int, num_tokens: int, device) -> torch.Tensor:
        """Claim the next ``num_tokens`` positions of every sequence and return their slots,
        (B * T,) int64 in batch-major order, for a cache write (ops.latent_cache_write or the
        fused ops.latent_project)."""
        if not self.is_initialized:
            self.lazy_initialization(batch_size, device)
        elif batch_size != self._batch:
            raise ValueError(f"the cache holds {self._batch} sequences, got a batch of {batch_size}")
        self._reserve(self.length + num_tokens)
        pos = self.length + torch.arange(num_tokens, device=self.device)
        blocks = self.block_table[:, pos // self.block_size].long()              # (B, T)
        self.length += num_tokens
        self.seq_lens.fill_(self.length)
        return (blocks * self.block_size + pos % self.block_size).reshape(-1)

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Write T new tokens of every sequence. latent: (B, T, D_c); k_rope: (B, T, H_kv, d_r),
        already rotated."""
        b, t, d_c = latent.shape
        if d_c != self.latent_dim or k_rope.shape != (b, t, self.num_kv_heads, self.rope_dim):
            raise ValueError(
                f"expected latent (B, T, {self.latent_dim}) and k_rope (B, T, "
                f"{self.num_kv_heads}, {self.rope_dim}), got {tuple(latent.shape)} and "
                f"{tuple(k_rope.shape)}")
        slots = self.reserve(b, t, latent.device)
        ops.latent_cache_write(latent.reshape(b * t, d_c).contiguous(),
                               k_rope.reshape(b * t, self.num_kv_heads, self.rope_dim).contiguous(),
                               slots, *self.tensors())

    def tensors(self):
        """(latent, latent_scale, latent_zero, k_rope, k_rope_scale), the ops' cache arguments."""
        s = self.storage
        return s["latent"], s["latent_scale"], s["latent_zero"], s["k_rope"], s["k_rope_scale"]

    def gather(self):
        """Dequantized context: latent (B, L, D_c) and k_rope (B, L, H_kv, d_r), fp32."""
        return ops.latent_gather(*self.tensors(), self.block_table, self.seq_lens, self.length)

    def nbytes(self) -> int:
        """Bytes allocated by this layer (storage + tables)."""
        total = sum(t.numel() * t.element_size() for t in self.storage.values() if t is not None)
        if self.block_table is not None:
            total += self.block_table.numel() * 4 + self.seq_lens.numel() * 4
        return total

    def bytes_per_token(self) -> int:
        return latent_bytes_per_token(self.latent_dim, self.num_kv_heads, self.rope_dim,
                                      self.latent_dtype, self.rope_dtype, self.group_size)

    # ---------------------------------------------------------------- Cache protocol

    def update(self, *args, **kwargs):
        raise TypeError("LatentCache stores MLA latents, not keys and values: use it with a model "
                        "converted by mla_ext.convert_to_mla")

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_length or -1

    def reset(self) -> None:
        self.length = 0
        if self.seq_lens is not None:
            self.seq_lens.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        # transformers passes a negative max_length or a count to drop, depending on the caller
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        self.length = max(0, min(self.length, keep))
        if self.seq_lens is not None:
            self.seq_lens.fill_(self.length)

    def _select(self, index: torch.Tensor) -> None:
        """Rebuild the storage so that sequence i holds old sequence index[i]."""
        if not self.is_initialized:
            return
        index = index.to(self.device).long()
        table = self.block_table.long()
        per_seq = table.shape[1]
        for name, t in self.storage.items():
            if t is not None:
                self.storage[name] = t[table[index]].flatten(0, 1).contiguous()
        self._batch = index.numel()
        self.block_table = torch.arange(self._batch * per_seq, dtype=torch.int32,
                                        device=self.device).view(self._batch, per_seq)
        self.seq_lens = torch.full((self._batch,), self.length, dtype=torch.int32,
                                   device=self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select(torch.arange(self._batch, device=self.device).repeat_interleave(repeats))

    def offload(self):
        raise NotImplementedError("LatentCache does not offload; it is already compressed")

    def prefetch(self):
        return None


def mla_layers(model) -> list:
    """The model's MLAAttention modules in layer order; ValueError if there are none."""
    from .attention import MLAAttention

    layers = sorted((m for m in model.modules() if isinstance(m, MLAAttention)),
                    key=lambda m: m.layer_idx)
    if not layers:
        raise ValueError("the model has no MLAAttention layers: convert it first with "
                         "mla_ext.convert_to_mla(model, config)")
    return layers


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


class LatentCache(Cache):
    """Paged latent cache for a converted model; use as ``past_key_values``.

    Args:
        model: a model converted by ``mla_ext.convert_to_mla`` (or loaded by ``load_pretrained``).
        cache_dtype: latent format: "bf16", "fp16", "fp32", "int8", "int4" or "fp8".
        rope_dtype: RoPE-key format: "bf16", "fp16", "fp32" or "fp8"; None takes the latent's
            float dtype, or the model's dtype for quantized latents.
        block_size: tokens per cache block (default 64).
        group_size: latent channels per quantization group; None picks ``default_group_size``.
        max_length: if given, every layer allocates room for this many tokens per sequence at
            its first write and never reallocates (needed for CUDA-graph capture).
    """

    def __init__(self, model, cache_dtype: str = "bf16", rope_dtype: str | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, group_size: int | None = None,
                 max_length: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        latent_dtype, rope = _resolve_dtypes(cache_dtype, rope_dtype, _model_dtype(model))
        layers = [LatentCacheLayer(
            m.latent_dim, m.num_kv_heads, m.rope_dim, latent_dtype, rope,
            block_size=block_size, group_size=group_size or default_group_size(m.latent_dim),
            max_length=max_length) for m in mla_layers(model)]
        super().__init__(layers=layers)
        self.cache_dtype = cache_dtype

    def nbytes(self) -> int:
        """Bytes allocated by all layers."""
        return sum(layer.nbytes() for layer in self.layers)

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, scales and zeros included."""
        return sum(layer.bytes_per_token() for layer in self.layers)


def kv_cache_bytes_per_token(model, cache_dtype: str = "bf16", rope_dtype: str | None = None,
                             group_size: int | None = None) -> int:
    """Cache bytes per token summed over all layers, scales and zeros included.

    For a converted model: latent + RoPE keys (+ scales) of every MLA layer. For an original
    Llama model: its K and V (``2 H_kv d_h`` values per layer) in a float ``cache_dtype``.
    """
    from .attention import MLAAttention

    if not any(isinstance(m, MLAAttention) for m in model.modules()):
        if cache_dtype not in _FLOAT_NAMES.values():
            raise ValueError(f"an unconverted model's cache is counted in a float dtype "
                             f"(fp32/fp16/bf16), got {cache_dtype!r}")
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
                * CACHE_DTYPES[cache_dtype].itemsize)
    latent_dtype, rope = _resolve_dtypes(cache_dtype, rope_dtype, _model_dtype(model))
    return sum(latent_bytes_per_token(m.latent_dim, m.num_kv_heads, m.rope_dim, latent_dtype, rope,
                                      group_size or default_group_size(m.latent_dim))
               for m in mla_layers(model))
