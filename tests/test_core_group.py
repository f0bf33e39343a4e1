"""Group chats: history records who said what, and the prompt names the speaker of each user turn."""

from __future__ import annotations

import asyncio

from bot.core.messages import ReplyStatus
from bot.core.service import FOLDED
from tests.core_helpers import running, say, stored, until, waiting


async def test_prompt_names_each_speaker_in_a_group(make_toy_service):
    async with make_toy_service() as service:
        await say(service, "I like tea", chat="g", user="1", user_name="Ann", is_group=True)
        reply = await say(service, "I like coffee", chat="g", user="2", user_name="Bob", is_group=True)
        assert reply.status == ReplyStatus.COMPLETE
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert [m.content for m in prompt if m.role == "user"] == ["Ann: I like tea", "Bob: I like coffee"]
        rows = await stored(service, "g")
        assert [(r.user_id, r.author_name) for r in rows if r.role == "user"] == [("1", "Ann"), ("2", "Bob")]


async def test_folded_messages_of_two_people_keep_their_names(make_toy_service):
    async with make_toy_service(delay_s=0.02) as service:
        blocker = asyncio.create_task(say(service, "a b c d e f g h", chat="other", user="9"))
        await until(lambda: running(service, "other"))
        first = asyncio.create_task(say(service, "who is first?", chat="g", user="1", user_name="Ann", is_group=True))
        await until(lambda: waiting(service, "g"))
        folded = await say(service, "me!", chat="g", user="2", user_name="Bob", is_group=True)
        assert folded.notices == [FOLDED]
        assert (await first).status == ReplyStatus.COMPLETE
        await blocker
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert prompt[-1].content == "Ann: who is first?\n\nBob: me!"


async def test_a_private_chat_is_not_prefixed(make_toy_service):
    async with make_toy_service() as service:
        await say(service, "hello", chat="dm", user="1", user_name="Ann")
        await say(service, "again", chat="dm", user="1", user_name="Ann")
        prompt = service.toy_engines.engines["toy-a"].prompts[-1]
        assert [m.content for m in prompt if m.role == "user"] == ["hello", "again"]
