"""StaticKVCache: the preallocated K/V cache of an unconverted model, with per-sequence lengths.

It is the original model's side of ``mla_ext.generate`` (both sides of a comparison run the same
harness): keys and values ``(B, H_kv, max_length, d_h)`` per layer in the model's dtype, the
sequences' lengths in the same ``SequenceTable`` as the latent cache (one block of
``max_length`` tokens per sequence), prompts prefilled one row at a time (``row``), decode steps
that write each sequence at its own position and attend through the mask of ``decode_mask``.
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import CacheLayerMixin

from ..checks import require_model
from .sequences import SequenceTable, TableCache, additive_mask


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class StaticKVLayer(CacheLayerMixin):
    """One layer's keys and values; ``table`` is shared by the cache's layers."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, cache: "StaticKVCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.cache, self.keys, self.values = cache, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to do: the storage is allocated with the cache."""

    def update(self, key_states, value_states, cache_kwargs=None):
        """Store (B, H_kv, t, d_h) new keys/values; return what the layer attends over: the
        row's tokens so far (a prefill of one row), or the whole capacity (a decode step, with
        ``decode_mask``)."""
        step = self.cache.begin_step(self, key_states.shape[0], key_states.shape[2],
                                     key_states.device)
        max_len = self.keys.shape[2]
        rows, pos = step.slots // max_len, step.slots % max_len
        self.keys[rows, :, pos] = key_states.transpose(1, 2).flatten(0, 1).to(self.keys.dtype)
        self.values[rows, :, pos] = value_states.transpose(1, 2).flatten(0, 1).to(self.values.dtype)
        table = self.cache.table
        if table._root is not None:   # a row: its own tokens only (host-known length)
            b = table._row
            return self.keys[b:b + 1, :, :table.length], self.values[b:b + 1, :, :table.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cache.table.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.table.length + query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        self.cache.table.reset()


class StaticKVCache(TableCache):
    """Preallocated K/V cache of an unconverted model for ``batch_size`` sequences of up to
    ``max_length`` tokens (see the module's doc)."""

    def __init__(self, model, batch_size: int, max_length: int):
        require_model(model)
        cfg = model.config
        param = next(model.parameters())
        self.table = SequenceTable(block_size=max_length, max_length=max_length)
        self.table.initialize(batch_size, param.device)
        shape = (batch_size, cfg.num_key_value_heads, max_length, _head_dim(cfg))
        layers = [StaticKVLayer(self, torch.zeros(shape, dtype=param.dtype, device=param.device),
                                torch.zeros(shape, dtype=param.dtype, device=param.device))
                  for _ in range(cfg.num_hidden_layers)]
        super().__init__(layers=layers)
        self.step = None

    def begin_step(self, layer, batch: int, t: int, device):
        if layer is self.layers[0] or self.step is None:
            self.step = self.table.begin_write(batch, t, device, None)
        return self.step

    def decode_mask(self, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
        """(B, 1, 1, max_length) mask of a decode step, made before it: sequence b sees its
        seq_lens[b] tokens and the new one. Boolean (True: attend) or additive in ``dtype``."""
        max_len = self.layers[0].keys.shape[2]
        visible = (torch.arange(max_len, device=self.table.device).view(1, -1)
                   <= self.table.seq_lens.view(-1, 1)).view(-1, 1, 1, max_len)
        return visible if boolean else additive_mask(visible, dtype)

    def _layer_view(self, layer, view):
        part = copy.copy(layer)
        part.cache = view
        return part

    def nbytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers)


