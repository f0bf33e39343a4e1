"""Refusals are per message: a request refused as too long (alone or folded) never breaks the chat."""

from __future__ import annotations

import asyncio

from bot.core.messages import PROMPT_STATUSES, MessageStatus, ReplyStatus
from bot.core.service import FOLDED
from tests.core_helpers import running, say, stored, until, waiting


async def test_folded_over_long_message_is_refused_with_its_request_and_the_chat_keeps_working(make_toy_service):
    # The scripted engine counts a word as a token: 64 context - 16 reply budget leaves ~48 for the prompt.
    async with make_toy_service(delay_s=0.02, context_length=64, max_new_tokens=16) as service:
        blocker = asyncio.create_task(say(service, "a b c d e f g h", chat="other"))
        await until(lambda: running(service, "other"))
        first = asyncio.create_task(say(service, "first question"))
        await until(lambda: waiting(service, "c1"))
        huge = " ".join(f"w{i}" for i in range(200))  # far under the character limit, far over the tokens
        folded = await say(service, huge)
        assert folded.notices == [FOLDED]
        refused = await first
        assert refused.errors and "2 waiting messages together are too long" in refused.errors[0]
        await blocker

        later = await say(service, "What is the capital of France?")
        assert later.status == ReplyStatus.COMPLETE, later.errors
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert not any("w199" in m.content or "first question" in m.content for m in prompt)
        rows = await stored(service)
        assert [(r.content[:14], r.status) for r in rows[:2]] == [
            ("first question", MessageStatus.REJECTED), (huge[:14], MessageStatus.REJECTED)]
        assert rows[-1].status == MessageStatus.COMPLETE  # the later message's reply


async def test_a_huge_unanswered_message_does_not_block_the_next_one(make_toy_service):
    """An earlier message left unanswered (its reply failed) is old history, dropped when it doesn't fit."""
    async with make_toy_service(context_length=64, max_new_tokens=16, fail_after=0) as service:
        failed = await say(service, " ".join(f"w{i}" for i in range(30)))  # fits alone; the engine fails
        assert failed.errors and "model failed" in failed.errors[0]
        service.toy_engines.engines["toy-a"].fail_after = None
        nxt = await say(service, "a short question now")
        assert nxt.status == ReplyStatus.COMPLETE, nxt.errors
        assert service.toy_engines.engines["toy-a"].prompts[-1][-1].content == "a short question now"
        assert (await say(service, "and another")).status == ReplyStatus.COMPLETE


async def test_context_holds_only_rows_whose_status_belongs_in_a_prompt(make_toy_service):
    async with make_toy_service() as service:
        chat = await service.store.chat_id("test", "c1")
        for status in MessageStatus:
            await service.store.add(chat, "user", f"user {status.value}", status)
            await service.store.add(chat, "assistant", f"reply {status.value}", status)
        context = await service.store.context(chat)
        assert {m.status for m in context} == set(PROMPT_STATUSES) == {MessageStatus.COMPLETE}
        assert [m.content for m in context] == ["user complete", "reply complete"]
        assert all(isinstance(m.status, MessageStatus) for m in await service.store.messages(chat))
