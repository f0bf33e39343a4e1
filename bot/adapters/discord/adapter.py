"""The Discord adapter: a discord.py client that turns slash commands, mentions and DMs into
`ChatService.handle` calls and streams the replies by editing messages.

Where the bot answers:
- `/chat prompt:` anywhere it is installed; `/reset`, `/model`, `/stop` answer ephemerally.
- DMs: every message is a prompt (text commands such as "/reset" work too).
- Guild channels and threads: messages that @mention the bot or reply to one of its messages.
History is kept per DM, channel or thread (the Discord channel id).

Reading guild messages needs the privileged MESSAGE_CONTENT intent (Developer Portal -> the
application -> Bot -> Privileged Gateway Intents -> Message Content Intent). Without it Discord
closes the gateway with 4014; the adapter then reconnects without the intent and keeps working
for slash commands, DMs and @mentions (those carry their text regardless), and says so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import discord
from discord import app_commands

from bot.adapters.delivery import TEXT_ONLY, handle_reply, not_read_note, started
from bot.adapters.regenerate import BUTTON_ID, BUTTON_LABEL, RETRY_COMMAND, STALE, LatestReplies, strip
from bot.adapters.discord.access import judge, manages_messages
from bot.adapters.discord.commands import CatalogueTranslator, build_tree, locale_of
from bot.adapters.discord.ops import INTERACTION_TOKEN_TTL_S, ChannelOps, InteractionOps, Sent
from bot.adapters.discord.sink import DiscordSink
from bot.adapters.streaming import Pacer, StreamingMessage
from bot.config import Settings
from bot.core import i18n
from bot.core.access import AccessPolicy
from bot.core.i18n import N_, _
from bot.core.messages import IncomingMessage
from bot.core.service import NOT_ALLOWED, ChatService
from bot.errors import BotError

log = logging.getLogger(__name__)

# --- tuning ---
GUILD_READY_TIMEOUT_S = 2.0  # discord.py waits this long after the last GUILD_CREATE before `ready`
LOGIN_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0  # for the gateway task to end after the client closed
STOP_GRACE_S = 5.0  # replies in progress get this long to finish before the client disconnects
RECONNECT_ATTEMPTS = 5  # unexpected gateway failures in a row before the adapter gives up (the process exits)
RECONNECT_BACKOFF_S = 2.0  # doubled after each of them
# Close codes after which Discord will not take this session or identify back: a new token or a code change is needed.
PERMANENT_CLOSE_CODES = {4004, 4010, 4011, 4012, 4013}
REFUSAL_COOLDOWN_S = 3600.0  # a refused person is told "not allowed" (mentions, DMs) at most once per this long

PLATFORM = "discord"
NOT_HERE = N_("Sorry, I don't answer in this channel.")
SOMETHING_WRONG = N_("Sorry, something went wrong. Please try again.")
MESSAGE_CONTENT_HELP = (
    "Discord refused the MESSAGE_CONTENT intent. Enable it in the Developer Portal (your application -> "
    "Bot -> Privileged Gateway Intents -> Message Content Intent). Continuing without it: slash commands, "
    "DMs and @mentions work; replies to the bot that do not mention it are not seen.")


def regenerate_buttons() -> tuple[tuple[str, str], ...]:
    """Under each finished reply (see bot.adapters.regenerate), labelled in the reader's language."""
    return ((BUTTON_ID, _(BUTTON_LABEL)),)


