"""`/stop` in a shared Telegram chat stops the caller's own reply, whatever else waits there (issue 14, item 9)."""

from __future__ import annotations

import asyncio

from bot.core.messages import ReplyStatus
from bot.core.service import FOLDED
from tests.core_helpers import running, say, until, waiting
from tests.test_telegram_access import BOB, GROUP, LONG
from tests.test_telegram_adapter import MakeService, running_bot, texts, wait_contains


async def test_stop_hits_your_running_reply_while_someone_elses_waits(make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05) as (fake, service):
        group = fake.group_chat(GROUP, "Friends")
        key = f"telegram:{GROUP}"
        await fake.user_says(f"@quant_test_bot {LONG}", chat=group)  # Alice's reply streams...
        await wait_contains(fake, GROUP, "w0 w1")
        await fake.user_says("@quant_test_bot what is AWQ?", chat=group, user_id=BOB, name="Bob")
        await fake.wait_for(lambda: service.queue.has_waiting(key))  # ...while Bob's waits behind it

        await fake.user_says("/stop", chat=group)  # Alice, no administrator
        await wait_contains(fake, GROUP, "Stopped your reply.")
        assert not any("answers someone else" in t for t in texts(fake, GROUP))
        await wait_contains(fake, GROUP, "Bob: what is AWQ? (turn")  # Bob's is still answered, after hers

        chat = await service.store.chat_id("telegram", str(GROUP))
        replies = [r for r in await service.store.messages(chat) if r.role == "assistant"]
        assert [r.status for r in replies] == ["cancelled", "complete"]
        assert replies[0].content.startswith("You said: Alice: w0")  # the stopped one was hers, partly kept


async def test_stop_removes_your_waiting_message_not_the_running_reply_of_someone_else(
        make_toy_service: MakeService) -> None:
    async with running_bot(make_toy_service, delay_s=0.05) as (fake, service):
        group = fake.group_chat(GROUP, "Friends")
        key = f"telegram:{GROUP}"
        await fake.user_says(f"@quant_test_bot {LONG}", chat=group)
        await wait_contains(fake, GROUP, "w0 w1")
        await fake.user_says("@quant_test_bot what is AWQ?", chat=group, user_id=BOB, name="Bob")
        await fake.wait_for(lambda: service.queue.has_waiting(key))

        await fake.user_says("/stop", chat=group, user_id=BOB, name="Bob")
        await wait_contains(fake, GROUP, "Removed your waiting message.")
        assert not service.queue.has_waiting(key) and service.queue.is_running(key)  # Alice's goes on
        await fake.user_says("/stop", chat=group, user_id=BOB, name="Bob")  # nothing of his left: hers is not his
        await wait_contains(fake, GROUP, "answers someone else")
        assert service.queue.is_running(key)


async def test_a_message_folded_into_a_waiting_request_makes_it_yours_to_stop(make_toy_service: MakeService) -> None:
    """Carol's message joined Bob's waiting request: it answers her too, so her /stop may remove it."""
    async with make_toy_service(delay_s=0.05) as service:
        alice = asyncio.create_task(say(service, LONG, chat="g", user="alice", is_group=True, is_admin=False))
        await until(lambda: running(service, "g"))
        bob = asyncio.create_task(say(service, "what is AWQ?", chat="g", user="bob", is_group=True, is_admin=False))
        await until(lambda: waiting(service, "g"))
        carol = await say(service, "and GPTQ?", chat="g", user="carol", is_group=True, is_admin=False)
        assert carol.notices == [FOLDED]
        stop = await say(service, "/stop", chat="g", user="carol", is_group=True, is_admin=False)
        assert stop.notices == ["Removed your waiting message."] and not stop.errors
        assert (await bob).status == ReplyStatus.CANCELLED
        assert running(service, "g")  # Alice's reply is not Carol's: it goes on
        assert (await alice).status == ReplyStatus.COMPLETE
