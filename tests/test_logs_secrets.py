"""Secrets never reach the log, even at DEBUG; user text stays below INFO; a bad MODELS_FILE is one line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.logs import setup_logging
from tests.test_discord_adapter import discord_world  # noqa: F401 - the fixture
from tests.test_telegram_adapter import ALICE, MakeService, running_bot, wait_text

SECRET_PHRASE = "my private thought about zebras"
DB_PASSWORD = "s3cret-Pa55word"
API_KEY = "sk-live-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def debug_log(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[Settings], Callable[[], list[dict]]]]:
    """`records = debug_log(settings)` installs the bot's logging at DEBUG (JSON lines on stderr);
    call the returned reader after the run. Logging is restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in logging.root.manager.loggerDict}
    lines: list[str] = []

    def install(settings: Settings) -> Callable[[], list[dict]]:
        setup_logging(settings.model_copy(update={"log_level": "DEBUG", "log_json": True}))

        def read() -> list[dict]:
            lines.extend(capsys.readouterr().err.splitlines())
            return [json.loads(line) for line in lines if line.startswith("{")]
        return read

    yield install
    root.handlers[:], level, levels = saved
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def _leaks(records: list[dict], secrets: list[str]) -> list[str]:
    text = "\n".join(json.dumps(r) for r in records)
    return [s for s in secrets if s in text]


async def test_telegram_at_debug_logs_no_token_and_no_user_text_above_debug(
        make_toy_service: MakeService, debug_log) -> None:
    async with running_bot(make_toy_service) as (fake, service):
        read = debug_log(service.settings.model_copy(update={
            "database_url": f"postgresql+asyncpg://quantbot:{DB_PASSWORD}@db:5432/quantbot"}))
        logging.getLogger("sqlalchemy.engine").warning(  # a library printing its URL
            "connecting to postgresql+asyncpg://quantbot:%s@db:5432/quantbot", DB_PASSWORD)
        fake.drop_next("editMessageText")  # a retry logs at INFO
        fake.fail_next("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
        await fake.user_says(SECRET_PHRASE)
        await wait_text(fake, ALICE, f"You said: {SECRET_PHRASE} (turn 1)")
    records = read()
    assert any(r["level"] == "DEBUG" for r in records) and any(r["level"] == "INFO" for r in records)
    assert _leaks(records, [fake.token, fake.token.split(":", 1)[1], DB_PASSWORD]) == []
    loud = [r for r in records if r["level"] != "DEBUG"]
    assert not [r for r in loud if "zebras" in json.dumps(r)]


async def test_discord_at_debug_logs_no_bot_or_interaction_token(discord_world, debug_log) -> None:  # noqa: F811
    async with discord_world() as w:
        read = debug_log(w.service.settings)
        inter = await w.chat(SECRET_PHRASE)
        assert inter.content.endswith(f"{SECRET_PHRASE} (turn 1)")
        await w.say(f"{w.fake.mention()} {SECRET_PHRASE}")
    records = read()
    assert any(r["logger"].startswith("discord.webhook") for r in records)  # the calls were logged...
    assert _leaks(records, [w.fake.token, inter.token]) == []  # ...without their tokens
    assert not [r for r in records if r["level"] != "DEBUG" and "zebras" in json.dumps(r)]


def _bot(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.parametrize("profiles, field", [
    ([{"name": "remote", "format": "openai", "base_url": "http://x/v1", "api_key": [API_KEY]}], "api_key"),
    ([{"name": "ok", "format": "gptq", "path": "x"}, {"name": "typo", "format": "gptqq", "path": API_KEY}], "format"),
])
def test_a_malformed_models_file_is_one_line_naming_file_and_field(tmp_path: Path, profiles: list, field: str) -> None:
    models_file = tmp_path / "profiles.json"
    models_file.write_text(json.dumps(profiles))
    result = _bot("models", "list", env={"MODELS_FILE": str(models_file), "MODELS_DIR": str(tmp_path)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(models_file) in line and repr(field) in line
    assert API_KEY not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_models_file_that_is_not_json_says_where(tmp_path: Path) -> None:
    models_file = tmp_path / "profiles.json"
    models_file.write_text('[{"name": "x", "format": "gguf",}]')
    result = _bot("models", "list", env={"MODELS_FILE": str(models_file), "MODELS_DIR": str(tmp_path)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert str(models_file) in line and "line 1" in line
