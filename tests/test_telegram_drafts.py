"""Private chats stream with sendMessageDraft and end in sendMessage; groups, refusals and older servers
use the edit loop (issue 18, item 4). The real python-telegram-bot client against the fake Bot API."""

from __future__ import annotations

import logging

import pytest
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, TelegramError

from bot.adapters.delivery import STOPPED_NOTE
from bot.adapters.regenerate import BUTTON_ID
from bot.adapters.telegram import sink
from bot.adapters.telegram.sink import DRAFT_INTERVAL_S, PLACEHOLDER, draft_refusal
from tests.fakes.telegram_api import Call, FakeTelegram
from tests.test_telegram_access import LONG
from tests.test_telegram_adapter import ALICE, MakeService, running_bot, texts, wait_contains, wait_text

BOB = 1002
PROMPT = " ".join(f"w{i}" for i in range(40))  # at 0.03 s a word: about 1.3 s of streaming, a few drafts
JITTER_S = 0.05  # scheduling slack on a busy machine


def ok_calls(fake: FakeTelegram, method: str, chat_id: int) -> list[Call]:
    return fake.calls_to(method, chat_id)


def refused(fake: FakeTelegram, method: str) -> list[Call]:
    return [c for c in fake.calls if c.method == method and c.error]


def has_regenerate(markup: object) -> bool:
    return BUTTON_ID in str(markup)


