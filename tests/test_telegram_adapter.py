"""The real python-telegram-bot client against the fake Bot API server, with the toy chat service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from bot.adapters.telegram import TelegramAdapter
from bot.core.service import ChatService
from tests.fakes.telegram_api import NOT_MODIFIED, FakeTelegram

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]
ALICE = 1001
FAST = {"telegram_edit_interval_private_s": 0.05, "telegram_edit_interval_group_s": 0.1}
EDITS = {"telegram_drafts": "off"}  # private chats stream by the edit loop (tests of it), not sendMessageDraft


@asynccontextmanager
async def running_bot(make_toy_service: MakeService, *, grace: float = 5.0,
                      **overrides: Any) -> AsyncIterator[tuple[FakeTelegram, ChatService]]:
    """Fake server + toy service + the real adapter polling it."""
    async with FakeTelegram() as fake:
        settings = {"telegram_bot_token": fake.token, "telegram_api_base_url": fake.base_url, **FAST, **overrides}
        async with make_toy_service(**settings) as service:
            adapter = TelegramAdapter(service.settings, service, poll_timeout=1, stop_grace=grace)
            await adapter.start()
            try:
                yield fake, service
            finally:
                await adapter.stop()


def texts(fake: FakeTelegram, chat_id: int) -> list[str]:
    return [m.text for m in fake.bot_messages(chat_id)]


async def wait_text(fake: FakeTelegram, chat_id: int, wanted: str, timeout: float = 10.0) -> None:
    """Until one of the bot's messages in the chat shows exactly `wanted`."""
    try:
        await fake.wait_for(lambda: wanted in texts(fake, chat_id), timeout)
    except TimeoutError:
        raise AssertionError(f"never saw {wanted!r}; bot messages: {texts(fake, chat_id)}") from None


async def wait_contains(fake: FakeTelegram, chat_id: int, part: str, timeout: float = 10.0) -> str:
    try:
        await fake.wait_for(lambda: any(part in t for t in texts(fake, chat_id)), timeout)
    except TimeoutError:
        raise AssertionError(f"never saw {part!r}; bot messages: {texts(fake, chat_id)}") from None
    return next(t for t in texts(fake, chat_id) if part in t)


async def test_private_conversation_streams_by_edits_and_keeps_history(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03, **EDITS) as (fake, service):
        assert [c["command"] for c in fake.commands] == ["start", "help", "reset", "model", "stop", "system", "persona", "retry", "stats"]
        prompt = "tell me something about four bit quantized language models please"
        await fake.user_says(prompt)
        first = f"You said: {prompt} (turn 1)"
        await wait_text(fake, ALICE, first)

        sends = fake.calls_to("sendMessage", ALICE)
        edits = fake.calls_to("editMessageText", ALICE)
        assert len(sends) == 1  # one message, then edits
        assert len(edits) >= 3
        shown = [c.params["text"] for c in edits]
        assert all(len(a) <= len(b) for a, b in zip(shown[1:], shown[2:]))  # the text grows
        assert all(a != b for a, b in zip(shown, shown[1:]))  # never an edit with unchanged text
        assert shown[-1] == first
        assert fake.calls_to("sendChatAction", ALICE)  # "typing…" while it worked

        chat = await service.store.chat_id("telegram", str(ALICE))
        stored = [m for m in await service.store.messages(chat) if m.role == "assistant"]
        assert stored[-1].content == first and stored[-1].status == "complete"

        await fake.user_says("and again")
        await wait_text(fake, ALICE, "You said: and again (turn 2)")  # history carried over


