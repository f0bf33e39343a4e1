"""The terminal chat: the seed tutorial's multi-turn loop as a product, through the same service."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from typing import TextIO

from bot.config import Settings
from bot.core import i18n
from bot.core.i18n import _
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService

PLATFORM = "terminal"
CHAT_ID = "local"
QUIT = {"/quit", "/exit"}


class TerminalSink:
    """Prints the reply as it grows: only the new part of each full-text update."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = 0

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def queued(self, position: int, eta_s: float | None) -> None:
        if eta_s is not None:
            self._write(_("(waiting: #%(position)s in line, about %(eta).0f s)") % {"position": position, "eta": eta_s}
                        + "\n")
        else:
            self._write(_("(waiting: #%(position)s in line)") % {"position": position} + "\n")

    async def started(self) -> None:
        self._write("bot> ")

    async def update(self, text: str) -> None:
        self._write(text[self.shown:])
        self.shown = len(text)

    async def finish(self, text: str, status: ReplyStatus) -> None:
        if self.shown == 0:
            self._write("bot> ")
        self._write(text[self.shown:] if text.startswith(text[: self.shown]) else "\n" + text)
        self._write("\n")

    async def error(self, message: str) -> None:
        self._write(("\n" if self.shown else "") + f"! {message}\n")

    async def notice(self, text: str) -> None:
        self._write(text + "\n")


def _stdin_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """A daemon thread feeding stdin lines to the loop (None at end of input)."""

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="stdin", daemon=True).start()


def terminal_locale(settings: Settings) -> str:
    """LANGUAGE, else the terminal's own locale (LC_ALL, LC_MESSAGES, LANG: the order gettext reads them)."""
    return i18n.pick(settings.language, *(os.environ.get(v) for v in ("LC_ALL", "LC_MESSAGES", "LANG")))


async def chat_loop(service: ChatService, out: TextIO = sys.stdout, user: str = "you") -> None:
    """Read a line, answer it, repeat. Ctrl-C stops a running reply, or leaves when idle."""
    with i18n.using(terminal_locale(service.settings)):
        await _chat_loop(service, out, user)


async def _chat_loop(service: ChatService, out: TextIO, user: str) -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    _stdin_lines(loop, lines)
    generating = False

    def on_sigint() -> None:
        if generating:
            loop.create_task(service.queue.cancel(f"{PLATFORM}:{CHAT_ID}"))
        else:
            lines.put_nowait(None)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # not the main thread / not supported
        pass
    out.write(_("Chatting with %(model)s. /help for commands, /quit to leave.") % {"model": service.current_model}
              + "\n")
    while True:
        if sys.stdin.isatty():
            out.write(f"{user}> ")
        out.flush()
        line = await lines.get()
        if line is None or line.strip() in QUIT:
            break
        if not line.strip():
            continue
        generating = True
        try:
            await service.handle(IncomingMessage(PLATFORM, CHAT_ID, "local", user, line, locale=i18n.current()),
                                 TerminalSink(out))
        finally:
            generating = False
    out.write(_("bye") + "\n")


def announce_loading(settings: Settings, out: TextIO = sys.stderr) -> None:
    """Say what the silent minute at start-up is (loading, and on a CPU compiling, the model)."""
    with i18n.using(terminal_locale(settings)):
        print(_("loading %(model)s (on a small CPU this takes about a minute)...") % {"model": settings.default_model},
              file=out, flush=True)


def one_person(settings: Settings) -> Settings:
    """The terminal has one person reading: a batch of one, and (unless TORCH_COMPILE=on) no torch.compile, which
    costs ~75 s on a 2-core CPU before the first answer for ~1.5x the speed of eager decoding, already ~5x
    faster than anyone reads."""
    update: dict[str, object] = {"max_batch": 1}
    if settings.torch_compile == "auto":
        update["torch_compile"] = "off"
    return settings.model_copy(update=update)


async def run_terminal(settings: Settings) -> None:
    settings = one_person(settings)
    announce_loading(settings)
    async with ChatService(settings) as service:
        await chat_loop(service)


def cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    asyncio.run(run_terminal(settings))
    return 0
