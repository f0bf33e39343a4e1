"""The batch's KV cache: rows of one width, left-padded, in buffers with room to grow.

A decode step writes each layer's new column in place (``index_copy_``, as Transformers' ``StaticCache`` does)
instead of concatenating it onto the whole cache: with ``DynamicCache`` every step copied all of it, per layer, for
every row (about a third of a batch-8 step on two cores), and the allocator kept the high-water mark of those
copies. Room is added a chunk at a time, so the buffers are copied once every :data:`GROW_COLUMNS` steps, and only
when a row joins or leaves otherwise. Columns not yet written are masked, so attention reads at most one chunk more
than it needs. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    :attr:`mask` is True where a row has a real token; :meth:`step_mask` marks the column the next step writes;
    :attr:`positions` [rows] is each row's count of real tokens, the position of its next one.
    Every change of shape (a row joins or leaves, room is added) makes new buffers, so a step's graph always sees
    inputs with fresh strides (a view would recompile it)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, width: int) -> None:
        self.width = width
        self.column = torch.tensor([width], device=mask.device)
        self.mask = mask  # [rows, capacity] bool
        self.positions = mask.sum(-1)
        super().__init__(layers=[BatchLayer(k, v, self.column) for k, v in layers])

    @classmethod
    def from_prompt(cls, prompt: Any, mask: torch.Tensor) -> BatchCache:
        """The rows a prefill filled (any Transformers cache with per-layer keys/values), left-padded as `mask`
        [rows, length] says; padded columns are zeroed (whatever the padded queries computed there)."""
        width = mask.shape[1]
        padding = ~mask[:, None, :, None]
        layers = [(_pad(layer.keys.masked_fill(padding, 0), 0, GROW_COLUMNS),
                   _pad(layer.values.masked_fill(padding, 0), 0, GROW_COLUMNS)) for layer in prompt.layers]
        return cls(layers, functional.pad(mask, (0, GROW_COLUMNS)), width)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def row(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row `index`'s keys and values, per layer [kv_heads, tokens, head_dim], its real tokens in order (a copy:
        it outlives the batch's buffers)."""
        columns = self.mask[index, :self.width].nonzero().squeeze(1)
        return [(layer.keys[index].index_select(1, columns), layer.values[index].index_select(1, columns))
                for layer in self.layers]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def step_mask(self) -> torch.Tensor:
        """[rows, 1, 1, capacity] for the next step, which writes column `width` (room is added first if full)."""
        if self.width >= self.capacity:
            self._reshape(None, 0, self.width + GROW_COLUMNS)
        self.mask[:, self.width] = True
        return self.mask[:, None, None, :]

    def advance(self) -> None:
        """After a step: its column is filled, and every row has one token more."""
        self.width += 1
        self.column.fill_(self.width)
        self.positions = self.positions + 1

    def join(self, other: BatchCache) -> None:
        """Add the rows of another batch cache (a prefill's) below these; the narrower side is padded on the left,
        and both keep their room to grow."""
        width = max(self.width, other.width)
        room = max(self.capacity - self.width, other.capacity - other.width)
        mine, theirs = self._spread(width, room), other._spread(width, room)
        layers = [(torch.cat([k1, k2]), torch.cat([v1, v2])) for (k1, v1), (k2, v2) in zip(mine[0], theirs[0],
                                                                                               strict=True)]
        self._replace(layers, torch.cat([mine[1], theirs[1]]), width, torch.cat([self.positions, other.positions]))

    def _spread(self, width: int, room: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The layers and mask padded to `width` columns in use and `room` free ones after them."""
        left, right = width - self.width, room - (self.capacity - self.width)
        layers = [(_pad(layer.keys, left, right), _pad(layer.values, left, right)) for layer in self.layers]
        return layers, functional.pad(self.mask, (left, right))

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows (indices) stay; the leading columns that are padding in every one of them are cut."""
        mask = self.mask.index_select(0, rows)
        start = int(mask.any(0).int().argmax())  # the first column some row still needs
        self._reshape(rows, start, self.capacity)

    def _reshape(self, rows: torch.Tensor | None, start: int, capacity: int) -> None:
        """New buffers of these rows (None: all), from column `start`, with `capacity` - `start` columns; each
        buffer is copied once (cut, then picked or padded)."""
        extra = capacity - self.capacity

        def cut(tensor: torch.Tensor, columns: slice) -> torch.Tensor:
            part = tensor[columns]
            return part.index_select(0, rows) if rows is not None else part

        kv = (slice(None), slice(None), slice(start, None))
        layers = [(_pad(cut(layer.keys, kv), 0, extra), _pad(cut(layer.values, kv), 0, extra))
                  for layer in self.layers]
        mask = functional.pad(cut(self.mask, (slice(None), slice(start, None))), (0, extra))
        self._replace(layers, mask, self.width - start, cut(self.positions, slice(None)))

    def _replace(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, width: int,
                 positions: torch.Tensor) -> None:
        self.mask, self.width, self.positions = _dense(mask), width, positions
        self.column.fill_(width)
        for layer, (keys, values) in zip(self.layers, layers, strict=True):
            layer.keys, layer.values = _dense(keys), _dense(values)


@dataclass(frozen=True)
class Past:
    """Keys and values a prefill starts from: per layer [rows, kv_heads, width, head_dim], each row's right-aligned
    after its padding as `mask` [rows, width] says (a row may have none)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @classmethod
    def right_aligned(cls, starts: list[list[tuple[torch.Tensor, torch.Tensor]] | None]) -> Past:
        """One batch of rows' starts (per layer [kv_heads, tokens, head_dim]; None: the row starts empty); at
        least one row has a start."""
        present = [start for start in starts if start]
        width = max(start[0][0].shape[1] for start in present)
        sample = present[0]
        mask = torch.zeros(len(starts), width, dtype=torch.bool, device=sample[0][0].device)
        for i, start in enumerate(starts):
            if start:
                mask[i, width - start[0][0].shape[1]:] = True
        layers = []
        for layer, (keys, values) in enumerate(sample):
            padded = [keys.new_zeros(len(starts), keys.shape[0], width, keys.shape[2]),
                      values.new_zeros(len(starts), values.shape[0], width, values.shape[2])]
            for i, start in enumerate(starts):
                if start:
                    for buffer, part in zip(padded, start[layer], strict=True):
                        buffer[i, :, width - part.shape[1]:] = part
            layers.append((padded[0], padded[1]))
        return cls(layers, mask)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with the strides a fresh tensor of its shape has. ``contiguous()`` is not enough: it keeps any
    stride of a size-1 dimension (one row left after a trim), and the compiled step guards on those strides."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)  # (as torch strides a fresh tensor)
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def _pad(tensor: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """[rows, heads, length, dim] with zero columns before and after (masked out by the batch's mask)."""
    return functional.pad(tensor, (0, 0, left, right)) if left or right else tensor
