"""`python -m bot bench telegram`: update -> first text edit -> final edit, per chat, 1 and 8 chats at once.

The real adapter (python-telegram-bot, AIORateLimiter, the default edit intervals) talks to the fake
Bot API server from tests/fakes on 127.0.0.1; the model is the scripted toy engine streaming at a
fixed word rate, so the numbers show the adapter's and the queue's share, not a model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bot.config import ModelProfile, Settings
from bot.errors import BotError

# --- tuning ---
WORD_DELAY_S = 0.02  # toy model speed: 50 words/s
REPLY_WORDS = 60
QUICK_REPLY_WORDS = 20
CONCURRENCY = (1, 8)
TIMEOUT_S = 120.0


def _reply(words: int) -> str:
    return " ".join(f"w{i}" for i in range(words))


async def _one_round(base: Settings, chats: int, words: int) -> list[dict[str, Any]]:
    from bot.adapters.telegram import TelegramAdapter
    from bot.core.service import ChatService
    from bot.engines.scripted import ScriptedEngine

    try:
        from tests.fakes.telegram_api import FakeTelegram
    except ImportError as exc:
        raise BotError("bench telegram needs the fake Bot API server in tests/fakes (run it from the repository)") from exc

    text = _reply(words)
    async with FakeTelegram() as fake:
        with tempfile.TemporaryDirectory() as tmp:
            settings = base.model_copy(update={
                "telegram_bot_token": SecretStr(fake.token), "telegram_api_base_url": fake.base_url,
                "database_url": f"sqlite+aiosqlite:///{tmp}/bench.db"})
            engines: dict[str, ScriptedEngine] = {}

            def factory(profile: ModelProfile) -> ScriptedEngine:
                return engines.setdefault(profile.name, ScriptedEngine(
                    profile.name, script=lambda msgs: text, delay_s=WORD_DELAY_S, context_length=8192))

            service = ChatService(settings, engine_factory=factory)
            await service.start()
            adapter = TelegramAdapter(settings, service, poll_timeout=1)
            await adapter.start()
            try:
                users = [5000 + i for i in range(chats)]
                sent_at: dict[int, float] = {}
                for u in users:
                    sent_at[u] = time.monotonic()
                    await fake.user_says(f"bench {u}", user_id=u, name=f"U{u}")
                await fake.wait_for(lambda: all(any(m.text == text for m in fake.bot_messages(u)) for u in users),
                                    TIMEOUT_S)
            finally:
                await adapter.stop()
                await service.close()
    rows = []
    for u in users:
        # private chats stream by drafts (sendMessageDraft) and end with one sendMessage
        calls = [c for c in fake.calls if c.method in ("sendMessage", "editMessageText", "sendMessageDraft")
                 and c.params.get("chat_id") == u and c.error is None]
        with_text = [c for c in calls if str(c.params.get("text", "")).startswith("w0")]
        final = next(c for c in calls if c.params.get("text") == text and c.method != "sendMessageDraft")
        rows.append({"chat": u, "first_text_s": round(with_text[0].at - sent_at[u], 3),
                     "final_s": round(final.at - sent_at[u], 3),
                     "first_message_s": round(calls[0].at - sent_at[u], 3),
                     "edits": sum(1 for c in calls if c.method == "editMessageText"),
                     "errors": sum(1 for c in fake.calls if c.error and c.params.get("chat_id") == u)})
    return rows


def cmd_bench_telegram(args: argparse.Namespace, settings: Settings) -> int:
    words = QUICK_REPLY_WORDS if args.quick else REPLY_WORDS
    models = Path(tempfile.mkdtemp()) / "toy.json"
    models.write_text(json.dumps([{"name": "toy", "format": "hf", "path": "toy"}]))
    base = Settings(_env_file=None, models_file=models, include_embedded_models=False,  # type: ignore[call-arg]
                    default_model="toy", queue_max=64, log_level=settings.log_level,
                    telegram_edit_interval_private_s=settings.telegram_edit_interval_private_s,
                    telegram_edit_interval_group_s=settings.telegram_edit_interval_group_s)
    report: dict[str, Any] = {"reply_words": words, "word_delay_s": WORD_DELAY_S,
                              "edit_interval_private_s": base.telegram_edit_interval_private_s, "runs": {}}
    print(f"toy model: {words} words at {1 / WORD_DELAY_S:.0f} words/s "
          f"(generation {words * WORD_DELAY_S:.1f} s a reply, one reply at a time); "
          f"edit interval {base.telegram_edit_interval_private_s:.1f} s")
    print(f"{'chats':>5} {'1st msg max':>12} {'first text p50':>15} {'max':>7} {'final p50':>10} {'max':>7} {'edits/chat':>11} {'errors':>7}")
    for n in CONCURRENCY:
        rows = asyncio.run(_one_round(base, n, words))
        first = [r["first_text_s"] for r in rows]
        final = [r["final_s"] for r in rows]
        summary = {"first_message_max_s": max(r["first_message_s"] for r in rows),
                   "first_text_p50_s": round(statistics.median(first), 3), "first_text_max_s": max(first),
                   "final_p50_s": round(statistics.median(final), 3), "final_max_s": max(final),
                   "edits_per_chat": round(statistics.mean(r["edits"] for r in rows), 1),
                   "errors": sum(r["errors"] for r in rows), "chats": rows}
        report["runs"][str(n)] = summary
        print(f"{n:>5} {summary['first_message_max_s']:>11.2f}s {summary['first_text_p50_s']:>14.2f}s {summary['first_text_max_s']:>6.2f}s "
              f"{summary['final_p50_s']:>9.2f}s {summary['final_max_s']:>6.2f}s "
              f"{summary['edits_per_chat']:>11} {summary['errors']:>7}")
    out = Path(args.out or "bench/telegram.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0
