"""`python -m bot run`: the service plus every adapter that has a token; the terminal otherwise."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Protocol

from bot.adapters.terminal import announce_loading, chat_loop
from bot.config import Settings
from bot.core.service import ChatService

log = logging.getLogger(__name__)


class Adapter(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def configured_adapters(settings: Settings, service: ChatService) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    if settings.telegram_bot_token:
        from bot.adapters.telegram import TelegramAdapter

        adapters["telegram"] = TelegramAdapter(settings, service)
    if settings.discord_bot_token:
        from bot.adapters.discord import DiscordAdapter

        adapters["discord"] = DiscordAdapter(settings, service)
    return adapters


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set); replies in progress finish or are marked."""
    announce_loading(settings)
    async with ChatService(settings) as service:
        adapters = configured_adapters(settings, service)
        if not adapters:
            await chat_loop(service)
            return
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        for adapter in adapters.values():
            await adapter.start()
        print(f"quantbot running on {', '.join(adapters)} with {service.current_model}; Ctrl-C to stop",
              flush=True)
        await stop.wait()
        log.warning("stopping")
        for adapter in adapters.values():
            try:
                await adapter.stop()
            except Exception:  # noqa: BLE001 - stop the others and the service regardless
                log.exception("adapter failed to stop cleanly")


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(run(settings))
    return 0
