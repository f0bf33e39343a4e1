"""One reply in one Telegram chat: Bot API calls for the streaming loop, typing, the ReplySink.

Private chats preview a growing reply with sendMessageDraft (`DraftedMessage`) and send the final text
with sendMessage; groups, topics and servers or chats that refuse drafts use the edit loop.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
import secrets
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

from telegram import Bot, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import (BadRequest, ChatMigrated, EndPointNotFound, Forbidden, InvalidToken, NetworkError,
                            RetryAfter, TelegramError)

from bot.adapters.streaming import (DEFAULT_GIVE_UP_S, RETRY_MARGIN_S, Fatal, MessageGone, MessageOps, NotModified,
                                    Pacer, RetryLater, StreamingMessage, StreamingSink, TooLong, TransientError)
from bot.adapters.telegram.formatting import has_markup, markdown_to_html
from bot.adapters.textsplit import split_message, utf16_length
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
# Drafts have no documented rate; others saw ~5 updates/s hold and faster draw a 429 of ~3 s: stay well under.
DRAFT_INTERVAL_S = 0.3  # least time between two drafts in one chat (about 3 a second)
DRAFT_REFRESH_S = 20.0  # a draft preview lasts ~30 s: an unchanged one (queue, slow start) is sent again this often
DRAFT_MORE = "\n…"  # ends a draft cut to one message (the final messages carry all of it)
DRAFT_ID_MAX = 2**31 - 1  # draft ids are drawn from 1..this: unique per reply, across restarts too


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


class DraftRefused(Exception):
    """sendMessageDraft refused in this chat (not a private one, say) or, `everywhere`, unknown to the server."""

    def __init__(self, why: str, everywhere: bool) -> None:
        super().__init__(why)
        self.everywhere = everywhere


def draft_refusal(exc: TelegramError) -> DraftRefused | None:
    """A draft's error as a refusal (use the edit loop), or None when it means what it means for any call."""
    words = str(exc).lower()
    if isinstance(exc, EndPointNotFound) or (isinstance(exc, InvalidToken) and "not found" in words):
        return DraftRefused(str(exc), everywhere=True)  # 404: PTB reads an unknown method as a bad token
    if isinstance(exc, BadRequest) and not isinstance(translate(exc), Fatal):
        return DraftRefused(str(exc), everywhere="method" in words and "not found" in words)
    return None


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

    async def draft(self, draft_id: int, text: str) -> None:
        """sendMessageDraft: show `text` (plain) as a preview that animates in place for `draft_id`."""
        try:
            await self.bot.send_message_draft(self.chat_id, draft_id, text, message_thread_id=self.thread_id)
        except TelegramError as exc:
            refusal = draft_refusal(exc)
            if refusal is not None:
                raise refusal from exc
            mapped = translate(exc)
            if mapped is exc:
                raise
            raise mapped from exc

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


class Drafts:
    """Where sendMessageDraft may be used, shared by a bot's private-chat replies, and each chat's draft clock.

    A chat that refused a draft keeps the edit loop from then on; a server that does not know the
    method (older than Bot API 9.5) turns drafts off for every chat. Each is logged once.
    """

    def __init__(self, interval: float = DRAFT_INTERVAL_S) -> None:
        self.interval = interval
        self.unsupported = False
        self._refused: set[int] = set()
        self._clocks: dict[int, Pacer] = {}

    def allowed(self, chat_id: int) -> bool:
        return not self.unsupported and chat_id not in self._refused

    def clock(self, chat_id: int) -> Pacer:
        """Spaces the drafts of one chat (apart from its edit pacer: drafts are not messages)."""
        return self._clocks.setdefault(chat_id, Pacer(self.interval))

    def refuse(self, chat_id: int, refusal: DraftRefused) -> None:
        if refusal.everywhere:
            if not self.unsupported:
                log.info("telegram: the Bot API server does not know sendMessageDraft (%s); streaming by edits",
                         refusal)
            self.unsupported = True
        elif chat_id not in self._refused:
            log.info("telegram: chat %s refused a draft (%s); streaming by edits there", chat_id, refusal)
            self._refused.add(chat_id)


