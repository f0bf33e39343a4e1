"""Hand one message to the chat service and always leave its reply in a final state.

Shared by the chat adapters: a failure becomes a polite error (the details go to the log), a
shutdown mid-reply ends the reply with `STOPPED_NOTE`, and the sink is closed either way. The
adapters connect before the model has loaded (`bot.app`): until `ready` is set, a message shows
`LOADING` and waits, rather than going unanswered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from bot.adapters.streaming import StreamingSink
from bot.core.messages import IncomingMessage, ReplyStatus

if TYPE_CHECKING:
    from bot.core.service import ChatService

STOPPED_NOTE = "(stopped: the bot is restarting; please ask again in a minute)"
LOADING = "⏳ I'm just starting up and loading the model; I'll answer in a moment."
TEXT_ONLY = ("I can only read text messages. Please type your question "
             "(stickers, photos, voice and files are not supported).")
NOT_READ = "(I can only read text, so I did not look at {what}; this answer is about your text alone.)"


def not_read_note(filenames: list[str]) -> str:
    """The note under a reply to text that came with attachments the bot cannot read."""
    if len(filenames) == 1:
        return NOT_READ.format(what=f"the attachment {filenames[0]}")
    return NOT_READ.format(what=f"the {len(filenames)} attachments")


def started() -> asyncio.Event:
    """A `ready` event for a service that has already started."""
    event = asyncio.Event()
    event.set()
    return event


async def handle_reply(service: ChatService, msg: IncomingMessage, sink: StreamingSink, *,
                       log: logging.Logger, label: str, something_wrong: str,
                       ready: asyncio.Event | None = None) -> None:
    """`service.handle(msg, sink)` once `ready`, then `sink.close()`; `label` names the platform in the log."""
    try:
        if ready is not None and not ready.is_set():
            sink.stream.set_status(LOADING)
            await ready.wait()
        await service.handle(msg, sink)
    except Exception:  # noqa: BLE001 - the person gets a polite note, the log gets the details
        log.exception("%s: handling a message failed", label)
        if sink.final_text is None:
            await sink.error(something_wrong)
    except asyncio.CancelledError:
        if sink.final_text is None:  # shutting down mid-reply: say so rather than leave it hanging
            partial = sink.stream.text
            final = f"{partial}\n\n{STOPPED_NOTE}" if partial.strip() else STOPPED_NOTE
            await asyncio.shield(sink.finish(final, ReplyStatus.CANCELLED))
        raise
    finally:
        await sink.close()
