"""Edit to regenerate (issue #18 item 3): core service, Telegram edited_message, Discord on_message_edit."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from bot.core.service import ChatService
from bot.engines.base import ChatMessage
from tests.core_helpers import say, stored

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]


def numbered() -> Callable[[list[ChatMessage]], str]:
    count = itertools.count(1)
    return lambda messages: f"answer {next(count)} to {messages[-1].content}"


async def test_editing_the_last_question_rewrites_its_reply(make_toy_service: MakeService) -> None:
    async with make_toy_service(script=numbered()) as service:
        await say(service, "capital of Frnace?", message_id="m1")
        edit = await say(service, "capital of France?", message_id="m1", edited=True)
        assert edit.final == "answer 2 to capital of France?"
        rows = [(m.role, m.content, m.status) for m in await stored(service)]
        assert rows == [("user", "capital of France?", "complete"),
                        ("assistant", "answer 1 to capital of Frnace?", "superseded"),
                        ("assistant", "answer 2 to capital of France?", "complete")]


async def test_editing_an_older_message_only_updates_the_stored_text(make_toy_service: MakeService) -> None:
    async with make_toy_service(script=numbered()) as service:
        await say(service, "first", message_id="m1")
        await say(service, "second", message_id="m2")
        edit = await say(service, "first, corrected", message_id="m1", edited=True)
        assert edit.events == []  # nothing shown, nothing generated
        assert len(service.toy_engines.engines["toy-a"].prompts) == 2  # type: ignore[attr-defined]
        await say(service, "third", message_id="m3")
        assert "first, corrected" in [m.content for m in service.toy_engines.engines["toy-a"].prompts[-1]]  # type: ignore[attr-defined]


async def test_edits_that_change_nothing_or_into_commands_are_ignored(make_toy_service: MakeService) -> None:
    async with make_toy_service(script=numbered()) as service:
        await say(service, "hello", message_id="m1")
        for text in ("hello", "", "/reset"):
            assert (await say(service, text, message_id="m1", edited=True)).events == []
        assert (await say(service, "unknown message", message_id="m9", edited=True)).events == []
        assert [m.content for m in await stored(service)] == ["hello", "answer 1 to hello"]


# --------------------------------------------------------------------------- Telegram

from tests.test_telegram_adapter import ALICE, running_bot, wait_text  # noqa: E402


async def test_telegram_edit_regenerates_the_latest_reply_in_place(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, script=numbered()) as (fake, service):
        first = await fake.user_says("capital of Frnace?")
        await wait_text(fake, ALICE, "answer 1 to capital of Frnace?")
        reply = next(m for m in fake.bot_messages(ALICE) if m.text == "answer 1 to capital of Frnace?")
        sends = len(fake.calls_to("sendMessage", ALICE))
        await fake.user_edits(first["message"]["message_id"], "capital of France?")
        await wait_text(fake, ALICE, "answer 2 to capital of France?")
        assert reply.text == "answer 2 to capital of France?"  # the same bot message, edited
        assert len(fake.calls_to("sendMessage", ALICE)) == sends
        chat = await service.store.chat_id("telegram", str(ALICE))
        assert [(m.content, m.status) for m in await service.store.messages(chat)][:2] == [
            ("capital of France?", "complete"), ("answer 1 to capital of Frnace?", "superseded")]

        await fake.user_says("and Spain?")
        await wait_text(fake, ALICE, "answer 3 to and Spain?")
        await fake.user_edits(first["message"]["message_id"], "capital of Italy?")  # an older message
        for _ in range(200):  # the stored turn follows the edit
            if (await service.store.messages(chat))[0].content == "capital of Italy?":
                break
            await asyncio.sleep(0.02)
        assert (await service.store.messages(chat))[0].content == "capital of Italy?"
        assert len(service.toy_engines.engines["toy-a"].prompts) == 3  # nothing regenerated
        await fake.user_says("thanks")
        await wait_text(fake, ALICE, "answer 4 to thanks")
        assert "capital of Italy?" in [m.content for m in service.toy_engines.engines["toy-a"].prompts[-1]]
        assert reply.text == "answer 2 to capital of France?"  # older replies stay as they were


# --------------------------------------------------------------------------- Discord

from tests.test_discord_adapter import discord_world  # noqa: E402,F401 - the fixture


async def test_discord_edit_regenerates_the_latest_reply_in_place(discord_world) -> None:  # noqa: F811
    async with discord_world(script=numbered()) as w:
        question = await w.say("capital of Frnace?", channel=w.dm)
        reply = w.fake.bot_messages(w.dm)[-1]
        assert reply["content"] == "answer 1 to capital of Frnace?"
        count = len(w.fake.bot_messages(w.dm))
        await w.fake.user_edits(question, "capital of France?")
        await w.fake.wait_for(lambda: reply["content"] == "answer 2 to capital of France?")
        await w.until_idle()  # the same message, edited
        assert len(w.fake.bot_messages(w.dm)) == count and w.fake.button_ids(reply) == ["retry"]
        assert [(c, s) for r, c, s in await w.stored(w.dm)] == [
            ("capital of France?", "complete"), ("answer 1 to capital of Frnace?", "superseded"),
            ("answer 2 to capital of France?", "complete")]

        await w.say("and Spain?", channel=w.dm)
        await w.fake.user_edits(question, "capital of Italy?")  # older: only the stored text changes
        for _ in range(200):
            if (await w.stored(w.dm))[0][1] == "capital of Italy?":
                break
            await asyncio.sleep(0.02)
        assert (await w.stored(w.dm))[0][1] == "capital of Italy?"
        await w.until_idle()
        assert reply["content"] == "answer 2 to capital of France?"
        assert len(w.service.toy_engines.engines["toy-a"].prompts) == 3
