"""The batch's KV cache: rows of one width, left-padded, in buffers with room to grow.

A decode step writes each layer's new column in place (``index_copy_``, as Transformers' ``StaticCache`` does)
instead of concatenating it onto the whole cache: with ``DynamicCache`` every step copied all of it, per layer, for
every row (about a third of a batch-8 step on two cores), and the allocator kept the high-water mark of those
copies. Room is added a chunk at a time, so the buffers are copied once every :data:`GROW_COLUMNS` steps, and only
when a row joins or leaves otherwise. Columns not yet written are masked, so attention reads at most one chunk more
than it needs. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional
from transformers.cache_utils import Cache, CacheLayerMixin

# --- tuning constants ---
GROW_COLUMNS = 32  # room added when the buffers are full: a copy every 32 steps; attention reads <= 31 spare columns


class BatchLayer(CacheLayerMixin):
    """One layer's keys and values, [rows, kv_heads, capacity, head_dim]; writes go to the batch's shared column."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Never needed: a batch layer is made from a prompt's cache."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return int(self.column.item())

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class BatchCache(Cache):
    """Every row's cache; the columns [0, width) hold the tokens so far, each row's right-aligned after its padding.

    :attr:`mask` is True where a row has a real token; :meth:`step_mask` marks the column the next step writes.
    Every change of shape (a row joins or leaves, room is added) makes new buffers, so a step's graph always sees
    contiguous inputs (a view would recompile it)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, width: int) -> None:
        self.width = width
        self.column = torch.tensor([width], device=mask.device)
        self.mask = mask  # [rows, capacity] bool
        super().__init__(layers=[BatchLayer(k, v, self.column) for k, v in layers])

    @classmethod
    def from_prompt(cls, prompt: Any) -> BatchCache:
        """One row from the cache a prompt's prefill filled (any Transformers cache with per-layer keys/values)."""
        width = prompt.layers[0].keys.shape[2]
        room = GROW_COLUMNS
        layers = [(_pad(layer.keys, 0, room), _pad(layer.values, 0, room)) for layer in prompt.layers]
        mask = torch.ones(1, width + room, dtype=torch.bool, device=layers[0][0].device)
        mask[:, width:] = False
        return cls(layers, mask, width)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def step_mask(self) -> torch.Tensor:
        """[rows, 1, 1, capacity] for the next step, which writes column `width` (room is added first if full)."""
        if self.width >= self.capacity:
            self._reshape(torch.arange(self.rows, device=self.mask.device), 0, self.width + GROW_COLUMNS)
        self.mask[:, self.width] = True
        return self.mask[:, None, None, :]

    def advance(self) -> None:
        """After a step: its column is filled."""
        self.width += 1
        self.column.fill_(self.width)

    def join(self, prompt: Any) -> None:
        """Add a row from a prompt's cache; the shorter side is padded on the left."""
        length = prompt.layers[0].keys.shape[2]
        grow, pad = max(0, length - self.width), max(0, self.width - length)
        width = self.width + grow
        room = self.capacity - self.width
        layers = []
        for layer, row in zip(self.layers, prompt.layers, strict=True):
            layers.append((torch.cat([_pad(layer.keys, grow, 0), _pad(row.keys, pad, room)]),
                           torch.cat([_pad(layer.values, grow, 0), _pad(row.values, pad, room)])))
        real = torch.ones(1, length, dtype=torch.bool, device=self.mask.device)
        mask = torch.cat([functional.pad(self.mask, (grow, 0)), functional.pad(real, (pad, room))])
        self._replace(layers, mask, width)

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (indices) stay; the leading columns that are padding in every one of them are cut."""
        mask = self.mask.index_select(0, rows)
        start = int(mask.any(0).int().argmax())  # the first column some row still needs
        self._reshape(rows, start, self.capacity)

    def _reshape(self, rows: torch.Tensor, start: int, capacity: int) -> None:
        """New buffers of these rows, from column `start`, with `capacity` - `start` columns."""
        extra = capacity - self.capacity
        layers = [(_pad(layer.keys.index_select(0, rows)[:, :, start:], 0, extra),
                   _pad(layer.values.index_select(0, rows)[:, :, start:], 0, extra)) for layer in self.layers]
        mask = functional.pad(self.mask.index_select(0, rows)[:, start:], (0, extra))
        self._replace(layers, mask, self.width - start)

    def _replace(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, width: int) -> None:
        self.mask, self.width = mask.contiguous(), width
        self.column.fill_(width)
        for layer, (keys, values) in zip(self.layers, layers, strict=True):
            layer.keys, layer.values = keys.contiguous(), values.contiguous()


def _pad(tensor: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """[rows, heads, length, dim] with zero columns before and after (masked out by the batch's mask)."""
    return functional.pad(tensor, (0, 0, left, right)) if left or right else tensor
