"""One reply in one Telegram chat: Bot API calls for the streaming loop, typing, the ReplySink."""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
from collections.abc import Hashable
from dataclasses import dataclass, replace

from telegram import Bot, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, RetryAfter, TelegramError

from bot.adapters.streaming import (DEFAULT_GIVE_UP_S, Fatal, MessageGone, MessageOps, NotModified, Pacer, RetryLater,
                                    StreamingMessage, StreamingSink, TooLong, TransientError)
from bot.adapters.telegram.formatting import has_markup, markdown_to_html
from bot.adapters.textsplit import utf16_length
from bot.core.i18n import _

log = logging.getLogger(__name__)

# --- tuning ---
MESSAGE_LIMIT = 4096  # characters (UTF-16 units) after entity parsing
TYPING_REFRESH_S = 4.0  # "typing" shows for up to 5 s
PLACEHOLDER = "✍️ …"
PLAIN_RETRY_ERRORS = ("can't parse entities", "can't find end", "unsupported start tag")
# 400s that no retry will cure: the bot may not write here (any more), or the place is gone.
PERMANENT_ERRORS = ("chat not found", "bot was kicked", "not enough rights", "have no rights", "chat_write_forbidden",
                    "need administrator rights", "topic_closed", "message thread not found", "group chat was deactivated",
                    "bot is not a member")


def queue_status(position: int, eta_s: float | None) -> str:
    if eta_s:
        return (_("⏳ You're number %(position)s in the queue, about %(eta).0f s.")
                % {"position": position, "eta": eta_s})
    return _("⏳ You're number %(position)s in the queue.") % {"position": position}


@dataclass(frozen=True)
class Rendered:
    """What goes out: the text, its parse mode, and the Markdown it came from (for the plain fallback)."""

    text: str
    parse_mode: str | None
    source: str
    keyboard: InlineKeyboardMarkup | None = None  # the reply's Regenerate button, on its last message


def translate(exc: TelegramError) -> Exception:
    """PTB's exception -> the streaming loop's vocabulary (Telegram words matched case-insensitively)."""
    words = str(exc).lower()
    if isinstance(exc, RetryAfter):
        raw = getattr(exc, "_retry_after", None)
        seconds = raw.total_seconds() if isinstance(raw, dtm.timedelta) else float(raw or 1)
        return RetryLater(seconds)
    if isinstance(exc, BadRequest):
        if "message is not modified" in words:
            return NotModified()
        if "message to edit not found" in words or "message can't be edited" in words:
            return MessageGone()
        if "message is too long" in words:
            return TooLong()
        if any(w in words for w in PERMANENT_ERRORS):
            return Fatal(str(exc))
        return exc
    if isinstance(exc, Forbidden):
        return Fatal(str(exc))
    if isinstance(exc, NetworkError):
        return TransientError(str(exc))
    return exc


