"""Discord message operations for the shared streaming loop (`bot.adapters.streaming`).

Two targets:
- `InteractionOps`: the reply to a slash command. The first message is the deferred original
  response (edited in place); more chunks become follow-ups. The interaction token lives 15 min:
  past `token_ttl_s` (or on 50027 Invalid Webhook Token) the rest continues as plain channel
  messages, and any chunk stuck in an expired message is re-sent in full, so nothing is lost.
- `ChannelOps`: the answer to a mention or DM. The first message is a reply to the person's
  message (sent as a plain message when that one was deleted meanwhile); more chunks are channel
  messages; all are edited in place.

Discord errors map onto the loop's exceptions: 429s that discord.py did not retry itself ->
`RetryLater`, 10008 Unknown Message -> `MessageGone`, 50035 on content -> `TooLong`,
403 Forbidden (missing permissions, blocked DMs) and 10003 Unknown Channel -> `Fatal`, 5xx and
network errors -> `TransientError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import discord

from bot.adapters.streaming import Fatal, MessageGone, MessageOps, RetryLater, TooLong, TransientError

log = logging.getLogger(__name__)

# --- tuning ---
MESSAGE_LIMIT = 2000  # characters in one message's content
INTERACTION_TOKEN_TTL_S = 15 * 60 - 30  # Discord's 15 minutes, less a margin for slow requests
DEFAULT_RETRY_AFTER_S = 1.0

UNKNOWN_CHANNEL = 10003
UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
INVALID_FORM_BODY = 50035
INVALID_WEBHOOK_TOKEN = 50027

T = TypeVar("T")

# No @everyone, role or user pings from model text; a reply may notify the person it answers.
NO_PINGS = discord.AllowedMentions.none()
REPLY_PING = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)


async def call_discord(request: Callable[[], Awaitable[T]]) -> T:
    """Run one REST call, translating Discord's failures for the streaming loop."""
    try:
        return await request()
    except discord.RateLimited as exc:  # a wait longer than discord.py's own limit
        raise RetryLater(exc.retry_after) from exc
    except discord.HTTPException as exc:
        if exc.status == 429:  # a 429 discord.py would not retry (no Via header)
            retry = exc.response.headers.get("Retry-After") if exc.response is not None else None
            raise RetryLater(float(retry) if retry else DEFAULT_RETRY_AFTER_S) from exc
        if exc.code == UNKNOWN_MESSAGE:
            raise MessageGone(str(exc)) from exc
        if exc.status == 403 or exc.code == UNKNOWN_CHANNEL:
            raise Fatal(str(exc)) from exc
        if exc.code == INVALID_FORM_BODY and "content" in str(exc.text):
            raise TooLong(str(exc)) from exc
        if exc.status >= 500:
            raise TransientError(str(exc)) from exc
        raise
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise TransientError(str(exc)) from exc


@dataclass(frozen=True)
class Buttoned:
    """Message content with buttons under it: (custom_id, label) pairs, one action row."""

    content: str
    buttons: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return self.content


def view_for(rendered: Hashable) -> discord.ui.View | None:
    """The buttons of `rendered` as a view, or None (which clears a message's buttons on edit).

    The view is stopped at once: discord.py then does not keep it in memory per message; presses
    reach the adapter's `on_interaction` by custom_id, also after a restart.
    """
    if not isinstance(rendered, Buttoned):
        return None
    view = discord.ui.View(timeout=None)
    for custom_id, label in rendered.buttons:
        view.add_item(discord.ui.Button(label=label, custom_id=custom_id, style=discord.ButtonStyle.secondary))
    view.stop()
    return view


def with_view(rendered: Hashable) -> dict[str, Any]:
    """Keyword arguments for a send: a view only when there are buttons."""
    view = view_for(rendered)
    return {"view": view} if view is not None else {}


async def strip_buttons_in(channel: Any, message_id: Hashable) -> None:
    """Clear the buttons under one of the bot's messages in `channel`."""
    if channel is None or not hasattr(channel, "get_partial_message"):
        return
    partial = channel.get_partial_message(int(message_id))  # type: ignore[call-overload]
    await call_discord(lambda: partial.edit(view=None))


class DiscordButtonsMixin:
    """Buttons and message ids for both Discord ops (the streaming loop's optional hooks)."""

    def with_buttons(self, rendered: Hashable, buttons: Hashable) -> Hashable:
        return Buttoned(str(rendered), buttons)  # type: ignore[arg-type]

    def message_id(self, handle: Sent) -> Hashable:
        return self.original_id if handle.message == "original" else handle.message.id  # type: ignore[attr-defined]


@dataclass
class Sent:
    """A message the bot sent: the object to edit it with, and whether it hangs on the token."""

    message: Any  # discord.Message, WebhookMessage, or the string "original"
    via_token: bool


