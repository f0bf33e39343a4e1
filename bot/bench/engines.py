"""`python -m bot bench engines`: load time, memory, first-token latency and decode speed of each local build."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot.engines import CancelToken, ChatMessage, Engine, EngineError, StreamStats, create_engine
from bot.engines.generate import params_for
from bot.models.catalog import profile_files_present

if TYPE_CHECKING:
    from bot.config import Settings

# --- tuning constants ---
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "Give me three tips for learning a new language.",
]
MAX_NEW_TOKENS = 96
QUICK_PROMPTS = 2
QUICK_MAX_NEW_TOKENS = 32
DEFAULT_OUT = "bench/engines.json"
TRANSFORMERS_FORMATS = ("gptq", "awq", "hf")
# Each Transformers build runs twice: as configured (TORCH_COMPILE, on CPU compiled) and eager, to show the gain.
EAGER_SUFFIX = " eager"


@dataclass
class EngineBench:
    model: str
    format: str
    compiled: bool = False
    load_s: float = 0.0
    rss_delta_mb: float = 0.0
    gpu_mb: float = 0.0
    first_token_s: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str = ""
    # llama.cpp's figures for the same prompts, each run just before this build's: host drift cancels out
    paired_first_token_s: list[float] = field(default_factory=list)
    paired_tokens_per_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "median_first_token_s": _median(self.first_token_s),
            "median_tokens_per_s": _median(self.tokens_per_s),
        }

    def ratios(self, baseline: EngineBench | None) -> dict[str, float]:
        """Each figure divided by llama.cpp's (tokens/s > 1 is faster, the rest < 1 is better); speed and latency
        against the llama.cpp runs interleaved with this build's, load and memory against llama.cpp's own."""
        if baseline is None or baseline.error or self.error:
            return {}
        mine, base = self.summary(), baseline.summary()

        def ratio(a: float, b: float) -> float:
            return a / b if b else 0.0

        return {
            "load_s": ratio(self.load_s, baseline.load_s),
            "rss_delta_mb": ratio(self.rss_delta_mb, baseline.rss_delta_mb),
            "first_token_s": ratio(mine["median_first_token_s"],
                                   _median(self.paired_first_token_s) or base["median_first_token_s"]),
            "tokens_per_s": ratio(mine["median_tokens_per_s"],
                                  _median(self.paired_tokens_per_s) or base["median_tokens_per_s"]),
        }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _gpu_mb() -> float:
    try:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    except ImportError:
        return 0.0


def load_engine(settings: Settings, name: str, label: str | None = None) -> tuple[EngineBench, Engine | None]:
    """Load one build, timing it and measuring the memory it added."""
    profile = settings.profiles[name]
    result = EngineBench(label or name, profile.format)
    engine = create_engine(profile, settings)
    gc.collect()
    rss0 = _rss_mb()
    start = time.perf_counter()
    try:
        engine.load()
    except EngineError as exc:
        result.error = str(exc)
        return result, None
    result.load_s = time.perf_counter() - start
    result.rss_delta_mb = _rss_mb() - rss0
    result.compiled = bool(getattr(engine, "compiled", False))
    return result, engine


def run_prompt(settings: Settings, engine: Engine, prompt: str, max_new_tokens: int,
               into: EngineBench | None = None, paired: bool = False) -> None:
    """One greedy chat reply; its first-token latency and decode speed go into `into` (or nowhere: a warm-up)."""
    profile = settings.profiles[engine.name]
    params = params_for(settings, profile, max_new_tokens=max_new_tokens, temperature=0.0)
    stats = StreamStats()
    messages = [ChatMessage("system", settings.system_prompt), ChatMessage("user", prompt)]
    for _ in engine.stream_chat(messages, params, CancelToken(), stats):
        pass
    if into is None:
        return
    first, speed = (into.paired_first_token_s, into.paired_tokens_per_s) if paired else \
        (into.first_token_s, into.tokens_per_s)
    if stats.first_token_s is not None:
        first.append(stats.first_token_s)
    speed.append(stats.extra.get("tokens_per_s", 0.0))
    if not paired:
        into.completion_tokens += stats.completion_tokens


def bench_build(settings: Settings, name: str, prompts: list[str], max_new_tokens: int, label: str | None = None,
                baseline: Engine | None = None) -> EngineBench:
    """Load a build, warm it with one untimed reply, then time each prompt (after llama.cpp's run of it)."""
    result, engine = load_engine(settings, name, label)
    if engine is None:
        return result
    try:
        time_prompts(settings, engine, prompts, max_new_tokens, result, baseline)
        result.gpu_mb = _gpu_mb()
    finally:
        engine.unload()
    return result


def time_prompts(settings: Settings, engine: Engine, prompts: list[str], max_new_tokens: int, into: EngineBench,
                 baseline: Engine | None = None) -> None:
    """One untimed warm-up reply, then each prompt timed (right after `baseline` answers it, when given)."""
    run_prompt(settings, engine, prompts[0], max_new_tokens)
    for prompt in prompts:
        if baseline is not None:
            run_prompt(settings, baseline, prompt, max_new_tokens, into, paired=True)
        run_prompt(settings, engine, prompt, max_new_tokens, into)


def cmd_bench_engines(args: argparse.Namespace, settings: Settings) -> int:
    prompts = PROMPTS[:QUICK_PROMPTS] if args.quick else PROMPTS
    max_new = QUICK_MAX_NEW_TOKENS if args.quick else MAX_NEW_TOKENS
    names = [p.name for p in settings.profiles.values()
             if p.format != "openai" and profile_files_present(p, settings.models_dir)]
    if args.models:
        wanted = [n.strip() for n in args.models.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in settings.profiles]
        if unknown:
            print(f"unknown model(s): {', '.join(unknown)} (configured: {', '.join(settings.profiles)})")
            return 1
        names = [n for n in names if n in wanted]
    if not names:
        print("no local model builds found; run `python -m bot models prepare` first")
        return 1
    results: list[EngineBench] = []
    baseline: EngineBench | None = None
    base_engine: Engine | None = None
    base_name = next((n for n in names if settings.profiles[n].format == "gguf"), None)
    if base_name:  # stays loaded: its runs are interleaved with every other build's
        baseline, base_engine = load_engine(settings, base_name)
        results.append(baseline)
        if base_engine is not None:
            time_prompts(settings, base_engine, prompts, max_new, baseline)
    try:
        for name in names:
            if name == base_name:
                continue
            results.append(bench_build(settings, name, prompts, max_new, baseline=base_engine))
            if settings.profiles[name].format in TRANSFORMERS_FORMATS and results[-1].compiled:
                eager = settings.model_copy(update={"torch_compile": "off"})
                results.append(bench_build(eager, name, prompts, max_new, label=name + EAGER_SUFFIX,
                                           baseline=base_engine))
    finally:
        if base_engine is not None:
            base_engine.unload()
    if baseline is not None and baseline.error:
        baseline = None
    print(f"{'model':20} {'load s':>7} {'RSS MB':>7} {'GPU MB':>7} {'1st tok s':>9} {'tok/s':>7}  "
          f"{'vs llama.cpp: tok/s':>19} {'1st tok':>7} {'load':>6} {'RSS':>5}")
    for r in results:
        if r.error:
            print(f"{r.model:20} error: {r.error}")
            continue
        s, x = r.summary(), r.ratios(baseline)
        versus = (f"{x['tokens_per_s']:18.2f}x {x['first_token_s']:6.2f}x {x['load_s']:5.1f}x {x['rss_delta_mb']:4.1f}x"
                  if x else "")
        print(f"{r.model:20} {r.load_s:7.2f} {r.rss_delta_mb:7.0f} {r.gpu_mb:7.0f} "
              f"{s['median_first_token_s']:9.3f} {s['median_tokens_per_s']:7.1f}  {versus}")
    out = Path(args.out or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "prompts": len(prompts), "max_new_tokens": max_new, "baseline": baseline.model if baseline else None,
               "results": [dict(asdict(r), **r.summary(), vs_llamacpp=r.ratios(baseline)) for r in results]}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0
