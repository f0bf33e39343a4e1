"""`python -m bot bench batching`: our batched decode loop against Transformers' continuous-batching manager.

Issue #15 item 3 asks to choose between the two by measurement on a GPU. Both run on the same loaded build (one
load): ours through the engine's `stream_chat`, one caller thread per reply, as the chat service drives it;
Transformers' through `model.generate_batch` (paged attention; on CUDA it captures CUDA graphs first), called on the
engine thread. Greedy, repetition penalty 1.0 (the manager has none), the same prompts and token budget. Reported per
batch size: aggregate decode tokens/s of each (the manager's from its requests' own start/finish times, so its set-up
and graph capture are left out; ours from wall time, prefill included, which only favours the manager) and how many
of the batch's greedy replies are the same text in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.bench.concurrency import QUESTIONS, built_models
from bot.bench.engines import load_engine
from bot.engines import CancelToken, ChatMessage, GenerationParams, StreamStats

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.engines.transformers_engine import TransformersEngine

# --- tuning constants ---
BATCHES = (1, 2, 4, 8, 16)
QUICK_BATCHES = (1, 4)
MAX_NEW_TOKENS = 96
QUICK_MAX_NEW_TOKENS = 24
DEFAULT_MODELS = ("smollm2-gptq", "smollm2-awq")
DEFAULT_OUT = "bench/batching.json"


@dataclass
class Row:
    model: str
    batch: int
    ours_tokens_per_s: float = 0.0
    manager_tokens_per_s: float = 0.0
    ours_tokens: int = 0
    manager_tokens: int = 0
    same_text: int = 0  # replies whose greedy text is identical in both
    error: str = ""


@dataclass
class ModelResult:
    model: str
    kernels: str | None = None
    device: str = ""
    rows: list[Row] = field(default_factory=list)
    error: str = ""


def prompts_for(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (take {i // len(QUESTIONS) + 1})")
            for i in range(n)]


def run_ours(engine: TransformersEngine, messages: list[list[ChatMessage]], params: GenerationParams
             ) -> tuple[list[str], int, float]:
    """Every reply at once through the engine's batch, one caller thread each: texts, tokens, seconds."""
    texts = [""] * len(messages)
    stats = [StreamStats() for _ in messages]

    def reply(i: int) -> None:
        texts[i] = "".join(engine.stream_chat(messages[i], params, CancelToken(), stats[i]))

    threads = [threading.Thread(target=reply, args=(i,)) for i in range(len(messages))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts, sum(s.completion_tokens for s in stats), time.perf_counter() - start


def run_manager(engine: TransformersEngine, messages: list[list[ChatMessage]], max_new_tokens: int
                ) -> tuple[list[str], int, float]:
    """The same replies through Transformers' continuous batching, on the engine thread: texts, tokens, seconds from
    the first request's start to the last one's finish."""
    from transformers import GenerationConfig

    inputs = [engine.prompt_ids(m) for m in messages]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=engine._eos_ids,
                              pad_token_id=engine.tokenizer.pad_token_id or engine._eos_ids[0])

    def generate() -> dict[str, Any]:
        return engine.model.generate_batch(inputs, generation_config=config, progress_bar=False)

    outputs = list(engine.thread.call(generate).values())
    if len(outputs) != len(inputs) or any(o.error for o in outputs):
        raise RuntimeError(f"generate_batch answered {len(outputs)} of {len(inputs)} requests: "
                           f"{[o.error for o in outputs if o.error][:1]}")
    texts = [engine.tokenizer.decode([t for t in o.generated_tokens if t not in engine._eos_ids],
                                     skip_special_tokens=True) for o in outputs]
    seconds = max(o.lifespan[1] for o in outputs) - min(o.lifespan[0] for o in outputs)
    return texts, sum(len(o.generated_tokens) for o in outputs), seconds


def bench_model(settings: Settings, name: str, batches: tuple[int, ...], max_new: int) -> ModelResult:
    """Load once; per batch size, a warm-up of each side, then each side timed."""
    result = ModelResult(name)
    loaded, engine = load_engine(settings, name)
    if engine is None:
        result.error = loaded.error
        return result
    try:
        result.kernels = engine.kernel_summary()
        result.device = str(engine.model.device)
        params = GenerationParams(max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.0)
        for n in batches:
            messages = [[ChatMessage("system", settings.system_prompt), ChatMessage("user", p)]
                        for p in prompts_for(n)]
            row = Row(name, n)
            result.rows.append(row)
            run_ours(engine, messages, params)
            ours, row.ours_tokens, seconds = run_ours(engine, messages, params)
            row.ours_tokens_per_s = row.ours_tokens / seconds
            try:
                run_manager(engine, messages, max_new)
                theirs, row.manager_tokens, seconds = run_manager(engine, messages, max_new)
                row.manager_tokens_per_s = row.manager_tokens / seconds if seconds > 0 else 0.0
                row.same_text = sum(a.strip() == b.strip() for a, b in zip(ours, theirs))
            except Exception as exc:  # noqa: BLE001 - the manager's failure is a result, not a crash
                row.error = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {name} batch {n}: ours {row.ours_tokens_per_s:.0f} tok/s, manager "
                  f"{row.manager_tokens_per_s:.0f} tok/s, same text {row.same_text}/{n} {row.error}", flush=True)
    finally:
        engine.unload()
    return result


def print_table(results: list[ModelResult]) -> None:
    print(f"{'model':<14} {'batch':>5} {'ours tok/s':>11} {'manager tok/s':>14} {'ours/manager':>13} {'same':>6}")
    for result in results:
        if result.error:
            print(f"{result.model:<14} failed to load: {result.error}")
        for r in result.rows:
            ratio = r.ours_tokens_per_s / r.manager_tokens_per_s if r.manager_tokens_per_s else 0.0
            print(f"{r.model:<14} {r.batch:>5} {r.ours_tokens_per_s:>11.0f} {r.manager_tokens_per_s:>14.0f} "
                  f"{ratio:>13.2f} {r.same_text:>3}/{r.batch:<2}" + (f"  manager: {r.error}" if r.error else ""))


def cmd_bench_batching(args: argparse.Namespace, settings: Settings) -> int:
    batches = QUICK_BATCHES if args.quick else BATCHES
    max_new = QUICK_MAX_NEW_TOKENS if args.quick else MAX_NEW_TOKENS
    names = built_models(settings, args.models, DEFAULT_MODELS)
    if not names:
        return 1
    settings = settings.model_copy(update={"max_batch": max(settings.max_batch, max(batches))})
    results = [bench_model(settings, name, batches, max_new) for name in names]
    print_table(results)
    out = Path(args.out or DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"platform": platform.platform(), "processor": platform.processor()},
                               "max_new_tokens": max_new, "results": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {out}")
    return 0 if all(not r.error for r in results) else 1
