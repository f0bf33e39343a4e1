"""A message whose reply failed is not part of later prompts: a message that breaks the engine must not break the chat.

Found by the Telegram soak: the failed reply was left out of the history, but its question stayed,
merged into the next user turn, so every later reply in that chat failed again until /reset.
"""

from __future__ import annotations

from bot.core.messages import MessageStatus, ReplyStatus
from bot.engines.base import ChatMessage
from tests.core_helpers import say, stored


def fails_on_boom(messages: list[ChatMessage]) -> str:
    last = messages[-1].content
    if "boom" in last:
        raise RuntimeError("this input breaks the engine")
    return f"You said: {last}"


async def test_after_a_failed_reply_the_chat_answers_the_next_message(make_toy_service):
    async with make_toy_service(script=fails_on_boom) as service:
        broken = await say(service, "boom")
        assert "the model failed" in broken.errors[0]
        nxt = await say(service, "what is the capital of France?")
        assert nxt.status == ReplyStatus.COMPLETE
        assert nxt.final == "You said: what is the capital of France?"  # answered alone, not with the failed one
        rows = await stored(service)
        assert [(r.role, r.content, r.status) for r in rows] == [
            ("user", "boom", MessageStatus.FAILED), ("assistant", "", MessageStatus.FAILED),
            ("user", "what is the capital of France?", MessageStatus.COMPLETE),
            ("assistant", "You said: what is the capital of France?", MessageStatus.COMPLETE)]
