"""One Discord conversation through a real 4-bit build (GPTQ via Transformers), kept short."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.core.service import ChatService
from tests.test_discord_adapter import growing, running_world

pytestmark = pytest.mark.slow


async def test_chat_and_mention_on_the_real_gptq_build(tmp_path: Path, prepared_models: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    @asynccontextmanager
    async def real_service(**kwargs: Any) -> AsyncIterator[ChatService]:
        settings = Settings(models_dir=prepared_models, default_model="smollm2-gptq", max_new_tokens=24,
                            temperature=0.0, database_url=f"sqlite+aiosqlite:///{tmp_path}/discord.db",
                            _env_file=None, **kwargs)
        async with ChatService(settings) as service:
            yield service

    async with running_world(real_service, monkeypatch, discord_edit_interval_s=0.02) as w:
        inter = await w.fake.interact("chat", w.alice, w.channel, {"prompt": "What is the capital of France?"})
        await w.until_idle(timeout=120)
        assert inter.ack_type == 5  # deferred within the 3 s the fake enforces
        assert inter.original_edits and growing(inter.original_edits)
        (first,) = [r for r in await w.stored(w.channel) if r[0] == "assistant"]
        assert first[2] == "complete" and first[1].strip()
        assert inter.content == first[1]  # what Discord shows is what was stored

        await w.say(f"{w.fake.mention()} Say that again, in one word.")
        await w.until_idle(timeout=120)
        (reply,) = [m for m in w.fake.bot_messages(w.channel) if "webhook_id" not in m]
        replies = await w.stored_replies(w.channel)
        assert len(replies) == 2 and reply["content"] == replies[1] and replies[1].strip()
