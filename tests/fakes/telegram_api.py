"""A fake Telegram Bot API server on 127.0.0.1 that speaks the real protocol to real clients.

`POST /bot<token>/<method>` with form (JSON-encoded values, as python-telegram-bot sends) or JSON
bodies; `{"ok": true, "result": ...}` envelopes; long-polling getUpdates with `offset`; real message
objects with `bot_command` / `mention` entities; HTML parse mode parsed into entities; and the real
errors: message is not modified, message is too long (4096 UTF-16 units after parsing), can't parse
entities, message text is empty, message to edit not found, 429 with `parameters.retry_after`.
sendMessageDraft (Bot API 9.5+): private chats only, recorded in `drafts`, never a message; an older
server (`drafts_supported = False`) answers 404 as for any unknown method, and drafts faster than
`draft_rate` a second draw 429 (`draft_retry_after`, refused until it is over).
Tests inject updates (`user_says`, `press_button`, `user_sends_sticker`) and errors (`fail_next`,
`drop_next`, `rate_limit_storm`), and read every call from `calls` (429s served: `served_429`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from aiohttp import web

MAX_TEXT = 4096
STORM_METHODS = ("sendMessage", "editMessageText")  # what flood control refuses during a storm
MAX_CALLBACK_ANSWER = 200
DRAFT_RATE = 5  # drafts a second per chat that hold (observed by others; undocumented)
DRAFT_RETRY_AFTER = 3  # the retry_after drawn by drafting faster (observed ~3 s)
BOT_ID = 7000001

# Form fields whose values arrive JSON-encoded (everything else is a plain string).
_JSON_FIELDS = {
    "chat_id", "message_id", "offset", "limit", "timeout", "allowed_updates", "reply_markup", "entities",
    "commands", "scope", "reply_parameters", "link_preview_options", "message_thread_id",
    "disable_notification", "protect_content", "drop_pending_updates", "show_alert", "cache_time",
    "allow_sending_without_reply", "reply_to_message_id", "disable_web_page_preview", "user_id", "draft_id",
}
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


class ApiError(Exception):
    def __init__(self, code: int, description: str, retry_after: int | None = None,
                 parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.code, self.description, self.retry_after = code, description, retry_after
        self.parameters = dict(parameters or {})
        if retry_after is not None:
            self.parameters["retry_after"] = retry_after

    def body(self) -> dict[str, Any]:
        """The error envelope; `parameters` is Telegram's ResponseParameters (retry_after, migrate_to_chat_id)."""
        out: dict[str, Any] = {"ok": False, "error_code": self.code, "description": self.description}
        if self.parameters:
            out["parameters"] = self.parameters
        return out


def bad_request(text: str) -> ApiError:
    return ApiError(400, f"Bad Request: {text}")


_TAGS = {"b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline", "ins": "underline",
         "s": "strikethrough", "strike": "strikethrough", "del": "strikethrough", "code": "code", "pre": "pre",
         "a": "text_link", "tg-spoiler": "spoiler", "span": "spoiler", "blockquote": "blockquote"}


