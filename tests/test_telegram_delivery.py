"""Getting the final text to the chat: outages waited out, permanent refusals not retried, migrated
groups followed, a cut reply announced, and no empty chunk ever sent (real PTB, fake Bot API)."""

from __future__ import annotations

import asyncio

from bot.adapters.streaming import CUT_NOTE
from tests.test_telegram_adapter import ALICE, EDITS, MakeService, running_bot, texts, wait_contains, wait_text

GROUP = -500
SUPERGROUP = -1000000000500


async def test_an_outage_longer_than_six_tries_is_waited_out(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delivery_retry_s=4.0, **EDITS) as (fake, service):
        fake.fail_next("editMessageText", 502, "Bad Gateway", times=9)  # the server is down for a while
        await fake.user_says("are you there")
        await wait_text(fake, ALICE, "You said: are you there (turn 1)", timeout=15)
        refused = [c for c in fake.calls if c.method == "editMessageText" and c.error]
        assert len(refused) == 9
        assert texts(fake, ALICE) == ["You said: are you there (turn 1)"]  # one message, no note needed


async def test_a_reply_that_never_lands_is_kept_and_the_next_one_says_so(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delivery_retry_s=1.0, **EDITS) as (fake, service):
        fake.fail_next("editMessageText", 502, "Bad Gateway", times=10_000)
        await fake.user_says("first question")
        chat = await service.store.chat_id("telegram", str(ALICE))

        async def stored_reply() -> bool:
            rows = await service.store.messages(chat)
            return any(r.role == "assistant" and r.status == "complete" for r in rows)

        while not await stored_reply():
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # past DELIVERY_RETRY_S: the adapter has given up
        assert "You said: first question (turn 1)" not in texts(fake, ALICE)
        (reply,) = [r for r in await service.store.messages(chat) if r.role == "assistant"]
        assert reply.content == "You said: first question (turn 1)"  # stored intact

        fake.heal()
        await fake.user_says("second question")
        shown = await wait_contains(fake, ALICE, "second question")
        await wait_text(fake, ALICE, f"{CUT_NOTE}\n\nYou said: second question (turn 2)")
        assert shown.startswith(CUT_NOTE)
        await fake.user_says("third")
        await wait_text(fake, ALICE, "You said: third (turn 3)")  # said once, not forever


async def test_no_rights_in_a_group_is_not_retried(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        group = fake.group_chat(GROUP, "Muted")
        fake.fail_next("sendMessage", 400, "Bad Request: not enough rights to send text messages to the chat",
                       times=100)
        await fake.user_says("@quant_test_bot hello", chat=group)
        chat = await service.store.chat_id("telegram", str(GROUP))
        while not [r for r in await service.store.messages(chat) if r.role == "assistant" and r.status == "complete"]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert len([c for c in fake.calls if c.method == "sendMessage"]) == 1  # refused once, not hammered


async def test_a_group_upgraded_to_a_supergroup_gets_its_reply_there(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        group = fake.group_chat(GROUP, "Friends")
        await fake.user_says("@quant_test_bot hello", chat=group)
        await wait_contains(fake, GROUP, "hello (turn 1)")  # (group replies may name the speaker)
        fake.migrate_group(GROUP, SUPERGROUP)  # upgraded meanwhile
        await fake.user_says("@quant_test_bot still there?", chat=group)
        await wait_contains(fake, SUPERGROUP, "still there? (turn 2)")
        moved = [c for c in fake.calls if c.params.get("chat_id") == GROUP and c.error]
        assert 1 <= len(moved) <= 2  # followed at once, not retried as if temporary


async def test_a_chunk_that_would_render_empty_is_never_sent(make_toy_service: MakeService) -> None:
    code = "\n".join(f"v{i} = {i}" for i in range(380))
    body = f"\n\n```\n{code}\n```\n"
    reply = "Here is the code" + "." * (4097 - len("Here is the code") - len(body)) + body  # 4097 long
    assert len(reply) == 4097  # split at 4096 right before the closing fence
    async with running_bot(make_toy_service, script=lambda messages: reply, max_new_tokens=1500, context_length=4096) as (fake, service):
        await fake.user_says("show me code")
        await wait_contains(fake, ALICE, "v379 = 379")
        await asyncio.sleep(0.5)
        assert not [c for c in fake.calls if c.error and "empty" in c.error]
        assert len(fake.bot_messages(ALICE)) == 1
        assert fake.bot_messages(ALICE)[0].text.rstrip().endswith("v379 = 379")
