"""Helpers for core tests: talk to a toy-engine service as people would, and wait for queue states."""

from __future__ import annotations

import asyncio

from bot.core.messages import IncomingMessage
from tests.sinks import RecordingSink


def msg(text: str, chat: str = "c1", user: str | None = None, **kw: object) -> IncomingMessage:
    """A message in `chat`; by default each chat is a different person (one user per chat)."""
    user = user or f"u-{chat}"
    name = kw.pop("user_name", None) or f"Ann {user}"
    return IncomingMessage(platform="test", chat_id=chat, user_id=user, user_name=name, text=text,
                           **kw)  # type: ignore[arg-type]


async def say(service, text: str, chat: str = "c1", user: str | None = None, **kw: object) -> RecordingSink:
    sink = RecordingSink()
    await service.handle(msg(text, chat, user, **kw), sink)
    return sink


async def until(cond, timeout: float = 20.0) -> None:
    """Wait for a queue state instead of sleeping a guessed time (the machine may be busy)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.002)


def running(service, chat: str) -> bool:
    return service.queue.is_running(f"test:{chat}")


def waiting(service, chat: str) -> bool:
    return service.queue.has_waiting(f"test:{chat}")


async def stored(service, chat: str = "c1"):
    return await service.store.messages(await service.store.chat_id("test", chat))
