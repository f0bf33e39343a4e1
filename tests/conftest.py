"""Shared fixtures: a toy-engine chat service on a real SQLite file, and the prepared model builds."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.config import ModelProfile, Settings
from bot.core.service import ChatService
from bot.engines.scripted import ScriptedEngine

try:  # the models engineer's session fixture (builds GPTQ/AWQ/GGUF once per machine)
    from tests.models_fixture import prepared_models  # noqa: F401
except ImportError:  # pragma: no cover - before that module exists
    pass

TOY_MODELS = ("toy-a", "toy-b")

# torch.compile adds ~1 min to every model load on a 2-core CPU; the engine tests run the compiled decode
# step (the default on CPU) explicitly, every other test that loads a real model decodes eagerly.
os.environ.setdefault("TORCH_COMPILE", "off")
# A desktop shell's GNU gettext LANGUAGE (e.g. "en_US:en") is also the bot's LANGUAGE setting: tests choose their own.
os.environ.pop("LANGUAGE", None)


def toy_settings(tmp_path: Path, **overrides: Any) -> Settings:
    models_file = tmp_path / "toy-models.json"
    models_file.write_text(json.dumps([{"name": n, "format": "hf", "path": n, "description": f"scripted {n}"}
                                       for n in TOY_MODELS]))
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path}/bot.db",
        "models_file": models_file,
        "include_embedded_models": False,
        "default_model": "toy-a",
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


class ToyEngines:
    """Engine factory handing out one ScriptedEngine per model name (tests read `.prompts`)."""

    def __init__(self, **engine_kwargs: Any) -> None:
        self.kwargs = engine_kwargs
        self.engines: dict[str, ScriptedEngine] = {}

    def __call__(self, profile: ModelProfile) -> ScriptedEngine:
        if profile.name not in self.engines:
            self.engines[profile.name] = ScriptedEngine(profile.name, **self.kwargs)
        return self.engines[profile.name]


@pytest.fixture
def make_toy_service(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[ChatService]]:
    """`async with make_toy_service(delay_s=0.01, queue_max=2) as service:` -> a started service.

    Keyword arguments that ScriptedEngine takes go to the engines; the rest are Settings fields.
    The factory is at `service.toy_engines` (a ToyEngines).
    """
    engine_keys = {"delay_s", "script", "context_length", "fail_after", "load_s", "fail_load"}

    @asynccontextmanager
    async def make(**kwargs: Any) -> AsyncIterator[ChatService]:
        engine_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in engine_keys}
        factory = ToyEngines(**engine_kwargs)
        service = ChatService(toy_settings(tmp_path, **kwargs), engine_factory=factory)
        service.toy_engines = factory  # type: ignore[attr-defined]
        await service.start()
        try:
            yield service
        finally:
            await service.close()

    return make
