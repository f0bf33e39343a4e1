"""What adapters hand to the chat service, and the sink they implement to show the reply."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class MessageStatus(StrEnum):
    """The one status of every stored message; it alone decides what enters a prompt."""

    COMPLETE = "complete"  # user: accepted; reply: finished normally
    CANCELLED = "cancelled"  # reply: /stop, shutdown
    FAILED = "failed"  # reply: engine error, time limit; user: its reply failed (not context again)
    INCOMPLETE = "incomplete"  # reply: process died mid-reply (found at start-up)
    PENDING = "pending"  # reply: being written now
    REJECTED = "rejected"  # user: refused (too long, busy); kept, never answered or used as context
    SUPERSEDED = "superseded"  # reply: replaced by a regenerated one (/retry); kept, never context again

    def in_prompt(self) -> bool:
        """Whether a message with this status is context for later replies (same rule for both roles)."""
        return self is MessageStatus.COMPLETE


PROMPT_STATUSES = frozenset(s for s in MessageStatus if s.in_prompt())

# What a reply ended as (complete, cancelled, failed): the same enum, named for the sink's side.
ReplyStatus = MessageStatus


@dataclass(frozen=True)
class IncomingMessage:
    """One message from a person, already judged by the adapter (mentions, access)."""

    platform: str  # "telegram", "discord", "terminal"
    chat_id: str  # per-platform conversation key (chat, chat:topic, channel, thread, DM)
    user_id: str
    user_name: str
    text: str
    is_allowed: bool = True
    # A bot admin (ADMIN_USERS). The default is the terminal's owner; chat adapters take it from
    # `bot.core.access.AccessPolicy`, which gives it only to the people ADMIN_USERS names.
    is_admin: bool = True
    is_group: bool = False  # a chat several people share (Telegram group, Discord guild channel/thread)
    is_chat_admin: bool = False  # the platform calls this person an administrator of this chat
    message_id: str = ""  # the platform's id of this message ("" when it has none: slash commands, terminal)
    edited: bool = False  # the person edited message `message_id` to `text` (it is not a new message)
    locale: str = "en"  # the language to answer in (`bot.core.i18n.pick`: LANGUAGE, else the person's)


class ReplySink(Protocol):
    """Implemented by each adapter; the service calls these in order for one message.

    For a prompt: `queued`* -> `started` -> `update`* -> `finish`, or `error` at any point.
    For a command: `notice` once. `update` always gets the full text so far; throttling edits is
    the adapter's job.
    """

    async def queued(self, position: int, eta_s: float | None) -> None: ...

    async def started(self) -> None: ...

    async def update(self, text: str) -> None: ...

    async def finish(self, text: str, status: ReplyStatus) -> None: ...

    async def error(self, message: str) -> None: ...

    async def notice(self, text: str) -> None: ...
