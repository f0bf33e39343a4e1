"""Hand one message to the chat service and always leave its reply in a final state.

Shared by the chat adapters: a failure becomes a polite error (the details go to the log), a
shutdown mid-reply ends the reply with `STOPPED_NOTE`, and the sink is closed either way.
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


async def handle_reply(service: ChatService, msg: IncomingMessage, sink: StreamingSink, *,
                       log: logging.Logger, label: str, something_wrong: str) -> None:
    """`service.handle(msg, sink)`, then `sink.close()`; `label` names the platform in the log."""
    try:
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
