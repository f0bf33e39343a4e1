"""`python -m bot run` against the fake Bot API server, answering with the real GPTQ build; SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from bot.adapters.telegram.formatting import has_markup, markdown_to_html
from tests.fakes.telegram_api import FakeTelegram, parse_html

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ALICE = 1001


def stored_replies(db: Path) -> list[tuple[str, str]]:
    """The reply rows so far ([] while the bot, which connects before it loads, has not migrated the file yet)."""
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT content, status FROM messages WHERE role = 'assistant' ORDER BY id").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise


def as_shown(markdown: str) -> str:
    return parse_html(markdown_to_html(markdown))[0] if has_markup(markdown) else markdown


async def until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


async def test_run_answers_on_telegram_with_gptq_and_stops_on_sigterm(tmp_path: Path, prepared_models: Path) -> None:
    db = tmp_path / "bot.db"
    async with FakeTelegram() as fake:
        env = {**os.environ, "PYTHONPATH": str(REPO), "TELEGRAM_BOT_TOKEN": fake.token,
               "TELEGRAM_API_BASE_URL": fake.base_url, "DISCORD_BOT_TOKEN": "", "MODELS_DIR": str(prepared_models),
               "DEFAULT_MODEL": "smollm2-gptq", "MAX_NEW_TOKENS": "16", "TEMPERATURE": "0",
               "DATABASE_URL": f"sqlite+aiosqlite:///{db}", "LOG_LEVEL": "INFO",
               "TELEGRAM_EDIT_INTERVAL_PRIVATE_S": "0.2"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", cwd=tmp_path, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await until(lambda: fake.calls_to("getUpdates"), 180)  # polling (a message waits for the model load)
            await fake.user_says("What is the capital of France?")
            await until(lambda: db.exists() and any(s == "complete" for _, s in stored_replies(db)), 240)
            (content, _), = stored_replies(db)
            assert content.strip()
            await fake.wait_for(lambda: [m.text for m in fake.bot_messages(ALICE)] == [as_shown(content)], 10)
            assert fake.drafts_in(ALICE) and not fake.calls_to("editMessageText", ALICE)  # streamed by drafts

            await fake.user_says("Say that again, in one word.")
            await until(lambda: len(stored_replies(db)) == 2, 60)  # the second reply has started
            proc.send_signal(signal.SIGTERM)
            output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, output
    assert fake.token not in output and fake.token.split(":")[1] not in output  # never logged
    (_, first), (second_text, second) = stored_replies(db)
    assert second in {"complete", "cancelled"}  # finished or marked, never left pending
    last = fake.bot_messages(ALICE)[-1].text
    assert last == as_shown(second_text) or "stopped" in last
