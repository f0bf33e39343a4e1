"""Session fixture `prepared_models`: the embedded HF/GPTQ/AWQ/GGUF builds, made once per machine.

The folder is QUANTBOT_TEST_MODELS_DIR, else MODELS_DIR, else the bot's default (~/.cache/quantbot/models),
so `scripts/test` (which runs `python -m bot models prepare` first) and the tests share one set of builds.
Builds carry manifests: a current build is reused, a stale or half-written one is rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.models.prepare import prepare

DEFAULT_DIR = "~/.cache/quantbot/models"


def shared_models_dir() -> Path:
    raw = os.environ.get("QUANTBOT_TEST_MODELS_DIR") or os.environ.get("MODELS_DIR") or DEFAULT_DIR
    return Path(raw).expanduser()


@pytest.fixture(scope="session")
def prepared_models() -> Path:
    """MODELS_DIR holding smollm2-135m-{hf,gptq,awq,gguf} (builds any that are missing: minutes on CPU)."""
    models_dir = shared_models_dir()
    prepare(models_dir)
    return models_dir
