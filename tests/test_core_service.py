"""Chat service and queue behaviour with the scripted engine (fast; real SQLite file)."""

from __future__ import annotations

import asyncio

from bot.core.messages import ReplyStatus
from bot.core.service import BUSY, FOLDED, NOT_ALLOWED
from tests.core_helpers import running, say, stored, until, waiting


async def test_reply_streams_and_is_stored(make_toy_service):
    async with make_toy_service(delay_s=0.01) as service:
        sink = await say(service, "hello there friend")
        assert sink.final == "You said: hello there friend (turn 1)"
        assert sink.status == ReplyStatus.COMPLETE
        assert len(sink.updates) >= 2 and sink.updates[-1] == sink.final
        assert all(sink.final.startswith(u) for u in sink.updates)  # each update is the text so far
        rows = await stored(service)
        assert [(r.role, r.content, r.status) for r in rows] == [
            ("user", "hello there friend", "complete"), ("assistant", sink.final, "complete")]
        assert rows[1].model == "toy-a"


async def test_multi_turn_history_and_reset(make_toy_service):
    async with make_toy_service() as service:
        await say(service, "my name is Zed")
        await say(service, "I like tea")
        third = await say(service, "what is my name?")
        assert third.final.endswith("(turn 3)")
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert prompt[0].role == "system"
        assert any("my name is Zed" in m.content for m in prompt)
        reset = await say(service, "/reset")
        assert "cleared" in reset.notices[0].lower()
        after = await say(service, "what is my name?")
        assert after.final.endswith("(turn 1)")
        assert not any("Zed" in m.content for m in service.toy_engines.engines["toy-a"].prompts[-1])


async def test_restart_continues_conversation(make_toy_service):
    async with make_toy_service() as service:
        await say(service, "remember the number 42")
    async with make_toy_service() as service:
        again = await say(service, "which number?")
        assert again.final.endswith("(turn 2)")
        assert any("42" in m.content for m in service.toy_engines.engines["toy-a"].prompts[-1])


async def test_chats_do_not_leak(make_toy_service):
    async with make_toy_service(delay_s=0.002) as service:
        sinks = await asyncio.gather(*(say(service, f"secret {i}", chat=f"chat{i}") for i in range(10)))
        for i, sink in enumerate(sinks):
            assert sink.final == f"You said: secret {i} (turn 1)"
            rows = await stored(service, f"chat{i}")
            assert [r.content for r in rows] == [f"secret {i}", sink.final]
        for prompt in service.toy_engines.engines["toy-a"].prompts:
            assert sum("secret" in m.content for m in prompt) == 1


async def test_event_loop_stays_responsive(make_toy_service):
    async with make_toy_service(delay_s=0.01) as service:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.gather(*(say(service, "one two three four five six", chat=f"c{i}") for i in range(3)))
        task.cancel()
        # 3 replies x 9 words x 10 ms of blocking engine work: a blocked loop would tick ~0 times.
        assert ticks >= 20


async def test_queue_positions_decrease(make_toy_service):
    async with make_toy_service(delay_s=0.02) as service:
        sinks = []
        for i in range(4):
            sinks.append(asyncio.create_task(say(service, "a b c d e", chat=f"q{i}")))
            await until(lambda i=i: running(service, f"q{i}") or waiting(service, f"q{i}"))
        done = await asyncio.gather(*sinks)
        last = done[-1]
        assert last.positions, "a waiting chat is told its position"
        assert last.positions == sorted(last.positions, reverse=True)
        assert last.positions[-1] == 1 and last.positions[0] >= 2
        assert all(s.status == ReplyStatus.COMPLETE for s in done)


async def test_eta_reported_after_a_measured_reply(make_toy_service):
    async with make_toy_service(delay_s=0.01) as service:
        await say(service, "warm up the rate measurement please")
        tasks = []
        for i in range(3):
            tasks.append(asyncio.create_task(say(service, "a b c d e f", chat=f"e{i}")))
            await until(lambda i=i: running(service, f"e{i}") or waiting(service, f"e{i}"))
        done = await asyncio.gather(*tasks)
        etas = [e[1] for s in done for k, e in s.events if k == "queued"]  # type: ignore[index]
        assert etas and all(eta is not None and eta >= 0 for eta in etas)


async def test_over_capacity_is_refused_politely(make_toy_service):
    async with make_toy_service(delay_s=0.05, queue_max=1) as service:
        first = asyncio.create_task(say(service, "one two three four", chat="a"))
        await until(lambda: running(service, "a"))
        second = asyncio.create_task(say(service, "one two", chat="b"))
        await until(lambda: waiting(service, "b"))
        refused = await say(service, "please answer", chat="c")
        assert refused.errors == [BUSY]
        rows = await stored(service, "c")
        assert rows[0].content == "please answer" and rows[0].status == "rejected"
        assert (await first).status == ReplyStatus.COMPLETE
        assert (await second).status == ReplyStatus.COMPLETE


async def test_second_message_while_waiting_is_folded(make_toy_service):
    async with make_toy_service(delay_s=0.03) as service:
        blocker = asyncio.create_task(say(service, "x y z w v", chat="other"))
        await until(lambda: running(service, "other"))
        first = asyncio.create_task(say(service, "first question"))
        await until(lambda: waiting(service, "c1"))
        second = await say(service, "second question")
        assert second.notices == [FOLDED]
        reply = await first
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert "first question\n\nsecond question" in prompt[-1].content
        assert reply.status == ReplyStatus.COMPLETE
        await blocker