def build_intents(message_content: bool) -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = message_content
    return intents


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter, message_content: bool, guild_ready_timeout: float) -> None:
        # A text bot: no "PyNaCl/davey is not installed, voice will NOT be supported" warnings at start.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(intents=build_intents(message_content), allowed_mentions=discord.AllowedMentions.none(),
                         guild_ready_timeout=guild_ready_timeout, chunk_guilds_at_startup=False)
        self.adapter = adapter
        self.tree = build_tree(self, adapter)

    async def setup_hook(self) -> None:
        await self.adapter.sync_commands(self.tree)

    async def on_ready(self) -> None:
        log.info("Discord: connected as %s (%d guilds)", self.user, len(self.guilds))
        self.adapter.ready.set()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_message_edit(self, before: discord.Message, after: discord.Message) -> None:
        if before.content != after.content:  # not an embed unfurling or a pin
            await self.adapter.on_message(after, edited=True)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Slash commands go to the tree; a press on our Regenerate button comes here."""
        if (interaction.type == discord.InteractionType.component
                and (interaction.data or {}).get("custom_id") == BUTTON_ID):
            await self.adapter.regenerate(interaction)


class DiscordAdapter:
    """Runs the bot on Discord: `await start()` logs in and connects in the background."""

    def __init__(self, settings: Settings, service: ChatService, *,
                 guild_ready_timeout_s: float = GUILD_READY_TIMEOUT_S, stop_grace_s: float = STOP_GRACE_S,
                 service_ready: asyncio.Event | None = None, reconnect_backoff_s: float = RECONNECT_BACKOFF_S) -> None:
        """`service_ready`: set once the service has started (messages wait for it); None: started already."""
        self.settings = settings
        self.service = service
        self.policy = AccessPolicy(settings)
        self.guild_ready_timeout_s = guild_ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.token_ttl_s = INTERACTION_TOKEN_TTL_S
        self.client: _Client | None = None
        self.ready = asyncio.Event()  # the gateway said READY
        self.service_ready = service_ready or started()
        self.failed = asyncio.Event()  # the gateway is gone for good: the process should exit non-zero
        self.reconnect_backoff_s = reconnect_backoff_s
        self._stopping = False
        self.message_content = True
        self.synced: list[app_commands.AppCommand] = []
        self._task: asyncio.Task[None] | None = None
        self._pacers: dict[int, Pacer] = {}
        self._in_flight: set[asyncio.Task[object]] = set()
        self._refused: dict[int, float] = {}  # user id -> when they were last told "not allowed"
        self._latest = LatestReplies()  # the messages of each channel's latest reply (its Regenerate button)

    # --- lifecycle ---------------------------------------------------------------------------
    def _token(self) -> str:
        if self.settings.discord_bot_token is None:
            raise BotError("DISCORD_BOT_TOKEN is not set")
        return self.settings.discord_bot_token.get_secret_value().strip()

    async def start(self) -> None:
        """Log in (and sync the slash commands), then connect to the gateway in a background task."""
        await self._login()
        self._task = asyncio.create_task(self._run(), name="discord-gateway")

    async def _login(self) -> None:
        token = self._token()
        self.client = _Client(self, self.message_content, self.guild_ready_timeout_s)
        try:
            await asyncio.wait_for(self.client.login(token), LOGIN_TIMEOUT_S)
        except discord.LoginFailure:
            await self.client.close()
            raise BotError("Discord refused the bot token; check DISCORD_BOT_TOKEN") from None
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self.client.close()
            raise BotError(f"could not log in to Discord: {type(exc).__name__}") from None

    async def _run(self) -> None:
        """Stay connected: discord.py resumes after ordinary drops; past that, log in again a few times,
        and when Discord will not have us back, set `failed` (the app then exits non-zero)."""
        failures = 0
        while self.client is not None and not self._stopping:
            client = self.client
            try:
                await client.connect(reconnect=True)
                if self._stopping:
                    return
                raise ConnectionError("the gateway connection closed")
            except discord.PrivilegedIntentsRequired:
                if not self.message_content:
                    return self._give_up("Discord refused the gateway intents")
                log.error(MESSAGE_CONTENT_HELP)
                self.message_content = False
            except asyncio.CancelledError:
                raise
            except discord.ConnectionClosed as exc:
                if exc.code in PERMANENT_CLOSE_CODES:
                    return self._give_up(f"Discord closed the gateway with {exc.code} ({exc.reason or 'no reason'})")
                failures += 1
                log.error("Discord: the gateway closed with %s (%d/%d); reconnecting", exc.code, failures,
                          RECONNECT_ATTEMPTS)
            except Exception:  # noqa: BLE001 - unexpected: reconnect, a few times
                failures += 1
                log.exception("Discord: the gateway connection failed (%d/%d); reconnecting", failures,
                              RECONNECT_ATTEMPTS)
            if failures >= RECONNECT_ATTEMPTS:
                return self._give_up(f"the gateway failed {failures} times in a row")
            await client.close()
            if failures:
                await asyncio.sleep(self.reconnect_backoff_s * 2 ** (failures - 1))
            if self._stopping:
                return
            try:
                await self._login()
            except BotError as exc:
                return self._give_up(str(exc))

    def _give_up(self, why: str) -> None:
        log.error("Discord: %s; the Discord adapter stopped", why)
        self.failed.set()

    @property
    def connected(self) -> bool:
        """The gateway said READY and the client is not closed (what /healthz asks)."""
        client = self.client
        return client is not None and client.is_ready() and not client.is_closed() and not self.failed.is_set()

    async def stop(self) -> None:
        """Give replies in progress `stop_grace_s` to finish, then disconnect.

        Replies still running after that are ended and stored by the service when it closes.
        """
        self._stopping = True
        pending = [t for t in self._in_flight if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=self.stop_grace_s)
            for task in still:  # each shows what it had, with a note, before the client goes
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=STOP_TIMEOUT_S)
        if self.client is not None:
            await self.client.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, STOP_TIMEOUT_S)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:  # noqa: BLE001 - already logged by _run
                pass

    async def sync_commands(self, tree: app_commands.CommandTree) -> None:
        """Register the slash commands, described in every language we have (Discord shows each client
        its own): in DISCORD_GUILD_IDS at once, else globally (takes a while)."""
        await tree.set_translator(CatalogueTranslator(self.settings.language))
        try:
            if self.settings.discord_guild_ids:
                for guild_id in self.settings.discord_guild_ids:
                    guild = discord.Object(id=int(guild_id))
                    tree.copy_global_to(guild=guild)
                    self.synced = await tree.sync(guild=guild)
            else:
                self.synced = await tree.sync()
        except (discord.HTTPException, ValueError) as exc:
            log.warning("Discord: could not register the slash commands: %s", exc)

    # --- helpers -----------------------------------------------------------------------------
    def _pacer(self, channel_id: int) -> Pacer:
        if channel_id not in self._pacers:
            self._pacers[channel_id] = Pacer(self.settings.discord_edit_interval_s)
        return self._pacers[channel_id]

    async def _handle(self, msg: IncomingMessage, sink: DiscordSink) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:  # handle_reply closes the sink: no edit loop outlives its message
            await handle_reply(self.service, msg, sink, log=log, label="Discord", something_wrong=SOMETHING_WRONG,
                               ready=self.service_ready)
            await self._latest.delivered(msg.chat_id, sink)
        finally:
            if task is not None:
                self._in_flight.discard(task)

    # --- slash commands ----------------------------------------------------------------------
    async def run_interaction(self, interaction: discord.Interaction, text: str, *, private: bool) -> None:
        """Acknowledge at once (deferred), then let the service answer by editing the response."""
        with i18n.using(locale_of(interaction, self.settings.language)):
            await self._run_interaction(interaction, text, private=private)

    async def _run_interaction(self, interaction: discord.Interaction, text: str, *, private: bool) -> None:
        in_guild = interaction.guild_id is not None
        assert self.client is not None
        access = await judge(self.policy, self.client, interaction.user, interaction.channel, in_guild)
        if not access.place_ok:
            await interaction.response.send_message(_(NOT_HERE), ephemeral=True)
            return
        ephemeral = private or not access.allowed
        try:
            await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        except discord.HTTPException as exc:  # 10062 too late, 40060 already acknowledged
            log.warning("Discord: could not acknowledge /%s: %s", interaction.command and
                        interaction.command.name, exc)
            return
        ops = InteractionOps(interaction, ephemeral=ephemeral, token_ttl_s=self.token_ttl_s)
        pacer = Pacer(self.settings.discord_edit_interval_s) if ephemeral else self._pacer(interaction.channel_id or 0)
        sink = DiscordSink(StreamingMessage(ops, pacer, self.settings.delivery_retry_s),
                           reply_buttons=None if ephemeral else regenerate_buttons())
        user = interaction.user
        msg = IncomingMessage(platform=PLATFORM, chat_id=str(interaction.channel_id), user_id=str(user.id),
                              user_name=user.display_name, text=text, is_allowed=access.allowed,
                              is_admin=access.admin, is_group=in_guild,
                              is_chat_admin=in_guild and interaction.permissions.manage_messages,
                              locale=i18n.current())
        await self._handle(msg, sink)

    async def regenerate(self, interaction: discord.Interaction) -> None:
        """The Regenerate button: `/retry`, streamed into the reply it is under (edited in place)."""
        with i18n.using(locale_of(interaction, self.settings.language)):
            await self._regenerate(interaction)

    async def _regenerate(self, interaction: discord.Interaction) -> None:
        assert self.client is not None
        in_guild = interaction.guild_id is not None
        access = await judge(self.policy, self.client, interaction.user, interaction.channel, in_guild)
        key = str(interaction.channel_id)
        pressed = interaction.message
        if not access.place_ok or not access.allowed or pressed is None:
            await self._say_privately(interaction, _(NOT_HERE if not access.place_ok else NOT_ALLOWED))
            return
        ops = InteractionOps(interaction, token_ttl_s=self.token_ttl_s)
        sink = DiscordSink(StreamingMessage(ops, self._pacer(interaction.channel_id or 0),
                                            self.settings.delivery_retry_s), reply_buttons=regenerate_buttons())
        if self._latest.is_stale(key, pressed.id):
            await self._say_privately(interaction, _(STALE))
            await strip(sink, pressed.id)
            return
        try:
            await interaction.response.defer()  # a component: "deferred update", the message stays as it is
        except discord.HTTPException as exc:
            log.warning("Discord: could not acknowledge a Regenerate press: %s", exc)
            return
        channel = interaction.channel
        earlier = [i for i in self._latest.messages(key) or [] if i != pressed.id]
        ops.original_used = True
        sink.replace_messages([*(Sent(channel.get_partial_message(int(i)), via_token=False)  # type: ignore[union-attr]
                                 for i in earlier), Sent("original", via_token=True)])
        msg = IncomingMessage(platform=PLATFORM, chat_id=key, user_id=str(interaction.user.id),
                              user_name=interaction.user.display_name, text=RETRY_COMMAND, is_allowed=True,
                              is_admin=access.admin, is_group=in_guild,
                              is_chat_admin=in_guild and interaction.permissions.manage_messages,
                              locale=i18n.current())
        await self._handle(msg, sink)

    @staticmethod
    async def _say_privately(interaction: discord.Interaction, text: str) -> None:
        try:
            await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("Discord: could not answer a button press: %s", exc)

    async def command_failed(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("Discord: slash command failed: %s", error, exc_info=error)
        with i18n.using(locale_of(interaction, self.settings.language)):
            text = _(SOMETHING_WRONG)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass

    # --- messages ----------------------------------------------------------------------------
    def _addressed(self, message: discord.Message) -> bool:
        me = self.client.user if self.client else None
        if me is None:
            return False
        if message.guild is None:
            return True
        if any(u.id == me.id for u in message.mentions):
            return True
        own_role = message.guild.self_role  # "@quantbot" picked as the bot's managed role
        if own_role is not None and own_role in message.role_mentions:
            return True
        ref = message.reference.resolved if message.reference else None
        return isinstance(ref, discord.Message) and ref.author.id == me.id

    def _prompt_text(self, message: discord.Message) -> str:
        me = self.client.user if self.client else None
        text = message.content
        if me is not None:
            text = re.sub(rf"<@!?{me.id}>", " ", text)
        own_role = message.guild.self_role if message.guild else None
        if own_role is not None:
            text = text.replace(own_role.mention, " ")
        return text.strip()

    async def on_message(self, message: discord.Message, *, edited: bool = False) -> None:
        """DMs, and guild messages that mention the bot or reply to it, are prompts.

        `edited`: the person changed the message; if the channel's latest reply answered it, that
        reply is rewritten in place (the service decides; most edits only change the stored text).
        A message carries no locale: the guild's preferred one is used (DMs: English), or LANGUAGE.
        """
        guild_locale = message.guild.preferred_locale.value if message.guild else None
        with i18n.using(i18n.pick(self.settings.language, guild_locale)):
            await self._on_message(message, edited=edited)

    async def _on_message(self, message: discord.Message, *, edited: bool) -> None:
        if message.author.bot or message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        if not self._addressed(message):
            return
        in_guild = message.guild is not None
        text = self._prompt_text(message)
        if in_guild and not message.content and not message.attachments and not message.stickers:
            log.warning("Discord: a reply to the bot arrived without text; is the MESSAGE_CONTENT intent on?")
            return
        assert self.client is not None
        access = await judge(self.policy, self.client, message.author, message.channel, in_guild)
        if not access.place_ok:
            log.info("Discord: ignoring a message in channel %s (not in DISCORD_ALLOWED_CHANNELS)",
                     message.channel.id)
            return
        if edited and not access.allowed:
            return
        if not access.allowed:  # say it once, not at every mention (slash commands always answer privately)
            now = asyncio.get_running_loop().time()
            if now - self._refused.get(message.author.id, -REFUSAL_COOLDOWN_S) < REFUSAL_COOLDOWN_S:
                return
            self._refused[message.author.id] = now

        async def typing() -> None:
            try:
                await message.channel.typing()
            except discord.HTTPException:
                pass

        stream = StreamingMessage(ChannelOps(message), self._pacer(message.channel.id), self.settings.delivery_retry_s)
        sink = DiscordSink(stream, on_started=typing, reply_buttons=regenerate_buttons())
        unread = [a.filename for a in message.attachments] + [s.name for s in message.stickers]
        if edited:
            sink.replace_messages([Sent(message.channel.get_partial_message(int(i)), via_token=False)  # type: ignore[union-attr]
                                   for i in self._latest.messages(str(message.channel.id)) or []])
        elif unread and access.allowed:
            if not text:  # nothing but files or stickers: the same note as on Telegram, nothing stored
                await sink.notice(_(TEXT_ONLY))
                await sink.close()
                return
            sink.footer = not_read_note(unread)
        msg = IncomingMessage(platform=PLATFORM, chat_id=str(message.channel.id), user_id=str(message.author.id),
                              user_name=message.author.display_name, text=text, is_allowed=access.allowed,
                              is_admin=access.admin, is_group=in_guild,
                              is_chat_admin=manages_messages(message.channel, message.author),
                              message_id=str(message.id), edited=edited, locale=i18n.current())
        await self._handle(msg, sink)