class DraftedMessage(StreamingMessage[int]):
    """A private-chat reply previewed with sendMessageDraft while it grows, then sent with sendMessage.

    Drafts are not messages, so nothing is left to edit or delete: the final text goes out as new
    messages, formatted, split and with the reply's buttons as the edit loop would leave them. A
    refused draft hands the rest of the reply to the edit loop; a rate limit only skips drafts for a while.
    """

    ops: TelegramOps

    def __init__(self, ops: TelegramOps, pacer: Pacer, drafts: Drafts, give_up_s: float = DEFAULT_GIVE_UP_S) -> None:
        super().__init__(ops, pacer, give_up_s)
        self.drafts = drafts
        self.draft_id = secrets.randbelow(DRAFT_ID_MAX) + 1  # non-zero; one preview per reply
        self.in_place = False  # regenerating into messages already sent: those are edited instead
        self._drafted: str | None = None  # the latest draft's text, until it is due again (DRAFT_REFRESH_S)
        self._refresh: asyncio.TimerHandle | None = None

    @property
    def drafting(self) -> bool:
        """Still previewing: nothing sent yet, not rewriting old messages, and drafts allowed in this chat."""
        return not self.sent and not self.in_place and self.drafts.allowed(self.ops.chat_id)

    async def _pace(self) -> None:
        await self.pacer.wait()
        clock = self.drafts.clock(self.ops.chat_id)
        while self._final is None and self.drafting and (left := clock.left()) > 0:
            await asyncio.sleep(min(left, self.drafts.interval))  # the final text does not wait for the draft clock

    def _draft_text(self, text: str) -> str:
        """The preview: the reply so far (or the status) as plain text, cut to one message."""
        body = self._with_note(text) if text.strip() else self._status
        if self.ops.length(body) <= self.limit:
            return body
        head = split_message(body, self.limit - self.ops.length(DRAFT_MORE), length=self.ops.length)[0]
        return head + DRAFT_MORE

    async def _deliver(self, text: str, final: bool) -> None:
        if final or not self.drafting:
            self._stop_refresh()
            await super()._deliver(text, final)
            return
        shown = self._draft_text(text)
        if not shown.strip() or shown == self._drafted:
            return
        clock = self.drafts.clock(self.ops.chat_id)
        try:
            await self.ops.draft(self.draft_id, shown)
        except RetryLater as exc:
            log.info("telegram: drafts rate limited in chat %s; skipping drafts for %.1f s",
                     self.ops.chat_id, exc.retry_after)
            clock.block(exc.retry_after + RETRY_MARGIN_S)
            self._wake.set()  # the latest text is drafted once the wait is over
            return
        except DraftRefused as exc:
            self.drafts.refuse(self.ops.chat_id, exc)
            await super()._deliver(text, final)  # the edit loop from here on
            return
        self.calls += 1
        clock.mark()
        self._drafted = shown
        self._stop_refresh()
        self._refresh = asyncio.get_running_loop().call_later(DRAFT_REFRESH_S, self._due)

    def _due(self) -> None:
        """The preview is about to expire: draft it again even if unchanged."""
        self._drafted = None
        self._wake.set()

    def _stop_refresh(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None

    async def aclose(self) -> None:
        self._stop_refresh()
        await super().aclose()


class TelegramSink(StreamingSink):
    """The ReplySink for one message: queue position / placeholder, streamed drafts or edits, final formatting."""

    stream: StreamingMessage[int]

    def __init__(self, ops: TelegramOps, pacer: Pacer, typing: Typing | None = None, *,
                 give_up_s: float = DEFAULT_GIVE_UP_S, reply_buttons: InlineKeyboardMarkup | None = None,
                 drafts: Drafts | None = None) -> None:
        """`drafts`: preview with sendMessageDraft (private chats); None: the edit loop."""
        stream = (DraftedMessage(ops, pacer, drafts, give_up_s) if drafts is not None
                  else StreamingMessage(ops, pacer, give_up_s))
        super().__init__(stream, reply_buttons)
        self.typing = typing

    def replace_messages(self, handles: list[Any]) -> None:
        """Regenerating in place edits the old messages: no drafts for this reply."""
        super().replace_messages(handles)
        if handles and isinstance(self.stream, DraftedMessage):
            self.stream.in_place = True

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
