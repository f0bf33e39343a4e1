"""The ReplySink the chat service talks to: one streaming reply shown through `MessageOps`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

from bot.adapters.streaming import StreamingMessage, StreamingSink
from bot.core.i18n import N_, _
from bot.core.messages import ReplyStatus

QUEUED = N_("⏳ Waiting in line: number %(position)s.")
QUEUED_ETA = N_("⏳ Waiting in line: number %(position)s, about %(eta)s s.")
WRITING = N_("✍️ Writing…")


def queue_text(position: int, eta_s: float | None) -> str:
    if eta_s:
        return _(QUEUED_ETA) % {"position": position, "eta": max(1, round(eta_s))}
    return _(QUEUED) % {"position": position}


class DiscordSink(StreamingSink):
    """Throttled edits while the reply grows; `finish`, `error` and `notice` deliver a final text."""

    def __init__(self, stream: StreamingMessage, on_started: Callable[[], Awaitable[None]] | None = None,
                 reply_buttons: Hashable | None = None) -> None:
        super().__init__(stream, reply_buttons)
        self.on_started = on_started
        self._showing_status = False
        self.footer: str | None = None  # shown under the finished reply, not stored (e.g. "attachment not read")

    async def finish(self, text: str, status: ReplyStatus) -> None:
        await super().finish(f"{text}\n\n{self.footer}" if self.footer else text, status)

    async def queued(self, position: int, eta_s: float | None) -> None:
        self._take_over()
        self._showing_status = True
        self.stream.set_status(queue_text(position, eta_s))

    async def started(self) -> None:
        self._take_over()
        if self._showing_status:
            self.stream.set_status(_(WRITING))
        if self.on_started is not None:
            await self.on_started()

    @property
    def delivered(self) -> bool:
        return self.stream.delivered_final