async def test_reset_and_model_switch_by_command_and_button(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, admin_users=[str(ALICE)]) as (fake, service):
        await fake.user_says("one")
        await wait_text(fake, ALICE, "You said: one (turn 1)")
        await fake.user_says("/reset")
        await wait_contains(fake, ALICE, "History cleared")
        await fake.user_says("two")
        await wait_text(fake, ALICE, "You said: two (turn 1)")  # history forgotten

        await fake.user_says("/model")
        listing = next(m for m in await _until(lambda: [m for m in fake.bot_messages(ALICE)
                                                        if "model:" in str(m.reply_markup)]))
        buttons = [b["callback_data"] for row in listing.reply_markup["inline_keyboard"] for b in row]  # type: ignore[index]
        assert buttons == ["model:toy-a", "model:toy-b"]
        assert "toy-b" in listing.text
        await fake.press_button(listing.message_id, "model:toy-b", chat=fake.private_chat(ALICE))
        await wait_contains(fake, ALICE, "Switched to toy-b")
        assert service.current_model == "toy-b"
        assert fake.calls_to("answerCallbackQuery")

        await fake.user_says("/model toy-a")
        await wait_contains(fake, ALICE, "Switched to toy-a")
        assert service.current_model == "toy-a"


async def _until(get: Callable[[], list[Any]], timeout: float = 10.0) -> list[Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (found := get()):
        if loop.time() > end:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.02)
    return found


