"""Continuous batching on the real GPTQ build, compiled as a CPU user gets it: several replies decode in one
loop; each is what it would be alone, joins and leaves at any step, and keeps its own settings."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from bot.config import Settings
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.engines import CancelToken, ChatMessage, EngineError, GenerationParams, StreamStats, create_engine
from bot.engines.batching import Request
from bot.engines.transformers_engine import TransformersEngine
from bot.models.prepare import prepare
from tests.models_fixture import shared_models_dir
from tests.sinks import RecordingSink

pytestmark = pytest.mark.slow

SHARED_BUILDS = shared_models_dir()
GREEDY = GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.1)
QUESTIONS = ["What is the capital of France?",  # prompts of different lengths: the shorter ones are padded
             "Write a haiku about the sea.",
             "Explain what a CPU does in two sentences, for a child who is eight years old and curious.",
             "List three fruits."]
# Where a batched greedy reply parts from the same reply alone, the alone run's two candidates must be a near tie:
# bf16 logits of ~20-30 are spaced 0.125 apart, and padding changes the rounding of a sum by an ulp or two.
NEAR_TIE = 0.5


@pytest.fixture(scope="module")
def engine() -> Iterator[TransformersEngine]:
    prepare(SHARED_BUILDS, ["gptq"])
    settings = Settings(models_dir=SHARED_BUILDS, _env_file=None, torch_compile="auto",  # type: ignore[call-arg]
                        max_batch=8)
    eng = create_engine(settings.profiles["smollm2-gptq"], settings)
    assert isinstance(eng, TransformersEngine)
    eng.load()
    from torch._dynamo.utils import counters

    eng.graphs_at_load = counters["stats"]["unique_graphs"]  # type: ignore[attr-defined]
    yield eng
    eng.unload()


class Scores:
    """Records, per request, each sampled token and the scores it was picked from."""

    def __init__(self, engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        scheduler = engine.scheduler
        assert scheduler is not None
        # Keyed by the request itself, which keeps it alive: an id() could be reused by the next request once the
        # last one is freed, and its steps would then land in the earlier request's list.
        self.steps: dict[Request, list[tuple[int, torch.Tensor]]] = {}
        pick = scheduler._pick

        def recording(rows: list[Any], scores: torch.Tensor) -> torch.Tensor:
            tokens = pick(rows, scores)
            for row, token, row_scores in zip(rows, tokens.tolist(), scores, strict=True):
                self.steps.setdefault(row.request, []).append((token, row_scores))
            return tokens

        monkeypatch.setattr(scheduler, "_pick", recording)

    def of(self, request: Request) -> list[tuple[int, torch.Tensor]]:
        return self.steps[request]


def request_for(engine: TransformersEngine, question: str, params: GenerationParams = GREEDY) -> Request:
    return Request(engine.prompt_ids([ChatMessage("user", question)]), params, params.max_new_tokens, CancelToken())


def run(engine: TransformersEngine, requests: list[Request]) -> list[list[int]]:
    """Submit all at once (they share the batch) and collect each one's tokens."""
    assert engine.scheduler is not None
    for request in requests:
        engine.scheduler.submit(request)
    return [list(request.stream()) for request in requests]


def assert_same_or_near_tie(alone: list[tuple[int, torch.Tensor]], batched: list[int],
                            end_ids: frozenset[int]) -> None:
    for step, ((token, scores), other) in enumerate(zip(alone, batched)):
        if token != other:
            assert_near_tie(scores, token, [other], step)
            return
    if len(alone) - len(batched) > 1:  # the batched reply ended first: it picked an end-of-turn token here
        token, scores = alone[len(batched)]
        assert_near_tie(scores, token, sorted(end_ids), len(batched))
    # (alone's last pick may be the end-of-turn token, never emitted)


def assert_near_tie(scores: torch.Tensor, token: int, others: list[int], step: int) -> None:
    gap = min(float(scores[token] - scores[other]) for other in others)
    assert gap <= NEAR_TIE, f"parted at step {step} on a gap of {gap:.3f}: not a near tie"


