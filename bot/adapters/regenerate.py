"""The Regenerate button: which messages show each chat's latest reply, shared by the adapters.

Only the latest reply of a chat carries the button. When a newer reply is delivered, the button
goes from the one before (one platform call); a press on a button that is somehow still under an
older reply is refused politely and that button removed. The service does the regenerating
(`/retry`); a press on the latest reply regenerates it in place (its messages are edited).
After a restart nothing is known: a press is then taken as meaning the latest reply.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

from bot.adapters.streaming import StreamingSink
from bot.core.i18n import N_

log = logging.getLogger(__name__)

RETRY_COMMAND = "/retry"
BUTTON_LABEL = N_("🔄 Regenerate")
BUTTON_ID = "retry"  # Telegram callback_data, Discord custom_id
STALE = N_("Only the latest reply can be regenerated.")
WRITING_AGAIN = N_("Writing it again…")


class LatestReplies:
    """Per chat key: the platform ids of the messages showing its latest reply, oldest first."""

    def __init__(self) -> None:
        self._by_chat: dict[str, list[Hashable]] = {}

    def messages(self, chat: str) -> list[Hashable] | None:
        return self._by_chat.get(chat)

    def is_stale(self, chat: str, message_id: Hashable) -> bool:
        """A press on `message_id` is not on the chat's latest reply (False when nothing is known)."""
        known = self._by_chat.get(chat)
        return known is not None and message_id not in known

    async def delivered(self, chat: str, sink: StreamingSink) -> None:
        """After `sink` was done: a finished reply becomes the latest and the previous one loses its button."""
        stream = sink.stream
        if sink.status is None or not stream.delivered_final or not stream.sent:
            return
        new = [stream.ops.message_id(s.handle) for s in stream.sent]
        old = self._by_chat.get(chat)
        self._by_chat[chat] = new
        if old and old[-1] not in new:
            await strip(sink, old[-1])


async def strip(sink: StreamingSink, message_id: Hashable) -> None:
    """Remove the buttons under one of our messages; cosmetic, so a failure is only logged."""
    try:
        await sink.stream.ops.strip_buttons(message_id)
    except Exception as exc:  # noqa: BLE001 - a leftover button is refused later as stale
        log.info("could not remove an old Regenerate button: %s", exc)
