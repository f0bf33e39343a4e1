"""Fairness: one user cannot crowd out the rest, and a chat never runs two replies at once."""

from __future__ import annotations

import asyncio

from bot.core.messages import MessageStatus, ReplyStatus
from bot.core.service import BUSY, USER_BUSY
from tests.core_helpers import running, say, stored, until, waiting

LONG = " ".join(f"w{i}" for i in range(150))  # a reply of ~1.5 s at 10 ms a word: long enough to act meanwhile


async def test_one_user_in_many_topics_does_not_lock_out_another_user(make_toy_service):
    async with make_toy_service(delay_s=0.01, queue_max=4) as service:
        first = asyncio.create_task(say(service, LONG, chat="topic0", user="spam"))
        await until(lambda: running(service, "topic0"))
        second = asyncio.create_task(say(service, "hello", chat="topic1", user="spam"))
        await until(lambda: waiting(service, "topic1"))
        refused = [await say(service, f"hi from topic {i}", chat=f"topic{i}", user="spam") for i in range(2, 12)]
        assert all(r.errors == [USER_BUSY] for r in refused)  # told why, in words about *them*
        rows = await stored(service, "topic5")
        assert [(r.content, r.status) for r in rows] == [("hi from topic 5", MessageStatus.REJECTED)]  # kept

        other = asyncio.create_task(say(service, "my own question", chat="elsewhere", user="bob"))
        await until(lambda: waiting(service, "elsewhere") or running(service, "elsewhere"))
        assert (await other).status == ReplyStatus.COMPLETE
        assert BUSY not in (await other).errors
        assert (await first).status == ReplyStatus.COMPLETE and (await second).status == ReplyStatus.COMPLETE


async def test_a_model_switch_counts_against_the_users_waiting_bound(make_toy_service):
    async with make_toy_service(delay_s=0.01) as service:
        first = asyncio.create_task(say(service, LONG, chat="dm", user="ann"))
        await until(lambda: running(service, "dm"))
        queued = asyncio.create_task(say(service, "and then?", chat="group", user="ann"))
        await until(lambda: waiting(service, "group"))
        switch = await say(service, "/model toy-b", chat="dm", user="ann")
        assert switch.errors == [USER_BUSY]
        await first, await queued
        assert service.current_model == "toy-a"
        assert (await say(service, "/model toy-b", chat="dm", user="ann")).notices == ["Switched to toy-b."]


async def test_waiting_bound_per_user_is_a_setting(make_toy_service):
    async with make_toy_service(delay_s=0.01, user_max_waiting=2) as service:
        first = asyncio.create_task(say(service, LONG, chat="t0", user="ann"))
        await until(lambda: running(service, "t0"))
        rest = [asyncio.create_task(say(service, "more", chat=f"t{i}", user="ann")) for i in (1, 2)]
        await until(lambda: waiting(service, "t1") and waiting(service, "t2"))
        assert (await say(service, "too many", chat="t3", user="ann")).errors == [USER_BUSY]
        assert all(r.status == ReplyStatus.COMPLETE for r in await asyncio.gather(first, *rest))


async def test_a_chats_next_reply_starts_after_its_previous_one_is_stored(make_toy_service):
    async with make_toy_service(delay_s=0.01, remote_concurrency=4) as service:
        service.queue.engine.supports_concurrency = True  # as a remote engine (several replies at once)
        engine = service.toy_engines.engines["toy-a"]
        first = asyncio.create_task(say(service, "first question here " + LONG, chat="g", user="ann"))
        await until(lambda: running(service, "g"))
        second = asyncio.create_task(say(service, "second question", chat="g", user="bob"))
        await until(lambda: waiting(service, "g"))
        other = asyncio.create_task(say(service, "meanwhile elsewhere", chat="x", user="cy"))
        await until(lambda: running(service, "x"))
        assert running(service, "g") and waiting(service, "g")  # other chats run alongside; this one waits
        assert (await first).status == ReplyStatus.COMPLETE
        assert (await second).status == ReplyStatus.COMPLETE and (await other).status == ReplyStatus.COMPLETE
        prompt = next(p for p in engine.prompts if "second question" in p[-1].content)
        assert any(m.role == "assistant" and "first question here" in m.content for m in prompt)


async def test_one_user_gets_one_running_reply_even_when_the_engine_runs_several(make_toy_service):
    async with make_toy_service(delay_s=0.01, remote_concurrency=4) as service:
        service.queue.engine.supports_concurrency = True
        first = asyncio.create_task(say(service, LONG, chat="t0", user="ann"))
        await until(lambda: running(service, "t0"))
        second = asyncio.create_task(say(service, "other topic", chat="t1", user="ann"))
        await until(lambda: waiting(service, "t1"))
        bob = asyncio.create_task(say(service, "bob here", chat="b", user="bob"))
        await until(lambda: running(service, "b"))
        assert waiting(service, "t1") and not running(service, "t1")
        assert all(r.status == ReplyStatus.COMPLETE for r in await asyncio.gather(first, second, bob))
