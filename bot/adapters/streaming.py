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

Temporary trouble (network, 5xx, 429) with the final text is retried with backoff for `give_up_s`
(minutes by default); a permanent refusal (`Fatal`: blocked, no rights, chat gone) is not retried.
A reply that could not be delivered in full leaves a note on the chat's `Pacer`: the next reply
shown in that chat begins with `CUT_NOTE`. (The reply itself is stored by the service either way.)
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
from bot.core.i18n import N_, _
from bot.core.messages import ReplyStatus

log = logging.getLogger(__name__)

# --- tuning ---
DEFAULT_INTERVAL_S = 1.0  # least time between two edits in one chat
BACKOFF_START_S = 0.5  # first wait after a network error; doubles each time
BACKOFF_MAX_S = 30.0  # at most this, and at most a twentieth of give_up_s
DEFAULT_GIVE_UP_S = 300.0  # how long temporary trouble with the final text is retried (DELIVERY_RETRY_S)
MAX_ATTEMPTS = 6  # consecutive unexplained refusals before giving up on this text (the final one: for good)
CUT_NOTE = N_("(My previous reply here could not be delivered in full. It is saved: ask me to repeat it.)")
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
    """The platform will never accept this (bot blocked, no rights, chat gone): stop trying at once."""


class TransientError(Exception):
    """Network trouble or a server hiccup: worth trying again for a while (`give_up_s`)."""


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

    def with_buttons(self, rendered: Hashable, buttons: Hashable) -> Hashable:
        """`rendered` carrying `buttons` (the reply's Regenerate button); default: no buttons."""
        return rendered

    def message_id(self, handle: H) -> Hashable:
        """The platform's id of the message behind `handle` (buttons name the message they are on)."""
        return handle  # type: ignore[return-value]

    async def strip_buttons(self, message_id: Hashable) -> None:  # noqa: B027 - optional
        """Remove the buttons from one of our earlier messages (a reply that is no longer the latest)."""