async def test_private_chat_streams_drafts_then_sends_the_reply_once(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        await fake.user_says(PROMPT)
        final = f"You said: {PROMPT} (turn 1)"
        await wait_text(fake, ALICE, final)

        drafts = fake.drafts_in(ALICE)
        assert len(drafts) >= 3
        assert len({d.draft_id for d in drafts}) == 1 and drafts[0].draft_id != 0  # one preview, animated
        growing = [d.text for d in drafts if d.text != PLACEHOLDER]
        assert growing and all(final.startswith(t) for t in growing)  # the reply so far, as plain text
        assert all(len(a) < len(b) for a, b in zip(growing, growing[1:]))  # it grows; no draft repeats
        gaps = [b.at - a.at for a, b in zip(drafts, drafts[1:])]
        assert min(gaps) >= DRAFT_INTERVAL_S - JITTER_S  # paced well under what Telegram tolerates
        assert fake.served_429 == 0

        sends = ok_calls(fake, "sendMessage", ALICE)
        assert [c.params["text"] for c in sends] == [final]  # exactly one message, with the full text
        assert sends[0].at > drafts[-1].at
        assert not fake.calls_to("editMessageText") and not fake.calls_to("deleteMessage")
        [message] = fake.bot_messages(ALICE)
        assert has_regenerate(message.reply_markup)  # the Regenerate button, as with the edit loop

        await fake.user_says("again")
        await wait_text(fake, ALICE, "You said: again (turn 2)")
        assert fake.drafts_in(ALICE)[-1].draft_id != drafts[0].draft_id  # a new reply, a new preview
        assert not fake.calls_to("editMessageText", ALICE)
        await fake.wait_for(lambda: not has_regenerate(fake.bot_messages(ALICE)[0].reply_markup))  # moved on


async def test_groups_and_topics_keep_the_edit_loop(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        await fake.user_says(f"@quant_test_bot {PROMPT}", chat=fake.group_chat(-100, "Friends"))
        await fake.user_says(f"@quant_test_bot {PROMPT}", chat=fake.group_chat(-1000000000200, forum=True),
                             thread_id=11)
        await wait_text(fake, -100, f"You said: Alice: {PROMPT} (turn 1)")
        await wait_text(fake, -1000000000200, f"You said: Alice: {PROMPT} (turn 1)")
        for chat in (-100, -1000000000200):
            assert len(ok_calls(fake, "sendMessage", chat)) == 1 and ok_calls(fake, "editMessageText", chat)
        assert not [c for c in fake.calls if c.method == "sendMessageDraft"]


async def test_a_server_without_drafts_falls_back_to_edits_once_for_every_chat(
        make_toy_service: MakeService, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.adapters.telegram.sink")
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        fake.drafts_supported = False  # a Bot API server older than 9.5 (404: method unknown)
        await fake.user_says(PROMPT)
        final = f"You said: {PROMPT} (turn 1)"
        await wait_text(fake, ALICE, final)
        assert texts(fake, ALICE) == [final]  # the reply is complete, by the edit loop
        assert len(ok_calls(fake, "sendMessage", ALICE)) == 1 and ok_calls(fake, "editMessageText", ALICE)
        assert len(refused(fake, "sendMessageDraft")) == 1

        await fake.user_says("second")
        await fake.user_says("hello", user_id=BOB, name="Bob")
        await wait_text(fake, ALICE, "You said: second (turn 2)")
        await wait_text(fake, BOB, "You said: hello (turn 1)")
        assert len([c for c in fake.calls if c.method == "sendMessageDraft"]) == 1  # not asked again, in any chat
    switches = [r for r in caplog.records if "sendMessageDraft" in r.getMessage()]
    assert len(switches) == 1 and switches[0].levelno == logging.INFO  # said once, quietly


async def test_a_chat_refusing_drafts_gets_edits_from_then_on(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        fake.fail_next("sendMessageDraft", 400, "Bad Request: TEXTDRAFT_PEER_INVALID",
                       when=lambda p: p.get("chat_id") == ALICE)
        await fake.user_says(PROMPT)
        await wait_text(fake, ALICE, f"You said: {PROMPT} (turn 1)")
        assert ok_calls(fake, "editMessageText", ALICE) and not fake.drafts_in(ALICE)

        await fake.user_says("second")
        await wait_text(fake, ALICE, "You said: second (turn 2)")
        await fake.user_says(PROMPT, user_id=BOB, name="Bob")
        await wait_text(fake, BOB, f"You said: {PROMPT} (turn 1)")
        assert len(refused(fake, "sendMessageDraft")) == 1 and not fake.drafts_in(ALICE)  # remembered for Alice
        assert fake.drafts_in(BOB) and not ok_calls(fake, "editMessageText", BOB)  # Bob's chat still drafts


async def test_drafting_too_fast_draws_429_and_the_reply_still_lands(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        fake.draft_rate, fake.draft_retry_after = 1, 1  # this server holds one draft a second
        await fake.user_says(PROMPT)
        final = f"You said: {PROMPT} (turn 1)"
        await wait_text(fake, ALICE, final)
        [limited, *_] = refused(fake, "sendMessageDraft")
        assert "Too Many Requests" in (limited.error or "")
        later = [d for d in fake.drafts_in(ALICE) if d.at > limited.at]
        assert all(d.at - limited.at >= 1.0 for d in later)  # drafts waited out retry_after
        assert [c.params["text"] for c in ok_calls(fake, "sendMessage", ALICE)] == [final]
        assert not fake.calls_to("editMessageText")


async def test_a_long_reply_drafts_one_message_and_ends_in_split_messages(make_toy_service: MakeService) -> None:
    paragraph = ("Quantization maps weights to four bits with a scale per group of sixty-four. " * 6).strip()
    long_reply = "\n\n".join(f"{i}. {paragraph}" for i in range(12))  # about 5.6k characters
    async with running_bot(make_toy_service, script=lambda msgs: long_reply, delay_s=0.002, max_new_tokens=4000,
                           context_length=10000) as (fake, service):
        await fake.user_says("explain")
        await fake.wait_for(lambda: len(fake.bot_messages(ALICE)) == 2 and "11." in texts(fake, ALICE)[-1], 20)
        shown = texts(fake, ALICE)
        assert "\n\n".join(t.strip() for t in shown) == long_reply  # nothing lost, cut between paragraphs
        assert len(ok_calls(fake, "sendMessage", ALICE)) == 2 and not fake.calls_to("editMessageText")
        drafts = fake.drafts_in(ALICE)
        assert all(len(d.text) <= 4096 for d in drafts)
        assert drafts[-1].text.endswith("…") and long_reply.startswith(drafts[-1].text.removesuffix("\n…"))
        first, last = fake.bot_messages(ALICE)
        assert has_regenerate(last.reply_markup) and not has_regenerate(first.reply_markup)


async def test_stop_during_drafts_sends_the_partial_text(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05) as (fake, service):
        await fake.user_says(LONG)
        await fake.wait_for(lambda: any("w0 w1" in d.text for d in fake.drafts_in(ALICE)))
        await fake.user_says("/stop")
        await wait_contains(fake, ALICE, "Stopped your reply.")
        partial = await wait_contains(fake, ALICE, "You said: w0")
        assert "w59" not in partial and partial.rstrip().endswith("(stopped)")
        assert not fake.calls_to("editMessageText")

        chat = await service.store.chat_id("telegram", str(ALICE))
        [reply] = [r for r in await service.store.messages(chat) if r.role == "assistant"]
        assert reply.status == "cancelled" and partial.startswith(reply.content)


async def test_shutdown_during_drafts_sends_the_partial_text_with_the_note(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.1, grace=0.3) as (fake, service):
        await fake.user_says(PROMPT)
        await fake.wait_for(lambda: any("w0" in d.text for d in fake.drafts_in(ALICE)))
    [shown] = texts(fake, ALICE)
    assert shown.startswith("You said: w0") and shown.endswith(STOPPED_NOTE)


async def test_regenerating_in_place_edits_the_reply(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03) as (fake, service):
        await fake.user_says("hello there")
        await wait_text(fake, ALICE, "You said: hello there (turn 1)")
        [reply] = fake.bot_messages(ALICE)
        drafted = len(fake.drafts)
        await fake.press_button(reply.message_id, BUTTON_ID, chat=fake.private_chat(ALICE))
        await fake.wait_for(lambda: reply.edits >= 1 and has_regenerate(reply.reply_markup)
                            and reply.text.startswith("You said: hello there"))
        assert len(fake.bot_messages(ALICE)) == 1 and len(fake.drafts) == drafted  # rewritten in place, no preview


async def test_an_unchanged_preview_is_drafted_again_before_it_expires(
        make_toy_service: MakeService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink, "DRAFT_REFRESH_S", 0.3)  # a preview lasts ~30 s; the bot re-drafts every 20 s
    async with running_bot(make_toy_service, script=lambda msgs: "slowly", delay_s=1.5) as (fake, service):
        await fake.user_says("take your time")
        await wait_text(fake, ALICE, "slowly")
        placeholders = [d for d in fake.drafts_in(ALICE) if d.text == PLACEHOLDER]
        assert len(placeholders) >= 3  # the placeholder kept alive while the model was silent


async def test_drafts_off_streams_private_chats_by_edits(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.03, telegram_drafts="off") as (fake, service):
        await fake.user_says(PROMPT)
        await wait_text(fake, ALICE, f"You said: {PROMPT} (turn 1)")
        assert ok_calls(fake, "editMessageText", ALICE)
        assert not [c for c in fake.calls if c.method == "sendMessageDraft"]


@pytest.mark.parametrize(("error", "refused_where"), [
    (InvalidToken("Not Found"), "everywhere"),  # 404 from a server without the method, as PTB reports it
    (BadRequest("Method not found"), "everywhere"),
    (BadRequest("Textdraft_peer_invalid"), "chat"),
    (BadRequest("Message is too long"), "chat"),
    (BadRequest("Chat not found"), None),  # as final as for any other call
    (Forbidden("Forbidden: bot was blocked by the user"), None),
    (InvalidToken("Unauthorized"), None),
    (NetworkError("Bad Gateway"), None),
])
def test_which_draft_errors_mean_use_the_edit_loop(error: TelegramError, refused_where: str | None) -> None:
    refusal = draft_refusal(error)
    assert (None if refusal is None else "everywhere" if refusal.everywhere else "chat") == refused_where
