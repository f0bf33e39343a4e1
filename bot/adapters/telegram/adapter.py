"""The Telegram adapter: python-telegram-bot polling, who gets an answer, and one sink per message."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from telegram import BotCommand, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update, User
from telegram.constants import ChatType, MessageEntityType
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import AIORateLimiter, Application, CallbackQueryHandler, ContextTypes, MessageHandler, filters

from bot.adapters.delivery import TEXT_ONLY, handle_reply, started
from bot.adapters.regenerate import BUTTON_ID, BUTTON_LABEL, RETRY_COMMAND, STALE, WRITING_AGAIN, LatestReplies, strip
from bot.adapters.streaming import Pacer
from bot.adapters.telegram.sink import Drafts, TelegramOps, TelegramSink, Typing
from bot.core import i18n
from bot.core.access import AccessPolicy, Verdict, wants_chat_admin_fact
from bot.core.i18n import N_, _
from bot.core.messages import IncomingMessage
from bot.core.service import COMMANDS, NOT_ALLOWED, parse_command
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.core.service import ChatService

log = logging.getLogger(__name__)

# --- tuning ---
POLL_TIMEOUT_S = 10.0  # getUpdates long-poll; tests use ~1 s so shutdown is quick
STOP_GRACE_S = 5.0  # stop() lets replies in progress run this long, then marks them (docker stop: 10 s)
SOMETHING_WRONG = N_("Sorry, something went wrong on my side. Please try again.")
REFUSAL_COOLDOWN_S = 3600.0  # a refused user hears "not allowed" at most once per this long
CHAT_ADMIN_STATUSES = ("creator", "administrator")  # getChatMember statuses that administer a group
MODEL_BUTTON_PREFIX = "model:"
PERSONA_BUTTON_PREFIX = "persona:"
# A pressed button is the command it stands for, with what the button names as its argument.
BUTTON_COMMANDS = {MODEL_BUTTON_PREFIX: "model", PERSONA_BUTTON_PREFIX: "persona"}
BUTTON_ANSWERS = {"model": N_("Switching to %(name)s…"), "persona": N_("Choosing %(name)s…")}
# setMyCommands language_code (ISO 639-1) for each catalogue; the list without one (English) is everyone else's.
COMMAND_LANGUAGES = {i18n.CHINESE: "zh"}


def regenerate_keyboard() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton(_(BUTTON_LABEL), callback_data=BUTTON_ID)]])


def _quiet_retry_after(record: logging.LogRecord) -> bool:
    """AIORateLimiter(max_retries=0) logs every RetryAfter with a traceback; our edit loop handles them."""
    return "Rate limit hit after maximum" not in record.getMessage()


class TelegramAdapter:
    """`await start()` begins polling (non-blocking); `await stop()` shuts down gracefully."""

    def __init__(self, settings: Settings, service: ChatService, *, poll_timeout: float = POLL_TIMEOUT_S,
                 stop_grace: float = STOP_GRACE_S, service_ready: asyncio.Event | None = None) -> None:
        """`service_ready`: set once the service has started (messages wait for it); None: started already."""
        if settings.telegram_bot_token is None:
            raise BotError("TELEGRAM_BOT_TOKEN is not set")
        self.settings = settings
        self.service = service
        self.policy = AccessPolicy(settings)
        self.service_ready = service_ready or started()
        self.failed = asyncio.Event()  # set when Telegram refuses the token while running: the process should exit
        self.poll_timeout = poll_timeout
        self.stop_grace = stop_grace
        self.username = ""
        self.bot_id = 0
        self._pacers: dict[int, Pacer] = {}
        self._drafts = Drafts() if settings.telegram_drafts == "auto" else None  # who refused them; None: off
        self._refused: dict[str, float] = {}
        self._inflight: set[asyncio.Task[object]] = set()
        self._latest = LatestReplies()  # the messages of each chat's latest reply (its Regenerate button)
        self.app: Application = (  # type: ignore[type-arg]
            Application.builder()
            .token(settings.telegram_bot_token.get_secret_value())
            .base_url(settings.telegram_api_base_url)
            .base_file_url(settings.telegram_api_base_url.replace("/bot", "/file/bot"))
            .concurrent_updates(True)
            .rate_limiter(AIORateLimiter())
            .get_updates_read_timeout(poll_timeout + 10)
            .build()
        )
        self.app.add_handler(MessageHandler(filters.UpdateType.MESSAGE | filters.UpdateType.EDITED_MESSAGE,
                                            self._on_message))
        self.app.add_handler(CallbackQueryHandler(
            self._on_button, pattern="^(" + "|".join(BUTTON_COMMANDS) + ")"))
        self.app.add_handler(CallbackQueryHandler(self._on_regenerate, pattern=f"^{BUTTON_ID}$"))
        self.app.add_error_handler(self._on_error)
        limiter_log = logging.getLogger("telegram.ext.AIORateLimiter")
        if _quiet_retry_after not in limiter_log.filters:
            limiter_log.addFilter(_quiet_retry_after)

    # --- lifecycle ---
    async def start(self) -> None:
        try:
            await self.app.initialize()  # getMe
        except InvalidToken:
            raise BotError("Telegram refused the bot token (TELEGRAM_BOT_TOKEN); check it with @BotFather") from None
        except NetworkError as exc:
            raise BotError(f"cannot reach the Telegram Bot API at {self.settings.telegram_api_base_url}: "
                           f"{type(exc).__name__}") from None
        self.username = self.app.bot.username or ""
        self.bot_id = self.app.bot.id
        await self._set_commands()
        await self.app.start()
        assert self.app.updater is not None
        await self.app.updater.start_polling(
            timeout=int(self.poll_timeout) or 1, poll_interval=0.0, drop_pending_updates=False,
            allowed_updates=[Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY], error_callback=self._on_poll_error)
        log.info("telegram: polling as @%s", self.username)

    async def _set_commands(self) -> None:
        """The command menu in each catalogue's language, and the default one (English, or LANGUAGE's)."""
        for language, code in [(None, None), *COMMAND_LANGUAGES.items()]:
            with i18n.using(i18n.pick(self.settings.language, language)):
                await self.app.bot.set_my_commands([BotCommand(name, _(what)) for name, what in COMMANDS.items()],
                                                   language_code=code)

    def _locale(self, user: User | None) -> str:
        """The language to answer `user` in: LANGUAGE, else their Telegram app's."""
        return i18n.pick(self.settings.language, user.language_code if user else None)

    @property
    def connected(self) -> bool:
        """Polling for updates (what /healthz asks): not before start, after stop, or once the token is refused.

        python-telegram-bot 22.8 ends its polling task on a refused token without telling the error
        callback or clearing `updater.running`, so the task itself is asked.
        """
        updater = self.app.updater
        polling = getattr(updater, "_Updater__polling_task", None)
        return (updater is not None and updater.running and polling is not None and not polling.done()
                and not self.failed.is_set())

    async def stop(self) -> None:
        """Stop fetching updates, let replies in progress finish (or be marked), then shut down."""
        if self.app.updater is not None and self.app.updater.running:
            await self.app.updater.stop()
        pending = [t for t in self._inflight if not t.done()]
        if pending:
            done, still = await asyncio.wait(pending, timeout=self.stop_grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()

    # --- decisions ---
    def _access(self, user_id: int, message: Message) -> Verdict:
        return self.policy.judge(str(user_id), {str(message.chat.id)},
                                 shared=message.chat.type != ChatType.PRIVATE)

    async def _is_chat_admin(self, message: Message, user_id: int) -> bool:
        """getChatMember: is the person the group's creator or one of its administrators?"""
        if message.chat.type == ChatType.PRIVATE:
            return False
        try:
            member = await self.app.bot.get_chat_member(message.chat.id, user_id)
        except TelegramError as exc:  # unknown: treat as not an administrator
            log.warning("telegram: getChatMember failed: %s", exc)
            return False
        return member.status in CHAT_ADMIN_STATUSES

    def _command_target(self, message: Message) -> str | None:
        """For a message starting with a bot command: the @bot it names ('' when bare); else None."""
        for ent in message.entities:
            if ent.type == MessageEntityType.BOT_COMMAND and ent.offset == 0:
                command = message.parse_entity(ent)
                return command.partition("@")[2]
        return None

    def _addressed(self, message: Message) -> bool:
        """Private chat: always. Groups: commands for us, @mentions of us, replies to us."""
        if message.chat.type == ChatType.PRIVATE:
            return True
        target = self._command_target(message)
        if target is not None:
            return target == "" or target.lower() == self.username.lower()
        for ent, value in message.parse_entities([MessageEntityType.MENTION]).items():
            if value[1:].lower() == self.username.lower():
                return True
        for ent in message.entities:
            if ent.type == MessageEntityType.TEXT_MENTION and ent.user and ent.user.id == self.bot_id:
                return True
        replied = message.reply_to_message
        return bool(replied and replied.from_user and replied.from_user.id == self.bot_id)

    def _prompt_text(self, message: Message) -> str:
        """The text with our @mention removed."""
        text = message.text or ""
        if self.username and message.chat.type != ChatType.PRIVATE:
            for ent, value in sorted(message.parse_entities([MessageEntityType.MENTION]).items(),
                                     key=lambda kv: -kv[0].offset):
                if value[1:].lower() == self.username.lower():
                    text = text.replace(value, "", 1)
        return text.strip()

    @staticmethod
    def _chat_key(message: Message) -> str:
        """Forum topics keep separate histories."""
        if message.chat.is_forum and message.message_thread_id:
            return f"{message.chat.id}:{message.message_thread_id}"
        return str(message.chat.id)

    def _pacer(self, chat_id: int, chat_type: str) -> Pacer:
        if chat_id not in self._pacers:
            interval = (self.settings.telegram_edit_interval_private_s if chat_type == ChatType.PRIVATE
                        else self.settings.telegram_edit_interval_group_s)
            self._pacers[chat_id] = Pacer(interval)
        return self._pacers[chat_id]

    def _sink(self, message: Message, *, keyboard: InlineKeyboardMarkup | None = None,
              typing: bool = False) -> TelegramSink:
        chat = message.chat
        thread = message.message_thread_id if chat.is_forum else None
        reply_to = message.message_id if chat.type != ChatType.PRIVATE else None
        ops = TelegramOps(self.app.bot, chat.id, thread, reply_to, keyboard)
        return TelegramSink(ops, self._pacer(chat.id, chat.type),
                            Typing(self.app.bot, chat.id, thread) if typing else None,
                            give_up_s=self.settings.delivery_retry_s, reply_buttons=regenerate_keyboard(),
                            drafts=self._drafts if chat.type == ChatType.PRIVATE and thread is None else None)

    def _model_keyboard(self) -> InlineKeyboardMarkup:
        current = self.service.current_model
        not_ready = self.settings.not_ready()
        return InlineKeyboardMarkup([[InlineKeyboardButton(("✅ " if name == current else "") + name
                                                           + (" " + _("(not ready)") if name in not_ready else ""),
                                                           callback_data=f"{MODEL_BUTTON_PREFIX}{name}")]
                                     for name in self.service.model_names()])

    def _persona_keyboard(self) -> InlineKeyboardMarkup:
        return InlineKeyboardMarkup([[InlineKeyboardButton(name, callback_data=f"{PERSONA_BUTTON_PREFIX}{name}")]
                                     for name in self.service.personas])

    def _refuse_now(self, user_id: str) -> bool:
        last = self._refused.get(user_id)
        now = time.monotonic()
        if last is not None and now - last < REFUSAL_COOLDOWN_S:
            return False
        self._refused[user_id] = now
        return True

    # --- handlers ---
    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A new message, or (`edited_message`) a person's edit of one: the service decides what follows."""
        edited = update.message is None
        message = update.message or update.edited_message
        if message is None or message.from_user is None or message.from_user.is_bot:
            return
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)  # type: ignore[arg-type]
        try:
            with i18n.using(self._locale(message.from_user)):
                if edited:
                    await self._edited(message)
                else:
                    await self._answer(message)
        finally:
            if task is not None:
                self._inflight.discard(task)  # type: ignore[arg-type]

    async def _answer(self, message: Message) -> None:
        if not self._addressed(message):
            return
        user = message.from_user
        assert user is not None
        private = message.chat.type == ChatType.PRIVATE
        access = self._access(user.id, message)
        if not access.allowed:
            if private and self._refuse_now(str(user.id)):
                await self._run(message, IncomingMessage(
                    "telegram", self._chat_key(message), str(user.id), user.full_name, message.text or "",
                    is_allowed=False, is_admin=False, locale=i18n.current()), self._sink(message))
            return
        if message.text is None:
            sink = self._sink(message)
            await sink.notice(_(TEXT_ONLY))
            await sink.close()
            return
        text = self._prompt_text(message)
        is_command = self._command_target(message) is not None
        command = parse_command(text) if is_command else None
        keyboard = None
        if command == ("model", "") and access.admin:  # buttons only for those who may switch
            keyboard = self._model_keyboard()
        chat_admin = (command is not None and wants_chat_admin_fact(command[0])
                      and await self._is_chat_admin(message, user.id))
        if command == ("persona", "") and (private or chat_admin or access.admin):  # for those who may choose
            keyboard = self._persona_keyboard()
        incoming = IncomingMessage("telegram", self._chat_key(message), str(user.id), user.full_name, text,
                                   is_allowed=True, is_admin=access.admin, is_group=not private,
                                   is_chat_admin=chat_admin, message_id=str(message.message_id),
                                   locale=i18n.current())
        await self._run(message, incoming, self._sink(message, keyboard=keyboard, typing=not is_command))

    async def _edited(self, message: Message) -> None:
        """An edit: if the latest reply answered it, that reply is rewritten in place (else nothing shows)."""
        user = message.from_user
        assert user is not None
        access = self._access(user.id, message)
        if message.text is None or not self._addressed(message) or not access.allowed:
            return
        key = self._chat_key(message)
        incoming = IncomingMessage("telegram", key, str(user.id), user.full_name, self._prompt_text(message),
                                   is_admin=access.admin, is_group=message.chat.type != ChatType.PRIVATE,
                                   message_id=str(message.message_id), edited=True, locale=i18n.current())
        sink = self._sink(message)  # no "typing": most edits change only the stored text
        sink.replace_messages(self._latest.messages(key) or [])  # type: ignore[arg-type]
        await self._run(message, incoming, sink)

    async def _run(self, message: Message, incoming: IncomingMessage, sink: TelegramSink) -> None:
        if sink.typing:
            sink.typing.start()
        await handle_reply(self.service, incoming, sink, log=log, label="telegram", something_wrong=SOMETHING_WRONG,
                           ready=self.service_ready)
        await self._latest.delivered(self._chat_key(message), sink)

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A model or persona button: the same as typing its command, judged for whoever pressed it."""
        query = update.callback_query
        if query is None or query.data is None or not isinstance(query.message, Message):
            return
        with i18n.using(self._locale(query.from_user)):
            await self._button(query, query.message, query.data)

    async def _button(self, query: CallbackQuery, message: Message, data: str) -> None:
        user = query.from_user
        access = self._access(user.id, message)
        prefix = next(p for p in BUTTON_COMMANDS if data.startswith(p))
        command, name = BUTTON_COMMANDS[prefix], data.removeprefix(prefix)
        if not access.allowed:
            await query.answer(_(NOT_ALLOWED))
            return
        await query.answer(_(BUTTON_ANSWERS[command]) % {"name": name})
        chat_admin = wants_chat_admin_fact(command) and await self._is_chat_admin(message, user.id)
        incoming = IncomingMessage("telegram", self._chat_key(message), str(user.id), user.full_name,
                                   f"/{command} {name}", is_allowed=True, is_admin=access.admin,
                                   is_group=message.chat.type != ChatType.PRIVATE, is_chat_admin=chat_admin,
                                   locale=i18n.current())
        await self._run(message, incoming, self._sink(message))

    async def _on_regenerate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The Regenerate button: `/retry`, shown in place of the reply it is under."""
        query = update.callback_query
        if query is None or not isinstance(query.message, Message):
            return
        with i18n.using(self._locale(query.from_user)):
            await self._regenerate(query, query.message)

    async def _regenerate(self, query: CallbackQuery, message: Message) -> None:
        user = query.from_user
        access = self._access(user.id, message)
        if not access.allowed:
            await query.answer(_(NOT_ALLOWED))
            return
        key = self._chat_key(message)
        if self._latest.is_stale(key, message.message_id):
            await query.answer(_(STALE))
            sink = self._sink(message)
            await strip(sink, message.message_id)
            await sink.close()
            return
        await query.answer(_(WRITING_AGAIN))
        sink = self._sink(message, typing=True)
        sink.replace_messages(self._latest.messages(key) or [message.message_id])  # type: ignore[arg-type]
        incoming = IncomingMessage("telegram", key, str(user.id), user.full_name, RETRY_COMMAND, is_allowed=True,
                                   is_admin=access.admin, is_group=message.chat.type != ChatType.PRIVATE,
                                   locale=i18n.current())
        await self._run(message, incoming, sink)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: unhandled error: %s", context.error)

    def _on_poll_error(self, exc: TelegramError) -> None:
        if isinstance(exc, InvalidToken):  # revoked while running: no retry can help
            log.error("telegram: the bot token was refused while running; check TELEGRAM_BOT_TOKEN")
            self.failed.set()
            return
        log.warning("telegram: polling failed, retrying: %s", exc)
