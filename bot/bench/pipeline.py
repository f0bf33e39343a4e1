"""`python -m bot bench pipeline`: the whole service (queue, history, prompt) vs the raw engine.

Same model, same greedy prompts, one run: decode tokens/s through the service as a fraction of the
engine's own, and the latency from handing a message to the service to its first text beyond the
engine's own time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from bot.config import Settings
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.engines import create_engine
from bot.engines.base import CancelToken, ChatMessage, Engine, GenerationParams, StreamStats
from bot.engines.recording import RecordingEngine

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a short poem about the sea.",
    "Explain what a computer does in two sentences.",
]
MAX_NEW_TOKENS = 64
SERVICE_COST_TARGET = 0.05  # the service may cost at most 5% of decode speed
FIRST_TEXT_TARGET_MS = 100.0


class TimingSink:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.last = self.t0
        self.status: ReplyStatus | None = None

    async def queued(self, position: int, eta_s: float | None) -> None: ...

    async def started(self) -> None: ...

    async def update(self, text: str) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.status = status

    async def error(self, message: str) -> None:
        self.status = ReplyStatus.FAILED

    async def notice(self, text: str) -> None: ...


def _decode_rate(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0


def raw_engine_runs(engine: Engine, params: GenerationParams, system: str) -> list[dict[str, float]]:
    rows = []
    for prompt in PROMPTS:
        stats = StreamStats()
        t0 = time.perf_counter()
        first = last = None
        for _ in engine.stream_chat([ChatMessage("system", system), ChatMessage("user", prompt)], params,
                                    CancelToken(), stats):
            last = time.perf_counter()
            first = first or last
        assert first is not None and last is not None
        rows.append({"ttft_s": first - t0, "tokens": stats.completion_tokens,
                     "tok_s": _decode_rate(stats.completion_tokens, first, last)})
    return rows


async def service_runs(settings: Settings, timed: RecordingEngine) -> list[dict[str, float]]:
    rows = []
    async with ChatService(settings, engine_factory=lambda _p: timed) as service:
        for i, prompt in enumerate(PROMPTS):
            sink = TimingSink()
            await service.handle(IncomingMessage("bench", f"chat{i}", "u", "bench", prompt), sink)
            stats = timed.runs[-1]
            assert sink.first is not None and sink.status == ReplyStatus.COMPLETE
            first_text = sink.first - sink.t0
            rows.append({"first_text_s": first_text, "engine_ttft_s": stats.first_token_s or 0.0,
                         "overhead_ms": (first_text - (stats.first_token_s or 0.0)) * 1000,
                         "tokens": stats.completion_tokens,
                         "tok_s": _decode_rate(stats.completion_tokens, sink.first, sink.last)})
    return rows


def cmd_bench_pipeline(args: argparse.Namespace, settings: Settings) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        settings = settings.model_copy(update={
            "database_url": f"sqlite+aiosqlite:///{tmp}/bench.db", "temperature": 0.0,
            "max_new_tokens": 16 if args.quick else MAX_NEW_TOKENS})
        profile = settings.profiles[settings.default_model]
        gen = settings.generation_for(profile)
        params = GenerationParams(max_new_tokens=gen.max_new_tokens, temperature=0.0, top_p=1.0,
                                  repetition_penalty=gen.repetition_penalty)
        engine = create_engine(profile, settings)
        engine.load()
        raw_engine_runs(engine, params, settings.system_prompt)  # warm-up
        raw = raw_engine_runs(engine, params, settings.system_prompt)
        timed = RecordingEngine(engine)
        served = asyncio.run(service_runs(settings, timed))
        timed.unload()
    raw_rate = statistics.mean(r["tok_s"] for r in raw)
    svc_rate = statistics.mean(r["tok_s"] for r in served)
    result = {
        "model": profile.name,
        "raw_engine": {"tok_s": raw_rate, "ttft_s": statistics.mean(r["ttft_s"] for r in raw), "runs": raw},
        "service": {"tok_s": svc_rate, "first_text_s": statistics.mean(r["first_text_s"] for r in served),
                    "runs": served},
        "service_cost": 1 - svc_rate / raw_rate if raw_rate else None,
        "first_text_overhead_ms": statistics.median(r["overhead_ms"] for r in served),
        "targets": {"service_cost_max": SERVICE_COST_TARGET, "first_text_overhead_ms_max": FIRST_TEXT_TARGET_MS},
    }
    print(f"model {profile.name}: {len(PROMPTS)} prompts, greedy, max {params.max_new_tokens} new tokens")
    print(f"{'path':<12}{'decode tok/s':>14}{'first text (s)':>16}")
    print(f"{'raw engine':<12}{raw_rate:>14.1f}{result['raw_engine']['ttft_s']:>16.3f}")
    print(f"{'service':<12}{svc_rate:>14.1f}{result['service']['first_text_s']:>16.3f}")
    cost = result["service_cost"]
    print(f"service cost: {cost * 100:.1f}% of decode speed (target <= {SERVICE_COST_TARGET * 100:.0f}%)")
    print(f"first-text latency beyond engine TTFT: {result['first_text_overhead_ms']:.1f} ms "
          f"(median; target <= {FIRST_TEXT_TARGET_MS:.0f} ms)")
    out = Path(args.out or "bench/pipeline.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0
