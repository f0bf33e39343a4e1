"""`python -m bot bench concurrency`: many chats asking at once, through the chat service and the real builds.

For 1, 2, 4 and 8 chats asking at the same moment (the same question and different ones; greedy and sampled;
a fixed token budget) it reports aggregate and per-chat tokens/s, time to first text p50/p95 and peak memory,
with ratios to one chat in the same run. The aggregate's ratio is paired: every try of several chats is bracketed by
a one-chat try just before and after and divides by their mean, so the host's drift over minutes (one chat ran 46 to
67 tok/s in two runs of session 9) moves both sides alike; the other ratios divide by the one-chat row (median of 3).
The engine batches them (MAX_BATCH). Then a chat asks while 7 others decode ("joiner"), several times: how soon its
first text comes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot.core.messages import IncomingMessage, ReplyStatus
from bot.engines.recording import RecordingEngine
from bot.models.catalog import profile_files_present

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings
    from bot.engines.base import Engine

# --- tuning constants ---
CHATS = (1, 2, 4, 8)
QUICK_CHATS = (1, 4)
MAX_NEW_TOKENS = 96
QUICK_MAX_NEW_TOKENS = 32
DEFAULT_MODELS = ("smollm2-gptq", "smollm2-awq")
QUESTIONS = (
    "Write a short story about a dragon who learns to cook.",
    "Explain how a bicycle works, step by step.",
    "Describe a day at the beach with your family.",
    "What are the benefits of regular exercise?",
    "Tell me about the history of Rome.",
    "Write a poem about autumn leaves falling.",
    "How do I bake bread at home?",
    "Tell me a story about a brave knight.",
)
SAME_QUESTION = QUESTIONS[0]
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.7, "top_p": 0.9}}
ONE_CHAT_REPEATS = 3  # the one-chat row: the median of 3 (one 2-second reply drifts with the host)
JOINER_REPEATS = 5  # a chat asking while the others decode, this many times (fresh runners each time): its p95
MEMORY_SAMPLE_S = 0.05
DEFAULT_OUT = "bench/concurrency.json"


@dataclass
class TimingSink:
    """A ReplySink that keeps when the first text and the end arrived."""

    start: float
    first_text_s: float | None = None
    done_s: float | None = None
    status: ReplyStatus | None = None

    async def queued(self, position: int, eta_s: float | None) -> None: ...

    async def started(self) -> None: ...

    async def update(self, text: str) -> None:
        if self.first_text_s is None and text.strip():
            self.first_text_s = time.perf_counter() - self.start

    async def finish(self, text: str, status: ReplyStatus) -> None:
        self.done_s, self.status = time.perf_counter() - self.start, status

    async def error(self, message: str) -> None:
        self.done_s = time.perf_counter() - self.start

    async def notice(self, text: str) -> None: ...


@dataclass
class Scenario:
    model: str
    mode: str
    prompts: str  # "same" or "different"
    chats: int
    max_batch: int
    wall_s: float = 0.0
    tokens: int = 0
    aggregate_tokens_per_s: float = 0.0
    per_chat_tokens_per_s: float = 0.0
    first_text_p50_s: float = 0.0
    first_text_p95_s: float = 0.0
    peak_rss_delta_mb: float = 0.0
    peak_batch: int = 0
    failed: int = 0
    others_decoding: float = 0.0  # joiner: how many replies were decoding, on average, when it asked
    baseline_tokens_per_s: float = 0.0  # one chat, the mean of the tries just before and after this one (0: none)
    ratios: dict[str, float] = field(default_factory=dict)


class PeakMemory:
    """Samples this process's RSS (and the GPU's allocation) in the background; the peak above the start."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._base = self._now()
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="bench-memory")

    def _now(self) -> float:
        mb = self._process.memory_info().rss / 2**20
        try:
            import torch

            if torch.cuda.is_available():
                mb += torch.cuda.memory_allocated() / 2**20
        except ImportError:
            pass
        return mb

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_S):
            self.peak = max(self.peak, self._now() - self._base)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def ask_at_once(service: object, engine: RecordingEngine, questions: list[str], run: int) -> Scenario:
    """Every chat sends its question at the same moment; waits for all replies. Each question starts with the
    try's number: the engine's prefix cache then finds the system prompt in earlier tries' replies, as it would
    for new people asking, and not a whole earlier prompt (which a repeated benchmark question would be)."""
    from bot.core.service import ChatService

    assert isinstance(service, ChatService)
    before = len(engine.runs)
    start = time.perf_counter()
    sinks = [TimingSink(start) for _ in questions]
    with PeakMemory() as memory:
        await asyncio.gather(*(service.handle(IncomingMessage("bench", f"r{run}-c{i}", f"r{run}-u{i}", "Bench",
                                                              f"#{run}: {q}"), s)
                               for i, (q, s) in enumerate(zip(questions, sinks))))
    wall = time.perf_counter() - start
    runs = engine.runs[before:]
    tokens = sum(r.completion_tokens for r in runs)
    per_chat = [r.completion_tokens / s.done_s for r, s in zip(runs, sinks) if s.done_s]
    firsts = [s.first_text_s for s in sinks if s.first_text_s is not None]
    scenario = Scenario("", "", "", len(questions), 0, wall_s=wall, tokens=tokens,
                        aggregate_tokens_per_s=tokens / wall if wall else 0.0,
                        per_chat_tokens_per_s=statistics.mean(per_chat) if per_chat else 0.0,
                        first_text_p50_s=percentile(firsts, 0.5), first_text_p95_s=percentile(firsts, 0.95),
                        peak_rss_delta_mb=memory.peak,
                        failed=sum(s.status != ReplyStatus.COMPLETE for s in sinks))
    return scenario


