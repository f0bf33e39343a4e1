"""`python -m bot generate` and `python -m bot bench engines` as a person runs them (GGUF build)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from bot.models.prepare import prepare
from tests.models_fixture import on_the_subject

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp


@pytest.fixture()
def gguf_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    prepare(tmp_path, ["gguf"])
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    for var in ("MODELS_FILE", "MAX_NEW_TOKENS", "TEMPERATURE", "DEFAULT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return tmp_path


def test_generate_streams_the_answer_and_a_summary(gguf_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "What is the capital of France?", "--model", "smollm2-gguf", "--temperature", "0",
                 "--max-new-tokens", "24"])
    out, err = capsys.readouterr()
    assert code == 0
    assert on_the_subject(out)
    assert "smollm2-gguf" in err and "tok/s" in err


def test_generate_with_an_unknown_model_lists_the_known_ones(gguf_only: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", "gpt-9"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-9'" in err and "smollm2-gguf" in err
    assert "Traceback" not in err


def test_generate_with_a_missing_build_says_how_to_make_it(gguf_only: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", "smollm2-awq"]) == 2
    err = capsys.readouterr().err
    assert "python -m bot models prepare" in err and "Traceback" not in err


def test_bench_engines_reports_every_present_build(gguf_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = gguf_only / "bench.json"
    assert main(["bench", "engines", "--quick", "--out", str(out_file)]) == 0
    table = capsys.readouterr().out
    assert "smollm2-gguf" in table and "smollm2-gptq" not in table
    results = json.loads(out_file.read_text())["results"]
    assert [r["model"] for r in results] == ["smollm2-gguf"]
    assert results[0]["error"] == "" and results[0]["completion_tokens"] > 0
    assert results[0]["median_tokens_per_s"] > 0 and results[0]["load_s"] > 0


def test_bench_times_each_build_right_after_llamacpp_on_the_same_prompt(gguf_only: Path) -> None:
    """Ratios to llama.cpp come from interleaved runs, so a host that slows down mid-run skews neither side."""
    from bot.bench.engines import bench_build, load_engine
    from bot.config import Settings

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    baseline, engine = load_engine(settings, "smollm2-gguf")
    assert engine is not None and baseline.load_s > 0
    try:
        result = bench_build(settings, "smollm2-gguf", ["Name three colors.", "What is 2+2?"], 8, label="again",
                             baseline=engine)
    finally:
        engine.unload()
    assert result.model == "again" and result.error == ""
    assert len(result.tokens_per_s) == len(result.paired_tokens_per_s) == 2
    # the baseline ran no prompts of its own here: a speed ratio exists only through the paired runs
    assert result.ratios(baseline)["tokens_per_s"] > 0


def test_bench_refuses_an_unknown_model_name(gguf_only: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "engines", "--quick", "--models", "gpt-9"]) == 1
    assert "unknown model(s): gpt-9" in capsys.readouterr().out
