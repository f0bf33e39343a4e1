"""A recording ReplySink for core tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from bot.core.messages import ReplyStatus


@dataclass
class RecordingSink:
    events: list[tuple[str, object]] = field(default_factory=list)
    final: str | None = None
    status: ReplyStatus | None = None
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    started_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def queued(self, position: int, eta_s: float | None) -> None:
        self.events.append(("queued", (position, eta_s)))

    async def started(self) -> None:
        self.events.append(("started", None))
        self.started_event.set()

    async def update(self, text: str) -> None:
        self.events.append(("update", text))

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.events.append(("finish", text))
        self.final, self.status = text, status

    async def error(self, message: str) -> None:
        self.events.append(("error", message))
        self.errors.append(message)

    async def notice(self, text: str) -> None:
        self.events.append(("notice", text))
        self.notices.append(text)

    @property
    def updates(self) -> list[str]:
        return [str(v) for k, v in self.events if k == "update"]

    @property
    def positions(self) -> list[int]:
        return [v[0] for k, v in self.events if k == "queued"]  # type: ignore[index]