async def bracketed(service: object, engine: RecordingEngine, questions: list[str], alone: list[str],
                    run: int) -> Scenario:
    """The chats asking at once, with one chat asking `alone` just before and just after: the scenario, its
    baseline the mean of those two."""
    before = await ask_at_once(service, engine, alone, run=run + 1)
    scenario = await ask_at_once(service, engine, questions, run=run + 2)
    after = await ask_at_once(service, engine, alone, run=run + 3)
    scenario.baseline_tokens_per_s = (before.aggregate_tokens_per_s + after.aggregate_tokens_per_s) / 2
    return scenario


async def join_while_decoding(service: object, engine: RecordingEngine, running: int, run: int) -> Scenario:
    """`running` chats ask at once; once each has its first text, one more chat asks: its time to first text,
    :data:`JOINER_REPEATS` times."""
    from bot.core.service import ChatService

    assert isinstance(service, ChatService)
    before = len(engine.runs)
    firsts: list[float] = []
    others: list[int] = []
    failed = 0
    start = time.perf_counter()
    with PeakMemory() as memory:
        for rep in range(JOINER_REPEATS):
            sinks = [TimingSink(time.perf_counter()) for _ in range(running)]
            tag = f"#{run}-{rep}: "  # (see ask_at_once)
            tasks = [asyncio.create_task(service.handle(
                IncomingMessage("bench", f"j{run}-{rep}-c{i}", f"j{run}-{rep}-u{i}", "Bench", tag + QUESTIONS[i]),
                sink))
                for i, sink in enumerate(sinks)]
            while any(s.first_text_s is None and s.done_s is None for s in sinks):
                await asyncio.sleep(0.005)
            others.append(sum(s.done_s is None for s in sinks))
            joiner = TimingSink(time.perf_counter())
            await service.handle(IncomingMessage("bench", f"j{run}-{rep}-join", f"j{run}-{rep}-ujoin", "Bench",
                                                 tag + QUESTIONS[running % len(QUESTIONS)]), joiner)
            await asyncio.gather(*tasks)
            if joiner.first_text_s is not None:
                firsts.append(joiner.first_text_s)
            failed += sum(s.status != ReplyStatus.COMPLETE for s in [*sinks, joiner])
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in engine.runs[before:])
    return Scenario("", "", "joiner", running + 1, 0, wall_s=wall, tokens=tokens,
                    aggregate_tokens_per_s=tokens / wall if wall else 0.0,
                    first_text_p50_s=percentile(firsts, 0.5), first_text_p95_s=percentile(firsts, 0.95),
                    peak_rss_delta_mb=memory.peak, failed=failed,
                    others_decoding=statistics.mean(others) if others else 0.0)


