"""The sequences of a paged cache and the steps that write to it (ARCHITECTURE 3.6).

A ``SequenceTable`` holds the block table and each sequence's length on the device, and on the
host an upper bound of each length; a forward pass over a ``SteppedCache`` is one step, whose
``WriteStep`` (the new tokens' slots, the lengths before the write, the decode kernel's plans) its
first layer makes and every other layer reuses.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .. import ops


def host_bookkeeping() -> bool:
    """Whether Python runs along with the device work. Under CUDA-graph capture or torch.compile
    the host counters are not advanced by the captured code: its driver advances them
    (``LatentCache.advance``), so that a replayed or compiled step reads no changing host value."""
    return not (torch.compiler.is_compiling() or ops.is_capturing())


def valid_tokens(attention_mask: torch.Tensor, batch: int, t: int) -> torch.Tensor:
    """(B, t) bool: which of a prefill's t tokens are real (not padding), read on the device from
    the mask the attention layers get: 4D (bool, True = attend, or additive float: the keys that
    the last query row may see; holds for left and right padding alike) or the 2D padding mask
    that flash-attention implementations get."""
    if attention_mask.dim() == 2:
        return attention_mask[:, -t:].bool().expand(batch, t)
    last = attention_mask[:, 0, -1, -t:]
    visible = last if last.dtype == torch.bool else last == 0
    return visible.expand(batch, t)


@dataclass
class WriteStep:
    """One forward pass's cache write, shared by every layer of the step.

    slots: (B * t,) int64 cache slots of the new tokens (-1: padding, not stored);
    past_lens: (B,) int32 device lengths before the write; seq_lens: the table's lengths
    after it (the tensor the kernels read); past_length: host bound of past_lens;
    has_context: whether any sequence had tokens before; uniform: whether every sequence had
    exactly past_length tokens (both host-known); padded: whether the write skips tokens;
    plans: the decode kernel's split plans of this step, one per layer shape."""
    slots: torch.Tensor
    past_lens: torch.Tensor
    seq_lens: torch.Tensor
    past_length: int
    has_context: bool
    uniform: bool
    padded: bool
    plans: dict = field(default_factory=dict)


