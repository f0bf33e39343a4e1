"""The terminal chat, as a person uses it: a real process, lines in, streamed replies out."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from bot.adapters.terminal import TerminalSink
from bot.core.messages import ReplyStatus
from tests.models_fixture import on_the_subject

ROOT = Path(__file__).resolve().parents[1]


async def test_sink_prints_each_part_once():
    out = io.StringIO()
    sink = TerminalSink(out)
    await sink.started()
    for text in ("Hel", "Hello, wor", "Hello, world"):
        await sink.update(text)
    await sink.finish("Hello, world", ReplyStatus.COMPLETE)
    assert out.getvalue() == "bot> Hello, world\n"


@pytest.mark.slow
def test_terminal_chat_on_real_build(tmp_path, prepared_models):
    """`python -m bot chat` with the embedded GPTQ build: multi-turn, /model, /reset, history on disk."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "MODELS_DIR": str(prepared_models),
           "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/chat.db", "DEFAULT_MODEL": "smollm2-gptq",
           "MAX_NEW_TOKENS": "24", "TEMPERATURE": "0", "GPTQMODEL_CPU_WORKERS": "2"}
    script = "What is the capital of France?\n/model\n/frobnicate\n/reset\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "bot", "chat"], cwd=ROOT, env=env, input=script,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "Chatting with smollm2-gptq" in text
    assert "loading smollm2-gptq" in out.stderr  # the minute of loading and compiling is announced
    assert on_the_subject(text.split("bot>", 1)[-1])
    assert "* smollm2-gptq" in text and "smollm2-awq" in text
    assert "Unknown command /frobnicate" in text
    assert "History cleared" in text
    assert "Traceback" not in out.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "chat.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0  # /reset cleared it
        assert conn.execute("SELECT platform, external_id FROM chats").fetchall() == [("terminal", "local")]


@pytest.mark.slow
def test_the_terminal_chat_prints_nothing_but_our_own_lines(prepared_models: Path, tmp_path: Path) -> None:
    """`python -m bot chat` on the embedded default: no third-party banner, warning or progress bar reaches the
    terminal before (or with) the first answer, on stdout or stderr."""
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_BOT_TOKEN") and k not in ("LOG_LEVEL", "PYTHONWARNINGS")}
    env.update(MODELS_DIR=str(prepared_models), DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/bot.db",
               TORCH_COMPILE="off")  # the compiled step prints nothing more, and costs a minute here
    done = subprocess.run([sys.executable, "-m", "bot", "chat"], input="What is the capital of France?\n/quit\n",
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["loading smollm2-gptq (on a small CPU this takes about a minute)..."], \
        done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "Chatting with smollm2-gptq. /help for commands, /quit to leave.", done.stdout[:2000]
    assert lines[1].startswith("bot> ") and len(lines[1]) > len("bot> ") and lines[-1] == "bye", done.stdout


def test_the_terminal_chat_is_one_person() -> None:
    """One reader: a batch of one and no torch.compile at start (unless asked for), so a newcomer's first answer
    does not wait ~75 s for a compile."""
    from bot.adapters.terminal import one_person
    from bot.config import Settings

    base = Settings(_env_file=None, torch_compile="auto", max_batch=8)  # type: ignore[call-arg]
    terminal = one_person(base)
    assert (terminal.max_batch, terminal.torch_compile) == (1, "off")
    assert one_person(base.model_copy(update={"torch_compile": "on"})).torch_compile == "on"
