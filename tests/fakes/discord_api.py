"""A fake Discord (REST API v10 + gateway websocket) on 127.0.0.1 for the real discord.py client.

Protocol-faithful where the adapter can notice: JSON bodies with exactly `Content-Type:
application/json`, `X-RateLimit-*` headers, 429s with `Via` and a JSON `retry_after`, zlib-stream
gateway compression, snowflake ids that carry their creation time, and Discord's error codes:

- 10062 Unknown interaction: acknowledged after `ack_timeout_s` (3 s on Discord)
- 40060 Interaction has already been acknowledged
- 50035 Invalid Form Body: content over 2000 characters, or empty
- 50027 Invalid Webhook Token: the interaction token is older than `token_ttl_s` (15 min)
- 10008 Unknown Message, 10003 Unknown Channel, 401 on a bad bot token, gateway close 4004 / 4014

Guild messages reach a bot without the MESSAGE_CONTENT intent with empty content unless they
mention it (the documented exceptions: DMs, mentions, the bot's own messages). Every REST call is
recorded in `calls`. Point discord.py at it with `discord.http.Route.BASE = fake.api_base` and
`DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)`.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
MAX_CONTENT = 2000
# The locales Discord accepts (interaction `locale`, a guild's `preferred_locale`, command `*_localizations` keys).
LOCALES = frozenset({"id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl", "no",
                     "pl", "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi", "th",
                     "zh-CN", "ja", "zh-TW", "ko"})
HEARTBEAT_INTERVAL_MS = 41250
INTENT_MESSAGE_CONTENT = 1 << 15
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
PRIVILEGED_INTENTS = INTENT_MESSAGE_CONTENT | INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES
EVERYONE_PERMISSIONS = 1071698660929  # what Discord gives @everyone in a new server (no Manage Messages)
ADMINISTRATOR = 1 << 3
MANAGE_MESSAGES = 1 << 13
ALL_PERMISSIONS = (1 << 53) - 1
DEFAULT_RATE_LIMIT = (50, 1.0)  # requests per window per route bucket (generous; tests may tighten)

Json = dict[str, Any]


def snowflake(counter: list[int] = [0]) -> str:  # noqa: B006 - a process-wide sequence on purpose
    counter[0] = (counter[0] + 1) % 4096
    return str(((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | counter[0])


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


@dataclass
class Call:
    """One REST request as the fake saw it (and what it answered)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0
    response: Any = None
    t: float = field(default_factory=time.monotonic)


@dataclass
class FakeInteraction:
    """The server side of one interaction: what the bot did with it."""

    id: str
    token: str
    name: str
    channel_id: str
    user_id: str
    created: float
    kind: int = 2  # 2 application command, 3 message component, 4 autocomplete
    ack_type: int | None = None
    acked_at: float | None = None
    ephemeral: bool = False
    original: Json | None = None  # the response message (after a message or deferred response)
    original_edits: list[str] = field(default_factory=list)  # content of every PATCH @original
    followups: list[Json] = field(default_factory=list)
    choices: list[Json] | None = None  # autocomplete result
    responded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def content(self) -> str:
        return (self.original or {}).get("content", "")


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    body: Json
    count: int
    headers: dict[str, str]


