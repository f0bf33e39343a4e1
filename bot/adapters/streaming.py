"""Show a growing reply by editing chat messages, throttled, on any platform.

An adapter gives `StreamingMessage` a `MessageOps` (send / edit / delete one message, render text,
the platform's length limit) and a per-chat `Pacer`. It then calls `set_status` (placeholder or
queue position), `update(full_text)` as often as it likes, and `await finish(final_text)`.

The loop, read top to bottom:
  1. wait until there is something new (or the final text),
  2. wait for the chat's pacer (the edit interval, or a rate-limit wait),
  3. take the LATEST text (everything that arrived meanwhile is coalesced into one edit),
  4. split it into messages (`split_message`), send the missing ones, edit the changed ones
     (never an edit with unchanged rendering), render finished chunks in their final form,
  5. on a rate limit wait `retry_after`; on network trouble back off; on a deleted message send a
     new one; repeat until the final text has been delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bot.adapters.textsplit import split_message
from bot.core.messages import ReplyStatus

log = logging.getLogger(__name__)

# --- tuning ---
DEFAULT_INTERVAL_S = 1.0  # least time between two edits in one chat
BACKOFF_START_S = 0.5  # first wait after a network error; doubles each time
BACKOFF_MAX_S = 8.0
MAX_ATTEMPTS = 6  # consecutive failures before giving up on this text (the final one: for good)
SHRINK_FACTOR = 0.8  # when the platform says "too long" anyway, split at this share of the limit
RETRY_MARGIN_S = 0.1  # added to a server's retry_after

H = TypeVar("H")


class RetryLater(Exception):
    """The platform asked us to wait (Telegram 429 retry_after)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class NotModified(Exception):
    """The edit would not change the message (harmless)."""


class MessageGone(Exception):
    """The message to edit no longer exists (deleted by someone)."""


class TooLong(Exception):
    """The platform refused the text as too long."""


class Fatal(Exception):
    """The platform will never accept this (bot blocked, chat gone): stop trying at once."""


class TransientError(Exception):
    """Network trouble or a server hiccup: worth another try later."""


class MessageOps(ABC, Generic[H]):
    """The platform calls a streaming reply needs; raise the exceptions above on known failures."""

    limit: int = 4096

    def length(self, text: str) -> int:
        """Length as the platform counts it."""
        return len(text)

    def render(self, text: str, final: bool) -> Hashable:
        """What to send for `text`: plain while streaming, formatted when `final`."""
        return text

    @abstractmethod
    async def send(self, rendered: Hashable) -> H: ...

    @abstractmethod
    async def edit(self, handle: H, rendered: Hashable) -> None: ...

    async def delete(self, handle: H) -> None:  # noqa: B027 - optional
        """Remove a message that is no longer needed (the text shrank); default: leave it."""


class Pacer:
    """Spaces the calls of every reply in one chat: the edit interval and rate-limit waits."""

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.interval = interval
        self._next = 0.0

    async def wait(self) -> None:
        delay = self._next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def mark(self) -> None:
        """A call just went out: the next one waits `interval`."""
        self._next = max(self._next, time.monotonic() + self.interval)

    def block(self, seconds: float) -> None:
        """The platform asked to wait `seconds` before anything else in this chat."""
        self._next = max(self._next, time.monotonic() + seconds)


@dataclass
class _Sent(Generic[H]):
    handle: H
    rendered: Hashable


