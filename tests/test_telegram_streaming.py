"""The platform-neutral streaming loop: throttled edits, coalescing, final delivery, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from bot.adapters.streaming import MessageGone, MessageOps, NotModified, Pacer, RetryLater, StreamingMessage, TransientError


class RecordingOps(MessageOps[int]):
    """Messages kept in a dict; `failures` is a queue of exceptions raised by the next calls."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self.messages: dict[int, Hashable] = {}
        self.calls: list[tuple[str, int, Hashable]] = []
        self.failures: list[Exception] = []

    def _maybe_fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    async def send(self, rendered: Hashable) -> int:
        self._maybe_fail()
        mid = len(self.calls) + 1
        self.messages[mid] = rendered
        self.calls.append(("send", mid, rendered))
        return mid

    async def edit(self, handle: int, rendered: Hashable) -> None:
        self._maybe_fail()
        if handle not in self.messages:
            raise MessageGone()
        if self.messages[handle] == rendered:
            raise NotModified()
        self.messages[handle] = rendered
        self.calls.append(("edit", handle, rendered))


async def _stream(reply: StreamingMessage[int], words: list[str], gap: float) -> str:
    text = ""
    for w in words:
        text = f"{text} {w}".strip()
        reply.update(text)
        await asyncio.sleep(gap)
    await reply.finish(text)
    return text


async def test_send_then_throttled_growing_edits_and_final() -> None:
    ops = RecordingOps()
    reply = StreamingMessage(ops, Pacer(0.05))
    text = await _stream(reply, [f"w{i}" for i in range(40)], 0.005)
    assert ops.calls[0][0] == "send"
    edits = [c for c in ops.calls if c[0] == "edit"]
    assert 1 <= len(edits) < 39  # coalesced: far fewer edits than updates
    shown = [str(c[2]) for c in ops.calls]
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:]))  # text only grows
    assert len(set(shown)) == len(shown)  # never the same text twice
    assert list(ops.messages.values()) == [text]


async def test_status_first_then_text() -> None:
    ops = RecordingOps()
    reply = StreamingMessage(ops, Pacer(0.0))
    reply.set_status("queued: 2")
    await asyncio.sleep(0.01)
    reply.set_status("thinking")
    await asyncio.sleep(0.01)
    await reply.finish("answer")
    assert [c[2] for c in ops.calls] == ["queued: 2", "thinking", "answer"]


async def test_retry_after_waits_then_delivers_latest_text() -> None:
    ops = RecordingOps()
    reply = StreamingMessage(ops, Pacer(0.0))
    reply.update("one")
    await asyncio.sleep(0.01)
    ops.failures.append(RetryLater(0.2))
    reply.update("one two")
    await asyncio.sleep(0.05)
    reply.update("one two three")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await reply.finish("one two three four")
    assert loop.time() - t0 >= 0.1  # it waited for the rate limit
    assert [c[2] for c in ops.calls] == ["one", "one two three four"]  # pending edits coalesced


async def test_network_errors_are_retried_and_deleted_message_replaced() -> None:
    ops = RecordingOps()
    reply = StreamingMessage(ops, Pacer(0.0))
    reply.update("hello")
    await asyncio.sleep(0.01)
    ops.messages.clear()  # someone deleted the reply
    ops.failures += [TransientError("connection reset"), TransientError("timeout")]
    await reply.finish("hello world")
    assert reply.delivered_final
    assert list(ops.messages.values()) == ["hello world"]


async def test_long_text_moves_to_new_messages() -> None:
    ops = RecordingOps(limit=100)
    reply = StreamingMessage(ops, Pacer(0.0))
    words = [f"word{i:03d}" for i in range(60)]
    text = await _stream(reply, words, 0.001)
    bodies = [str(v) for v in ops.messages.values()]
    assert len(bodies) == 5  # 479 characters, 12 words (96 characters) a message
    assert all(len(b) <= 100 for b in bodies)
    assert " ".join(b.strip() for b in bodies) == text
