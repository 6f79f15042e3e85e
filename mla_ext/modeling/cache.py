"""LatentCache: the paged, optionally quantized latent KV cache of a converted model.

It is a transformers ``Cache`` (pass it as ``past_key_values`` to ``model(...)`` or
``model.generate(...)``) with one ``LatentCacheLayer`` per MLA layer. Each layer stores, per
token, the latent ``c`` (D_c values, shared by all heads) and the rotated RoPE keys (H_kv x d_r)
in blocks of ``block_size`` tokens. The formats are those of ``mla_ext/reference.py``.

One ``SequenceTable`` per cache, shared by its layers, holds what every layer would otherwise
repeat (ARCHITECTURE 3.6): the block table, each sequence's length on the device, and on the
host an upper bound of the lengths, so that deciding how to attend never reads the device.
A forward pass is one *step*: its first MLA layer computes the write slots (and, on a GPU, the
split plan of the decode kernel) once, and the other layers reuse them.
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import CacheLayerMixin

from .. import ops
from ..checks import require_model
from ..cache_format import (CACHE_DTYPES, FLOAT_NAMES as _FLOAT_NAMES, ROPE_DTYPES,
                            CacheFormat, default_group_size, latent_bytes_per_token)
from .attention import MLAAttention
from .sequences import SequenceTable, SteppedCache, WriteStep, valid_tokens

DEFAULT_BLOCK_SIZE = 64


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


def layer_format(module, cache_dtype: str | None, rope_dtype: str | None,
                 group_size: int | None, model_dtype: torch.dtype):
    """(latent dtype, RoPE-key dtype, group size) of one MLA layer's cache: the format stored
    with the layer (``module.cache_format``, chosen by a byte-budget conversion; bf16 where
    none is stored), each part replaced by what the caller gives explicitly. A stored 16-bit
    float latent follows a 16-bit model's dtype (same bytes; the CUDA kernel reads a float
    latent in the queries' dtype)."""
    stored = getattr(module, "cache_format", None) or CacheFormat()
    if cache_dtype is not None:
        latent, rope = _resolve_dtypes(cache_dtype, rope_dtype, model_dtype)
        group = group_size or default_group_size(module.latent_dim)
        return latent, rope, group
    if rope_dtype is not None and rope_dtype not in ROPE_DTYPES:
        raise ValueError(f"rope_dtype must be one of {sorted(ROPE_DTYPES)} or None, got {rope_dtype!r}")
    latent = CACHE_DTYPES[stored.latent]
    rope = ROPE_DTYPES[rope_dtype or stored.rope]
    if model_dtype in (torch.float16, torch.bfloat16):
        latent = model_dtype if latent in (torch.float16, torch.bfloat16) else latent
        if rope_dtype is None and rope in (torch.float16, torch.bfloat16):
            rope = model_dtype
    return latent, rope, group_size or stored.group_for(module.latent_dim)