async def test_stop_running_reply(make_toy_service):
    words = " ".join(f"w{i}" for i in range(200))
    async with make_toy_service(delay_s=0.01) as service:
        task = asyncio.create_task(say(service, words))
        await until(lambda: running(service, "c1") and len(service.toy_engines.engines["toy-a"].prompts) == 1)
        await asyncio.sleep(0.1)
        stop = await say(service, "/stop")
        assert stop.notices == ["Stopped your reply."]
        sink = await task
        assert sink.status == ReplyStatus.CANCELLED
        rows = await stored(service)
        reply = rows[-1]
        assert reply.status == "cancelled"
        assert 0 < len(reply.content.split()) < 100  # stopped within a few tokens, partial text kept
        nxt = await say(service, "are you there?")
        # the cancelled reply does not pollute the next prompt
        assert not any(m.role == "assistant" for m in service.toy_engines.engines["toy-a"].prompts[-1])
        assert nxt.status == ReplyStatus.COMPLETE


async def test_stop_queued_reply(make_toy_service):
    async with make_toy_service(delay_s=0.03) as service:
        blocker = asyncio.create_task(say(service, "a b c d e f", chat="other"))
        await until(lambda: running(service, "other"))
        queued = asyncio.create_task(say(service, "never mind"))
        await until(lambda: waiting(service, "c1"))
        stop = await say(service, "/stop")
        assert stop.notices == ["Removed your waiting message."]
        sink = await queued
        assert sink.status == ReplyStatus.CANCELLED and not sink.updates
        rows = await stored(service)
        assert [(r.role, r.content) for r in rows] == [("user", "never mind")]  # kept, not answered
        await blocker
        assert (await say(service, "/stop")).notices == ["Nothing to stop."]


async def test_model_switch_is_a_barrier(make_toy_service):
    async with make_toy_service(delay_s=0.02) as service:
        first = asyncio.create_task(say(service, "a b c d", chat="r"))
        await until(lambda: running(service, "r"))
        switch = asyncio.create_task(say(service, "/model toy-b", chat="admin"))
        await until(lambda: len(service.queue._waiting) == 1)
        after = []
        for i in range(3):
            after.append(asyncio.create_task(say(service, "hi there", chat=f"w{i}")))
            await until(lambda i=i: waiting(service, f"w{i}"))
        assert (await switch).notices == ["Switched to toy-b."]
        assert (await first).status == ReplyStatus.COMPLETE
        for t in after:
            assert (await t).status == ReplyStatus.COMPLETE
        assert service.current_model == "toy-b"
        assert not service.toy_engines.engines["toy-a"].loaded
        rows = await stored(service, "w0")
        assert rows[-1].model == "toy-b"
        assert len(service.toy_engines.engines["toy-b"].prompts) == 3


async def test_model_list_and_unknown_and_admin_only(make_toy_service):
    async with make_toy_service(admin_users=["root"]) as service:
        listing = await say(service, "/model")
        assert "* toy-a" in listing.notices[0] and "toy-b" in listing.notices[0]
        unknown = await say(service, "/model nope")
        assert "Unknown model 'nope'" in unknown.errors[0]
        denied = await say(service, "/model toy-b", is_admin=False)
        assert denied.errors == ["Only admins can switch the model."]
        assert service.current_model == "toy-a"


async def test_failed_load_brings_old_model_back(make_toy_service):
    async with make_toy_service() as service:
        service.toy_engines.engines["toy-b"] = type(service.toy_engines.engines["toy-a"])("toy-b", fail_load=True)
        sink = await say(service, "/model toy-b")
        assert "Could not load toy-b" in sink.errors[0] and "Still using toy-a" in sink.errors[0]
        assert service.current_model == "toy-a"
        assert (await say(service, "still ok?")).status == ReplyStatus.COMPLETE


async def test_engine_failure_mid_reply(make_toy_service):
    async with make_toy_service(fail_after=2) as service:
        sink = await say(service, "this will break halfway")
        assert sink.status == ReplyStatus.FAILED
        assert "failed" in sink.final.lower()
        rows = await stored(service)
        assert rows[0].content == "this will break halfway"
        assert rows[-1].status == "failed"
        service.toy_engines.engines["toy-a"].fail_after = None
        nxt = await say(service, "try again")
        assert nxt.status == ReplyStatus.COMPLETE
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert not any(m.role == "assistant" for m in prompt)  # the failed reply is not context


async def test_over_long_message_refused_without_generating(make_toy_service):
    async with make_toy_service(context_length=64, max_new_tokens=16) as service:
        sink = await say(service, " ".join(["word"] * 100))
        assert sink.errors and "too long: " in sink.errors[0] and "limit" in sink.errors[0]
        assert service.toy_engines.engines["toy-a"].prompts == []
        assert (await say(service, "short one")).status == ReplyStatus.COMPLETE


async def test_history_trimmed_to_context_whole_turns(make_toy_service):
    async with make_toy_service(context_length=120, max_new_tokens=20) as service:
        for i in range(10):
            await say(service, f"turn number {i} with a few words")
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert prompt[0].role == "system" and prompt[1].role == "user"
        assert prompt[-1].content == "turn number 9 with a few words"
        assert len(prompt) < 21  # older turns dropped, whole
        assert all(m.content.startswith(("turn number", "You said", "You are")) for m in prompt)


async def test_access_empty_and_unknown_command(make_toy_service):
    async with make_toy_service() as service:
        assert (await say(service, "hi", is_allowed=False)).errors == [NOT_ALLOWED]
        assert await stored(service) == []
        assert "empty" in (await say(service, "   ")).errors[0]
        unknown = await say(service, "/frobnicate")
        assert "Unknown command /frobnicate" in unknown.notices[0] and "/reset" in unknown.notices[0]
        assert "/model" in (await say(service, "/help@SomeBot")).notices[0]