def test_greedy_replies_in_a_batch_equal_the_same_replies_alone(engine: TransformersEngine,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scores = Scores(engine, monkeypatch)
    # Batching alone: with the prefix cache the batch would start from the rows the replies alone left behind
    # (its own test below), and its prompts' last token would be computed apart from the rest.
    monkeypatch.setattr(engine.scheduler, "prefix_cache", None)
    alone = []
    for question in QUESTIONS:
        request = request_for(engine, question)
        run(engine, [request])
        alone.append(scores.of(request))
    engine.scheduler.peak_rows = 0
    together = [request_for(engine, q) for q in QUESTIONS]
    batched = run(engine, together)
    assert engine.scheduler.peak_rows == len(QUESTIONS)  # they really shared the batch
    together_for = []  # tokens each reply shares with itself alone before they part (on a near tie, checked)
    for steps, tokens in zip(alone, batched):
        assert_same_or_near_tie(steps, tokens, engine.scheduler.end_ids)
        mine = [t for t, _ in steps]
        together_for.append(next((i for i, (a, b) in enumerate(zip(mine, tokens)) if a != b), len(tokens)))
    # Near ties are not the rule: some reply stays the same for a good stretch. (Token for token equal is too much to
    # ask of a 135M model on 8-bit activations, where a last-bit difference can flip an activation's code: a fresh
    # build's four replies parted at tokens 0, 3, 13 and 35 of 30-40, each on a near tie.)
    assert max(together_for) >= 10, together_for


def test_a_chat_s_next_turn_reuses_its_first_turn_and_gets_the_same_reply(engine: TransformersEngine,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix cache keeps a finished reply's row: the chat's next prompt (the first turn, the reply, a new
    question) computes only what is new, and its greedy reply is the one the whole prompt gives (up to a near tie:
    the kept keys were computed one token at a time, the whole prompt's in one forward)."""
    kept = engine.scheduler.prefix_cache
    assert kept is not None
    first = [ChatMessage("user", "What is the capital of France?")]
    reply = engine.chat(first, GREEDY)
    second = engine.prompt_ids([*first, ChatMessage("assistant", reply), ChatMessage("user", "And of Italy?")])
    scores = Scores(engine, monkeypatch)
    reused = kept.reused_tokens
    with_kept = Request(second, GREEDY, GREEDY.max_new_tokens, CancelToken())
    tokens = run(engine, [with_kept])[0]
    assert kept.reused_tokens - reused >= len(engine.prompt_ids(first))  # the whole first turn, at least
    monkeypatch.setattr(engine.scheduler, "prefix_cache", None)
    whole = Request(second, GREEDY, GREEDY.max_new_tokens, CancelToken())
    run(engine, [whole])
    assert tokens
    assert_same_or_near_tie(scores.of(whole), tokens, engine.scheduler.end_ids)


def test_a_reply_joining_a_running_batch_starts_before_the_others_finish(engine: TransformersEngine) -> None:
    long = GenerationParams(max_new_tokens=80, temperature=0.0, repetition_penalty=1.0)
    running = [request_for(engine, "Count from one to one hundred in words.", long) for _ in range(2)]
    for request in running:
        engine.scheduler.submit(request)
    first_tokens = [next(request.stream()) for request in running]  # both decoding now
    assert all(isinstance(t, int) for t in first_tokens)
    joiner = request_for(engine, "Say hello.")
    engine.scheduler.submit(joiner)
    next(joiner.stream())  # its first token ...
    assert all(not r.finish for r in running)  # ... while the running replies are still going
    assert engine.scheduler.active >= 2
    for request in [*running, joiner]:
        list(request.stream())
    assert all(r.finish in ("stop", "length") for r in [*running, joiner])


def test_stop_of_one_reply_leaves_the_others_unaffected(engine: TransformersEngine,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    scores = Scores(engine, monkeypatch)
    params = GenerationParams(max_new_tokens=48, temperature=0.0, repetition_penalty=1.1)
    alone = request_for(engine, QUESTIONS[2], params)
    run(engine, [alone])
    stopped, kept = request_for(engine, "Tell me a long story about a dragon.", params), \
        request_for(engine, QUESTIONS[2], params)
    engine.scheduler.submit(stopped)
    engine.scheduler.submit(kept)
    got = []
    for token in stopped.stream():
        got.append(token)
        if len(got) == 5:
            stopped.cancel.cancel()
    assert stopped.finish == "cancelled" and len(got) <= 5 + 2  # within a step or two of the /stop
    rest = list(kept.stream())
    assert kept.finish in ("stop", "length")
    assert_same_or_near_tie(scores.of(alone), rest, engine.scheduler.end_ids)


def test_greedy_and_sampled_replies_in_one_batch_follow_their_own_settings(engine: TransformersEngine) -> None:
    sampled = GenerationParams(max_new_tokens=24, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=7)
    other_seed = GenerationParams(max_new_tokens=24, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=8)
    question = "Write one sentence about cats."

    def once() -> list[list[int]]:
        # The same company in the same shapes: the greedy row may reuse what the prefix cache kept, which moves
        # the batch's padding and so the float rounding every row sees; an empty cache before each run keeps it still.
        engine.scheduler.prefix_cache.clear()
        return run(engine, [request_for(engine, question, GREEDY), request_for(engine, question, sampled),
                            request_for(engine, question, other_seed)])

    runs = [once() for _ in range(2)]
    (greedy_a, seven_a, eight_a), (greedy_b, seven_b, eight_b) = runs
    assert seven_a == seven_b and eight_a == eight_b  # a seed reproduces its reply, in whatever company
    assert seven_a != eight_a  # and seeds differ
    alone = run(engine, [request_for(engine, question, GREEDY)])[0]
    assert greedy_a[:8] == alone[:8] and greedy_a != seven_a  # the greedy row stays greedy beside sampled ones


def failing_once(fn: Any, error: Exception) -> Any:
    """`fn`, except that its first call raises `error`."""
    failures = iter([error])

    def call(*args: Any) -> Any:
        pending = next(failures, None)
        if pending is not None:
            raise pending
        return fn(*args)

    return call


def test_an_error_in_a_batched_step_fails_its_replies_and_the_engine_goes_on(engine: TransformersEngine,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    forwards = engine.scheduler.model
    monkeypatch.setattr(forwards, "decode", failing_once(forwards.decode, RuntimeError("out of memory (simulated)")))
    stats = [StreamStats(), StreamStats()]

    def ask(i: int) -> str | Exception:
        try:
            return "".join(engine.stream_chat([ChatMessage("user", QUESTIONS[i])], GREEDY, CancelToken(), stats[i]))
        except EngineError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(ask, range(2)))
    failed = [r for r in results if isinstance(r, EngineError)]
    assert failed, results  # the step's replies fail with the engine's polite error ...
    assert all("failed while writing the reply" in str(e) for e in failed)
    after = engine.chat([ChatMessage("user", "Say hello.")], GREEDY)  # ... and the next reply is served
    assert after.strip()


def test_a_failed_prefill_fails_its_joiners_and_not_the_running_replies(engine: TransformersEngine,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    long = GenerationParams(max_new_tokens=60, temperature=0.0, repetition_penalty=1.0)
    running = request_for(engine, "Count from one to one hundred in words.", long)
    engine.scheduler.submit(running)
    tokens = running.stream()
    next(tokens)  # decoding now
    forwards = engine.scheduler.model
    monkeypatch.setattr(forwards, "prefill", failing_once(forwards.prefill, RuntimeError("out of memory (simulated)")))
    with pytest.raises(EngineError, match="failed while writing the reply"):
        engine.chat([ChatMessage("user", "Say hello.")], GREEDY)
    rest = list(tokens)
    assert running.finish in ("stop", "length") and rest  # the running reply went on to its end
    assert engine.chat([ChatMessage("user", "Say hello.")], GREEDY).strip()  # and the next joiner is served


def test_torch_work_stays_on_the_engine_thread(engine: TransformersEngine) -> None:
    """Once a second thread runs torch ops, OpenMP halves the decode speed for the rest of the process."""
    seen: set[int] = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        with ThreadPoolExecutor(4) as pool:  # replies asked from several threads, as the queue does
            list(pool.map(lambda q: engine.chat([ChatMessage("user", q)], GREEDY), QUESTIONS))
    finally:
        hook.remove()
    assert seen == {engine.thread.ident}


def test_no_recompiles_while_the_batch_changes(engine: TransformersEngine) -> None:
    """The warm-up compiled the one-row and the batched step; batches of any size and length reuse them, in
    this test and every one before it in this module: rows joining, leaving, and the last row left after the
    padding before it was cut."""
    from torch._dynamo.utils import counters

    assert engine.compiled
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    for size in (3, 5, 8, 1, 2):
        run(engine, [request_for(engine, q * (1 + i % 3), params) for i, q in enumerate((QUESTIONS * 2)[:size])])
    short = GenerationParams(max_new_tokens=3, temperature=0.0)
    run(engine, [request_for(engine, QUESTIONS[2], short), request_for(engine, QUESTIONS[3], params)])
    assert counters["stats"]["unique_graphs"] == engine.graphs_at_load  # type: ignore[attr-defined]


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss / 2**20


def test_memory_returns_near_idle_after_bursts_of_long_replies(engine: TransformersEngine) -> None:
    """Each step writes into the batch's buffers in place and the cache is dropped when the batch empties, so
    after 8 replies of 160 tokens RSS is back near where it was before them, burst after burst (measured: +10 to
    +30 MB; copying the cache every step had left a high-water mark of +180 to +360 MB)."""
    params = GenerationParams(max_new_tokens=160, temperature=0.0, repetition_penalty=1.0)
    burst = [f"Tell me a long story about dragon number {i}." for i in range(8)]
    kept = engine.scheduler.prefix_cache
    assert kept is not None
    idle, kept_idle = rss_mb(), kept.bytes
    for _ in range(2):
        run(engine, [request_for(engine, q, params) for q in burst])
        assert engine.scheduler.cache is None
        after = rss_mb()
        # the KV cache of the burst alone was ~40 MB; the prefix cache keeps the replies, within its budget
        kept_mb = (kept.bytes - kept_idle) / 2**20
        assert after - idle < 64 + kept_mb, (idle, after, kept_mb)
    assert kept.tokens <= kept.budget_tokens


def test_a_bug_in_the_batch_loop_fails_its_replies_and_the_next_one_is_served(engine: TransformersEngine,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever breaks inside a step (here: merging a joiner's cache), no reply waits forever."""
    scheduler = engine.scheduler
    monkeypatch.setattr(scheduler, "_join", failing_once(scheduler._join, RuntimeError("bug")))
    with pytest.raises(EngineError):
        engine.chat([ChatMessage("user", "Say hello.")], GREEDY)
    assert engine.chat([ChatMessage("user", "Say hello.")], GREEDY).strip()


async def test_the_chat_service_answers_chats_at_once(tmp_path: Path, engine: TransformersEngine) -> None:
    """Through the queue: replies of several chats run together (the queue admits up to the batch). Last here: the
    service unloads the module's engine when it closes."""
    settings = Settings(models_dir=SHARED_BUILDS, _env_file=None, default_model="smollm2-gptq",  # type: ignore
                        database_url=f"sqlite+aiosqlite:///{tmp_path}/b.db", max_new_tokens=24, temperature=0.0)
    async with ChatService(settings, engine_factory=lambda _profile: engine) as service:
        engine.scheduler.peak_rows = 0
        sinks = [RecordingSink() for _ in range(4)]
        started = time.monotonic()
        await asyncio.gather(*(service.handle(IncomingMessage("test", f"c{i}", f"u{i}", "Ann", QUESTIONS[i]), sink)
                               for i, sink in enumerate(sinks)))
        assert all(s.status == ReplyStatus.COMPLETE and s.final for s in sinks), [s.status for s in sinks]
        assert engine.scheduler.peak_rows >= 2, time.monotonic() - started

