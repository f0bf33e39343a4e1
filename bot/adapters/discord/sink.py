"""The ReplySink the chat service talks to: one streaming reply shown through `MessageOps`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bot.adapters.streaming import StreamingMessage
from bot.core.messages import ReplyStatus

QUEUED = "⏳ Waiting in line: number {position}{eta}."
WRITING = "✍️ Writing…"


def queue_text(position: int, eta_s: float | None) -> str:
    eta = f", about {max(1, round(eta_s))} s" if eta_s else ""
    return QUEUED.format(position=position, eta=eta)


class DiscordSink:
    """Throttled edits while the reply grows; `finish`, `error` and `notice` deliver a final text."""

    def __init__(self, stream: StreamingMessage, on_started: Callable[[], Awaitable[None]] | None = None) -> None:
        self.stream = stream
        self.on_started = on_started
        self.final_text: str | None = None
        self.status: ReplyStatus | None = None
        self._showing_status = False

    async def queued(self, position: int, eta_s: float | None) -> None:
        self._showing_status = True
        self.stream.set_status(queue_text(position, eta_s))

    async def started(self) -> None:
        if self._showing_status:
            self.stream.set_status(WRITING)
        if self.on_started is not None:
            await self.on_started()

    async def update(self, text: str) -> None:
        self.stream.update(text)

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.status = status
        await self._final(text)

    async def error(self, message: str) -> None:
        await self._final(message)

    async def notice(self, text: str) -> None:
        await self._final(text)

    async def _final(self, text: str) -> None:
        self.final_text = text
        await self.stream.finish(text)

    @property
    def delivered(self) -> bool:
        return self.stream.delivered_final