class ChannelOps(DiscordButtonsMixin, MessageOps[Sent]):
    """Reply to `source` (a person's message), then continue in its channel."""

    limit = MESSAGE_LIMIT

    def __init__(self, source: discord.Message) -> None:
        self.source = source
        self.sent_any = False

    async def send(self, rendered: Hashable) -> Sent:
        content = str(rendered)
        if not self.sent_any:  # a reply, or a plain message if the person's message is gone by now
            reference = self.source.to_reference(fail_if_not_exists=False)
            msg = await call_discord(lambda: self.source.channel.send(content, reference=reference,
                                                                      allowed_mentions=REPLY_PING,
                                                                      mention_author=True, **with_view(rendered)))
        else:
            msg = await call_discord(lambda: self.source.channel.send(content, allowed_mentions=NO_PINGS,
                                                                      **with_view(rendered)))
        self.sent_any = True
        return Sent(msg, via_token=False)

    async def edit(self, handle: Sent, rendered: Hashable) -> None:
        await call_discord(lambda: handle.message.edit(content=str(rendered), allowed_mentions=NO_PINGS,
                                                       view=view_for(rendered)))

    async def strip_buttons(self, message_id: Hashable) -> None:
        await strip_buttons_in(self.source.channel, message_id)


class InteractionOps(DiscordButtonsMixin, MessageOps[Sent]):
    """Edit the deferred response of `interaction`, then follow-ups, then channel messages."""

    limit = MESSAGE_LIMIT

    def __init__(self, interaction: discord.Interaction, *, ephemeral: bool = False,
                 token_ttl_s: float = INTERACTION_TOKEN_TTL_S) -> None:
        self.interaction = interaction
        self.ephemeral = ephemeral
        self.token_ttl_s = token_ttl_s
        self.started = time.monotonic()  # just after the interaction arrived
        self.original_used = False
        self.original_id: int | None = None  # the original response's message id, once known
        self.token_dead = False
        if interaction.type == discord.InteractionType.component and interaction.message is not None:
            self.original_id = interaction.message.id  # a button press: the message it is under

    @property
    def token_expired(self) -> bool:
        if not self.token_dead and time.monotonic() - self.started > self.token_ttl_s:
            log.info("interaction token is about to expire; continuing with channel messages")
            self.token_dead = True
        return self.token_dead

    async def _with_token(self, request: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call_discord(request)
        except discord.HTTPException as exc:
            if exc.code == INVALID_WEBHOOK_TOKEN or (exc.status == 401 and exc.code == 0):
                log.info("interaction token expired (%s); continuing with channel messages", exc.code)
                self.token_dead = True
                raise MessageGone("interaction token expired") from exc
            raise

    async def send(self, rendered: Hashable) -> Sent:
        content = str(rendered)
        if not self.token_expired:
            try:
                if not self.original_used:
                    original = await self._with_token(lambda: self.interaction.edit_original_response(
                        content=content, allowed_mentions=NO_PINGS, view=view_for(rendered)))
                    self.original_used = True
                    self.original_id = original.id
                    return Sent("original", via_token=True)
                msg = await self._with_token(lambda: self.interaction.followup.send(
                    content, wait=True, ephemeral=self.ephemeral, allowed_mentions=NO_PINGS, **with_view(rendered)))
                return Sent(msg, via_token=True)
            except MessageGone:
                if not self.token_dead:
                    raise
        if self.ephemeral:  # an ephemeral answer must not become public; nothing else can carry it
            raise Fatal("interaction token expired; an ephemeral answer cannot be sent any more")
        channel = self.interaction.channel
        if channel is None or not hasattr(channel, "send"):
            raise Fatal("interaction token expired and the channel is unknown")
        msg = await call_discord(lambda: channel.send(content, allowed_mentions=NO_PINGS,  # type: ignore[union-attr]
                                                      **with_view(rendered)))
        return Sent(msg, via_token=False)

    async def edit(self, handle: Sent, rendered: Hashable) -> None:
        content = str(rendered)
        if handle.via_token:
            if self.token_expired:
                raise MessageGone("interaction token expired")
            if handle.message == "original":
                await self._with_token(lambda: self.interaction.edit_original_response(
                    content=content, allowed_mentions=NO_PINGS, view=view_for(rendered)))
            else:
                await self._with_token(lambda: handle.message.edit(content=content, allowed_mentions=NO_PINGS,
                                                                   view=view_for(rendered)))
            return
        await call_discord(lambda: handle.message.edit(content=content, allowed_mentions=NO_PINGS,
                                                       view=view_for(rendered)))

    async def strip_buttons(self, message_id: Hashable) -> None:
        await strip_buttons_in(self.interaction.channel, message_id)