class StreamingMessage(Generic[H]):
    """One reply shown as one or more messages that are edited while the text grows."""

    def __init__(self, ops: MessageOps[H], pacer: Pacer | None = None) -> None:
        self.ops = ops
        self.pacer = pacer or Pacer()
        self.limit = ops.limit
        self.sent: list[_Sent[H]] = []
        self.delivered_final = False
        self.calls = 0  # platform calls made (sends + edits)
        self._status = ""
        self._text = ""
        self._final: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        """The latest reply text received (not necessarily shown yet)."""
        return self._final if self._final is not None else self._text

    # --- what the adapter calls ---
    def set_status(self, status: str) -> None:
        """Shown while the reply has no text yet (placeholder, queue position)."""
        self._status = status
        self._poke()

    def update(self, text: str) -> None:
        """The full reply text so far; cheap, call it for every delta."""
        if text != self._text:
            self._text = text
            self._poke()

    async def finish(self, text: str) -> None:
        """Deliver `text` as the final form of the reply and return once it is shown (or given up)."""
        self._final = text
        self._poke()
        if self._task is not None:
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        """Stop without delivering anything more (shutdown)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # --- the loop ---
    def _poke(self) -> None:
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="streaming-reply")

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            await self.pacer.wait()
            self._wake.clear()
            final = self._final is not None
            text = self._final if self._final is not None else self._text
            try:
                await self._deliver(text, final)
                failures = 0
                if final:
                    self.delivered_final = True
                    return
            except RetryLater as exc:
                log.info("rate limited: waiting %.1fs", exc.retry_after)
                self.pacer.block(exc.retry_after + RETRY_MARGIN_S)
                self._wake.set()
            except Fatal as exc:
                log.warning("cannot deliver a reply: %s", exc)
                return
            except TooLong:
                self.limit = max(64, int(self.limit * SHRINK_FACTOR))
                log.warning("platform said too long; splitting at %d", self.limit)
                self._wake.set()
            except Exception as exc:  # noqa: BLE001 - network trouble or an unexpected refusal
                failures += 1
                level = logging.INFO if isinstance(exc, TransientError) else logging.WARNING
                log.log(level, "delivering a reply failed (%d/%d): %s", failures, MAX_ATTEMPTS, exc)
                if failures >= MAX_ATTEMPTS:
                    if final:
                        log.error("giving up on delivering a reply after %d attempts", failures)
                        return
                    failures = 0
                    continue  # wait for new text
                self.pacer.block(min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (failures - 1)))
                self._wake.set()

    async def _deliver(self, text: str, final: bool) -> None:
        """Make the messages show `text`: send missing ones, edit changed ones."""
        chunks = split_message(text, self.limit, length=self.ops.length) if text.strip() else []
        chunks = [c for c in chunks if c.strip()]  # platforms refuse blank messages
        if not chunks:  # no reply text yet: show the status (placeholder, queue position)
            if not self._status:
                return
            chunks = [self._status]
        for i, chunk in enumerate(chunks):
            done = final or i < len(chunks) - 1  # earlier chunks will not change any more
            rendered = self.ops.render(chunk, done)
            if i < len(self.sent):
                if self.sent[i].rendered == rendered:
                    continue
                await self._edit(i, rendered)
            else:
                handle = await self.ops.send(rendered)
                self.calls += 1
                self.pacer.mark()
                self.sent.append(_Sent(handle, rendered))
        if final:
            for extra in self.sent[len(chunks):]:
                try:
                    await self.ops.delete(extra.handle)
                except Exception as exc:  # noqa: BLE001 - leftover message; not worth failing the reply
                    log.info("could not delete a leftover message: %s", exc)
            del self.sent[len(chunks):]

    async def _edit(self, i: int, rendered: Hashable) -> None:
        try:
            await self.ops.edit(self.sent[i].handle, rendered)
        except NotModified:
            pass
        except MessageGone:
            self.sent[i].handle = await self.ops.send(rendered)
        self.calls += 1
        self.pacer.mark()
        self.sent[i].rendered = rendered


class StreamingSink:
    """The shared part of a ReplySink backed by one `StreamingMessage`: `update` streams, and
    `finish`, `error` and `notice` deliver a final text (recorded in `final_text`).

    Subclasses add `queued` / `started`, and may override `error_text` (how an error is worded),
    `_before_final` (called once the final text is recorded, before it is delivered) and `close`.
    """

    def __init__(self, stream: StreamingMessage[Any]) -> None:
        self.stream = stream
        self.final_text: str | None = None
        self.status: ReplyStatus | None = None

    async def update(self, text: str) -> None:
        self.stream.update(text)

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.status = status
        await self._final(text)

    async def error(self, message: str) -> None:
        await self._final(self.error_text(message))

    async def notice(self, text: str) -> None:
        await self._final(text)

    def error_text(self, message: str) -> str:
        return message

    async def _before_final(self) -> None:
        """Hook: runs after `final_text` is set, before the final text is delivered."""

    async def _final(self, text: str) -> None:
        self.final_text = text
        await self._before_final()
        await self.stream.finish(text)

    async def close(self) -> None:
        """After the service is done with this message: stop any edit loop still running."""
        await self.stream.aclose()
