"""`python -m bot generate PROMPT`: stream one reply from a model to the terminal."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from bot.engines import CancelToken, ChatMessage, GenerationParams, StreamStats, create_engine
from bot.errors import BotError

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings


def find_profile(settings: Settings, name: str | None) -> ModelProfile:
    """The named profile (default: DEFAULT_MODEL), or a clear error listing the known names."""
    name = name or settings.default_model
    profiles = settings.profiles
    if name not in profiles:
        raise BotError(f"unknown model {name!r}; known models: {', '.join(sorted(profiles))}")
    return profiles[name]


def params_for(settings: Settings, profile: ModelProfile, max_new_tokens: int | None = None,
               temperature: float | None = None, seed: int | None = None) -> GenerationParams:
    """The profile's sampling defaults with settings and command-line overrides applied."""
    gen = settings.generation_for(profile)
    return GenerationParams(
        max_new_tokens=max_new_tokens if max_new_tokens is not None else gen.max_new_tokens,
        temperature=temperature if temperature is not None else gen.temperature,
        top_p=gen.top_p, repetition_penalty=gen.repetition_penalty, seed=seed,
    )


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    profile = find_profile(settings, args.model)
    engine = create_engine(profile, settings)
    load_start = time.perf_counter()
    engine.load()
    load_s = time.perf_counter() - load_start
    messages = [ChatMessage("system", settings.system_prompt), ChatMessage("user", args.prompt)]
    params = params_for(settings, profile, args.max_new_tokens, args.temperature)
    stats = StreamStats()
    cancel = CancelToken()
    try:
        for delta in engine.stream_chat(messages, params, cancel, stats):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        cancel.cancel()
        stats.finish_reason = "cancelled"
    finally:
        engine.unload()
    sys.stdout.write("\n")
    rate = stats.extra.get("tokens_per_s", 0.0)
    first = f"{stats.first_token_s:.2f}s" if stats.first_token_s is not None else "-"
    print(f"[{profile.name}: load {load_s:.1f}s, prompt {stats.prompt_tokens} tok, {stats.completion_tokens} tok, "
          f"first token {first}, {rate:.1f} tok/s, {stats.finish_reason}]", file=sys.stderr)
    return 0
