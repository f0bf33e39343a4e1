"""/retry and the Regenerate button (issue #18 item 2): core service, Telegram, Discord."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from bot.core.service import ChatService
from bot.engines.base import ChatMessage
from tests.core_helpers import say, stored

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]


def numbered() -> Callable[[list[ChatMessage]], str]:
    """Each answer names its sample number, as sampling would make each one differ."""
    count = itertools.count(1)
    return lambda messages: f"answer {next(count)} to {messages[-1].content}"


def prompts(service: ChatService) -> list[list[ChatMessage]]:
    return service.toy_engines.engines["toy-a"].prompts  # type: ignore[attr-defined]


async def test_retry_replaces_the_last_reply_and_the_old_one_never_returns(make_toy_service: MakeService) -> None:
    async with make_toy_service(script=numbered()) as service:
        assert (await say(service, "hello")).final == "answer 1 to hello"
        again = await say(service, "/retry")
        assert again.final == "answer 2 to hello"
        assert prompts(service)[1] == prompts(service)[0]  # the same request, without the old answer
        rows = [(m.role, m.content, m.status) for m in await stored(service)]
        assert rows == [("user", "hello", "complete"), ("assistant", "answer 1 to hello", "superseded"),
                        ("assistant", "answer 2 to hello", "complete")]
        assert (await say(service, "/retry")).final == "answer 3 to hello"
        await say(service, "thanks")
        seen = [m.content for m in prompts(service)[-1]]
        assert "answer 3 to hello" in seen
        assert not {"answer 1 to hello", "answer 2 to hello"} & set(seen)  # superseded: never sent again


async def test_retry_with_nothing_to_retry_or_while_busy(make_toy_service: MakeService) -> None:
    async with make_toy_service() as service:
        nothing = await say(service, "/retry")
        assert nothing.errors == ["There is no reply here to write again yet."]
        assert await stored(service) == []


async def test_a_failed_retry_keeps_the_old_reply(make_toy_service: MakeService) -> None:
    calls = itertools.count(1)

    def script(messages: list[ChatMessage]) -> str:
        if next(calls) == 2:
            raise RuntimeError("engine trouble")
        return f"fine answer to {messages[-1].content}"

    async with make_toy_service(script=script) as service:
        await say(service, "hello")
        failed = await say(service, "/retry")
        assert failed.final is None and failed.errors  # the person hears it failed
        statuses = [(m.role, m.status) for m in await stored(service)]
        assert statuses == [("user", "complete"), ("assistant", "complete"), ("assistant", "failed")]
        await say(service, "more")
        assert "fine answer to hello" in [m.content for m in prompts(service)[-1]]


async def test_retry_samples_even_when_replies_are_greedy(make_toy_service: MakeService) -> None:
    async with make_toy_service(temperature=0.0) as service:
        engine_temps: list[float] = []
        await say(service, "warm up")
        engine = service.toy_engines.engines["toy-a"]  # type: ignore[attr-defined]
        original = engine.stream_chat

        def recording(messages, params, cancel, stats=None):  # type: ignore[no-untyped-def]
            engine_temps.append(params.temperature)
            return original(messages, params, cancel, stats)

        engine.stream_chat = recording
        await say(service, "hello")
        await say(service, "/retry")
        assert engine_temps == [0.0, 0.7]


async def test_retry_answers_a_request_that_was_stopped_before_its_reply(make_toy_service: MakeService) -> None:
    async with make_toy_service(script=numbered()) as service:
        await say(service, "first")
        chat = await service.store.chat_id("test", "c1")
        await service.store.add(chat, "user", "second", user_id="u-c1", author_name="Ann")  # stopped while waiting
        again = await say(service, "/retry")
        assert again.final == "answer 2 to second"
        assert [m.status for m in await stored(service) if m.role == "assistant"] == ["complete", "complete"]


# --------------------------------------------------------------------------- Telegram

from tests.fakes.telegram_api import FakeTelegram  # noqa: E402
from tests.test_telegram_adapter import ALICE, _until, running_bot, wait_text  # noqa: E402

RETRY_BUTTON = {"inline_keyboard": [[{"text": "🔄 Regenerate", "callback_data": "retry"}]]}


def bot_message(fake: FakeTelegram, chat_id: int, text: str):  # type: ignore[no-untyped-def]
    return next(m for m in fake.bot_messages(chat_id) if m.text == text)


async def test_telegram_regenerate_button_rewrites_the_reply_in_place(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, script=numbered()) as (fake, service):
        await fake.user_says("hello")
        await wait_text(fake, ALICE, "answer 1 to hello")
        reply = bot_message(fake, ALICE, "answer 1 to hello")
        await _until(lambda: [1] if reply.reply_markup == RETRY_BUTTON else [])
        sends = len(fake.calls_to("sendMessage", ALICE))

        await fake.press_button(reply.message_id, "retry", chat=fake.private_chat(ALICE))
        await wait_text(fake, ALICE, "answer 2 to hello")
        await _until(lambda: [1] if reply.reply_markup == RETRY_BUTTON else [])
        assert reply.text == "answer 2 to hello"  # the same message, edited
        assert len(fake.calls_to("sendMessage", ALICE)) == sends  # no new message
        assert any(c.params.get("text") == "Writing it again…" for c in fake.calls_to("answerCallbackQuery"))
        chat = await service.store.chat_id("telegram", str(ALICE))
        assert [(m.content, m.status) for m in await service.store.messages(chat) if m.role == "assistant"] == [
            ("answer 1 to hello", "superseded"), ("answer 2 to hello", "complete")]

        await fake.user_says("next")
        await wait_text(fake, ALICE, "answer 3 to next")
        newer = bot_message(fake, ALICE, "answer 3 to next")
        await _until(lambda: [1] if reply.reply_markup is None and newer.reply_markup == RETRY_BUTTON else [])

        await fake.press_button(reply.message_id, "retry", chat=fake.private_chat(ALICE))  # an old button
        await _until(lambda: [c for c in fake.calls_to("answerCallbackQuery")
                              if c.params.get("text") == "Only the latest reply can be regenerated."])
        assert reply.text == "answer 2 to hello" and len(service.toy_engines.engines["toy-a"].prompts) == 3

        await fake.user_says("/retry")  # typed: a new message; the old one loses its button
        await wait_text(fake, ALICE, "answer 4 to next")
        await _until(lambda: [1] if newer.reply_markup is None else [])
        assert newer.text == "answer 3 to next"
        assert "next" in [m.content for m in service.toy_engines.engines["toy-a"].prompts[-1]]


async def test_telegram_regenerate_while_busy_leaves_the_reply_readable(make_toy_service: MakeService) -> None:
    # 0.6 s a word: the second reply (13 words) is still running when the press arrives through polling
    async with running_bot(make_toy_service, script=numbered(), delay_s=0.6) as (fake, service):
        await fake.user_says("hello")
        await wait_text(fake, ALICE, "answer 1 to hello", timeout=20)
        reply = bot_message(fake, ALICE, "answer 1 to hello")
        await fake.user_says("a longer question with quite a few words in it")
        # the second question is generating (its prompt reached the engine), not merely the first one storing
        await _until(lambda: [1] if len(prompts(service)) == 2 and service.queue.is_running(f"telegram:{ALICE}")
                     else [])
        await fake.press_button(reply.message_id, "retry", chat=fake.private_chat(ALICE))
        try:
            await _until(lambda: [m for m in fake.bot_messages(ALICE) if "still working on a reply" in m.text], 20)
        except AssertionError:
            raise AssertionError([m.text for m in fake.bot_messages(ALICE)]) from None
        assert reply.text == "answer 1 to hello"  # the refusal came as a new message


# --------------------------------------------------------------------------- Discord

from tests.test_discord_adapter import discord_world  # noqa: E402,F401 - the fixture


async def test_discord_regenerate_button_rewrites_the_reply_in_place(discord_world) -> None:  # noqa: F811
    async with discord_world(script=numbered()) as w:
        await w.say("hello", channel=w.dm)
        reply = w.fake.bot_messages(w.dm)[-1]
        assert reply["content"] == "answer 1 to hello"
        assert w.fake.button_ids(reply) == ["retry"]
        count = len(w.fake.bot_messages(w.dm))

        press = await w.fake.press(reply, "retry", w.alice)
        await w.until_idle()
        assert press.ack_type == 6  # deferred update: no new message, the pressed one is edited
        assert reply["content"] == "answer 2 to hello" and w.fake.button_ids(reply) == ["retry"]
        assert len(w.fake.bot_messages(w.dm)) == count
        assert [(c, s) for r, c, s in await w.stored(w.dm) if r == "assistant"] == [
            ("answer 1 to hello", "superseded"), ("answer 2 to hello", "complete")]

        await w.say("next", channel=w.dm)
        newer = w.fake.bot_messages(w.dm)[-1]
        assert newer["content"] == "answer 3 to next" and w.fake.button_ids(newer) == ["retry"]
        assert w.fake.button_ids(reply) == []  # only the latest reply keeps the button

        chat = await w.chat("a slash question")  # /chat replies carry it too; the DM's latest is unaffected
        assert "answer 4" in chat.content and w.fake.button_ids(chat.original or {}) == ["retry"]
        assert w.fake.button_ids(newer) == ["retry"]


async def test_discord_regenerate_needs_access(discord_world) -> None:  # noqa: F811
    async with discord_world(script=numbered(), settings=lambda ids: {"allowed_users": ids["alice"]["id"]}) as w:
        await w.say(f"{w.fake.mention()} hello")
        reply = w.fake.bot_messages(w.channel)[-1]
        before = reply["content"]
        assert before.startswith("answer 1 to") and w.fake.button_ids(reply) == ["retry"]
        press = await w.fake.press(reply, "retry", w.bob)
        await w.until_idle()
        assert press.ack_type == 4 and press.ephemeral and "not allowed" in press.content
        assert reply["content"] == before
        press = await w.fake.press(reply, "retry", w.alice)
        await w.until_idle()
        assert reply["content"].startswith("answer 2 to")