async def bench_model(settings: Settings, name: str, chats: tuple[int, ...], max_new: int) -> list[Scenario]:
    from bot.core.service import ChatService
    from bot.engines import create_engine

    results: list[Scenario] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, sampling in MODES.items():
            run_settings = settings.model_copy(update={
                "default_model": name, "max_new_tokens": max_new, "database_url": f"sqlite+aiosqlite:///{tmp}/b.db",
                "queue_max": max(chats) * 2, **sampling})
            engines: list[RecordingEngine] = []

            def factory(profile: ModelProfile, s: Settings = run_settings) -> Engine:
                engines.append(RecordingEngine(create_engine(profile, s)))
                return engines[-1]

            async with ChatService(run_settings, engine_factory=factory) as service:
                engine = engines[-1]
                await ask_at_once(service, engine, [SAME_QUESTION], run=-1)  # settle caches after the warm-up
                for prompts in ("same", "different"):
                    for i, n in enumerate(chats):
                        questions = [SAME_QUESTION] * n if prompts == "same" else list(QUESTIONS[:n])
                        scheduler = getattr(engine.inner, "scheduler", None)
                        if scheduler is not None:
                            scheduler.peak_rows = 0
                        run = (len(results) * 10 + i) * 10
                        if n == 1:
                            tries = [await ask_at_once(service, engine, questions, run=run + k)
                                     for k in range(ONE_CHAT_REPEATS)]
                            scenario = sorted(tries, key=lambda t: t.aggregate_tokens_per_s)[len(tries) // 2]
                        else:
                            scenario = await bracketed(service, engine, questions, questions[:1], run)
                        scenario.model, scenario.mode, scenario.prompts = name, mode, prompts
                        scenario.max_batch = getattr(engine.inner, "max_batch", 1)
                        scenario.peak_batch = scheduler.peak_rows if scheduler is not None else 1
                        results.append(scenario)
                        print_row(scenario, results, flush=True)
                if max(chats) > 1:
                    scheduler = getattr(engine.inner, "scheduler", None)
                    if scheduler is not None:
                        scheduler.peak_rows = 0
                    scenario = await join_while_decoding(service, engine, max(chats) - 1, run=len(results))
                    scenario.model, scenario.mode = name, mode
                    scenario.max_batch = getattr(engine.inner, "max_batch", 1)
                    scenario.peak_batch = scheduler.peak_rows if scheduler is not None else 1
                    results.append(scenario)
                    print_row(scenario, results, flush=True)
    add_ratios(results)
    return results


def one_chat(s: Scenario, results: list[Scenario]) -> Scenario | None:
    """The one-chat row of the same model, mode and prompts in this run."""
    return next((r for r in results if (r.model, r.mode, r.prompts, r.chats) == (s.model, s.mode, s.prompts, 1)),
                None)


def aggregate_ratio(s: Scenario, one: Scenario | None) -> float:
    """Aggregate tokens/s against one chat: the tries bracketing this one where it has them, else the one-chat row."""
    base = s.baseline_tokens_per_s or (one.aggregate_tokens_per_s if one else 0.0)
    return s.aggregate_tokens_per_s / base if base else 0.0


def add_ratios(results: list[Scenario]) -> None:
    """Each scenario against one chat of the same model, mode and prompts, measured in the same run."""
    for s in results:
        one = one_chat(s, results)
        if one is None or not one.aggregate_tokens_per_s:
            continue
        s.ratios = {"aggregate_tokens_per_s": aggregate_ratio(s, one),
                    "per_chat_tokens_per_s": s.per_chat_tokens_per_s / one.per_chat_tokens_per_s
                    if one.per_chat_tokens_per_s else 0.0,
                    "first_text_p95_s": s.first_text_p95_s / one.first_text_p95_s if one.first_text_p95_s else 0.0}


HEADER = (f"{'model':<14} {'mode':<8} {'prompts':<9} {'chats':>5} {'batch':>5} {'agg tok/s':>9} {'x1':>5} "
          f"{'chat tok/s':>10} {'ttft p50':>8} {'ttft p95':>8} {'peak MB':>7} {'failed':>6}")


def print_row(s: Scenario, results: list[Scenario], flush: bool = False) -> None:
    if len(results) == 1:
        print(HEADER)
    x1 = aggregate_ratio(s, one_chat(s, results))
    print(f"{s.model:<14} {s.mode:<8} {s.prompts:<9} {s.chats:>5} {s.peak_batch:>5} {s.aggregate_tokens_per_s:>9.1f} "
          f"{x1:>5.2f} {s.per_chat_tokens_per_s:>10.1f} {s.first_text_p50_s:>8.2f} {s.first_text_p95_s:>8.2f} "
          f"{s.peak_rss_delta_mb:>7.0f} {s.failed:>6}", flush=flush)


def built_models(settings: Settings, requested: str | None, defaults: tuple[str, ...]) -> list[str]:
    """The comma-separated builds asked for (or `defaults`) that are built; says so when none is."""
    wanted = [n.strip() for n in (requested.split(",") if requested else defaults) if n.strip()]
    names = [n for n in wanted if n in settings.profiles and profile_files_present(settings.profiles[n],
                                                                                    settings.models_dir)]
    if not names:
        print(f"none of {', '.join(wanted)} is built; run `python -m bot models prepare` first")
    return names


def cmd_bench_concurrency(args: argparse.Namespace, settings: Settings) -> int:
    chats = QUICK_CHATS if args.quick else CHATS
    max_new = QUICK_MAX_NEW_TOKENS if args.quick else MAX_NEW_TOKENS
    names = built_models(settings, args.models, DEFAULT_MODELS)
    if not names:
        return 1
    settings = settings.model_copy(update={"max_batch": max(settings.max_batch, max(chats))})
    results: list[Scenario] = []
    for name in names:
        results += asyncio.run(bench_model(settings, name, chats, max_new))
    out = Path(args.out or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "processor": platform.processor()},
                               "max_new_tokens": max_new, "scenarios": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {out}")
    return 0 if all(r.failed == 0 for r in results) else 1