class LatentCacheLayer(CacheLayerMixin):
    """One MLA layer's paged latent storage; its sequences are those of ``table``, shared with
    the cache's other layers (a layer made alone has a table of its own)."""

    is_sliding = False
    is_croppable = True

    def __init__(self, latent_dim: int, num_kv_heads: int, rope_dim: int,
                 latent_dtype: torch.dtype, rope_dtype: torch.dtype, *, block_size: int,
                 group_size: int, max_length: int | None = None,
                 table: SequenceTable | None = None):
        super().__init__()
        if latent_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide the latent width {latent_dim}")
        if latent_dtype == torch.uint8 and group_size % 2:
            raise ValueError(f"int4 caches need an even group_size, got {group_size}")
        self.latent_dim, self.num_kv_heads, self.rope_dim = latent_dim, num_kv_heads, rope_dim
        self.latent_dtype, self.rope_dtype = latent_dtype, rope_dtype
        self.group_size = group_size
        self.table = table if table is not None else SequenceTable(block_size, max_length)
        self.storage: dict[str, torch.Tensor | None] = {}

    # Hugging Face's generate() would compile its whole forward for a compileable cache, whose
    # mask building reads the host length every step (a recompilation per token): the captured
    # decode step is mla_ext.generate's, which builds no mask.
    is_compileable = False

    @property
    def block_size(self) -> int:
        return self.table.block_size

    @property
    def max_length(self) -> int | None:
        return self.table.max_length

    @property
    def block_table(self):
        return self.table.block_table

    @property
    def seq_lens(self):
        return self.table.seq_lens

    @property
    def batch_size(self) -> int:
        if self.table.batch_size is None:
            raise AttributeError("batch_size is known after the first write")
        return self.table.batch_size

    # ---------------------------------------------------------------- storage

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

    def fit_storage(self) -> None:
        """Grow the storage to the table's block count (new blocks are appended)."""
        want = self.table.num_blocks
        if not self.storage:
            self.storage = self._new_blocks(want, self.table.device)
        have = self.storage["latent"].shape[0]
        if have < want:
            fresh = self._new_blocks(want - have, self.table.device)
            for name, old in self.storage.items():
                if old is not None:
                    self.storage[name] = torch.cat([old, fresh[name]])
        self.is_initialized = True

    def lazy_initialization(self, batch_size: int, device) -> None:
        if not self.table.initialized:
            self.table.initialize(batch_size, device)
        self.fit_storage()

    def reserve(self, batch_size: int, num_tokens: int, device) -> torch.Tensor:
        """Claim the next ``num_tokens`` positions of every sequence of a layer that owns its
        table and return their slots, (B * T,) int64 in batch-major order."""
        step = self.table.begin_write(batch_size, num_tokens, device, None)
        self.fit_storage()
        return step.slots

    def _check_tokens(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        b, t, d_c = latent.shape
        if d_c != self.latent_dim or k_rope.shape != (b, t, self.num_kv_heads, self.rope_dim):
            raise ValueError(
                f"expected latent (B, T, {self.latent_dim}) and k_rope (B, T, "
                f"{self.num_kv_heads}, {self.rope_dim}), got {tuple(latent.shape)} and "
                f"{tuple(k_rope.shape)}")

    def write(self, latent: torch.Tensor, k_rope: torch.Tensor, slots: torch.Tensor) -> None:
        """Store latent (B, T, D_c) and rotated k_rope (B, T, H_kv, d_r) at ``slots``."""
        self._check_tokens(latent, k_rope)
        b, t, d_c = latent.shape
        ops.latent_cache_write(latent.reshape(b * t, d_c).contiguous(),
                               k_rope.reshape(b * t, self.num_kv_heads, self.rope_dim).contiguous(),
                               slots, *self.tensors(), check_ranges=ops.debug_checks_enabled())

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Write T new tokens of every sequence (a layer that owns its table)."""
        self._check_tokens(latent, k_rope)
        b, t, _ = latent.shape
        self.write(latent, k_rope, self.reserve(b, t, latent.device))

    def tensors(self):
        """(latent, latent_scale, latent_zero, k_rope, k_rope_scale), the ops' cache arguments."""
        self.fit_storage()
        s = self.storage
        return s["latent"], s["latent_scale"], s["latent_zero"], s["k_rope"], s["k_rope_scale"]

    def gather(self, max_len: int | None = None):
        """Dequantized context: latent (B, L, D_c) and k_rope (B, L, H_kv, d_r), fp32, zero past
        each sequence's length (L: the host bound of the lengths)."""
        length = self.table.length if max_len is None else max_len
        return ops.latent_gather(*self.tensors(), self.block_table, self.seq_lens, length)

    def permute_storage(self, order: torch.Tensor) -> None:
        """Block i of the storage becomes old block order[i] (after SequenceTable.select)."""
        for name, t in self.storage.items():
            if t is not None:
                self.storage[name] = t[order].contiguous()

    def nbytes(self) -> int:
        """Bytes allocated by this layer's storage (its share of the tables included)."""
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
        return self.table.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.table.length + query_length, 0

    def get_max_length(self) -> int:
        return self.table.max_length or -1

    def reset(self) -> None:
        self.table.reset()

    def crop(self, tokens_to_remove: int) -> None:
        # transformers passes a negative max_length or a count to drop, depending on the caller
        length = self.table.length
        self.table.crop(length + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove)

    def _select(self, index: torch.Tensor) -> None:
        if self.table.initialized:
            self.fit_storage()
            self.permute_storage(self.table.select(index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.table.initialized:
            self._select(torch.arange(self.table.batch_size,
                                      device=self.table.device).repeat_interleave(repeats))

    def offload(self):
        raise NotImplementedError("LatentCache does not offload; it is already compressed")

    def prefetch(self):
        return None


def mla_layers(model) -> list:
    """The model's MLAAttention modules in layer order; ValueError if there are none."""
    layers = sorted((m for m in model.modules() if isinstance(m, MLAAttention)),
                    key=lambda m: m.layer_idx)
    if not layers:
        raise ValueError("the model has no MLAAttention layers: convert it first with "
                         "mla_ext.convert_to_mla(model, config)")
    return layers


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class LatentCache(SteppedCache):
    """Paged latent cache for a converted model; use as ``past_key_values``.

    Args:
        model: a model converted by ``mla_ext.convert_to_mla`` (or loaded by ``load_pretrained``).
        cache_dtype: latent format of every layer: "bf16", "fp16", "fp32", "int8", "int4" or
            "fp8"; None (default) takes each layer's stored format (``MLAAttention.cache_format``,
            chosen by a byte-budget conversion and kept in its checkpoint; bf16 latents and RoPE
            keys where the model stores none).
        rope_dtype: RoPE-key format: "bf16", "fp16", "fp32" or "fp8"; None takes, with a
            cache_dtype, the latent's float dtype (the model's dtype for quantized latents),
            without one each layer's stored format.
        block_size: tokens per cache block (default 64).
        group_size: latent channels per quantization group; None takes the layer's stored one,
            else ``default_group_size``.
        max_length: if given, room for this many tokens per sequence is allocated at once and
            never reallocated (a static cache, as CUDA-graph capture and torch.compile need).
        batch_size: with ``max_length``, allocate everything now, on the model's device, for this
            many sequences (else at the first write).

    Sequences keep their own lengths: a prefill whose attention mask marks padding stores only
    the real tokens, and decode steps attend to each sequence's own tokens through the absorbed
    kernel (``mla_decode`` with per-sequence ``seq_lens``).
    """

    def __init__(self, model, cache_dtype: str | None = None, rope_dtype: str | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, group_size: int | None = None,
                 max_length: int | None = None, batch_size: int | None = None):
        require_model(model)
        for name, value in (("group_size", group_size), ("max_length", max_length),
                            ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if batch_size is not None and max_length is None:
            raise ValueError("batch_size allocates a static cache: give max_length too")
        modules = mla_layers(model)
        self.table = SequenceTable(block_size, max_length)
        layers = []
        for m in modules:
            latent, rope, group = layer_format(m, cache_dtype, rope_dtype, group_size,
                                               _model_dtype(model))
            layers.append(LatentCacheLayer(m.latent_dim, m.num_rope_heads, m.rope_dim, latent,
                                           rope, block_size=block_size, group_size=group,
                                           table=self.table))
        super().__init__(layers=layers)
        self.first_layer = modules[0].layer_idx
        self.step = None
        if batch_size is not None:
            self.table.initialize(batch_size, _model_device(model))
            for layer in self.layers:
                layer.fit_storage()

    # ---------------------------------------------------------------- steps

    def begin_step(self, layer_idx: int, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> WriteStep:
        """The write of this forward pass: made by its first MLA layer, reused by the others.
        A prefill (no context yet) with a mask stores only the tokens the mask shows as real."""
        if layer_idx == self.first_layer or self.step is None:
            b, t = hidden_states.shape[:2]
            valid = None
            if (torch.is_tensor(attention_mask) and attention_mask.dim() in (2, 4)
                    and not self.table.has_context):
                valid = valid_tokens(attention_mask, b, t)
            self.step = self.table.begin_write(b, t, hidden_states.device, valid)
        return self.step

    def _layer_view(self, layer, view):
        part = copy.copy(layer)
        part.table = view.table
        return part

    # ---------------------------------------------------------------- Cache protocol

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    def _select(self, index: torch.Tensor) -> None:
        if not self.table.initialized:
            return
        for layer in self.layers:
            layer.fit_storage()
        order = self.table.select(index)
        for layer in self.layers:
            layer.permute_storage(order)
        self.step = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.table.initialized:
            self._select(torch.arange(self.table.batch_size,
                                      device=self.table.device).repeat_interleave(repeats))

    def nbytes(self) -> int:
        """Bytes allocated by all layers (the shared tables counted once)."""
        tables = (self.table.block_table.numel() + self.table.seq_lens.numel()) * 4 \
            if self.table.initialized else 0
        return sum(layer.nbytes() for layer in self.layers) - (len(self.layers) - 1) * tables

    def bytes_per_token(self) -> int:
        """Bytes one token occupies over all layers, scales and zeros included."""
        return sum(layer.bytes_per_token() for layer in self.layers)


def kv_cache_bytes_per_token(model, cache_dtype: str | None = None,
                             rope_dtype: str | None = None,
                             group_size: int | None = None) -> int:
    """Cache bytes per token summed over all layers, scales and zeros included.

    For a converted model: latent + RoPE keys (+ scales) of every MLA layer, in each layer's
    stored format unless ``cache_dtype`` / ``rope_dtype`` / ``group_size`` say otherwise (as
    ``LatentCache``). For an original model: its K and V (``2 H_kv d_h`` values per layer) in a
    float ``cache_dtype`` (default bf16).
    """
    require_model(model)
    if not any(isinstance(m, MLAAttention) for m in model.modules()):
        cache_dtype = cache_dtype or "bf16"
        if cache_dtype not in _FLOAT_NAMES.values():
            raise ValueError(f"an unconverted model's cache is counted in a float dtype "
                             f"(fp32/fp16/bf16), got {cache_dtype!r}")
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return (2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim
                * CACHE_DTYPES[cache_dtype].itemsize)
    total = 0
    for m in mla_layers(model):
        latent, rope, group = layer_format(m, cache_dtype, rope_dtype, group_size,
                                           _model_dtype(model))
        total += latent_bytes_per_token(m.latent_dim, m.num_rope_heads, m.rope_dim, latent, rope,
                                        group)
    return total