class FakeDiscord:
    """One application/bot, some users, guilds, channels and DMs, served over REST and a gateway."""

    def __init__(self, token: str = "", *, ack_timeout_s: float = 3.0, token_ttl_s: float = 900.0,
                 privileged_intents: int = PRIVILEGED_INTENTS,
                 rate_limit: tuple[int, float] = DEFAULT_RATE_LIMIT) -> None:
        self.token = token or f"{secrets.token_urlsafe(18)}.{secrets.token_urlsafe(5)}.{secrets.token_urlsafe(27)}"
        self.ack_timeout_s = ack_timeout_s
        self.token_ttl_s = token_ttl_s
        self.privileged_intents = privileged_intents  # those enabled "in the developer portal"
        self.rate_limit = rate_limit
        self.app_id = snowflake()
        self.bot_user: Json = {"id": self.app_id, "username": "quantbot", "discriminator": "0",
                               "global_name": None, "avatar": None, "bot": True}
        self.owner: Json = self.add_user("owner")
        self.guilds: dict[str, Json] = {}
        self.channels: dict[str, Json] = {}
        self.members: dict[tuple[str, str], Json] = {}  # (guild, user) -> member payload
        self.users: dict[str, Json] = {self.app_id: self.bot_user, self.owner["id"]: self.owner}
        self.messages: dict[str, dict[str, Json]] = {}  # channel -> id -> message (latest state)
        self.commands: dict[str | None, list[Json]] = {}  # guild id (None = global) -> commands
        self.locales: dict[str, str] = {}  # user id -> their client's locale (interactions carry it; default en-US)
        self.command_puts: list[tuple[str | None, list[Json]]] = []
        self.interactions: dict[str, FakeInteraction] = {}
        self.calls: list[Call] = []
        self.identify: Json | None = None
        self.ready = asyncio.Event()
        self.sessions_started = 0
        self._failures: list[_Failure] = []
        self._buckets: dict[str, tuple[float, int]] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._session_id = secrets.token_hex(16)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ----------------------------------------------------------------- world setup

    def add_user(self, name: str, *, bot: bool = False) -> Json:
        user = {"id": snowflake(), "username": name, "discriminator": "0", "global_name": name.title(),
                "avatar": None, "bot": bot}
        if hasattr(self, "users"):
            self.users[user["id"]] = user
        return user

    def add_guild(self, name: str = "Test guild", *, roles: list[str] = (),  # type: ignore[assignment]
                  permissions: dict[str, int] | None = None, preferred_locale: str = "en-US") -> Json:
        """A server; `roles` are role names, `permissions` gives some of them permission bits."""
        if preferred_locale not in LOCALES:
            raise ValueError(f"Discord has no locale {preferred_locale!r}")
        gid = snowflake()
        role_list = [{"id": gid, "name": "@everyone", "permissions": str(EVERYONE_PERMISSIONS), "position": 0,
                      "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}]
        role_list.append({"id": snowflake(), "name": "quantbot", "permissions": "0", "position": 1, "color": 0,
                          "hoist": False, "managed": True, "mentionable": True, "flags": 0,
                          "tags": {"bot_id": self.app_id}})  # the role Discord gives an installed bot
        for i, role in enumerate(roles, 2):
            role_list.append({"id": snowflake(), "name": role, "permissions": str((permissions or {}).get(role, 0)),
                              "position": i, "color": 0,
                              "hoist": False, "managed": False, "mentionable": True, "flags": 0})
        guild = {"id": gid, "name": name, "owner_id": self.owner["id"], "roles": role_list, "channels": [],
                 "threads": [], "members": [], "member_count": 1, "features": [], "emojis": [], "stickers": [],
                 "icon": None, "large": False, "unavailable": False, "joined_at": _now_iso(),
                 "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
                 "mfa_level": 0, "premium_tier": 0, "preferred_locale": preferred_locale, "nsfw_level": 0,
                 "system_channel_flags": 0, "voice_states": [], "presences": [], "stage_instances": [],
                 "guild_scheduled_events": [], "soundboard_sounds": []}
        self.guilds[gid] = guild
        self.add_member(gid, self.bot_user)
        return guild

    def member_permissions(self, guild_id: str, user_id: str) -> int:
        """Base permissions: the owner has all; else @everyone's and the member's roles' (no overwrites here)."""
        guild = self.guilds[guild_id]
        if guild["owner_id"] == user_id:
            return ALL_PERMISSIONS
        member = self.members[(guild_id, user_id)]
        bits = 0
        for role in guild["roles"]:
            if role["id"] == guild_id or role["id"] in member["roles"]:
                bits |= int(role["permissions"])
        return ALL_PERMISSIONS if bits & ADMINISTRATOR else bits

    def role_id(self, guild: Json, name: str) -> str:
        return next(r["id"] for r in guild["roles"] if r["name"] == name)

    def add_member(self, guild_id: str, user: Json, roles: list[str] = ()) -> Json:  # type: ignore[assignment]
        guild = self.guilds[guild_id]
        role_ids = [self.role_id(guild, r) for r in roles]
        member = {"user": user, "roles": role_ids, "joined_at": _now_iso(), "deaf": False, "mute": False,
                  "flags": 0, "nick": None, "pending": False}
        self.members[(guild_id, user["id"])] = member
        guild["members"] = [m for (g, _), m in self.members.items() if g == guild_id]
        guild["member_count"] = len(guild["members"])
        return member

    def add_channel(self, guild: Json, name: str = "general") -> Json:
        channel = {"id": snowflake(), "type": 0, "guild_id": guild["id"], "name": name, "position": len(guild["channels"]),
                   "permission_overwrites": [], "nsfw": False, "topic": None, "last_message_id": None,
                   "rate_limit_per_user": 0, "parent_id": None, "flags": 0}
        guild["channels"].append({k: v for k, v in channel.items() if k != "guild_id"})
        self.channels[channel["id"]] = channel
        self.messages[channel["id"]] = {}
        return channel

    def add_thread(self, parent: Json, name: str = "a thread") -> Json:
        guild = self.guilds[parent["guild_id"]]
        thread = {"id": snowflake(), "type": 11, "guild_id": guild["id"], "name": name, "parent_id": parent["id"],
                  "owner_id": self.owner["id"], "last_message_id": None, "rate_limit_per_user": 0, "flags": 0,
                  "message_count": 0, "member_count": 1, "total_message_sent": 0,
                  "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "locked": False,
                                      "archive_timestamp": _now_iso()}}
        guild["threads"].append({k: v for k, v in thread.items() if k != "guild_id"})
        self.channels[thread["id"]] = thread
        self.messages[thread["id"]] = {}
        return thread

    def add_dm(self, user: Json) -> Json:
        channel = {"id": snowflake(), "type": 1, "recipients": [user], "last_message_id": None, "flags": 0}
        self.channels[channel["id"]] = channel
        self.messages[channel["id"]] = {}
        return channel

    # ----------------------------------------------------------------- failures and rate limits

    def fail_next(self, method: str, path_regex: str, *, status: int = 429, count: int = 1,
                  retry_after: float = 0.3, code: int = 0, message: str = "") -> None:
        """The next `count` matching REST calls get this error (a 429 is a faithful rate limit)."""
        headers: dict[str, str] = {}
        if status == 429:
            body: Json = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
            headers = {"Via": "1.1 google", "Retry-After": str(max(1, round(retry_after))),
                       "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                       "X-RateLimit-Reset-After": f"{retry_after:.3f}", "X-RateLimit-Scope": "user"}
        else:
            body = {"message": message or "Error", "code": code}
        self._failures.append(_Failure(method, re.compile(path_regex), status, body, count, headers))

    def _injected(self, method: str, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.method == method and failure.pattern.search(path) and failure.count > 0:
                failure.count -= 1
                return failure
        return None

    def _bucket_key(self, method: str, path: str) -> str:
        # Discord buckets by route template + major parameter (channel, guild, webhook/interaction).
        template = re.sub(r"/messages/\d+", "/messages/{id}", path)
        template = re.sub(r"/(interactions)/(\d+)/[^/]+", r"/\1/\2/{token}", template)
        return f"{method} {template}"

    def _rate_headers(self, key: str) -> tuple[dict[str, str], float | None]:
        limit, window = self.rate_limit
        now = time.monotonic()
        start, used = self._buckets.get(key, (now, 0))
        if now - start >= window:
            start, used = now, 0
        reset_after = max(0.0, window - (now - start))
        if used >= limit:
            return ({"Via": "1.1 google", "X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0",
                     "X-RateLimit-Reset-After": f"{reset_after:.3f}", "X-RateLimit-Scope": "user",
                     "X-RateLimit-Bucket": secrets.token_hex(8)}, reset_after)
        used += 1
        self._buckets[key] = (start, used)
        return ({"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": str(limit - used),
                 "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                 "X-RateLimit-Reset-After": f"{reset_after:.3f}"}, None)

    # ----------------------------------------------------------------- server lifecycle

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        compress = request.query.get("compress") == "zlib-stream"
        deflater = zlib.compressobj() if compress else None

        async def send(payload: Json) -> None:
            raw = json.dumps(payload)
            if deflater is not None:
                await ws.send_bytes(deflater.compress(raw.encode()) + deflater.flush(zlib.Z_SYNC_FLUSH))
            else:
                await ws.send_str(raw)

        ws._fake_send = send  # type: ignore[attr-defined]
        await send({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}, "s": None, "t": None})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue  # discord.py sends JSON text frames
            data = json.loads(msg.data)
            op, d = data.get("op"), data.get("d")
            if op == 1:
                await send({"op": 11, "d": None, "s": None, "t": None})
            elif op == 2:
                if d.get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                intents = int(d.get("intents", 0))
                if intents & PRIVILEGED_INTENTS & ~self.privileged_intents:
                    await ws.close(code=4014, message=b"Disallowed intent(s).")
                    break
                self.identify = d
                self.sessions_started += 1
                self._sockets.append(ws)
                await self._send_ready(send)
            elif op == 6:
                if d.get("token") != self.token or d.get("session_id") != self._session_id:
                    await send({"op": 9, "d": False, "s": None, "t": None})
                    continue
                self._sockets.append(ws)
                await self._dispatch_on(send, "RESUMED", {})
        if ws in self._sockets:
            self._sockets.remove(ws)
        return ws

    async def _dispatch_on(self, send: Callable[[Json], Any], event: str, data: Json) -> None:
        self._seq += 1
        await send({"op": 0, "s": self._seq, "t": event, "d": data})

    async def _send_ready(self, send: Callable[[Json], Any]) -> None:
        ready = {"v": 10, "user": self.bot_user, "session_id": self._session_id, "session_type": "normal",
                 "resume_gateway_url": self.gateway_url, "private_channels": [], "relationships": [],
                 "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
                 "application": {"id": self.app_id, "flags": 0}, "shard": [0, 1]}
        await self._dispatch_on(send, "READY", ready)
        for guild in self.guilds.values():
            await self._dispatch_on(send, "GUILD_CREATE", guild)
        self.ready.set()

    async def dispatch(self, event: str, data: Json) -> None:
        """Send one gateway event to every identified connection."""
        if not self._sockets:
            raise RuntimeError("no bot is connected to the fake gateway")
        for ws in list(self._sockets):
            await self._dispatch_on(ws._fake_send, event, data)  # type: ignore[attr-defined]

    async def close_gateway(self, code: int, reason: str = "") -> None:
        """Discord ends every gateway connection with this close code (4004: the token was reset)."""
        for ws in list(self._sockets):
            self._sockets.remove(ws)
            await ws.close(code=code, message=reason.encode())

    def _intents(self) -> int:
        return int((self.identify or {}).get("intents", 0))

    # ----------------------------------------------------------------- what people do

    def _message(self, channel_id: str, author: Json, content: str, *, reference: Json | None = None,
                 webhook_id: str | None = None, flags: int = 0, interaction: FakeInteraction | None = None) -> Json:
        channel = self.channels[channel_id]
        mentioned = sorted(set(re.findall(r"<@!?(\d+)>", content)))
        msg: Json = {"id": snowflake(), "channel_id": channel_id, "author": author, "content": content,
                     "timestamp": _now_iso(), "edited_timestamp": None, "tts": False, "mention_everyone": False,
                     "mentions": [self.users[u] for u in mentioned if u in self.users],
                     "mention_roles": sorted(set(re.findall(r"<@&(\d+)>", content))),
                     "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": flags, "components": []}
        if reference is not None:
            msg["type"] = 19
            msg["message_reference"] = {"message_id": reference["id"], "channel_id": channel_id, "type": 0,
                                        **({"guild_id": channel["guild_id"]} if "guild_id" in channel else {})}
            msg["referenced_message"] = reference
        if webhook_id:
            msg["webhook_id"] = webhook_id
            msg["application_id"] = self.app_id
        if interaction is not None:
            msg["type"] = 20
            msg["interaction_metadata"] = {"id": interaction.id, "type": 2, "name": interaction.name,
                                           "user": self.users[interaction.user_id],
                                           "authorizing_integration_owners": {}}
        if "guild_id" in channel:
            msg["guild_id"] = channel["guild_id"]
        self.messages[channel_id][msg["id"]] = msg
        return msg

    def _for_gateway(self, msg: Json) -> Json:
        """A MESSAGE_CREATE payload as this bot may see it (content intent rules, member field)."""
        data = dict(msg)
        channel = self.channels[msg["channel_id"]]
        guild_id = channel.get("guild_id")
        if guild_id:
            member = self.members.get((guild_id, msg["author"]["id"]))
            if member:
                data["member"] = {k: v for k, v in member.items() if k != "user"}
            mentions_bot = any(u["id"] == self.app_id for u in msg["mentions"])
            own = msg["author"]["id"] == self.app_id
            if not (self._intents() & INTENT_MESSAGE_CONTENT) and not mentions_bot and not own:
                data.update(content="", embeds=[], attachments=[], components=[])
        return data

    async def user_message(self, channel: Json, author: Json, content: str, *, reply_to: Json | None = None,
                           attachments: list[str] = ()) -> Json:  # type: ignore[assignment]
        """A person posts in a channel or DM (with files named `attachments`); the bot gets MESSAGE_CREATE."""
        msg = self._message(channel["id"], author, content, reference=reply_to)
        msg["attachments"] = [self._attachment(channel["id"], name) for name in attachments]
        await self.dispatch("MESSAGE_CREATE", self._for_gateway(msg))
        return msg

    async def user_edits(self, message: Json, content: str) -> Json:
        """The author edits their message; the bot gets MESSAGE_UPDATE with the whole message."""
        stored = self.messages[message["channel_id"]][message["id"]]
        stored.update(content=content, edited_timestamp=_now_iso(),
                      mentions=[self.users[u] for u in sorted(set(re.findall(r"<@!?(\d+)>", content)))
                                if u in self.users])
        await self.dispatch("MESSAGE_UPDATE", self._for_gateway(stored))
        return stored

    @staticmethod
    def _attachment(channel_id: str, filename: str) -> Json:
        """An attachment object as Discord sends it (CDN URLs; images also carry their size)."""
        attachment_id = snowflake()
        url = f"https://cdn.discordapp.com/attachments/{channel_id}/{attachment_id}/{filename}"
        found: Json = {"id": attachment_id, "filename": filename, "size": 12345, "url": url,
                       "proxy_url": url.replace("cdn.discordapp.com", "media.discordapp.net")}
        kind = mimetypes.guess_type(filename)[0]
        if kind:
            found["content_type"] = kind
        if kind and kind.startswith("image/"):
            found.update(width=640, height=480)
        return found

    async def delete_message(self, message: Json) -> None:
        """Someone (a moderator) deletes a message; the bot gets MESSAGE_DELETE."""
        self.messages[message["channel_id"]].pop(message["id"], None)
        data = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            data["guild_id"] = message["guild_id"]
        await self.dispatch("MESSAGE_DELETE", data)

    def mention(self) -> str:
        return f"<@{self.app_id}>"

    def bot_role_mention(self, guild: Json) -> str:
        """What Discord's client inserts when someone picks the bot's managed role from the @ list."""
        return f"<@&{next(r['id'] for r in guild['roles'] if r.get('tags', {}).get('bot_id') == self.app_id)}>"

    def _find_command(self, name: str, guild_id: str | None) -> tuple[Json, str | None]:
        if guild_id and any(c["name"] == name for c in self.commands.get(guild_id, [])):
            return next(c for c in self.commands[guild_id] if c["name"] == name), guild_id
        for cmd in self.commands.get(None, []):
            if cmd["name"] == name:
                return cmd, None
        raise LookupError(f"command /{name} is not registered here (sync first)")

    async def interact(self, name: str, user: Json, channel: Json, options: dict[str, Any] | None = None, *,
                       focused: str | None = None) -> FakeInteraction:
        """A person runs `/name` (or types into option `focused`: an autocomplete interaction)."""
        guild_id = channel.get("guild_id")
        command, scope = self._find_command(name, guild_id)
        typed = {o["name"]: o["type"] for o in command.get("options", [])}
        opts = []
        for key, value in (options or {}).items():
            if key not in typed:
                raise LookupError(f"/{name} has no option {key!r}")
            opt: Json = {"name": key, "type": typed[key], "value": value}
            if key == focused:
                opt["focused"] = True
            opts.append(opt)
        inter = FakeInteraction(id=snowflake(), token="aW50ZXJhY3Rpb246" + secrets.token_urlsafe(72), name=name,
                                channel_id=channel["id"], user_id=user["id"], created=time.monotonic(),
                                kind=4 if focused else 2)
        self.interactions[inter.id] = inter
        data: Json = {"id": command["id"], "name": name, "type": 1, "options": opts}
        if scope:
            data["guild_id"] = scope
        await self.dispatch("INTERACTION_CREATE", self._interaction_payload(inter, channel, user, data))
        return inter

    def _interaction_payload(self, inter: FakeInteraction, channel: Json, user: Json, data: Json) -> Json:
        """INTERACTION_CREATE as Discord sends it: who, where (member in guilds, user in DMs), what."""
        guild_id = channel.get("guild_id")
        payload: Json = {"id": inter.id, "application_id": self.app_id, "type": inter.kind, "data": data,
                         "token": inter.token, "version": 1, "locale": self.locales.get(user["id"], "en-US"),
                         "app_permissions": "1071698660929",
                         "attachment_size_limit": 10485760, "entitlements": [], "authorizing_integration_owners":
                         {"0": guild_id} if guild_id else {"1": user["id"]},
                         "context": 0 if guild_id else 1,
                         "channel_id": channel["id"],
                         "channel": {k: v for k, v in channel.items() if k != "recipients"} |
                         ({"recipients": channel["recipients"]} if "recipients" in channel else {})}
        if guild_id:
            member = self.members[(guild_id, user["id"])]
            payload["guild_id"] = guild_id
            payload["guild_locale"] = self.guilds[guild_id]["preferred_locale"]
            payload["member"] = member | {"permissions": str(self.member_permissions(guild_id, user["id"]))}
        else:
            payload["user"] = user
        return payload

    async def press(self, message: Json, custom_id: str, user: Json) -> FakeInteraction:
        """A person clicks the button `custom_id` under `message` (a message component interaction).

        Like Discord, only a button that is on the message can be clicked (LookupError otherwise).
        The interaction's original response is that message (callback types 6 and 7 update it).
        """
        current = self.messages[message["channel_id"]][message["id"]]
        ids = self.button_ids(current)
        if custom_id not in ids:
            raise LookupError(f"no button {custom_id!r} on that message (it has {ids})")
        channel = self.channels[current["channel_id"]]
        inter = FakeInteraction(id=snowflake(), token="aW50ZXJhY3Rpb246" + secrets.token_urlsafe(72), name=custom_id,
                                channel_id=channel["id"], user_id=user["id"], created=time.monotonic(), kind=3,
                                original=current)
        self.interactions[inter.id] = inter
        payload = self._interaction_payload(inter, channel, user, {"custom_id": custom_id, "component_type": 2})
        payload["message"] = {k: v for k, v in current.items() if not k.startswith("_")}
        await self.dispatch("INTERACTION_CREATE", payload)
        return inter

    @staticmethod
    def button_ids(message: Json) -> list[str]:
        """The custom_ids of the buttons under a message (its latest state)."""
        return [b.get("custom_id") for row in message.get("components", []) for b in row.get("components", [])]

    # ----------------------------------------------------------------- REST

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        raw = await request.read()
        body: Any = None
        if raw:
            if request.headers.get("Content-Type", "").startswith("application/json"):
                body = json.loads(raw)
            elif request.content_type.startswith("multipart/"):
                body = {"multipart": True}
        call = Call(request.method, path, dict(request.query), body)
        self.calls.append(call)
        status, payload, headers = await self._route(request, path, body)
        call.status, call.response = status, payload
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.Response(status=status, body=json.dumps(payload).encode(), headers={
            "Content-Type": "application/json", **headers})

    async def _route(self, request: web.Request, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        method = request.method
        failure = self._injected(method, path)
        if failure is not None:
            return failure.status, failure.body, failure.headers
        is_webhook = path.startswith(("/webhooks/", "/interactions/"))
        if not is_webhook and request.headers.get("Authorization") != f"Bot {self.token}":
            return 401, {"message": "401: Unauthorized", "code": 0}, {}
        key = self._bucket_key(method, path)
        headers, limited = self._rate_headers(key)
        if limited is not None:
            return 429, {"message": "You are being rate limited.", "retry_after": limited, "global": False}, headers
        try:
            status, payload = self._handle(method, path, body, request)
        except _ApiError as err:
            status, payload = err.status, {"message": err.message, "code": err.code, **err.extra}
        return status, payload, headers

    def _handle(self, method: str, path: str, body: Any, request: web.Request) -> tuple[int, Any]:
        m: re.Match[str] | None
        if method == "GET" and path == "/users/@me":
            return 200, self.bot_user
        if method == "GET" and path == "/oauth2/applications/@me":
            return 200, {"id": self.app_id, "name": "quantbot", "description": "", "icon": None, "bot_public": True,
                         "bot_require_code_grant": False, "owner": self.owner, "verify_key": "ab" * 32, "flags": 0,
                         "team": None, "summary": "", "bot": self.bot_user}
        if method == "GET" and path == "/gateway/bot":
            return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit":
                         {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}
        if m := re.fullmatch(r"/applications/(\d+)(?:/guilds/(\d+))?/commands", path):
            return self._commands(method, m.group(1), m.group(2), body)
        if m := re.fullmatch(r"/interactions/(\d+)/([^/]+)/callback", path):
            if method == "POST":
                return self._callback(m.group(1), m.group(2), body, request.query.get("with_response"))
        if m := re.fullmatch(r"/webhooks/(\d+)/([^/]+)(?:/messages/(@original|\d+))?", path):
            return self._webhook(method, m.group(1), m.group(2), m.group(3), body)
        if m := re.fullmatch(r"/channels/(\d+)/messages(?:/(\d+))?", path):
            return self._channel_message(method, m.group(1), m.group(2), body)
        if m := re.fullmatch(r"/channels/(\d+)/typing", path):
            self._channel(m.group(1))
            return 204, None
        if m := re.fullmatch(r"/guilds/(\d+)/members/(\d+)", path):
            if method != "GET":
                raise _ApiError(405, 0, "405: Method Not Allowed")
            if m.group(1) not in self.guilds:
                raise _ApiError(404, 10004, "Unknown Guild")
            member = self.members.get((m.group(1), m.group(2)))
            if member is None:
                raise _ApiError(404, 10007, "Unknown Member")
            return 200, member
        if m := re.fullmatch(r"/users/@me/channels", path):
            recipient = self.users.get(str((body or {}).get("recipient_id")))
            if recipient is None:
                raise _ApiError(404, 10013, "Unknown User")
            dm = next((c for c in self.channels.values() if c.get("recipients") == [recipient]), None)
            return 200, dm or self.add_dm(recipient)
        raise _ApiError(404, 0, "404: Not Found")

    def _channel(self, channel_id: str) -> Json:
        if channel_id not in self.channels:
            raise _ApiError(404, 10003, "Unknown Channel")
        return self.channels[channel_id]

    @staticmethod
    def _apply_components(msg: Json, body: Any) -> None:
        """`components` in a create/edit body replaces the message's (absent: unchanged, as on PATCH).

        Checked like Discord: action rows (type 1) of at most 5 buttons (type 2); a non-link button
        needs a custom_id of 1-100 characters; labels at most 80.
        """
        if not isinstance(body, dict) or "components" not in body:
            return
        rows = body["components"] or []
        for row in rows:
            buttons = row.get("components", [])
            if row.get("type") != 1 or not 1 <= len(buttons) <= 5:
                raise _ApiError(400, 50035, "Invalid Form Body", errors={"components": "action rows of 1-5"})
            for b in buttons:
                link = b.get("style") == 5
                if b.get("type") != 2 or len(b.get("label") or "") > 80 or (
                        not link and not 1 <= len(b.get("custom_id") or "") <= 100):
                    raise _ApiError(400, 50035, "Invalid Form Body", errors={"components": "bad button"})
        msg["components"] = rows

    @staticmethod
    def _check_content(body: Any, *, required: bool) -> str | None:
        content = (body or {}).get("content")
        if content is not None and len(content) > MAX_CONTENT:
            raise _ApiError(400, 50035, "Invalid Form Body", errors={"content": {"_errors": [
                {"code": "BASE_TYPE_MAX_LENGTH", "message": f"Must be {MAX_CONTENT} or fewer in length."}]}})
        if required and not content and not (body or {}).get("embeds"):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        return content

    def set_locale(self, user: Json, locale: str) -> None:
        """The person's Discord client is in `locale`: their interactions carry it."""
        if locale not in LOCALES:
            raise ValueError(f"Discord has no locale {locale!r}")
        self.locales[user["id"]] = locale

    @staticmethod
    def _check_localizations(item: Json, name_pattern: str) -> None:
        """`name_localizations` / `description_localizations`: Discord locales to a valid name / 1-100 characters."""
        for key, ok in (("name_localizations", lambda v: re.fullmatch(name_pattern, v) is not None),
                        ("description_localizations", lambda v: 1 <= len(v) <= 100)):
            for locale, value in (item.get(key) or {}).items():
                if locale not in LOCALES or not isinstance(value, str) or not ok(value):
                    raise _ApiError(400, 50035, "Invalid Form Body", errors={key: {locale: value}})

    def _commands(self, method: str, app_id: str, guild_id: str | None, body: Any) -> tuple[int, Any]:
        if app_id != self.app_id:
            raise _ApiError(403, 50001, "Missing Access")
        if guild_id and guild_id not in self.guilds:
            raise _ApiError(403, 50001, "Missing Access")
        if method == "GET":
            return 200, self.commands.get(guild_id, [])
        if method != "PUT":
            raise _ApiError(405, 0, "405: Method Not Allowed")
        registered = []
        for cmd in body:
            name, desc = cmd.get("name", ""), cmd.get("description", "")
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower() or not 1 <= len(desc) <= 100:
                raise _ApiError(400, 50035, "Invalid Form Body", errors={"name": name})
            self._check_localizations(cmd, r"[-_\w]{1,32}")
            for opt in cmd.get("options", []):
                self._check_localizations(opt, r"[-_\w]{1,32}")
                if opt.get("autocomplete") and opt.get("choices"):
                    raise _ApiError(400, 50035, "Invalid Form Body", errors={"options": "autocomplete with choices"})
            old = next((c for c in self.commands.get(guild_id, []) if c["name"] == name), None)
            registered.append({"id": old["id"] if old else snowflake(), "application_id": self.app_id,
                               "version": snowflake(), "type": cmd.get("type", 1), "name": name,
                               "description": desc, "options": cmd.get("options", []),
                               "name_localizations": cmd.get("name_localizations"),
                               "description_localizations": cmd.get("description_localizations"),
                               "default_member_permissions": cmd.get("default_member_permissions"),
                               "dm_permission": cmd.get("dm_permission", True), "nsfw": cmd.get("nsfw", False),
                               **({"guild_id": guild_id} if guild_id else {})})
        self.commands[guild_id] = registered
        self.command_puts.append((guild_id, registered))
        return 200, registered

    def _interaction(self, interaction_id: str, token: str) -> FakeInteraction:
        inter = self.interactions.get(interaction_id)
        if inter is None or inter.token != token:
            raise _ApiError(404, 10062, "Unknown interaction")
        return inter

    def _callback(self, interaction_id: str, token: str, body: Any, with_response: str | None) -> tuple[int, Any]:
        inter = self._interaction(interaction_id, token)
        if inter.ack_type is not None:
            raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
        if time.monotonic() - inter.created > self.ack_timeout_s:
            raise _ApiError(404, 10062, "Unknown interaction")
        kind, data = body.get("type"), body.get("data") or {}
        if inter.kind == 4 and kind != 8:
            raise _ApiError(400, 50035, "Invalid Form Body", errors={"type": "autocomplete needs type 8"})
        if kind in (6, 7) and inter.kind != 3:
            raise _ApiError(400, 50035, "Invalid Form Body", errors={"type": "only for component interactions"})
        if kind == 8:
            choices = data.get("choices", [])
            if len(choices) > 25 or any(not 1 <= len(c.get("name", "")) <= 100 for c in choices):
                raise _ApiError(400, 50035, "Invalid Form Body", errors={"choices": "1-25, names 1-100"})
            inter.choices = choices
        elif kind == 6:  # deferred update: the message the component is on stays the original
            pass
        elif kind == 7:  # update that message now
            assert inter.original is not None
            content = self._check_content(data, required=False)
            self._apply_components(inter.original, data)
            if content is not None:
                inter.original["content"] = content
                inter.original["edited_timestamp"] = _now_iso()
        elif kind in (4, 5):
            content = self._check_content(data, required=kind == 4)
            inter.ephemeral = bool(int(data.get("flags", 0)) & 64)
            flags = (64 if inter.ephemeral else 0) | (128 if kind == 5 else 0)
            inter.original = self._message(inter.channel_id, self.bot_user, content or "", flags=flags,
                                           webhook_id=self.app_id, interaction=inter)
            self._apply_components(inter.original, data)
        else:
            raise _ApiError(400, 50035, "Invalid Form Body", errors={"type": f"unsupported type {kind}"})
        inter.ack_type, inter.acked_at = kind, time.monotonic()
        inter.responded.set()
        if not with_response:
            return 204, None
        result: Json = {"interaction": {"id": inter.id, "type": inter.kind,
                                        "response_message_loading": kind == 5,
                                        "response_message_ephemeral": inter.ephemeral},
                        "resource": {"type": kind}}
        if inter.original is not None:
            result["interaction"]["response_message_id"] = inter.original["id"]
            result["resource"]["message"] = inter.original
        return 200, result

    def _webhook(self, method: str, app_id: str, token: str, message_id: str | None, body: Any) -> tuple[int, Any]:
        inter = next((i for i in self.interactions.values() if i.token == token), None)
        if app_id != self.app_id or inter is None:
            raise _ApiError(404, 10015, "Unknown Webhook")
        if time.monotonic() - inter.created > self.token_ttl_s:
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        if inter.ack_type is None:
            raise _ApiError(404, 10015, "Unknown Webhook")
        if message_id is None:  # create a follow-up
            if method != "POST":
                raise _ApiError(405, 0, "405: Method Not Allowed")
            content = self._check_content(body, required=True)
            flags = int((body or {}).get("flags", 0)) & 64
            msg = self._message(inter.channel_id, self.bot_user, content or "", flags=flags, webhook_id=self.app_id,
                                interaction=inter)
            self._apply_components(msg, body)
            inter.followups.append(msg)
            return 200, msg
        target = inter.original if message_id == "@original" else next(
            (f for f in inter.followups if f["id"] == message_id), None)
        if target is None:
            raise _ApiError(404, 10008, "Unknown Message")
        if method == "GET":
            return 200, target
        if method == "DELETE":
            self.messages[inter.channel_id].pop(target["id"], None)
            return 204, None
        if method != "PATCH":
            raise _ApiError(405, 0, "405: Method Not Allowed")
        content = self._check_content(body, required=False)
        self._apply_components(target, body)
        if content is not None:
            target["content"] = content
            target["flags"] = int(target.get("flags", 0)) & ~128
            target["edited_timestamp"] = _now_iso()
            if message_id == "@original":
                inter.original_edits.append(content)
        return 200, target

    def _channel_message(self, method: str, channel_id: str, message_id: str | None, body: Any) -> tuple[int, Any]:
        self._channel(channel_id)
        if message_id is None:
            if method == "GET":
                return 200, list(reversed(self.messages[channel_id].values()))
            if method != "POST":
                raise _ApiError(405, 0, "405: Method Not Allowed")
            content = self._check_content(body, required=True)
            reference = None
            if ref := (body or {}).get("message_reference"):
                reference = self.messages[channel_id].get(str(ref.get("message_id")))
                if reference is None and ref.get("fail_if_not_exists", True):
                    raise _ApiError(400, 50035, "Invalid Form Body",
                                    errors={"message_reference": "Unknown message"})
            msg = self._message(channel_id, self.bot_user, content or "", reference=reference)
            self._apply_components(msg, body)
            asyncio.get_running_loop().create_task(self._echo(msg))
            return 200, msg
        msg = self.messages[channel_id].get(message_id)
        if msg is None:
            raise _ApiError(404, 10008, "Unknown Message")
        if method == "GET":
            return 200, msg
        if method == "DELETE":
            del self.messages[channel_id][message_id]
            return 204, None
        if method != "PATCH":
            raise _ApiError(405, 0, "405: Method Not Allowed")
        if msg["author"]["id"] != self.app_id:
            raise _ApiError(403, 50005, "Cannot edit a message authored by another user")
        content = self._check_content(body, required=False)
        self._apply_components(msg, body)
        if content is not None:
            msg["content"] = content
            msg["edited_timestamp"] = _now_iso()
            msg.setdefault("_edits", []).append(content)
        return 200, {k: v for k, v in msg.items() if not k.startswith("_")}

    async def _echo(self, msg: Json) -> None:
        """Discord sends a bot's own new messages back to it over the gateway."""
        if self._sockets:
            await self.dispatch("MESSAGE_CREATE", self._for_gateway({k: v for k, v in msg.items()
                                                                       if not k.startswith("_")}))

    # ----------------------------------------------------------------- test helpers

    def bot_messages(self, channel: Json) -> list[Json]:
        """The bot's messages in a channel, oldest first, as they stand now."""
        return [m for m in self.messages[channel["id"]].values() if m["author"]["id"] == self.app_id]

    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.search(path_regex, c.path)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll until `predicate()` holds (the bot works concurrently)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await asyncio.sleep(0.02)


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
