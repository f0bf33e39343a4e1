"""Discord attachments (issue #18 item 7): the same "text only" note as Telegram; text with files is answered."""

from __future__ import annotations

from bot.adapters.delivery import TEXT_ONLY
from tests.test_discord_adapter import discord_world  # noqa: F401 - the fixture


async def test_only_attachments_get_the_text_only_note(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        await w.fake.user_message(w.dm, w.alice, "", attachments=["cat.png"])
        await w.until_idle()
        assert [m["content"] for m in w.fake.bot_messages(w.dm)] == [TEXT_ONLY]
        assert await w.stored(w.dm) == []  # nothing to answer, nothing stored

        await w.fake.user_message(w.channel, w.alice, w.fake.mention(), attachments=["a.pdf", "b.txt"])
        await w.until_idle()
        assert [m["content"] for m in w.fake.bot_messages(w.channel)] == [TEXT_ONLY]


async def test_a_reply_with_only_a_file_in_a_channel_gets_the_note(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        first = await w.say(f"{w.fake.mention()} hi")
        answer = w.fake.bot_messages(w.channel)[-1]
        await w.fake.user_message(w.channel, w.alice, "", reply_to=answer, attachments=["photo.jpg"])
        await w.until_idle()
        assert w.fake.bot_messages(w.channel)[-1]["content"] == TEXT_ONLY and first


async def test_text_with_an_attachment_is_answered_with_a_note(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        await w.fake.user_message(w.dm, w.alice, "what is 2+2?", attachments=["sums.xlsx"])
        await w.until_idle()
        shown = w.fake.bot_messages(w.dm)[-1]["content"]
        assert shown.startswith("You said: what is 2+2? (turn 1)")
        assert shown.endswith("(I can only read text, so I did not look at the attachment sums.xlsx; "
                              "this answer is about your text alone.)")
        stored = [c for r, c, _ in await w.stored(w.dm) if r == "assistant"]
        assert stored == ["You said: what is 2+2? (turn 1)"]  # the note is not part of the reply

        await w.fake.user_message(w.dm, w.alice, "and these?", attachments=["a.png", "b.png"])
        await w.until_idle()
        assert "did not look at the 2 attachments" in w.fake.bot_messages(w.dm)[-1]["content"]
