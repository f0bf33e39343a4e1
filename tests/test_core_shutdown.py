"""Shutdown ends cleanly whatever is going on, and a streaming reply's text survives a hard kill."""

from __future__ import annotations

import asyncio

from bot.core.messages import MessageStatus, ReplyStatus
from bot.core.service import SHUTTING_DOWN
from tests.core_helpers import running, say, stored, until

WORDS = " ".join(f"w{i}" for i in range(500))  # ~5 s of reply at 10 ms a word


async def test_shutdown_while_replies_stream_and_switches_wait(make_toy_service):
    async with make_toy_service(delay_s=0.01) as service:
        reply = asyncio.create_task(say(service, WORDS, chat="a", user="ann"))
        await until(lambda: running(service, "a"))
        await until(lambda: len(service.toy_engines.engines["toy-a"].prompts) == 1)
        switch = asyncio.create_task(say(service, "/model toy-b", chat="adm", user="root"))
        gave_up = asyncio.create_task(say(service, "/model toy-b", chat="adm2", user="root2"))
        await until(lambda: len(service.queue._waiting) == 2)
        gave_up.cancel()  # an adapter cancelled this caller during its own shutdown
        await asyncio.sleep(0.1)

        await service.queue.close(grace_s=0.2)  # SIGTERM: must not raise
        sink = await reply
        assert sink.status == ReplyStatus.CANCELLED and sink.final.startswith("You said: w0")
        assert "(stopped)" not in sink.final and "shutting down" in sink.final
        rows = await stored(service, "a")
        assert rows[-1].status == MessageStatus.CANCELLED
        assert rows[-1].content.startswith("You said: w0") and len(rows[-1].content.split()) < 500
        assert "shutting down" in (await switch).errors[0]
        late = await say(service, "are you there?", chat="b", user="bob")
        assert late.errors == [SHUTTING_DOWN]
        assert (await stored(service, "b"))[0].status == MessageStatus.REJECTED  # kept, not answered later
    # leaving the block closes the service a second time: also clean


async def test_shutdown_while_a_model_loads(make_toy_service):
    async with make_toy_service(load_s=0.5) as service:
        switch = asyncio.create_task(say(service, "/model toy-b"))
        await until(lambda: service.queue._switching is not None)
        await service.queue.close(grace_s=0.01)
        sink = await asyncio.wait_for(switch, 5)
        assert sink.errors or sink.notices  # answered either way, never left hanging


async def test_partial_text_is_stored_every_interval_while_streaming(make_toy_service):
    async with make_toy_service(delay_s=0.01, partial_save_s=0.2) as service:
        saves = 0
        save = service.store.save_partial

        async def counting(row: int, text: str) -> None:
            nonlocal saves
            saves += 1
            await save(row, text)

        service.store.save_partial = counting
        reply = asyncio.create_task(say(service, " ".join(f"w{i}" for i in range(150))))
        seen_partial = False
        while not reply.done():
            rows = await stored(service)
            if len(rows) == 2 and rows[1].status == MessageStatus.PENDING and rows[1].content.startswith("You said"):
                seen_partial = True
            await asyncio.sleep(0.05)
        assert seen_partial, "the reply row held no text while streaming"
        assert (await reply).status == ReplyStatus.COMPLETE
        assert 1 <= saves <= 20  # every interval, not per token (150 tokens)
