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
from bot.core.i18n import N_, _, ngettext, using
from bot.core.messages import IncomingMessage, ReplyStatus

if TYPE_CHECKING:
    from bot.core.service import ChatService

STOPPED_NOTE = N_("(stopped: the bot is restarting; please ask again in a minute)")
LOADING = N_("⏳ I'm just starting up and loading the model; I'll answer in a moment.")
TEXT_ONLY = N_("I can only read text messages. Please type your question "
               "(stickers, photos, voice and files are not supported).")
NOT_READ = N_("(I can only read text, so I did not look at %(what)s; this answer is about your text alone.)")


def not_read_note(filenames: list[str]) -> str:
    """The note under a reply to text that came with attachments the bot cannot read."""
    if len(filenames) == 1:
        what = _("the attachment %(name)s") % {"name": filenames[0]}
    else:
        what = ngettext("the %(count)s attachment", "the %(count)s attachments", len(filenames)) % {
            "count": len(filenames)}
    return _(NOT_READ) % {"what": what}


def started() -> asyncio.Event:
    """A `ready` event for a service that has already started."""
    event = asyncio.Event()
    event.set()
    return event


async def handle_reply(service: ChatService, msg: IncomingMessage, sink: StreamingSink, *,
                       log: logging.Logger, label: str, something_wrong: str,
                       ready: asyncio.Event | None = None) -> None:
    """`service.handle(msg, sink)` once `ready`, then `sink.close()`; `label` names the platform in the log."""
    with using(msg.locale):
        await _handle_reply(service, msg, sink, log=log, label=label, something_wrong=something_wrong, ready=ready)


async def _handle_reply(service: ChatService, msg: IncomingMessage, sink: StreamingSink, *,
                        log: logging.Logger, label: str, something_wrong: str, ready: asyncio.Event | None) -> None:
    try:
        if ready is not None and not ready.is_set():
            sink.stream.set_status(_(LOADING))
            await ready.wait()
        await service.handle(msg, sink)
    except Exception:  # noqa: BLE001 - the person gets a polite note, the log gets the details
        log.exception("%s: handling a message failed", label)
        if sink.final_text is None:
            await sink.error(_(something_wrong))
    except asyncio.CancelledError:
        if sink.final_text is None:  # shutting down mid-reply: say so rather than leave it hanging
            partial = sink.stream.text
            final = f"{partial}\n\n{_(STOPPED_NOTE)}" if partial.strip() else _(STOPPED_NOTE)
            await asyncio.shield(sink.finish(final, ReplyStatus.CANCELLED))
        raise
    finally:
        await sink.close()
