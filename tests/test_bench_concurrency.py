"""`bench concurrency` divides each burst by one chat measured just around it, so a drifting host cannot fake a
speed-up or hide one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from bot.bench.concurrency import Scenario, add_ratios, ask_at_once, bracketed
from bot.core.service import ChatService
from bot.engines.base import CancelToken, ChatMessage, GenerationParams, StreamStats
from bot.engines.recording import RecordingEngine
from bot.engines.scripted import ScriptedEngine
from tests.conftest import toy_settings


class SlowingEngine(ScriptedEngine):
    """Each reply's words come slower than the last one's: a host whose speed drifts down while the bench runs."""

    def stream_chat(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                    stats: StreamStats | None = None) -> Iterator[str]:
        self.delay_s *= 1.5
        yield from super().stream_chat(messages, params, cancel, stats)


def test_a_burst_is_paired_with_one_chat_asked_just_before_and_after(tmp_path: Path) -> None:
    engines: list[RecordingEngine] = []

    def factory(profile: object, settings: object = None) -> RecordingEngine:
        engines.append(RecordingEngine(SlowingEngine(script=lambda _: " ".join(["word"] * 10), delay_s=0.02)))
        return engines[-1]

    async def run() -> tuple[Scenario, Scenario]:
        async with ChatService(toy_settings(tmp_path), engine_factory=factory) as service:
            await ask_at_once(service, engines[-1], ["hello"], run=-1)  # the model loads (as the bench settles)
            first = await ask_at_once(service, engines[-1], ["hello"], run=0)
            # one chat "bursting" alone: the same work as its baseline, so its paired ratio must be ~1
            alone = await bracketed(service, engines[-1], ["hello"], ["hello"], run=10)
            return first, alone

    first, alone = asyncio.run(run())
    for s in (first, alone):
        s.model, s.mode, s.prompts = "toy", "greedy", "same"
    add_ratios([first, alone])
    assert alone.tokens == 10 and alone.baseline_tokens_per_s > 0
    assert 0.8 < alone.ratios["aggregate_tokens_per_s"] < 1.25
    # against the one-chat row asked before the host slowed down, the same work would read as a loss
    assert alone.aggregate_tokens_per_s / first.aggregate_tokens_per_s < 0.6
