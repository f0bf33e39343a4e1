"""`/stop` in a shared Telegram chat stops the caller's own reply, whatever else waits there (issue 14, item 9)."""

from __future__ import annotations

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
