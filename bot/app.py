"""`python -m bot run`: the service plus every adapter that has a token; the terminal otherwise."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Protocol

from bot.adapters.terminal import announce_loading, chat_loop, one_person
from bot.config import Settings
from bot.core.service import ChatService
from bot.metrics import MetricsServer, start_metrics

log = logging.getLogger(__name__)


class Adapter(Protocol):
    failed: asyncio.Event  # set when the platform will not have the bot back: the process exits non-zero

    @property
    def connected(self) -> bool: ...  # connected to its platform now (/healthz)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def configured_adapters(settings: Settings, service: ChatService,
                        service_ready: asyncio.Event | None = None) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    if settings.telegram_bot_token:
        from bot.adapters.telegram import TelegramAdapter

        adapters["telegram"] = TelegramAdapter(settings, service, service_ready=service_ready)
    if settings.discord_bot_token:
        from bot.adapters.discord import DiscordAdapter

        adapters["discord"] = DiscordAdapter(settings, service, service_ready=service_ready)
    return adapters


async def run(settings: Settings, stop: asyncio.Event | None = None, service: ChatService | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or `stop` is set); replies in progress finish or are marked.

    The adapters connect first and the model loads after, so whoever writes during the load is
    told to wait and then answered (Discord would drop interactions nobody acknowledges, and
    messages sent while the bot is offline). Returns the exit code: 1 when an adapter lost its
    platform for good.
    """
    if not (settings.telegram_bot_token or settings.discord_bot_token):
        settings = one_person(settings)  # the terminal chat
    announce_loading(settings)
    service = service or ChatService(settings)
    service_ready = asyncio.Event()
    adapters = configured_adapters(settings, service, service_ready)
    if not adapters:
        async with service:
            await chat_loop(service)
        return 0
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    started: list[Adapter] = []
    metrics: MetricsServer | None = None
    try:
        # Up before the adapters connect and the model loads: /healthz says what is not ready yet.
        metrics = await start_metrics(settings, service, adapters)
        for adapter in adapters.values():
            await adapter.start()
            started.append(adapter)
        await service.start()
        service_ready.set()
        served = f"; health and metrics on {metrics.url}" if metrics else ""
        print(f"quantbot running on {', '.join(adapters)} with {service.current_model}{served}; Ctrl-C to stop",
              flush=True)
        lost = await _until_stopped(stop, adapters)
    finally:
        log.warning("stopping")
        for adapter in started:
            try:
                await adapter.stop()
            except Exception:  # noqa: BLE001 - stop the others and the service regardless
                log.exception("adapter failed to stop cleanly")
        await service.close()
        if metrics is not None:
            await metrics.stop()
    if lost:
        log.error("stopped because %s lost its connection for good", " and ".join(lost))
        return 1
    return 0


async def _until_stopped(stop: asyncio.Event, adapters: dict[str, Adapter]) -> list[str]:
    """Wait for `stop` or for an adapter to fail; the names of those that failed."""
    waits = {asyncio.create_task(stop.wait()): ""}
    waits.update({asyncio.create_task(a.failed.wait()): name for name, a in adapters.items()})
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return [name for name, a in adapters.items() if a.failed.is_set()]


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(run(settings))
