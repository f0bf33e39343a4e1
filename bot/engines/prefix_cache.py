"""The KV of recent replies, kept for the next prompt that starts the same way.

Every prompt of a chat begins with the same system turn, and a chat's next prompt begins with its last one and the
reply to it: a prefill that finds those tokens here computes only the rest (on two cores a prompt token costs about
as much as a decode step of the whole batch). When a reply leaves the batch its row of the cache (prompt and reply)
is kept; a prompt uses the longest run of leading tokens it shares with any kept row. Keys hold their rotary
positions, which are the same wherever a prefix starts a prompt (position 0). Least recently used rows go first
once the kept tokens pass the budget. The same code runs on CPU and CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# --- tuning constants ---
MIN_SHARED_TOKENS = 4  # a shorter shared start is computed with the rest of the prompt


@dataclass(eq=False)
class Kept:
    """One row's tokens and, per layer, their keys and values [kv_heads, tokens, head_dim]."""

    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class PrefixCache:
    """Kept rows, least recently used first, at most `budget_tokens` tokens in all (0: keep none)."""

    def __init__(self, budget_tokens: int) -> None:
        self.budget_tokens = max(0, budget_tokens)
        self._kept: OrderedDict[tuple[int, ...], Kept] = OrderedDict()
        self.hits = self.reused_tokens = 0  # prompts that found a shared start here, and its tokens (stats, tests)

    @property
    def tokens(self) -> int:
        return sum(len(k.tokens) for k in self._kept.values())

    @property
    def bytes(self) -> int:
        return sum(k.bytes for k in self._kept.values())

    def clear(self) -> None:
        self._kept.clear()

    def longest(self, ids: list[int]) -> tuple[Kept, int] | None:
        """The kept row sharing the most leading tokens with `ids`, and how many it shares (at most all but the
        last, whose logits the prefill must compute); None below :data:`MIN_SHARED_TOKENS`."""
        best: tuple[Kept, int] | None = None
        limit = len(ids) - 1
        for kept in self._kept.values():
            shared = _shared_start(kept.tokens, ids, limit)
            if shared >= MIN_SHARED_TOKENS and (best is None or shared > best[1]):
                best = (kept, shared)
        if best is not None:
            self._kept.move_to_end(best[0].tokens)
            self.hits += 1
            self.reused_tokens += best[1]
        return best

    def keep(self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep a row that left the batch: its tokens in cache order and each layer's [kv_heads, tokens, dim]. A
        kept row it extends is dropped (this one holds all of it); one that extends it makes it needless."""
        key = tuple(tokens)
        if len(key) < MIN_SHARED_TOKENS or len(key) > self.budget_tokens:
            return
        for other in list(self._kept):
            if len(other) >= len(key) and other[:len(key)] == key:
                self._kept.move_to_end(other)
                return
            if key[:len(other)] == other:
                del self._kept[other]
        self._kept[key] = Kept(key, layers)
        while self.tokens > self.budget_tokens:
            self._kept.popitem(last=False)


def _shared_start(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if a[:n] == tuple(b[:n]):
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]: halve the difference (slices compare in C)
    while high - low > 1:
        mid = (low + high) // 2
        if a[:mid] == tuple(b[:mid]):
            low = mid
        else:
            high = mid
    return low
