"""The fake Bot API server enforces Telegram's rules, as seen through the real python-telegram-bot Bot."""

from __future__ import annotations

import httpx
import pytest
from telegram import Bot
from telegram.error import BadRequest, InvalidToken, RetryAfter

from tests.fakes.telegram_api import FakeTelegram


async def test_limits_and_errors_reach_ptb_as_the_real_exceptions() -> None:
    async with FakeTelegram() as fake:
        async with Bot(fake.token, base_url=fake.base_url) as bot:
            assert bot.username == fake.username
            msg = await bot.send_message(1001, "x" * 4096)
            assert msg.text == "x" * 4096
            with pytest.raises(BadRequest, match="(?i)message is too long"):
                await bot.send_message(1001, "x" * 4097)
            with pytest.raises(BadRequest, match="(?i)message is too long"):
                await bot.send_message(1001, "🙂" * 2049)  # counted in UTF-16 units
            with pytest.raises(BadRequest, match="(?i)message text is empty"):
                await bot.send_message(1001, "<b> </b>", parse_mode="HTML")
            with pytest.raises(BadRequest, match="(?i)message is not modified"):
                await bot.edit_message_text("x" * 4096, chat_id=1001, message_id=msg.message_id)
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(1001, "<b>open", parse_mode="HTML")
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(1001, "a <tag> b", parse_mode="HTML")
            ok = await bot.send_message(1001, "<b>bold</b> &lt;ok&gt;", parse_mode="HTML")
            assert ok.text == "bold <ok>" and ok.entities[0].type == "bold"

            fake.fail_next("editMessageText", 429, "Too Many Requests: retry after 7", retry_after=7)
            with pytest.raises(RetryAfter) as exc:
                await bot.edit_message_text("y", chat_id=1001, message_id=msg.message_id)
            assert exc.value._retry_after.total_seconds() == 7  # type: ignore[attr-defined]

            fake.delete_message(1001, msg.message_id)
            with pytest.raises(BadRequest, match="(?i)message to edit not found"):
                await bot.edit_message_text("z", chat_id=1001, message_id=msg.message_id)


async def test_wrong_token_is_refused() -> None:
    async with FakeTelegram() as fake:
        with pytest.raises(InvalidToken):
            async with Bot("999:wrong-token-abcdefghijklmnopqrstuvwx", base_url=fake.base_url):
                pass


async def test_get_updates_long_polls_and_confirms_by_offset() -> None:
    async with FakeTelegram() as fake:
        first = await fake.user_says("/start")
        async with httpx.AsyncClient() as client:
            url = f"{fake.base_url}{fake.token}/getUpdates"
            got = (await client.post(url, data={"offset": "0", "timeout": "0"})).json()
            assert got["ok"] and got["result"][0]["update_id"] == first["update_id"]
            entity = got["result"][0]["message"]["entities"][0]
            assert entity == {"type": "bot_command", "offset": 0, "length": 6}
            again = (await client.post(url, json={"offset": first["update_id"] + 1, "timeout": 0})).json()
            assert again == {"ok": True, "result": []}  # confirmed updates are gone
            missing = await client.post(f"{fake.base_url}{fake.token}/noSuchMethod")
            assert missing.status_code == 404 and missing.json()["ok"] is False


async def test_message_drafts_are_private_previews_not_messages() -> None:
    """sendMessageDraft as documented (Bot API 9.5, 10.0): private chats, a non-zero draft_id, up to 4096 characters."""
    async with FakeTelegram() as fake:
        async with Bot(fake.token, base_url=fake.base_url) as bot:
            assert await bot.send_message_draft(1001, 7, "thinking about <b>it</b>", parse_mode="HTML")
            assert await bot.send_message_draft(1001, 7)  # no text: "Thinking..." (Bot API 10.0)
            assert [(d.chat_id, d.draft_id, d.text) for d in fake.drafts_in(1001)] == [
                (1001, 7, "thinking about it"), (1001, 7, "")]
            assert fake.drafts_in(1001)[0].entities[0]["type"] == "bold"
            assert fake.bot_messages(1001) == []  # a draft is not part of the chat's history

            await fake.user_says("hi all", chat=fake.group_chat(-100))
            await fake.user_says("hi all", chat=fake.group_chat(-1000000000100, forum=True))
            for group in (-100, -1000000000100):
                with pytest.raises(BadRequest, match="(?i)TEXTDRAFT_PEER_INVALID"):
                    await bot.send_message_draft(group, 7, "no")
            with pytest.raises(BadRequest):
                await bot.send_message_draft(1001, 0, "draft_id must be non-zero")
            with pytest.raises(BadRequest, match="(?i)message is too long"):
                await bot.send_message_draft(1001, 7, "x" * 4097)
            assert len(fake.drafts) == 2


async def test_drafts_too_fast_draw_retry_after_and_an_older_server_does_not_know_them() -> None:
    async with FakeTelegram() as fake:
        async with Bot(fake.token, base_url=fake.base_url) as bot:
            for i in range(fake.draft_rate or 0):
                await bot.send_message_draft(1001, 1, f"draft {i}")
            with pytest.raises(RetryAfter) as exc:
                await bot.send_message_draft(1001, 1, "one too many this second")
            assert exc.value._retry_after.total_seconds() == fake.draft_retry_after  # type: ignore[attr-defined]
            with pytest.raises(RetryAfter):
                await bot.send_message_draft(1001, 1, "still waiting it out")
            await bot.send_message_draft(1002, 1, "another chat has its own budget")

            fake.drafts_supported = False  # before Bot API 9.5: 404, which PTB reports as InvalidToken
            with pytest.raises(InvalidToken, match="Not Found"):
                await bot.send_message_draft(1003, 1, "unknown method")
            assert (await bot.send_message(1003, "messages still work")).text == "messages still work"