class TelegramOps(MessageOps[int]):
    """sendMessage / editMessageText for one chat (and topic); the first message may carry a keyboard."""

    limit = MESSAGE_LIMIT

    def __init__(self, bot: Bot, chat_id: int, thread_id: int | None = None, reply_to: int | None = None,
                 keyboard: InlineKeyboardMarkup | None = None) -> None:
        self.bot = bot
        self.chat_id = chat_id
        self.thread_id = thread_id
        self.reply_to = reply_to
        self.keyboard = keyboard

    def length(self, text: str) -> int:
        return utf16_length(text)

    def render(self, text: str, final: bool) -> Hashable:
        if final and has_markup(text):
            return Rendered(markdown_to_html(text), ParseMode.HTML, text)
        return Rendered(text, None, text)

    async def _call(self, make: object) -> object:
        try:
            try:
                return await make()  # type: ignore[operator]
            except ChatMigrated as exc:  # the group became a supergroup: it lives on under a new id
                log.warning("telegram: chat %s moved to %s; continuing there", self.chat_id, exc.new_chat_id)
                self.chat_id = int(exc.new_chat_id)
                return await make()  # type: ignore[operator]
        except TelegramError as exc:
            mapped = translate(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def send(self, rendered: Hashable) -> int:
        assert isinstance(rendered, Rendered)
        reply = ReplyParameters(self.reply_to, allow_sending_without_reply=True) if self.reply_to else None
        keyboard, self.keyboard = self.keyboard, None  # only on the first message

        async def go(r: Rendered) -> int:
            msg = await self._call(lambda: self.bot.send_message(
                self.chat_id, r.text, parse_mode=r.parse_mode, message_thread_id=self.thread_id,
                reply_parameters=reply, reply_markup=r.keyboard or keyboard))
            return msg.message_id  # type: ignore[attr-defined]

        return await self._with_plain_fallback(go, rendered)

    async def edit(self, handle: int, rendered: Hashable) -> None:
        assert isinstance(rendered, Rendered)

        async def go(r: Rendered) -> None:
            await self._call(lambda: self.bot.edit_message_text(
                r.text, chat_id=self.chat_id, message_id=handle, parse_mode=r.parse_mode, reply_markup=r.keyboard))

        await self._with_plain_fallback(go, rendered)

    async def delete(self, handle: int) -> None:
        await self._call(lambda: self.bot.delete_message(self.chat_id, handle))

    def with_buttons(self, rendered: Hashable, buttons: Hashable) -> Hashable:
        assert isinstance(rendered, Rendered) and isinstance(buttons, InlineKeyboardMarkup)
        return replace(rendered, keyboard=buttons)

    async def strip_buttons(self, message_id: Hashable) -> None:
        await self._call(lambda: self.bot.edit_message_reply_markup(self.chat_id, int(message_id),  # type: ignore[call-overload]
                                                                    reply_markup=None))

    @staticmethod
    async def _with_plain_fallback(go: object, rendered: Rendered) -> object:
        try:
            return await go(rendered)  # type: ignore[operator]
        except BadRequest as exc:
            if rendered.parse_mode and any(w in str(exc).lower() for w in PLAIN_RETRY_ERRORS):
                log.info("formatted text refused (%s); sending plain text", exc)
                return await go(replace(rendered, text=rendered.source, parse_mode=None))  # type: ignore[operator]
            raise


class Typing:
    """Keeps "typing…" showing in a chat until stopped."""

    def __init__(self, bot: Bot, chat_id: int, thread_id: int | None) -> None:
        self.bot, self.chat_id, self.thread_id = bot, chat_id, thread_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"typing-{self.chat_id}")

    async def _loop(self) -> None:
        while True:
            try:
                await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)
            except RetryAfter as exc:
                retry = translate(exc)
                await asyncio.sleep(retry.retry_after if isinstance(retry, RetryLater) else TYPING_REFRESH_S)
                continue
            except TelegramError as exc:  # typing is cosmetic; never let it disturb the reply
                log.info("typing action failed: %s", exc)
            await asyncio.sleep(TYPING_REFRESH_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class TelegramSink(StreamingSink):
    """The ReplySink for one message: queue position / placeholder, streamed edits, final formatting."""

    stream: StreamingMessage[int]

    def __init__(self, ops: TelegramOps, pacer: Pacer, typing: Typing | None = None, *,
                 give_up_s: float = DEFAULT_GIVE_UP_S, reply_buttons: InlineKeyboardMarkup | None = None) -> None:
        super().__init__(StreamingMessage(ops, pacer, give_up_s), reply_buttons)
        self.typing = typing

    async def queued(self, position: int, eta_s: float | None) -> None:
        self._take_over()
        self.stream.set_status(queue_status(position, eta_s))

    async def started(self) -> None:
        self._take_over()
        self.stream.set_status(PLACEHOLDER)

    def error_text(self, message: str) -> str:
        return f"⚠️ {message}"

    async def _before_final(self) -> None:
        if self.typing:
            await self.typing.stop()

    async def close(self) -> None:
        """After the service is done with this message: stop typing, stop any unfinished stream."""
        if self.typing:
            await self.typing.stop()
        if self.final_text is None:
            await self.stream.aclose()
