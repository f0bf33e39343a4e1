"""Engines: one per model format, all behind `bot.engines.base.Engine`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

__all__ = ["CancelToken", "ChatMessage", "Engine", "EngineError", "GenerationParams", "StreamStats",
           "create_engine"]


def create_engine(profile: ModelProfile, settings: Settings) -> Engine:
    """An unloaded engine for `profile`; imports the heavy backend only when needed."""
    if profile.format in ("gptq", "awq", "hf"):
        from bot.engines.transformers_engine import TransformersEngine

        return TransformersEngine(profile, settings)
    if profile.format == "gguf":
        from bot.engines.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(profile, settings)
    if profile.format == "openai":
        from bot.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(profile, settings)
    raise EngineError(f"unknown model format {profile.format!r} for model {profile.name!r}")
