"""Prompt building: system prompt + the newest whole turns that fit the context minus the reply budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.engines.base import ChatMessage

CountTokens = Callable[[list[ChatMessage]], int]


class MessageTooLong(Exception):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"too long: {tokens} tokens, limit {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant
    content: str


def merge_consecutive(turns: Sequence[Turn]) -> list[Turn]:
    """Join back-to-back turns of one role (e.g. a user message whose reply failed, then another)."""
    merged: list[Turn] = []
    for t in turns:
        if merged and merged[-1].role == t.role:
            merged[-1] = Turn(t.role, merged[-1].content + "\n\n" + t.content)
        else:
            merged.append(t)
    return merged


def build_prompt(system: str | None, turns: Sequence[Turn], count: CountTokens, context_length: int,
                 reply_budget: int) -> list[ChatMessage]:
    """The newest turns that fit `context_length - reply_budget` tokens, never cutting a turn.

    The last turn (the newest user message) always goes in, or MessageTooLong is raised.
    A prompt never starts with an assistant turn.
    """
    limit = context_length - reply_budget
    head = [ChatMessage("system", system)] if system else []
    turns = merge_consecutive(turns)
    if not turns:
        raise ValueError("no message to answer")
    newest = [ChatMessage(turns[-1].role, turns[-1].content)]  # type: ignore[arg-type]
    needed = count(head + newest)
    if needed > limit:
        own = needed - (count(head) if head else 0)
        raise MessageTooLong(own, limit - (needed - own))
    used = needed
    chosen = newest
    for t in reversed(turns[:-1]):
        msg = ChatMessage(t.role, t.content)  # type: ignore[arg-type]
        cost = count([msg])  # a slight overestimate: includes the template's fixed overhead
        if used + cost > limit:
            break
        chosen = [msg] + chosen
        used += cost
    # Per-message counts are an estimate of the joined prompt; confirm and trim the oldest if off.
    while len(chosen) > 1 and count(head + chosen) > limit:
        chosen = chosen[1:]
    while chosen and chosen[0].role == "assistant":
        chosen = chosen[1:]
    return head + chosen
