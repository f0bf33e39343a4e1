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


def on_the_subject(reply: str) -> bool:
    """What every honest build's answer to "What is the capital of France?" guarantees: it is about France.

    "Paris" itself is a near-tie for a 135M model: the unquantized reference answers it on three of five
    phrasings, and one AWQ build says it decoding eagerly but "L'Capital de France est ..." compiled.
    """
    return "Paris" in reply or "France" in reply
