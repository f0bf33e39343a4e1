"""The platform-neutral chat service: commands, history and replies, the same for every adapter."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.config import ModelProfile, Settings, build_hint
from bot.core import access
from bot.core.i18n import N_, _, using
from bot.core.messages import IncomingMessage, MessageStatus, ReplySink, ReplyStatus
from bot.core.personas import Persona, load_personas, persona_of
from bot.core.prompt import MessageTooLong, Turn, build_prompt
from bot.core.queue import Event, GenerationQueue, Job, JobResult, QueueClosed, QueueFull, UserBusy
from bot.core.stats import BotStats, bot_text, chat_text, usage_of
from bot.engines.base import ChatMessage, Engine, GenerationParams
from bot.errors import BotError
from bot.storage import migrate
from bot.storage.store import HistoryStore, StoredMessage

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 16_000  # refused before any tokenizing; the token budget is checked at start
COMMANDS = {  # name -> description (English; shown through `_`)
    "start": N_("say hello and show what I can do"),
    "help": N_("list the commands"),
    "reset": N_("forget this chat's history"),
    "model": N_("list models, or /model NAME to switch"),
    "stop": N_("stop your running or queued reply"),
    "system": N_("show the system prompt, /system TEXT to set it, /system reset"),
    "persona": N_("list personas, or /persona NAME to choose one"),
    "retry": N_("write the last reply again (a new sample)"),
    "stats": N_("what this chat has used (admins: the whole bot too)"),
}

NOT_ALLOWED = N_("Sorry, you are not allowed to use this bot.")
EMPTY = N_("Your message is empty. Please send some text.")
BUSY = N_("I'm busy with other people's messages right now. Please try again in a minute.")
USER_BUSY = N_("You already have a message waiting for an answer (here or in another chat). "
               "Please wait for that answer, then send this one again.")
FOLDED = N_("Added to your waiting message; I'll answer both together.")
TOO_LONG = N_("Your message is too long: %(tokens)s tokens, limit %(limit)s. Please shorten it.")
TOO_LONG_FOLDED = N_("Your %(count)s waiting messages together are too long: %(tokens)s tokens, limit %(limit)s. "
                     "None of them was answered; please send a shorter one.")
SHUTTING_DOWN = N_("I'm restarting right now, so I couldn't take your message. Please send it again in a minute.")
NO_MODEL_NOW = N_("No model could be loaded at all right now; I keep retrying in the background.")
REQUEST_GONE = N_("Your message was removed before I could answer it.")
# bot/core/queue.py's texts for the people waiting (that file keeps them English): the same ids here put
# them in the catalogue, so the reply shows them translated (tests/test_i18n.py checks they still match).
QUEUE_TEXTS = (
    N_("No model could be loaded right now, so I can't answer. I keep trying to load one; "
       "please try again in a few minutes."),
    N_("The bot is shutting down."),
)
MAX_SYSTEM_CHARS = 4000  # a longer system prompt would leave little of a small model's context
RESET_WORD = "reset"
RETRY_MIN_TEMPERATURE = 0.7  # a regenerated reply is sampled at least this warm, so that it differs
NOTHING_TO_RETRY = N_("There is no reply here to write again yet.")
RETRY_WAIT = N_("I'm still working on a reply here; /retry once it is finished.")
SYSTEM_TOO_LONG = N_("That system prompt is too long: %(length)s characters, limit %(limit)s. Nothing was changed.")


@dataclass
class _Record:
    """Rows of one reply, shared by its prepare and finish steps.

    `user_rows` is the request: the message that queued the reply plus every message folded into
    it while it waited. They are answered, or refused, together.
    """

    chat: int
    key: str
    user_rows: list[int] = field(default_factory=list)
    is_group: bool = False
    reply_row: int | None = None
    askers: set[str] = field(default_factory=set)  # the user keys behind `user_rows` (the job shares this set)
    supersedes: int | None = None  # /retry: the reply row this one replaces once it is complete
    submitted_at: float = field(default_factory=time.monotonic)  # for the queue wait in /stats


def help_text(current_model: str) -> str:
    lines = [f"/{name} - {_(what)}" for name, what in COMMANDS.items()]
    return (_("Send me a message and I'll answer.") + "\n" + "\n".join(lines) + "\n"
            + _("Model: %(model)s") % {"model": current_model})


def parse_command(text: str) -> tuple[str, str] | None:
    """'/model@MyBot  x' -> ('model', 'x'); None when the text is not a command."""
    if not text.startswith("/") or len(text) < 2:
        return None
    head, _, rest = text[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    return name, rest.strip()


class ChatService:
    def __init__(self, settings: Settings, engine_factory: Callable[[ModelProfile], Engine] | None = None,
                 store: HistoryStore | None = None) -> None:
        self.settings = settings
        self._engine_factory = engine_factory or self._default_factory
        self.store = store or HistoryStore(settings.database_url)
        self.queue = GenerationQueue(self._make_engine, max_waiting=settings.queue_max,
                                     reply_timeout_s=settings.reply_timeout_s,
                                     concurrency=settings.remote_concurrency,
                                     user_max_waiting=settings.user_max_waiting,
                                     user_max_running=settings.user_max_running,
                                     fallback_models=[settings.default_model, *settings.profiles],
                                     partial_save_s=settings.partial_save_s)
        self._waiting_records: dict[str, _Record] = {}  # chat key -> the request its waiting reply answers
        self.personas: dict[str, Persona] = load_personas(settings.personas_file)
        self.stats = BotStats()
        self._started = False

    def _default_factory(self, profile: ModelProfile) -> Engine:
        from bot.engines import create_engine

        return create_engine(profile, self.settings)

    def _make_engine(self, name: str) -> Engine:
        return self._engine_factory(self.profile(name))

    def profile(self, name: str) -> ModelProfile:
        try:
            return self.settings.profiles[name]
        except KeyError:
            raise BotError(f"unknown model {name!r}; configured: {', '.join(self.model_names())}") from None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(migrate.upgrade, self.settings.database_url)
        interrupted = await self.store.mark_interrupted()
        if interrupted:
            log.warning("%d replies were interrupted by the last shutdown; marked incomplete", interrupted)
        self.profile(self.settings.default_model)
        await self.queue.start(self.settings.default_model)
        self._started = True

    async def close(self) -> None:
        if self._started:
            await self.queue.close()
        await self.store.close()

    async def __aenter__(self) -> ChatService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- facts for adapters ------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return list(self.settings.profiles)

    @property
    def current_model(self) -> str:
        return self.queue.model

    # --- entry point -------------------------------------------------------------------------
    async def handle(self, msg: IncomingMessage, sink: ReplySink) -> None:
        """Answer one message: a command or a prompt. Returns when the reply is finished."""
        with using(msg.locale):  # every text written for this message is in its language
            await self._handle(msg, sink)

    async def _handle(self, msg: IncomingMessage, sink: ReplySink) -> None:
        if msg.edited:
            await self._edit(msg, sink)
            return
        if not msg.is_allowed:
            await sink.error(_(NOT_ALLOWED))
            return
        command = parse_command(msg.text.strip())
        if command is not None:
            await self._command(msg, sink, *command)
        else:
            await self._prompt(msg, sink)

    async def _command(self, msg: IncomingMessage, sink: ReplySink, name: str, arg: str) -> None:
        chat = await self.store.chat_id(msg.platform, msg.chat_id)
        if name == "start":
            await sink.notice(_("Hello %(name)s!") % {"name": msg.user_name} + " " + help_text(self.current_model))
        elif name == "help":
            await sink.notice(help_text(self.current_model))
        elif name == "reset":
            if refusal := access.reset_refusal(msg):
                await sink.error(refusal)
                return
            await self.queue.cancel(self._key(msg))
            await self.store.clear(chat)
            await sink.notice(_("History cleared. Let's start over."))
        elif name == "stop":
            key = self._key(msg)
            stopped = await self.queue.cancel(key, user_key=self._user_key(msg))  # the caller's own first
            if stopped is None and (self.queue.has_waiting(key) or self.queue.is_running(key)):
                if refusal := access.stop_refusal(msg):  # what is left answers someone else
                    await sink.error(refusal)
                    return
                stopped = await self.queue.cancel(key)
            said = {"running": N_("Stopped your reply."), "queued": N_("Removed your waiting message."),
                    None: N_("Nothing to stop.")}
            await sink.notice(_(said[stopped]))
        elif name == "model":
            await self._model_command(msg, sink, arg)
        elif name == "stats":
            usage = usage_of(await self.store.usage_rows(chat))
            text = chat_text(usage) + (f"\n\n{bot_text(self.stats, self.current_model)}" if msg.is_admin else "")
            await sink.notice(text)
        elif name == "retry":
            await self._retry(msg, sink, chat)
        elif name == "system":
            await self._system_command(msg, sink, chat, arg)
        elif name == "persona":
            await self._persona_command(msg, sink, chat, arg)
        else:
            await sink.notice(_("Unknown command /%(name)s.") % {"name": name} + "\n" + help_text(self.current_model))

    async def _model_command(self, msg: IncomingMessage, sink: ReplySink, arg: str) -> None:
        if not arg:
            lines = [f"{'* ' if n == self.current_model else '  '}{n}"
                     + (f" - {p.description}" if p.description else "")
                     + ("" if n == self.current_model or self.settings.profile_ready(p) else " " + _("(not ready)"))
                     for n, p in self.settings.profiles.items()]
            if msg.is_admin and (kernels := getattr(self.queue.engine, "kernel_summary", None)):
                # what the model runs on (bot/engines/kernel_report.py)
                lines.append(_("Running: %(kernels)s") % {"kernels": kernels})
            await sink.notice(_("Models (* = current):") + "\n" + "\n".join(lines) + "\n"
                              + _("Switch with /model NAME"))
            return
        if refusal := access.switch_refusal(msg, self.settings):
            await sink.error(refusal)
            return
        if arg not in self.settings.profiles:
            await sink.error(_("Unknown model %(name)s. Available: %(names)s")
                             % {"name": repr(arg), "names": ", ".join(self.model_names())})
            return
        if arg == self.current_model:
            await sink.notice(_("Already using %(model)s.") % {"model": arg})
            return
        if not self.settings.profile_ready(self.settings.profiles[arg]):
            await sink.error(_("%(model)s is not ready: %(hint)s") % {"model": arg,
                                                                     "hint": build_hint(self.settings.profiles[arg])})
            return
        try:
            now = await self.queue.switch_model(arg, user_key=self._user_key(msg))
        except UserBusy:
            await sink.error(_(USER_BUSY))
            return
        except BotError as exc:
            state = (_("Still using %(model)s.") % {"model": self.current_model} if self.current_model
                     else _(NO_MODEL_NOW))
            await sink.error(_("Could not load %(model)s: %(error)s.") % {"model": arg, "error": _(str(exc))}
                             + " " + state)
            return
        await sink.notice(_("Switched to %(model)s.") % {"model": now})

    async def _latest_request(self, chat: int) -> tuple[list[StoredMessage], int | None]:
        """The chat's latest request (the user messages its last reply answered) and that reply's row.

        When the newest user messages have no reply (stopped while waiting), they are the request
        and there is no reply to replace.
        """
        rows = [r for r in await self.store.messages(chat)
                if r.status not in (MessageStatus.SUPERSEDED, MessageStatus.REJECTED)]
        replies = [i for i, r in enumerate(rows) if r.role == "assistant"]
        unanswered = rows[replies[-1] + 1:] if replies else rows
        if unanswered or not replies:
            return unanswered, None
        first = replies[-2] + 1 if len(replies) > 1 else 0
        return [r for r in rows[first:replies[-1]] if r.role == "user"], rows[replies[-1]].id

    async def _edit(self, msg: IncomingMessage, sink: ReplySink) -> None:
        """A person edited a message: the stored turn follows; if the chat's latest reply answered it,
        that reply is written again (shown in place by the adapter), else nothing more happens."""
        text = msg.text.strip()
        if (not msg.is_allowed or not msg.message_id or not text or len(text) > MAX_MESSAGE_CHARS
                or parse_command(text) is not None):
            return  # an edit never earns a refusal; a blanked, huge or command edit keeps the old text
        chat = await self.store.chat_id(msg.platform, msg.chat_id)
        row = await self.store.find_external(chat, msg.message_id)
        if row is None or row.role != "user" or row.status == MessageStatus.REJECTED or row.content == text:
            return
        await self.store.set_content(row.id, text)
        request, old = await self._latest_request(chat)
        key = self._key(msg)
        if old is None or row.id not in {r.id for r in request}:
            return  # an older turn (or one still waiting: its reply will read the new text)
        if self.queue.is_running(key) or self.queue.has_waiting(key):
            return  # a newer reply is under way; it reads the edited history
        record = _Record(chat, key, [r.id for r in request], is_group=msg.is_group, supersedes=old)
        await self._submit(msg, sink, record, reject_on_refusal=False)

    async def _system_command(self, msg: IncomingMessage, sink: ReplySink, chat: int, arg: str) -> None:
        """`/system` shows, `/system TEXT` sets, `/system reset` forgets the chat's own system prompt."""
        if not arg:
            own = await self.store.system_prompt(chat)
            if own is None:
                await sink.notice(_("System prompt (the default):") + f"\n{self.settings.system_prompt}")
            else:
                chosen = persona_of(self.personas, own)
                label = (_("System prompt (persona %(name)s):") % {"name": chosen} if chosen
                         else _("System prompt (set for this chat):"))
                await sink.notice(f"{label}\n{own}\n\n" + _("/system reset returns to the default."))
            return
        if refusal := access.prompt_refusal(msg):
            await sink.error(refusal)
            return
        if arg.lower() == RESET_WORD:
            await self.store.set_system_prompt(chat, None)
            await sink.notice(_("System prompt reset to the default."))
            return
        if len(arg) > MAX_SYSTEM_CHARS:
            await sink.error(_(SYSTEM_TOO_LONG) % {"length": len(arg), "limit": MAX_SYSTEM_CHARS})
            return
        await self.store.set_system_prompt(chat, arg)
        await sink.notice(_("System prompt set for this chat. It applies from the next reply on."))

    async def _persona_command(self, msg: IncomingMessage, sink: ReplySink, chat: int, arg: str) -> None:
        """`/persona` lists the presets (current one marked); `/persona NAME` stores its prompt."""
        if not arg:
            current = persona_of(self.personas, await self.store.system_prompt(chat))
            lines = [f"{'* ' if p.name == current else '  '}{p.name}"
                     + (f" - {p.description}" if p.description else "") for p in self.personas.values()]
            await sink.notice(_("Personas (* = current):") + "\n" + "\n".join(lines) + "\n"
                              + _("Choose with /persona NAME"))
            return
        if refusal := access.prompt_refusal(msg):
            await sink.error(refusal)
            return
        persona = self.personas.get(arg.strip().lower())
        if persona is None:
            await sink.error(_("Unknown persona %(name)s. Available: %(names)s")
                             % {"name": repr(arg), "names": ", ".join(self.personas)})
            return
        await self.store.set_system_prompt(chat, persona.prompt)
        await sink.notice(_("Persona %(name)s chosen for this chat.") % {"name": persona.name})

    # --- prompts -----------------------------------------------------------------------------
    @staticmethod
    def _key(msg: IncomingMessage) -> str:
        return f"{msg.platform}:{msg.chat_id}"

    @staticmethod
    def _user_key(msg: IncomingMessage) -> str:
        return f"{msg.platform}:{msg.user_id}"

    async def _prompt(self, msg: IncomingMessage, sink: ReplySink) -> None:
        text = msg.text.strip()
        if not text:
            await sink.error(_(EMPTY))
            return
        chat = await self.store.chat_id(msg.platform, msg.chat_id)
        author = {"user_id": msg.user_id, "author_name": msg.user_name, "external_id": msg.message_id}
        if len(text) > MAX_MESSAGE_CHARS:
            await self.store.add(chat, "user", text, MessageStatus.REJECTED, **author)
            await sink.error(_("Your message is too long: %(length)s characters, limit %(limit)s.")
                             % {"length": len(text), "limit": MAX_MESSAGE_CHARS})
            return
        key = self._key(msg)
        user_row = await self.store.add(chat, "user", text, **author)
        waiting = self._waiting_records.get(key)
        if waiting is not None and self.queue.has_waiting(key):
            waiting.user_rows.append(user_row)
            waiting.askers.add(self._user_key(msg))  # their message is in it: theirs to /stop too
            await sink.notice(_(FOLDED))
            return
        record = _Record(chat, key, [user_row], is_group=msg.is_group)
        await self._submit(msg, sink, record, reject_on_refusal=True)

    async def _submit(self, msg: IncomingMessage, sink: ReplySink, record: _Record, *,
                      reject_on_refusal: bool) -> None:
        """Queue the reply `record` describes and relay it to `sink`; a refusal is said politely."""
        locale = msg.locale  # `prepare` runs in the queue's worker, outside this message's `using`
        job = Job(record.key, prepare=lambda engine: self._prepare(engine, record, locale),
                  on_finish=lambda result: self._store_reply(record, result),
                  user_key=self._user_key(msg), askers=record.askers,
                  on_progress=lambda partial: self._save_partial(record, partial))
        try:
            self.queue.submit(job)
        except (QueueFull, UserBusy, QueueClosed) as exc:
            if reject_on_refusal:
                await self.store.set_status(record.user_rows, MessageStatus.REJECTED)
            await sink.error(_({UserBusy: USER_BUSY, QueueClosed: SHUTTING_DOWN}.get(type(exc), BUSY)))
            return
        self._waiting_records[record.key] = record
        await self._relay(job, sink)

    async def _retry(self, msg: IncomingMessage, sink: ReplySink, chat: int) -> None:
        """`/retry`: answer the chat's latest request again; the old reply becomes `superseded`
        once the new one is complete (until then it stays what it was, so a failed retry loses nothing)."""
        key = self._key(msg)
        request, old = await self._latest_request(chat)
        if self.queue.is_running(key) or self.queue.has_waiting(key):  # checked after the read: no await until submit
            await sink.error(_(RETRY_WAIT))
            return
        if not request:
            await sink.error(_(NOTHING_TO_RETRY))
            return
        record = _Record(chat, key, [r.id for r in request], is_group=msg.is_group, supersedes=old)
        await self._submit(msg, sink, record, reject_on_refusal=False)

    async def _prepare(self, engine: Engine, record: _Record,
                       locale: str) -> tuple[list[ChatMessage], GenerationParams]:
        """Runs when the reply starts: prompt from the history as it is now, then a `pending` row.

        A request that does not fit is refused as a whole: the message and everything folded into
        it become `rejected`, so they never enter a later prompt and the chat keeps working.
        """
        with using(locale):  # its refusals reach the asker as the reply's error
            return await self._prepare_in(engine, record)

    async def _prepare_in(self, engine: Engine, record: _Record) -> tuple[list[ChatMessage], GenerationParams]:
        if self._waiting_records.get(record.key) is record:
            del self._waiting_records[record.key]  # later messages queue a new reply instead of folding
        self.stats.waited(time.monotonic() - record.submitted_at)
        profile = self.profile(self.queue.model)
        gen = self.settings.generation_for(profile)
        temperature = gen.temperature if record.supersedes is None else max(gen.temperature, RETRY_MIN_TEMPERATURE)
        params = GenerationParams(max_new_tokens=gen.max_new_tokens, temperature=temperature,
                                  top_p=gen.top_p, repetition_penalty=gen.repetition_penalty)
        rows = [r for r in await self.store.context(record.chat) if r.id != record.supersedes]
        system = await self.store.system_prompt(record.chat) or self.settings.system_prompt
        mine = set(record.user_rows)
        request = [Turn(r.role, r.content, r.author_name or r.user_id) for r in rows if r.id in mine]
        if not request:
            raise BotError(_(REQUEST_GONE))
        # Not history: user messages sent after this request (a later reply answers them). The previous
        # reply's row may be newer than this request's messages: it was created when that reply started.
        history = [Turn(r.role, r.content, r.author_name or r.user_id) for r in rows
                   if r.id not in mine and (r.role != "user" or r.id < max(mine))]
        speakers = {r.user_id for r in rows if r.role == "user"}
        name_speakers = record.is_group or len(speakers) > 1
        loop = asyncio.get_running_loop()
        unmeasured = [r for r in rows if r.id in mine and r.token_count is None]

        def build() -> tuple[list[ChatMessage], dict[int, int]]:
            prompt = build_prompt(system, history, request, engine.count_tokens, engine.context_length,
                                  params.max_new_tokens, name_speakers)
            return prompt, {r.id: engine.count_tokens([ChatMessage("user", r.content)]) for r in unmeasured}

        try:
            messages, tokens_in = await loop.run_in_executor(None, build)
        except MessageTooLong as exc:
            await self.store.set_status(record.user_rows, MessageStatus.REJECTED)
            template = TOO_LONG_FOLDED if len(request) > 1 else TOO_LONG
            raise BotError(_(template) % {"count": len(request), "tokens": exc.tokens, "limit": exc.limit}) from None
        if tokens_in:
            await self.store.set_token_counts(tokens_in)  # "tokens in" of /stats
        record.reply_row = await self.store.add(record.chat, "assistant", "", MessageStatus.PENDING,
                                                model=self.queue.model)
        return messages, params

    async def _save_partial(self, record: _Record, text: str) -> None:
        if record.reply_row is not None:
            await self.store.save_partial(record.reply_row, text)

    async def _store_reply(self, record: _Record, result: JobResult) -> None:
        self.stats.finished(result.status, result.stats.prompt_tokens, result.stats.completion_tokens,
                            result.stats.total_s)
        if self._waiting_records.get(record.key) is record:
            del self._waiting_records[record.key]
        if record.reply_row is None:  # never started: cancelled while waiting, or refused
            return
        await self.store.finish(record.reply_row, result.text, result.status,
                                token_count=result.stats.completion_tokens, model=result.model)
        if record.supersedes is not None and result.status == ReplyStatus.COMPLETE:
            await self.store.set_status(record.supersedes, MessageStatus.SUPERSEDED)
        elif record.supersedes is None and result.status == ReplyStatus.FAILED:
            # The asker is told to try again, so the request is not context later (left in, merged into the
            # next turn, a message that breaks the engine would fail every later reply of the chat). A failed
            # /retry keeps the old reply, and with it its request.
            await self.store.set_status(record.user_rows, MessageStatus.FAILED)

    async def _relay(self, job: Job, sink: ReplySink) -> None:
        """Turn queue events into sink calls; sink failures never stop the reply being stored."""
        text = ""
        while True:
            event: Event = await job.events.get()
            if event.kind == "delta":
                text += event.text
                while not job.events.empty() and job.events._queue[0].kind == "delta":  # type: ignore[attr-defined]
                    text += job.events.get_nowait().text
                await self._safe(sink.update(text))
            elif event.kind == "queued":
                await self._safe(sink.queued(event.position, event.eta_s))
            elif event.kind == "started":
                await self._safe(sink.started())
            else:
                await self._deliver_end(sink, event)
                return

    async def _deliver_end(self, sink: ReplySink, event: Event) -> None:
        status = event.status or ReplyStatus.FAILED
        if status == ReplyStatus.COMPLETE:
            final = event.text if event.text.strip() else _("(the model gave an empty reply)")
            await self._safe(sink.finish(final, status))
        elif status == ReplyStatus.CANCELLED:
            note = _(event.error or N_("(stopped)"))
            await self._safe(sink.finish(f"{event.text}\n\n{note}" if event.text else note, status))
        elif event.text:
            await self._safe(sink.finish(f"{event.text}\n\n{_(event.error or '')}", status))
        else:
            await self._safe(sink.error(_(event.error or N_("Sorry, something went wrong."))))

    @staticmethod
    async def _safe(call: object) -> None:
        try:
            await call  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a platform failure must not lose the stored reply
            log.warning("reply sink failed", exc_info=True)