class _TelegramHtml(HTMLParser):
    """Telegram's HTML subset -> (text, entities); raises ApiError like the server does."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text = ""
        self.entities: list[dict[str, Any]] = []
        self.stack: list[tuple[str, int, dict[str, Any]]] = []

    def _offset(self) -> int:
        return utf16_len(self.text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _TAGS:
            raise bad_request(f"can't parse entities: Unsupported start tag \"{tag}\" at byte offset "
                              f"{len(self.text.encode())}")
        extra: dict[str, Any] = {}
        attr = dict(attrs)
        if tag == "a":
            if not attr.get("href"):
                raise bad_request("can't parse entities: Can't find end of the entity starting at byte offset 0")
            extra["url"] = attr["href"]
        if tag == "span" and attr.get("class") != "tg-spoiler":
            raise bad_request("can't parse entities: Tag \"span\" must have class \"tg-spoiler\"")
        if tag == "code" and self.stack and self.stack[-1][0] == "pre" and attr.get("class", "").startswith(
                "language-"):
            self.stack[-1][2]["language"] = attr["class"].removeprefix("language-")
        self.stack.append((tag, self._offset(), extra))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1][0] != tag:
            raise bad_request(f"can't parse entities: Can't find end tag corresponding to start tag "
                              f"\"{self.stack[-1][0] if self.stack else tag}\"")
        name, start, extra = self.stack.pop()
        length = self._offset() - start
        if length > 0:
            kind = _TAGS[name]
            if kind == "code" and self.stack and self.stack[-1][0] == "pre":
                return  # <pre><code class=...> is one pre entity
            self.entities.append({"type": kind, "offset": start, "length": length, **extra})

    def handle_data(self, data: str) -> None:
        self.text += data

    def check_raw(self, raw: str) -> None:
        # A bare "<" or "&" that is not a tag or entity is an error on the real server.
        for m in re.finditer(r"<(?!/?[a-zA-Z-]+[\s>/]|/?[a-zA-Z-]+$)", raw):
            raise bad_request(f"can't parse entities: Unsupported start tag \"\" at byte offset {m.start()}")
        for m in re.finditer(r"&(?!#\d+;|#x[0-9a-fA-F]+;|[a-zA-Z]+;)", raw):
            raise bad_request(f"can't parse entities: Can't find end of the entity at byte offset {m.start()}")


def parse_html(raw: str) -> tuple[str, list[dict[str, Any]]]:
    p = _TelegramHtml()
    p.check_raw(raw)
    p.feed(raw)
    p.close()
    if p.stack:
        raise bad_request(f"can't parse entities: Can't find end tag corresponding to start tag \"{p.stack[-1][0]}\"")
    p.entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return p.text, p.entities


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float
    error: str | None = None


@dataclass
class Draft:
    """One sendMessageDraft the server accepted: a ~30 s preview, not a message of the chat."""

    chat_id: int
    draft_id: int
    text: str  # after parsing; "" shows "Thinking..."
    entities: list[dict[str, Any]]
    thread_id: int | None
    at: float


@dataclass
class FakeMessage:
    chat: dict[str, Any]
    message_id: int
    text: str
    entities: list[dict[str, Any]]
    from_bot: bool
    date: int
    thread_id: int | None = None
    reply_markup: dict[str, Any] | None = None
    edits: int = 0
    deleted: bool = False
    history: list[str] = field(default_factory=list)


@dataclass
class _Injected:
    error: ApiError | None  # None: drop the connection
    times: int
    when: Callable[[dict[str, Any]], bool] | None = None


# Update types sent when allowed_updates is empty or was never given (all but these opt-in ones).
DEFAULT_UPDATES = {"message", "edited_message", "channel_post", "edited_channel_post", "inline_query",
                   "chosen_inline_result", "callback_query", "shipping_query", "pre_checkout_query", "poll",
                   "poll_answer", "my_chat_member", "chat_join_request", "business_message"}


class FakeTelegram:
    """The server. `async with FakeTelegram() as tg:` then `Settings(telegram_api_base_url=tg.base_url)`."""

    def __init__(self, token: str = "123456:TEST-token-abcdefghijklmnopqrstuvwx", username: str = "quant_test_bot") -> None:
        self.token = token
        self.username = username
        self.bot_user = {"id": BOT_ID, "is_bot": True, "first_name": "Quant", "username": username,
                         "can_join_groups": True, "can_read_all_group_messages": False,
                         "supports_inline_queries": False}
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []
        self.allowed_updates: list[str] | None = None  # as the bot last set it in getUpdates
        self.messages: dict[tuple[int, int], FakeMessage] = {}
        self.languages: dict[int, str] = {}  # user id -> language_code their updates carry (set_language)
        self.commands: list[dict[str, Any]] = []  # the default scope's list for no particular language
        # (scope type, language_code) -> that list; "" is the list for every language without its own
        self.command_lists: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._update_ids = itertools.count(1)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._new_update = asyncio.Condition()
        self._injected: dict[str, list[_Injected]] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.started_at = time.monotonic()
        # Flood control per chat, off unless a test sets it: a bucket of `burst` messages refilled one
        # per `flood_interval` seconds; sends and edits both count (as on Telegram).
        self.flood_interval: float | None = None
        self.flood_burst = 3
        self._buckets: dict[int, tuple[float, float]] = {}
        self.member_status: dict[tuple[int, int], str] = {}  # (chat, user) -> getChatMember status
        self.migrated: dict[int, int] = {}  # group id -> the supergroup it became
        self.chats: dict[int, dict[str, Any]] = {}  # chats known without a message in them (a new supergroup)
        self.served_429 = 0  # "Too Many Requests" answers given, whatever caused them
        self.fetched_update_id = 0  # the newest update getUpdates has handed to the bot
        self._storm_until = 0.0
        self._storm_methods: frozenset[str] = frozenset()
        self.drafts: list[Draft] = []  # accepted drafts, oldest first (they never appear in `messages`)
        self.drafts_supported = True  # False: a server older than Bot API 9.5 (404, method unknown)
        self.draft_rate: int | None = DRAFT_RATE  # more drafts than this in one second of a chat: 429; None: no limit
        self.draft_retry_after = DRAFT_RETRY_AFTER
        self._draft_times: dict[int, list[float]] = {}
        self._draft_wait_until: dict[int, float] = {}  # a chat that drafted too fast waits out its retry_after

    def rate_limit_storm(self, seconds: float, methods: tuple[str, ...] = STORM_METHODS) -> None:
        """For `seconds` from now every call of `methods` gets 429 with `retry_after` = the seconds left.

        Flood control as Telegram applies it to a bot that sends too much: the whole bot, every chat.
        """
        self._storm_until = time.monotonic() + seconds
        self._storm_methods = frozenset(methods)

    def _storm_check(self, method: str) -> None:
        left = self._storm_until - time.monotonic()
        if left > 0 and method in self._storm_methods:
            wait = max(1, math.ceil(left))
            raise ApiError(429, f"Too Many Requests: retry after {wait}", wait)

    def migrate_group(self, group_id: int, supergroup_id: int) -> dict[str, Any]:
        """The group is upgraded to a supergroup: calls naming the old id get 400 with migrate_to_chat_id."""
        self.migrated[group_id] = supergroup_id
        self.chats[supergroup_id] = {"id": supergroup_id, "type": "supergroup", "title": "Upgraded"}
        return self.chats[supergroup_id]

    def heal(self) -> None:
        """Forget every injected failure still pending (the outage is over)."""
        self._injected.clear()

    def set_member_status(self, chat_id: int, user_id: int, status: str) -> None:
        """`creator`, `administrator`, `member`, `restricted`, `left` or `kicked` in a group."""
        self.member_status[(chat_id, user_id)] = status

    # --- lifecycle ---
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        async with self._new_update:
            self._new_update.notify_all()
        if self._runner:
            await self._runner.cleanup()

    # --- injection (what users do) ---
    def private_chat(self, user_id: int, name: str = "Alice") -> dict[str, Any]:
        return {"id": user_id, "type": "private", "first_name": name}

    def group_chat(self, chat_id: int, title: str = "Group", forum: bool = False) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": chat_id, "type": "supergroup" if forum or chat_id < -10**12 else "group",
                                "title": title}
        if forum:
            chat["is_forum"] = True
        return chat

    def _next_message_id(self, chat_id: int) -> int:
        return next(self._message_ids.setdefault(chat_id, itertools.count(1)))

    def _entities_for(self, text: str) -> list[dict[str, Any]]:
        entities = []
        for m in re.finditer(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(@[A-Za-z0-9_]{5,32})?", text):
            entities.append({"type": "bot_command", "offset": utf16_len(text[:m.start()]),
                             "length": utf16_len(m.group(0))})
        for m in re.finditer(r"(?<![\w@])@[A-Za-z0-9_]{5,32}", text):
            if text[:m.start()].endswith("/") or re.search(r"/[A-Za-z0-9_]+$", text[:m.start()]):
                continue
            entities.append({"type": "mention", "offset": utf16_len(text[:m.start()]), "length": utf16_len(m.group(0))})
        return sorted(entities, key=lambda e: e["offset"])

    async def _push(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        update = {"update_id": next(self._update_ids), kind: payload}
        async with self._new_update:
            self.updates.append(update)
            self._new_update.notify_all()
        return update

    def _user(self, user_id: int, name: str) -> dict[str, Any]:
        user = {"id": user_id, "is_bot": False, "first_name": name, "username": name.lower()}
        if language := self.languages.get(user_id):  # the IETF tag of the person's app language (optional)
            user["language_code"] = language
        return user

    def set_language(self, user_id: int, language_code: str) -> None:
        """The person's Telegram app is in this language: their updates carry it as `from.language_code`."""
        self.languages[user_id] = language_code

    async def user_says(self, text: str, *, user_id: int = 1001, name: str = "Alice",
                        chat: dict[str, Any] | None = None, reply_to: int | None = None,
                        thread_id: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """A person sends `text` (private chat with them unless `chat` is given); returns the update."""
        chat = chat or self.private_chat(user_id, name)
        mid = self._next_message_id(chat["id"])
        msg: dict[str, Any] = {"message_id": mid, "from": self._user(user_id, name), "chat": chat,
                               "date": int(time.time())}
        if text:
            msg["text"] = text
            ents = self._entities_for(text)
            if ents:
                msg["entities"] = ents
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        if reply_to is not None:
            replied = self.messages.get((chat["id"], reply_to))
            if replied is not None:
                msg["reply_to_message"] = self._message_json(replied)
        msg.update(extra or {})
        self.messages[(chat["id"], mid)] = FakeMessage(chat, mid, text, msg.get("entities", []), False,
                                                       msg["date"], thread_id)
        return await self._push("message", msg)

    async def user_edits(self, message_id: int, text: str, *, user_id: int = 1001, name: str = "Alice",
                         chat: dict[str, Any] | None = None) -> dict[str, Any]:
        """A person edits their message `message_id` to `text`: an `edited_message` update (with edit_date)."""
        chat = chat or self.private_chat(user_id, name)
        stored = self.messages[(chat["id"], message_id)]
        if stored.from_bot:
            raise ValueError("people can only edit their own messages")
        stored.text = text
        stored.entities = self._entities_for(text)
        msg: dict[str, Any] = {"message_id": message_id, "from": self._user(user_id, name), "chat": chat,
                               "date": stored.date, "edit_date": int(time.time()), "text": text}
        if stored.entities:
            msg["entities"] = stored.entities
        if stored.thread_id is not None:
            msg["message_thread_id"] = stored.thread_id
            msg["is_topic_message"] = True
        return await self._push("edited_message", msg)

    async def user_sends_sticker(self, *, user_id: int = 1001, name: str = "Alice",
                                 chat: dict[str, Any] | None = None) -> dict[str, Any]:
        sticker = {"file_id": "CAACAgIAAxkBAAE", "file_unique_id": "AgADsticker", "type": "regular",
                   "width": 512, "height": 512, "is_animated": False, "is_video": False, "emoji": "🙂"}
        return await self.user_says("", user_id=user_id, name=name, chat=chat, extra={"sticker": sticker})

    async def press_button(self, message_id: int, data: str, *, chat: dict[str, Any],
                           user_id: int = 1001, name: str = "Alice") -> dict[str, Any]:
        message = self._message_json(self.messages[(chat["id"], message_id)])
        return await self._push("callback_query", {"id": str(next(self._update_ids) * 7919),
                                                   "from": self._user(user_id, name), "message": message,
                                                   "chat_instance": "ci-1", "data": data})

    def delete_message(self, chat_id: int, message_id: int) -> None:
        """Someone deleted a message (e.g. the reply while it was streaming)."""
        self.messages[(chat_id, message_id)].deleted = True

    def fail_next(self, method: str, code: int, description: str, *, retry_after: int | None = None,
                  times: int = 1, when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """The next `times` calls of `method` (that satisfy `when`) fail with this error."""
        self._injected.setdefault(method, []).append(
            _Injected(ApiError(code, description, retry_after), times, when))

    def drop_next(self, method: str, times: int = 1) -> None:
        """The next `times` calls of `method` lose their connection (a network error)."""
        self._injected.setdefault(method, []).append(_Injected(None, times))

    # --- reading what the bot did ---
    def calls_to(self, method: str, chat_id: int | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.error is None
                and (chat_id is None or c.params.get("chat_id") == chat_id)]

    def drafts_in(self, chat_id: int) -> list[Draft]:
        return [d for d in self.drafts if d.chat_id == chat_id]

    def bot_messages(self, chat_id: int) -> list[FakeMessage]:
        return [m for (cid, _), m in sorted(self.messages.items()) if cid == chat_id and m.from_bot and not m.deleted]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` holds (checked after every call the bot makes)."""
        async def _wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)
        await asyncio.wait_for(_wait(), timeout)

    # --- protocol ---
    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            body = await request.text()
            return json.loads(body) if body else {}
        form = await request.post() if request.method == "POST" else request.query
        params: dict[str, Any] = {}
        for key, value in form.items():
            if not isinstance(value, str):
                continue  # file upload: not needed here
            if key in _JSON_FIELDS:
                try:
                    params[key] = json.loads(value)
                except json.JSONDecodeError:
                    params[key] = value
            else:
                params[key] = value
        return params

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        params = await self._params(request)
        call = Call(method, params, time.monotonic())
        self.calls.append(call)
        try:
            injected = self._injected.get(method)
            if injected and (injected[0].when is None or injected[0].when(params)):
                inj = injected[0]
                inj.times -= 1
                if inj.times <= 0:
                    injected.pop(0)
                if inj.error is None:
                    call.error = "dropped"
                    assert request.transport is not None
                    request.transport.close()
                    raise ConnectionResetError("dropped by test")
                raise inj.error
            self._storm_check(method)
            handler = getattr(self, "_m_" + method.lower(), None)
            if handler is None or (method == "sendMessageDraft" and not self.drafts_supported):
                raise ApiError(404, "Not Found")
            result = await handler(params)
            return web.json_response({"ok": True, "result": result})
        except ApiError as exc:
            call.error = exc.description
            if exc.code == 429:
                self.served_429 += 1
            return web.json_response(exc.body(), status=exc.code)
        finally:
            async with self._changed:
                self._changed.notify_all()

    def _message_json(self, m: FakeMessage) -> dict[str, Any]:
        out: dict[str, Any] = {"message_id": m.message_id, "chat": m.chat, "date": m.date, "text": m.text}
        out["from"] = self.bot_user if m.from_bot else {"id": m.chat["id"], "is_bot": False, "first_name": "User"}
        if m.entities:
            out["entities"] = m.entities
        if m.thread_id is not None:
            out["message_thread_id"] = m.thread_id
            out["is_topic_message"] = True
        if m.reply_markup:
            out["reply_markup"] = m.reply_markup
        if m.edits:
            out["edit_date"] = int(time.time())
        return out

    def _chat(self, chat_id: Any) -> dict[str, Any]:
        try:
            cid = int(chat_id)
        except (TypeError, ValueError):
            raise bad_request("chat not found") from None
        if cid in self.migrated:
            raise ApiError(400, "Bad Request: group chat was upgraded to a supergroup chat",
                           parameters={"migrate_to_chat_id": self.migrated[cid]})
        if cid in self.chats:
            return self.chats[cid]
        for (c, _), m in self.messages.items():
            if c == cid:
                return m.chat
        if cid > 0:
            return self.private_chat(cid)
        raise bad_request("chat not found")

    def _text(self, params: dict[str, Any], empty_ok: bool = False) -> tuple[str, list[dict[str, Any]]]:
        raw = params.get("text")
        if empty_ok and (raw is None or raw == ""):
            return "", []
        if raw is None or raw == "":
            raise bad_request("message text is empty")
        mode = (params.get("parse_mode") or "").lower()
        if mode == "html":
            text, entities = parse_html(str(raw))
        elif mode == "":
            text, entities = str(raw), list(params.get("entities") or [])
        else:
            raise bad_request(f"unsupported parse_mode {params.get('parse_mode')}")
        if not text.strip() and not empty_ok:
            raise bad_request("message text is empty")
        if utf16_len(text) > MAX_TEXT:
            raise bad_request("message is too long")
        return text, entities

    def _flood_check(self, chat_id: int) -> None:
        if not self.flood_interval:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(chat_id, (float(self.flood_burst), now))
        tokens = min(float(self.flood_burst), tokens + (now - last) / self.flood_interval)
        if tokens < 1:
            wait = (1 - tokens) * self.flood_interval
            self._buckets[chat_id] = (tokens, now)
            raise ApiError(429, f"Too Many Requests: retry after {max(1, round(wait))}", max(1, round(wait)))
        self._buckets[chat_id] = (tokens - 1, now)

    # --- methods ---
    async def _m_getme(self, params: dict[str, Any]) -> Any:
        return self.bot_user

    async def _m_deletewebhook(self, params: dict[str, Any]) -> Any:
        return True

    async def _m_getupdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if offset:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]  # confirmed ones go
        if "allowed_updates" in params:  # the setting persists until a later getUpdates changes it
            self.allowed_updates = params["allowed_updates"] or None
        wanted = set(self.allowed_updates) if self.allowed_updates else DEFAULT_UPDATES
        deadline = time.monotonic() + timeout
        async with self._new_update:
            while True:
                self.updates = [u for u in self.updates if set(u) - {"update_id"} <= wanted]  # others: never sent
                pending = [u for u in self.updates if u["update_id"] >= offset]
                left = deadline - time.monotonic()
                if pending or left <= 0:
                    if pending[:limit]:
                        self.fetched_update_id = max(self.fetched_update_id, pending[:limit][-1]["update_id"])
                    return pending[:limit]
                try:
                    await asyncio.wait_for(self._new_update.wait(), left)
                except TimeoutError:
                    return []

    @staticmethod
    def _command_list_key(params: dict[str, Any]) -> tuple[str, str]:
        """setMyCommands/getMyCommands: `scope` (default: BotCommandScopeDefault) and `language_code`
        (a two-letter ISO 639-1 code, or empty for every language without a list of its own)."""
        scope = (params.get("scope") or {}).get("type", "default")
        language = params.get("language_code") or ""
        if language and not re.fullmatch(r"[a-z]{2}", language):
            raise bad_request("LANG_CODE_INVALID")  # (the wording is a guess; the API only documents the format)
        return scope, language

    async def _m_setmycommands(self, params: dict[str, Any]) -> Any:
        commands = params.get("commands") or []
        for c in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", c.get("command", "")) or not 1 <= len(c.get("description", "")) <= 256:
                raise bad_request("BOT_COMMAND_INVALID")
        key = self._command_list_key(params)
        self.command_lists[key] = commands
        if key == ("default", ""):
            self.commands = commands
        return True

    async def _m_getmycommands(self, params: dict[str, Any]) -> Any:
        return self.command_lists.get(self._command_list_key(params), [])

    async def _m_sendchataction(self, params: dict[str, Any]) -> Any:
        self._chat(params.get("chat_id"))
        if params.get("action") not in {"typing", "upload_photo", "record_video", "upload_document"}:
            raise bad_request("wrong parameter action in request")
        return True

    async def _m_sendmessage(self, params: dict[str, Any]) -> Any:
        chat = self._chat(params.get("chat_id"))
        text, entities = self._text(params)
        self._flood_check(chat["id"])
        mid = self._next_message_id(chat["id"])
        thread = params.get("message_thread_id")
        m = FakeMessage(chat, mid, text, entities, True, int(time.time()), int(thread) if thread else None,
                        params.get("reply_markup"))
        m.history.append(text)
        self.messages[(chat["id"], mid)] = m
        return self._message_json(m)

    async def _m_sendmessagedraft(self, params: dict[str, Any]) -> Any:
        """A preview that animates in place per draft_id; private chats only; the text is optional (Bot API 10.0)."""
        chat = self._chat(params.get("chat_id"))
        if chat["type"] != "private":
            raise bad_request("TEXTDRAFT_PEER_INVALID")
        draft_id = params.get("draft_id")
        if not isinstance(draft_id, int) or isinstance(draft_id, bool) or draft_id == 0:
            raise bad_request("DRAFT_ID_INVALID")  # "must be non-zero" (docs); the wording is a guess
        text, entities = self._text(params, empty_ok=True)
        self._draft_flood_check(chat["id"])
        thread = params.get("message_thread_id")
        self.drafts.append(Draft(chat["id"], draft_id, text, entities, int(thread) if thread else None,
                                 time.monotonic()))
        return True

    def _draft_flood_check(self, chat_id: int) -> None:
        """More than `draft_rate` drafts within one second of a chat: 429, and drafts there wait out its retry_after.

        Drafts and messages are limited apart here (`flood_interval` is the messages'): undocumented, assumed.
        """
        if self.draft_rate is None:
            return
        now = time.monotonic()
        left = self._draft_wait_until.get(chat_id, 0.0) - now
        if left > 0:
            wait = max(1, math.ceil(left))
            raise ApiError(429, f"Too Many Requests: retry after {wait}", wait)
        recent = [t for t in self._draft_times.get(chat_id, []) if now - t < 1.0]
        if len(recent) >= self.draft_rate:
            self._draft_times[chat_id] = recent
            self._draft_wait_until[chat_id] = now + self.draft_retry_after
            raise ApiError(429, f"Too Many Requests: retry after {self.draft_retry_after}", self.draft_retry_after)
        self._draft_times[chat_id] = [*recent, now]

    def _editable(self, params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The chat and the bot's own message an edit names, or the Bot API's 400 for it."""
        chat = self._chat(params.get("chat_id"))
        m = self.messages.get((chat["id"], int(params.get("message_id") or 0)))
        if m is None or m.deleted:
            raise bad_request("message to edit not found")
        if not m.from_bot:
            raise bad_request("message can't be edited")
        return chat, m

    async def _m_editmessagetext(self, params: dict[str, Any]) -> Any:
        chat, m = self._editable(params)
        text, entities = self._text(params)
        markup = params.get("reply_markup")
        if text == m.text and entities == m.entities and markup == m.reply_markup:
            raise bad_request(NOT_MODIFIED)
        self._flood_check(chat["id"])
        m.text, m.entities, m.reply_markup = text, entities, markup
        m.edits += 1
        m.history.append(text)
        return self._message_json(m)

    async def _m_editmessagereplymarkup(self, params: dict[str, Any]) -> Any:
        """Only the inline keyboard changes; no reply_markup removes it. Same errors as editMessageText."""
        chat, m = self._editable(params)
        markup = params.get("reply_markup") or None
        if markup == m.reply_markup:
            raise ApiError(400, NOT_MODIFIED)
        self._flood_check(chat["id"])
        m.reply_markup = markup
        return self._message_json(m)

    async def _m_getchatmember(self, params: dict[str, Any]) -> Any:
        """A ChatMember object: ChatMemberOwner / Administrator / Member / Left (Bot API 7+ shapes)."""
        chat = self._chat(params.get("chat_id"))
        try:
            user_id = int(params.get("user_id") or 0)
        except (TypeError, ValueError):
            raise bad_request("invalid user_id specified") from None
        if chat["type"] == "private":
            status = "member" if user_id in (chat["id"], BOT_ID) else "left"
        else:
            status = self.member_status.get((chat["id"], user_id), "member")
        user = self.bot_user if user_id == BOT_ID else {"id": user_id, "is_bot": False, "first_name": "User"}
        member: dict[str, Any] = {"status": status, "user": user}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member.update({"can_be_edited": False, "is_anonymous": False, "can_manage_chat": True,
                           "can_delete_messages": True, "can_manage_video_chats": True,
                           "can_restrict_members": True, "can_promote_members": False, "can_change_info": True,
                           "can_invite_users": True, "can_post_stories": False, "can_edit_stories": False,
                           "can_delete_stories": False})
        return member

    async def _m_deletemessage(self, params: dict[str, Any]) -> Any:
        chat = self._chat(params.get("chat_id"))
        m = self.messages.get((chat["id"], int(params.get("message_id") or 0)))
        if m is None or m.deleted:
            raise bad_request("message to delete not found")
        m.deleted = True
        return True

    async def _m_answercallbackquery(self, params: dict[str, Any]) -> Any:
        if len(params.get("text") or "") > MAX_CALLBACK_ANSWER:
            raise bad_request("MESSAGE_TOO_LONG")
        return True

    async def _m_close(self, params: dict[str, Any]) -> Any:
        return True