class SequenceTable:
    """The sequences of a paged cache, shared by its layers: ``block_table`` (B, max_blocks)
    int32 and ``seq_lens`` (B,) int32 on the device, and on the host one upper bound of each
    sequence's length (exact until a write skips padding tokens). Block ids are handed out by
    construction, in range: the ops' per-call range checks are left to ``ops.debug_checks``."""

    def __init__(self, block_size: int, max_length: int | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.block_size, self.max_length = block_size, max_length
        self.batch_size = None
        self.device = None
        self.block_table = None
        self.seq_lens = None
        self.num_blocks = 0          # blocks every layer's storage holds
        self.exact = True            # host lengths are exact (no padding skipped)
        self.has_context = False
        self._lengths: list[int] = []
        self._root, self._row = None, None

    # ---------------------------------------------------------------- host bookkeeping

    @property
    def lengths(self) -> list[int]:
        """Per-sequence host bound of the length (exact while ``exact``)."""
        return [self._root._lengths[self._row]] if self._root else list(self._lengths)

    def _set_lengths(self, values: list[int]) -> None:
        if self._root:
            self._root._lengths[self._row] = values[0]
            self._root.has_context = self._root.has_context or values[0] > 0
        else:
            self._lengths = list(values)
        self.has_context = max(values, default=0) > 0

    @property
    def length(self) -> int:
        return max(self.lengths, default=0)

    @property
    def uniform(self) -> bool:
        """Every sequence holds exactly ``length`` tokens (host-known)."""
        return self.exact and len(set(self.lengths)) <= 1

    @property
    def initialized(self) -> bool:
        return self.block_table is not None

    def initialize(self, batch_size: int, device) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.device = batch_size, torch.device(device)
        self.block_table = torch.zeros(batch_size, 0, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._set_lengths([0] * batch_size)
        if self.max_length:
            self.ensure(self.max_length)

    def ensure(self, length: int) -> None:
        """Room for ``length`` tokens per sequence, growing the table geometrically (a cache
        with ``max_length`` allocates it all at once and never grows, as graph capture needs)."""
        if self.max_length and length > self.max_length:
            raise ValueError(f"the cache was created with max_length={self.max_length}, cannot "
                             f"hold {length} tokens")
        have = self.block_table.shape[1]
        need = -(-length // self.block_size)
        if need <= have:
            return
        if self._root is not None:
            raise ValueError("a row of a cache cannot grow: create the cache with max_length")
        want = max(need, 2 * have)
        if self.max_length:
            want = max(need, min(want, -(-self.max_length // self.block_size)))
        extra = want - have
        new_ids = self.num_blocks + torch.arange(self.batch_size * extra, dtype=torch.int32,
                                                 device=self.device)
        self.block_table = torch.cat(
            [self.block_table, new_ids.view(extra, self.batch_size).t()], 1)
        self.num_blocks += self.batch_size * extra

    def advance(self, num_tokens: int) -> None:
        """Host side of ``num_tokens`` steps run by a captured graph or a compiled step."""
        self.ensure(self.length + num_tokens)
        self._set_lengths([n + num_tokens for n in self.lengths])

    # ---------------------------------------------------------------- device side

    def begin_write(self, batch: int, t: int, device, valid: torch.Tensor | None) -> WriteStep:
        """Claim the next t positions of every sequence (only the ``valid`` tokens' when given)
        and return their slots; ``seq_lens`` advances in place, so a captured step replays."""
        if not self.initialized:
            self.initialize(batch, device)
        elif batch != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, got a batch of {batch}")
        has_context = self.has_context
        # the host lengths are read and advanced by eager code only: captured or compiled steps
        # must not depend on them (their driver advances them), and take the absorbed path
        past_length, uniform = -1, False
        if host_bookkeeping():
            past_length, uniform = self.length, self.uniform
            self.advance(t)
            if valid is not None:
                self.exact = False
        past = self.seq_lens.clone()
        if valid is None:
            offsets = torch.arange(t, device=self.device).view(1, t)
        else:
            offsets = valid.long().cumsum(1) - 1
        pos = past.long().view(-1, 1) + offsets                                    # (B, t)
        col = (pos // self.block_size).clamp_(0, max(self.block_table.shape[1] - 1, 0))
        slots = self.block_table.gather(1, col).long() * self.block_size + pos % self.block_size
        if valid is None:
            self.seq_lens.add_(t)
        else:
            slots = slots.masked_fill(~valid, -1)
            self.seq_lens.add_(valid.sum(1, dtype=torch.int32))
        return WriteStep(slots.reshape(-1), past, self.seq_lens, past_length, has_context,
                         uniform, valid is not None)

    def select(self, index: torch.Tensor) -> torch.Tensor:
        """Sequence i becomes old sequence index[i]; returns the old block of each new block,
        by which every layer reorders its storage."""
        index = index.to(self.device).long()
        per_seq = self.block_table.shape[1]
        order = self.block_table.long()[index].flatten()
        host = self.lengths
        self.batch_size = index.numel()
        self.block_table = torch.arange(self.batch_size * per_seq, dtype=torch.int32,
                                        device=self.device).view(self.batch_size, per_seq)
        self.seq_lens = self.seq_lens[index].contiguous()
        self.num_blocks = self.batch_size * per_seq
        self._set_lengths([host[i] for i in index.tolist()])
        return order

    def crop(self, keep: int) -> None:
        keep = max(0, keep)
        self._set_lengths([min(n, keep) for n in self.lengths])
        if self.seq_lens is not None:
            self.seq_lens.clamp_(max=keep)

    def reset(self) -> None:
        if self.seq_lens is not None:
            self.seq_lens.zero_()
        self._set_lengths([0] * len(self.lengths))
        self.exact = True

    def row(self, b: int) -> "SequenceTable":
        """Sequence b alone, as a table of one sequence over the same blocks and lengths."""
        if not self.initialized or self.max_length is None:
            raise ValueError("rows exist in a cache created with batch_size and max_length")
        if not 0 <= b < self.batch_size:
            raise IndexError(f"row {b} of a cache of {self.batch_size} sequences")
        view = copy.copy(self)
        view._root, view._row = (self._root or self), b if self._root is None else self._row
        view.block_table = self.block_table[b:b + 1]
        view.seq_lens = self.seq_lens[b:b + 1]
        view.batch_size = 1
        view.has_context = view.length > 0
        return view


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as an additive one in ``dtype``: 0 where visible, the
    dtype's lowest finite value elsewhere (a row with nothing visible stays finite)."""
    blocked = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return blocked.masked_fill_(~visible, torch.finfo(dtype).min)


class TableCache(Cache):
    """A cache whose sequences are one SequenceTable (``table``) and whose forward passes are
    steps (``step``, the current WriteStep): the latent cache and the original model's static
    K/V cache."""

    table: SequenceTable
    step: WriteStep | None = None

    @property
    def seq_lens(self) -> torch.Tensor:
        """(B,) int32 lengths of the sequences, on the device."""
        return self.table.seq_lens

    def advance(self, num_tokens: int) -> None:
        """Host bookkeeping of ``num_tokens`` tokens per sequence written by replayed graphs or
        compiled steps (which advance only the device lengths)."""
        self.table.advance(num_tokens)

    def row(self, b: int):
        """Sequence b of a static cache as a cache of one sequence sharing its storage: a prompt
        is prefilled into its row alone, without padding."""
        view = copy.copy(self)
        view.table = self.table.row(b)
        view.layers = [self._layer_view(layer, view) for layer in self.layers]
        view.step = None
        return view

    def _layer_view(self, layer, view):
        """``layer`` as a layer of ``view`` (a row of this cache), sharing its storage."""
        raise NotImplementedError

    def reset(self):
        self.table.reset()
        self.step = None


class SteppedCache(TableCache):
    """A table cache whose MLA layers ask for the step themselves: ``begin_step(layer_idx,
    hidden_states, attention_mask)`` returns the step's WriteStep (LatentCache). MLAAttention
    attends absorbed or reconstructed over one."""

    def begin_step(self, layer_idx: int, hidden_states: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> WriteStep:
        raise NotImplementedError