class Pacer:
    """Spaces the calls of every reply in one chat: the edit interval and rate-limit waits."""

    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.interval = interval
        self._next = 0.0
        self.owes_note = False  # a reply in this chat was cut: the next one says so

    def left(self) -> float:
        """Seconds until the next call may go out (0 when it may go now)."""
        return max(0.0, self._next - time.monotonic())

    async def wait(self) -> None:
        delay = self.left()
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

    def __init__(self, ops: MessageOps[H], pacer: Pacer | None = None, give_up_s: float = DEFAULT_GIVE_UP_S) -> None:
        self.ops = ops
        self.pacer = pacer or Pacer()
        self.give_up_s = give_up_s
        self.limit = ops.limit
        self.sent: list[_Sent[H]] = []
        self.delivered_final = False
        self._note: str | None = None  # CUT_NOTE + blank line when this reply carries it; "" when not
        self.calls = 0  # platform calls made (sends + edits)
        self._status = ""
        self._text = ""
        self._final: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.buttons: Hashable | None = None  # shown under the final text's last message

    @property
    def text(self) -> str:
        """The latest reply text received (not necessarily shown yet)."""
        return self._final if self._final is not None else self._text

    # --- what the adapter calls ---
    def adopt(self, handles: list[H]) -> None:
        """Show this reply in messages already sent (regenerating a reply in place) instead of new ones."""
        self.sent = [_Sent(h, None) for h in handles]

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

    def _backoff(self, failures: int) -> float:
        ceiling = min(BACKOFF_MAX_S, self.give_up_s / 20)
        return min(ceiling, BACKOFF_START_S * 2 ** (failures - 1))

    def _cut(self, why: str) -> None:
        """Give up on this reply; the chat's next reply will say so."""
        log.error("giving up on delivering a reply: %s", why)
        self.pacer.owes_note = True

    async def _run(self) -> None:
        refusals = 0  # unexplained refusals in a row
        retries = 0  # failed tries since the last success (sets the backoff)
        trouble_since: float | None = None  # when the first of them failed
        while True:
            await self._wake.wait()
            await self._pace()
            self._wake.clear()
            final = self._final is not None
            text = self._final if self._final is not None else self._text
            try:
                await self._deliver(text, final)
                refusals, retries, trouble_since = 0, 0, None
                if final:
                    self.delivered_final = True
                    return
                continue
            except Fatal as exc:
                self._cut(f"the platform refused it for good ({exc})")
                return
            except TooLong:
                self.limit = max(64, int(self.limit * SHRINK_FACTOR))
                log.warning("platform said too long; splitting at %d", self.limit)
                self._wake.set()
                continue
            except RetryLater as exc:
                log.info("rate limited: waiting %.1fs", exc.retry_after)
                self.pacer.block(exc.retry_after + RETRY_MARGIN_S)
            except TransientError as exc:
                retries += 1
                log.info("delivering a reply failed (try %d), will retry: %s", retries, exc)
                self.pacer.block(self._backoff(retries))
            except Exception as exc:  # noqa: BLE001 - an unexpected refusal: a few tries, then not this text
                refusals += 1
                retries += 1
                log.warning("delivering a reply failed (%d/%d): %s", refusals, MAX_ATTEMPTS, exc)
                if refusals >= MAX_ATTEMPTS:
                    if final:
                        self._cut(f"{refusals} refusals in a row")
                        return
                    refusals = 0
                    continue  # wait for new text
                self.pacer.block(self._backoff(retries))
            now = time.monotonic()
            trouble_since = now if trouble_since is None else trouble_since
            if final and now - trouble_since >= self.give_up_s:
                self._cut(f"no delivery for {now - trouble_since:.0f} s")
                return
            self._wake.set()

    async def _pace(self) -> None:
        """Wait until the next call may go out (a subclass may pace some calls by another clock)."""
        await self.pacer.wait()

    def _with_note(self, text: str) -> str:
        """The reply text, after the chat's "a reply was cut" note if this reply is the one to carry it."""
        if self._note is None:
            self._note = f"{_(CUT_NOTE)}\n\n" if self.pacer.owes_note else ""
            self.pacer.owes_note = False  # taken; `_cut` puts it back if this reply fails too
        return self._note + text

    async def _deliver(self, text: str, final: bool) -> None:
        """Make the messages show `text`: send missing ones, edit changed ones."""
        chunks = split_message(self._with_note(text), self.limit, length=self.ops.length) if text.strip() else []
        if not chunks:  # no reply text yet: show the status (placeholder, queue position)
            if not self._status:
                return
            chunks = [self._status]
        for i, chunk in enumerate(chunks):
            done = final or i < len(chunks) - 1  # earlier chunks will not change any more
            rendered = self.ops.render(chunk, done)
            if final and self.buttons is not None and i == len(chunks) - 1:
                rendered = self.ops.with_buttons(rendered, self.buttons)
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

    def __init__(self, stream: StreamingMessage[Any], reply_buttons: Hashable | None = None) -> None:
        """`reply_buttons`: put under a finished reply (not under notices and errors)."""
        self.stream = stream
        self.final_text: str | None = None
        self.status: ReplyStatus | None = None
        self.reply_buttons = reply_buttons
        self._replaces: list[Any] | None = None

    def replace_messages(self, handles: list[Any]) -> None:
        """Regenerating: once the new reply is under way, show it in these messages (edited in place).

        Until then nothing is touched, so a refusal (still busy, nothing to redo) arrives as a new
        message and the old reply stays readable.
        """
        self._replaces = handles

    def _take_over(self) -> None:
        """Called by `queued` / `started`: the reply is accepted, so the old messages become its own."""
        if self._replaces is not None:
            self.stream.adopt(self._replaces)
            self._replaces = None

    async def update(self, text: str) -> None:
        self.stream.update(text)

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.status = status
        self.stream.buttons = self.reply_buttons
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