async def test_group_answers_only_when_addressed(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        group = fake.group_chat(-100, "Friends")
        await fake.user_says("hello everyone", chat=group)
        await fake.user_says("/help@some_other_bot", chat=group)
        await fake.user_says("@quant_test_bot what is GPTQ?", chat=group)
        await wait_text(fake, -100, "You said: Alice: what is GPTQ? (turn 1)")
        assert len(fake.bot_messages(-100)) == 1  # the chatter and the other bot's command were ignored
        reply = fake.bot_messages(-100)[0]
        assert fake.calls_to("sendMessage", -100)[0].params["reply_parameters"]["message_id"] == 3

        await fake.user_says("and AWQ?", chat=group, reply_to=reply.message_id)  # a reply to the bot
        await wait_text(fake, -100, "You said: Alice: and AWQ? (turn 2)")
        await fake.user_says("/help@quant_test_bot", chat=group)
        await wait_contains(fake, -100, "/reset")
        fake.set_member_status(-100, ALICE, "creator")  # /reset in a group: its administrators only
        await fake.user_says("/reset", chat=group)  # a bare command: for every bot in the group, us included
        await wait_contains(fake, -100, "History cleared")
        await fake.user_says("nobody asked the bot", chat=group)
        await asyncio.sleep(0.3)
        assert not any("nobody" in t for t in texts(fake, -100))


async def test_forum_topics_keep_separate_histories(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        forum = fake.group_chat(-1001234567890123, "Forum", forum=True)
        await fake.user_says("@quant_test_bot hi", chat=forum, thread_id=11)
        await wait_text(fake, forum["id"], "You said: Alice: hi (turn 1)")
        await fake.user_says("@quant_test_bot hello", chat=forum, thread_id=22)
        await wait_text(fake, forum["id"], "You said: Alice: hello (turn 1)")  # topic 22 has its own history
        await fake.user_says("@quant_test_bot again", chat=forum, thread_id=11)
        await wait_text(fake, forum["id"], "You said: Alice: again (turn 2)")
        threads = {c.params.get("message_thread_id") for c in fake.calls_to("sendMessage", forum["id"])}
        assert threads == {11, 22}  # each answer went to its own topic


async def test_retry_after_during_streaming_still_delivers_final_text(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05, **EDITS) as (fake, service):
        fake.fail_next("editMessageText", 429, "Too Many Requests: retry after 1", retry_after=1)
        prompt = "a b c d e f g h i j k l"
        await fake.user_says(prompt)
        await wait_text(fake, ALICE, f"You said: {prompt} (turn 1)")
        refused = next(c for c in fake.calls if c.method == "editMessageText" and c.error)
        later = [c for c in fake.calls_to("editMessageText", ALICE) if c.at > refused.at]
        assert later and later[0].at - refused.at >= 1.0  # it waited retry_after before the next edit
        assert len(later) <= 2  # the edits that piled up meanwhile were coalesced


async def test_not_modified_and_deleted_reply_are_survived(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05, **EDITS) as (fake, service):
        fake.fail_next("editMessageText", 400, NOT_MODIFIED)
        await fake.user_says("one two three four five six")
        await wait_text(fake, ALICE, "You said: one two three four five six (turn 1)")

        fake.drop_next("editMessageText")  # a network error mid-stream is retried
        await fake.user_says("seven eight nine ten eleven twelve")
        first = await _until(lambda: [m for m in fake.bot_messages(ALICE) if "seven" in m.text or "…" in m.text
                                      and m.message_id > 2])
        fake.delete_message(ALICE, first[-1].message_id)  # someone deletes the reply while it streams
        await wait_text(fake, ALICE, "You said: seven eight nine ten eleven twelve (turn 2)")


async def test_reply_over_4096_characters_continues_in_new_message(make_toy_service: MakeService) -> None:
    paragraph = ("Quantization maps weights to four bits with a scale per group of sixty-four. " * 6).strip()
    long_reply = "\n\n".join(f"{i}. {paragraph}" for i in range(12))  # about 5.6k characters

    async with running_bot(make_toy_service, script=lambda msgs: long_reply, max_new_tokens=4000, context_length=10000) as (fake, service):
        await fake.user_says("explain")
        await fake.wait_for(lambda: " ".join(texts(fake, ALICE)).rstrip().endswith("sixty-four."), 10)
        await fake.wait_for(lambda: len(fake.bot_messages(ALICE)) == 2 and "11." in texts(fake, ALICE)[-1], 10)
        shown = texts(fake, ALICE)
        assert all(len(t) <= 4096 for t in shown)
        assert "\n\n".join(t.strip() for t in shown) == long_reply  # nothing lost, cut between paragraphs
        assert not [c for c in fake.calls if c.error and "too long" in c.error]


async def test_code_block_split_across_messages_is_reopened(make_toy_service: MakeService) -> None:
    code = "\n".join(f"x_{i} = quantize(w[{i}], bits=4)  # group {i}" for i in range(150))
    reply = f"Here you go:\n\n```python\n{code}\n```\n\nThat's all."

    async with running_bot(make_toy_service, script=lambda msgs: reply, max_new_tokens=4000, context_length=10000) as (fake, service):
        await fake.user_says("code please")
        await fake.wait_for(lambda: any("That's all." in t for t in texts(fake, ALICE)), 10)
        await asyncio.sleep(0.2)
        messages = fake.bot_messages(ALICE)
        assert len(messages) == 2
        for m in messages:  # both halves are formatted as Python code blocks
            pre = [e for e in m.entities if e["type"] == "pre"]
            assert pre and pre[0].get("language") == "python"
        assert "x_149 = quantize" in messages[1].text and "x_0 = quantize" in messages[0].text


async def test_hostile_markdown_is_delivered(make_toy_service: MakeService) -> None:
    hostile = "Look: *unbalanced _under `tick <tag> & **bold** a<b [x](javascript:alert(1)) 2*3*4 snake_case_name"

    async with running_bot(make_toy_service, script=lambda msgs: hostile) as (fake, service):
        await fake.user_says("be hostile")
        done = await wait_contains(fake, ALICE, "snake_case_name")
        final = fake.bot_messages(ALICE)[-1]
        assert done == hostile.replace("**bold**", "bold")  # every character shown, markers of bold gone
        assert {"type": "bold", "offset": done.index("bold"), "length": 4} in final.entities

        # The server refuses the formatting of the final edit: the plain text still lands.
        for method in ("sendMessage", "editMessageText"):
            fake.fail_next(method, 400, "Bad Request: can't parse entities: Unsupported start tag \"b\" at byte "
                           "offset 3", when=lambda params: params.get("parse_mode") == "HTML")
        await fake.user_says("again")
        await fake.wait_for(lambda: texts(fake, ALICE).count(hostile) == 1 and len(texts(fake, ALICE)) == 2, 10)


async def test_unauthorized_user_gets_one_polite_refusal(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, allowed_users=["42", "1001"], admin_users=["42"]) as (fake, service):
        await fake.user_says("hi", user_id=666, name="Mallory")
        await wait_contains(fake, 666, "not allowed")
        await fake.user_says("hi again", user_id=666, name="Mallory")
        group = fake.group_chat(-200)
        await fake.user_says("@quant_test_bot hi", user_id=666, name="Mallory", chat=group)
        await fake.user_says("/model toy-b")  # allowed, but not an admin
        await wait_contains(fake, ALICE, "Only admins")
        assert len(fake.bot_messages(666)) == 1 and not fake.bot_messages(-200)
        assert service.current_model == "toy-a"
        await fake.user_says("/model toy-b", user_id=42, name="Root")
        await wait_contains(fake, 42, "Switched to toy-b")


async def test_unsupported_message_gets_an_explanation(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        await fake.user_sends_sticker()
        await wait_contains(fake, ALICE, "only read text")


async def test_five_chats_at_once(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.01) as (fake, service):
        users = range(2001, 2006)
        await asyncio.gather(*(fake.user_says(f"question from {u}", user_id=u, name=f"U{u}") for u in users))
        for u in users:
            await wait_text(fake, u, f"You said: question from {u} (turn 1)", timeout=20)
        for u in users:
            assert len(fake.bot_messages(u)) == 1  # queue position/placeholder edited into the answer


@pytest.mark.parametrize("bad", ["654321:WRONG-token-abcdefghijklmnopqrstu"])
async def test_bad_token_is_a_clear_error_without_the_token(make_toy_service: MakeService, bad: str) -> None:
    from bot.errors import BotError

    async with FakeTelegram() as fake:
        async with make_toy_service(telegram_bot_token=bad, telegram_api_base_url=fake.base_url) as service:
            adapter = TelegramAdapter(service.settings, service, poll_timeout=1)
            with pytest.raises(BotError) as err:
                await adapter.start()
            assert bad not in str(err.value) and "token" in str(err.value).lower()


async def test_stop_mid_reply_marks_the_message(make_toy_service: MakeService) -> None:
    prompt = " ".join(f"w{i}" for i in range(30))
    async with running_bot(make_toy_service, delay_s=0.1, grace=0.3, **EDITS) as (fake, service):
        await fake.user_says(prompt)
        await wait_contains(fake, ALICE, "You said: w0")  # streaming has begun
    shown = texts(fake, ALICE)
    assert len(shown) == 1 and shown[0].startswith("You said: w0")
    assert shown[0].endswith("(stopped: the bot is restarting; please ask again in a minute)")


async def test_paced_streaming_stays_within_flood_control(make_toy_service: MakeService) -> None:
    prompt = " ".join(f"w{i}" for i in range(40))
    async with running_bot(make_toy_service, delay_s=0.03, telegram_edit_interval_private_s=0.3,
                           **EDITS) as (fake, service):
        fake.flood_interval, fake.flood_burst = 0.25, 2  # this chat's flood limit: 4 messages a second
        await fake.user_says(prompt)
        await wait_text(fake, ALICE, f"You said: {prompt} (turn 1)")
        assert len(fake.calls_to("editMessageText", ALICE)) >= 2
        assert not [c for c in fake.calls if c.error and "Too Many Requests" in c.error]


async def test_editing_too_fast_draws_429_and_the_final_text_still_lands(make_toy_service: MakeService) -> None:
    prompt = " ".join(f"w{i}" for i in range(40))
    async with running_bot(make_toy_service, delay_s=0.03, telegram_edit_interval_private_s=0.0,
                           **EDITS) as (fake, service):
        fake.flood_interval, fake.flood_burst = 0.5, 2
        await fake.user_says(prompt)
        await wait_text(fake, ALICE, f"You said: {prompt} (turn 1)")
        assert [c for c in fake.calls if c.error and "Too Many Requests" in c.error]  # it did flood
        assert fake.bot_messages(ALICE)[-1].text == f"You said: {prompt} (turn 1)"
