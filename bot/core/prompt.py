"""Prompt building: system prompt + the newest whole turns that fit the context minus the reply budget.

The request being answered (one message, or several folded together) is the newest turn and must
fit on its own; older history is optional and dropped whole, oldest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot.engines.base import ChatMessage

CountTokens = Callable[[list[ChatMessage]], int]
TURN_JOINER = "\n\n"  # between back-to-back messages of one role (folded messages, unanswered ones)


class MessageTooLong(Exception):
    """The request alone (all its folded messages together) does not fit the prompt budget."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"too long: {tokens} tokens, limit {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant
    content: str
    author: str | None = None  # the speaker's display name (user turns)

    def text(self, name_speaker: bool) -> str:
        """The content as the model sees it; in shared chats prefixed with who said it."""
        if name_speaker and self.role == "user" and self.author:
            return f"{self.author}: {self.content}"
        return self.content


def merge_consecutive(turns: Sequence[ChatMessage]) -> list[ChatMessage]:
    """Join back-to-back messages of one role (e.g. a user message whose reply failed, then another)."""
    merged: list[ChatMessage] = []
    for t in turns:
        if merged and merged[-1].role == t.role:
            merged[-1] = ChatMessage(t.role, merged[-1].content + TURN_JOINER + t.content)
        else:
            merged.append(t)
    return merged


def _render(head: list[ChatMessage], older: list[ChatMessage], newest: ChatMessage) -> list[ChatMessage]:
    """System, then older turns (never starting with the assistant), then the request."""
    while older and older[0].role == "assistant":
        older = older[1:]
    return head + merge_consecutive([*older, newest])


def build_prompt(system: str | None, history: Sequence[Turn], request: Sequence[Turn], count: CountTokens,
                 context_length: int, reply_budget: int, name_speakers: bool = False) -> list[ChatMessage]:
    """The request plus the newest history turns that fit `context_length - reply_budget` tokens.

    `request` is the message being answered and everything folded into it: it is measured as the
    one user turn the model sees, and raises MessageTooLong when that alone does not fit, so the
    caller can refuse all of it together. History is never cut inside a turn.
    """
    if not request:
        raise ValueError("no message to answer")
    limit = context_length - reply_budget
    head = [ChatMessage("system", system)] if system else []
    newest = ChatMessage("user", TURN_JOINER.join(t.text(name_speakers) for t in request))
    needed = count(head + [newest])
    if needed > limit:
        own = needed - (count(head) if head else 0)
        raise MessageTooLong(own, limit - (needed - own))
    older = merge_consecutive([ChatMessage(t.role, t.text(name_speakers)) for t in history])  # type: ignore[arg-type]
    used = needed
    chosen: list[ChatMessage] = []
    for msg in reversed(older):
        cost = count([msg])  # a slight overestimate: includes the template's fixed overhead
        if used + cost > limit:
            break
        chosen.insert(0, msg)
        used += cost
    # Per-message counts are an estimate of the joined prompt; confirm and drop the oldest if off.
    messages = _render(head, chosen, newest)
    while chosen and count(messages) > limit:
        chosen = chosen[1:]
        messages = _render(head, chosen, newest)
    return messages
