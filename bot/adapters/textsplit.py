"""Split a long reply into platform-sized messages without breaking paragraphs or code blocks.

`split_message(text, limit)` cuts at a paragraph break, else a line break, else a space, and only
as a last resort in the middle of a word. A cut inside a ``` code block closes the block at the
end of that chunk and reopens it (same fence, same language) at the start of the next, so every
chunk renders on its own. Nothing is lost: the chunks' bodies (`split_parts`) joined together
give back the original text exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# A boundary of a preferred kind is only used if it fills at least this share of the room
# left in the chunk; otherwise the next kind (line, then word, then hard cut) is tried.
MIN_FILL = 0.5

_FENCE = re.compile(r"^ {0,3}(`{3,})([^`\n]*)$")

Length = Callable[[str], int]


def utf16_length(text: str) -> int:
    """Length in UTF-16 code units (how Telegram counts characters and entity offsets)."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


@dataclass(frozen=True)
class Chunk:
    """One message: `prefix` (a reopened fence) + `body` (original text) + `suffix` (a closing fence)."""

    prefix: str
    body: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.body + self.suffix


def split_message(text: str, limit: int, *, length: Length = len) -> list[str]:
    """Chunks of `text`, each at most `limit` long as measured by `length`.

    A chunk that would render as nothing (a lone closing fence, blank lines) is left out: platforms
    refuse an empty message, and it carried no text (the chunk before it already closed the block).
    """
    return [c.text for c in split_parts(text, limit, length=length) if not renders_empty(c)]


def renders_empty(chunk: Chunk) -> bool:
    """Only fences and whitespace: what a reader would see is an empty message."""
    return not any(line.strip() and not _FENCE.match(line.rstrip("\r\n")) for line in chunk.text.splitlines())


def _fence_states(text: str, opened: tuple[str, str] | None) -> list[tuple[int, tuple[str, str] | None]]:
    """For each line start offset in `text`: the open fence (marker, info) in force there."""
    states: list[tuple[int, tuple[str, str] | None]] = []
    pos = 0
    state = opened
    for line in text.splitlines(keepends=True):
        states.append((pos, state))
        m = _FENCE.match(line.rstrip("\r\n"))
        if m:
            marker, info = m.group(1), m.group(2)
            if state is None:
                state = (marker, info.strip())
            elif not info.strip() and len(marker) >= len(state[0]):
                state = None
        pos += len(line)
    states.append((pos, state))  # state at the very end (after the last line)
    return states


def _state_at(states: list[tuple[int, tuple[str, str] | None]], cut: int) -> tuple[str, str] | None:
    """The fence open at offset `cut`; a cut inside a line gets that line's starting state."""
    found = states[0][1]
    for start, state in states:
        if start > cut:
            break
        found = state
    return found


def _max_fit(text: str, room: int, length: Length) -> int:
    """The largest n with length(text[:n]) <= room (length grows with n)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(text[:mid]) <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _closing(body: str, fence: tuple[str, str]) -> str:
    return ("" if body.endswith("\n") else "\n") + fence[0]


def _opening(fence: tuple[str, str]) -> str:
    return f"{fence[0]}{fence[1]}\n"


def _candidates(window: str) -> list[list[int]]:
    """Cut offsets in `window` by preference: after paragraph breaks, line breaks, spaces."""
    paragraphs = [m.end() for m in re.finditer(r"\n[ \t]*\n+", window)]
    lines = [m.end() for m in re.finditer(r"\n", window)]
    words = [m.end() for m in re.finditer(r"[ \t]+", window)]
    return [paragraphs, lines, words]


def _choose_cut(rest: str, prefix: str, limit: int, length: Length,
                states: list[tuple[int, tuple[str, str] | None]]) -> int:
    """Where to end the next chunk's body so prefix + body + closing fence fits in `limit`."""
    room = limit - length(prefix)
    wide_len = _max_fit(rest, room, length)  # the most that fits if no closing fence is needed

    def fits(cut: int) -> bool:
        if cut <= 0:
            return False
        body = rest[:cut]
        state = _state_at(states, cut)
        suffix = _closing(body, state) if state else ""
        return length(prefix + body + suffix) <= limit

    fallback = 0
    for kind in _candidates(rest[: wide_len + 1]):
        best = next((c for c in sorted(kind, reverse=True) if c <= wide_len and fits(c)), 0)
        if best and length(rest[:best]) >= MIN_FILL * room:
            return best
        fallback = fallback or best
    if fallback:
        return fallback
    for cut in range(wide_len, 0, -1):  # hard cut, shrinking until the closing fence fits too
        if fits(cut):
            return cut
    return 0


def split_parts(text: str, limit: int, *, length: Length = len) -> list[Chunk]:
    """Like `split_message`, keeping apart the original text and the fences added around it."""
    if limit < 1:
        raise ValueError("limit must be positive")
    chunks: list[Chunk] = []
    rest = text
    opened: tuple[str, str] | None = None
    while rest:
        prefix = _opening(opened) if opened else ""
        if opened and length(prefix) + len(opened[0]) + 2 > limit:
            opened = (opened[0], "")  # no room to repeat a long language name
            prefix = _opening(opened)
            if length(prefix) + len(opened[0]) + 2 > limit:
                opened, prefix = None, ""  # a limit this small cannot hold fences at all
        if length(prefix + rest) <= limit:
            chunks.append(Chunk(prefix, rest, ""))
            break
        states = _fence_states(rest, opened)
        cut = _choose_cut(rest, prefix, limit, length, states)
        if cut <= 0:  # not even one character fits next to the fences: drop them
            if not prefix:
                cut = max(1, _max_fit(rest, limit, length))
                chunks.append(Chunk("", rest[:cut], ""))
                rest = rest[cut:]
                continue
            opened = None
            continue
        body = rest[:cut]
        state = _state_at(states, cut)
        if state is not None and cut == len(rest):
            # The text ends inside an unclosed block that the original never closes: keep it as is.
            chunks.append(Chunk(prefix, body, ""))
            break
        suffix = _closing(body, state) if state else ""
        chunks.append(Chunk(prefix, body, suffix))
        rest = rest[cut:]
        opened = state
    return chunks
