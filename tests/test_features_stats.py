"""/stats (issue #18 item 6): a chat's use from the database; the bot's totals for admins."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from bot.core.service import ChatService
from bot.core.stats import percentile
from tests.core_helpers import say

MakeService = Callable[..., AbstractAsyncContextManager[ChatService]]


def number(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return float(found.group(1))


async def test_stats_count_a_chats_messages_tokens_and_speed(make_toy_service: MakeService) -> None:
    async with make_toy_service(delay_s=0.01) as service:
        await say(service, "hello there", is_admin=False)  # reply: "You said: hello there (turn 1)" = 6 words
        await say(service, "one more question", is_admin=False)
        await say(service, "elsewhere", chat="c2", is_admin=False)
        text = (await say(service, "/stats", is_admin=False)).notices[0]
        assert "messages: 2 from people, 2 replies" in text
        # the scripted engine counts words + 4 per message: "hello there" 6+2, "one more question" 7+2
        assert number(text, r"tokens: (\d+) in") == (2 + 4 + 2) + (3 + 4 + 2)
        assert number(text, r"in, (\d+) out") == 6 + 7
        assert 10 < number(text, r"average speed: ([\d.]+) tokens/s") < 200  # ~100 at 10 ms a word
        assert "since it started" not in text  # the bot's totals are for admins


async def test_stats_for_admins_add_the_bots_totals(make_toy_service: MakeService) -> None:
    async with make_toy_service(delay_s=0.01) as service:
        assert "not measured yet" in (await say(service, "/stats", is_admin=False)).notices[0]
        await say(service, "hi")
        await say(service, "hi", chat="c2")
        await say(service, "/retry", chat="c2")
        text = (await say(service, "/stats")).notices[0]
        assert "messages: 1 from people, 1 replies" in text
        assert "replies: 3 complete" in text
        assert re.search(r"queue wait: p50 [\d.]+ s, p95 [\d.]+ s", text)
        assert "model: toy-a" in text
        assert number(text, r"speed ([\d.]+) tokens/s") > 0
        assert "1 replies" in (await say(service, "/stats", chat="c2")).notices[0]  # the superseded one is not


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0


# --------------------------------------------------------------------------- through the platforms

from tests.test_discord_adapter import discord_world  # noqa: E402,F401 - the fixture
from tests.test_telegram_adapter import ALICE, running_bot, wait_contains, wait_text  # noqa: E402


async def test_telegram_stats_admin_sees_the_bot_totals(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, admin_users=[str(ALICE)]) as (fake, service):
        await fake.user_says("hello")
        await wait_text(fake, ALICE, "You said: hello (turn 1)")
        await fake.user_says("/stats")
        text = await wait_contains(fake, ALICE, "This chat:")
        assert "messages: 1 from people, 1 replies" in text and "replies: 1 complete" in text
        await fake.user_says("/stats", user_id=2002, name="Bob")  # not an admin: the chat part only
        text = await wait_contains(fake, 2002, "This chat:")
        assert "messages: 0 from people" in text and "since it started" not in text


async def test_discord_stats_and_retry_slash_commands(discord_world) -> None:  # noqa: F811
    async with discord_world() as w:
        await w.chat("hello")
        again = await w.command("retry")
        assert again.content == "You said: Alice: hello (turn 1)" and not again.ephemeral
        stats = await w.command("stats")
        assert stats.ephemeral and "messages: 1 from people, 1 replies" in stats.content
        assert "since it started" not in stats.content
        assert [s for r, _, s in await w.stored(w.channel) if r == "assistant"] == ["superseded", "complete"]
