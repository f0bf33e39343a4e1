"""`python -m bot doctor`: what it reports and its exit code, with every probe of the machine replaced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot import doctor
from bot.cli import main
from bot.doctor import GpuInfo, TorchFacts
from bot.engines.transformers_engine import CACHE_DIRS

CPU_TORCH = TorchFacts("2.13.0+cpu", None, False)
CUDA_TORCH = TorchFacts("2.13.0+cu128", "12.8", True, [GpuInfo("NVIDIA GeForce RTX 3090", 24.0, "8.6", True)])
T4_BY_DRIVER = [GpuInfo("Tesla T4", 15.0, "7.5")]
SECRET = "123456:AAE-very-secret-token"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """A CPU machine with a compiler, our kernels built, GPTQModel and llama.cpp installed, the default model's
    files present and a migrated database; tests change one fact at a time."""
    facts: dict[str, Any] = {"torch": CPU_TORCH, "driver": [], "nvcc": None, "cxx": ("/usr/bin/c++", "c++ 12.2"),
                             "cpu": ("AVX2", True, True, None), "gptq": ("7.6.0", ["gptq_torch_aten"], {}),
                             "llama": ("0.3.36", False), "db": ("0001", "0001")}
    monkeypatch.setattr(doctor, "torch_facts", lambda: facts["torch"])
    monkeypatch.setattr(doctor, "nvidia_smi_gpus", lambda: facts["driver"])
    monkeypatch.setattr(doctor, "tool_version", lambda names: facts["nvcc"] if names == ("nvcc",) else facts["cxx"])
    monkeypatch.setattr(doctor, "cpu_kernel_facts", lambda: facts["cpu"])
    monkeypatch.setattr(doctor, "gptqmodel_facts", lambda device: facts["gptq"])
    monkeypatch.setattr(doctor, "llamacpp_facts", lambda: facts["llama"])
    monkeypatch.setattr(doctor, "module_present", lambda name: True)

    def db(url: str) -> tuple[str, str]:
        if isinstance(facts["db"], Exception):
            raise facts["db"]
        return facts["db"]

    monkeypatch.setattr(doctor, "database_facts", db)
    models = tmp_path / "models"
    (models / "smollm2-135m-gptq").mkdir(parents=True)
    (models / "smollm2-135m-gptq" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # no .env of the developer's
    for var in ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "QUANTBOT_CPU_KERNELS", "DEFAULT_MODEL", "MODELS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELS_DIR", str(models))
    for var in CACHE_DIRS:  # the doctor points them at MODELS_DIR; restored after each test
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://bot:hunter2@db.example/quantbot")
    return facts


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["doctor", *args])
    return code, capsys.readouterr().out


def test_a_healthy_cpu_machine_exits_0(machine: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys)
    assert code == 0
    assert "torch 2.13.0+cpu (CPU-only build, no CUDA)" in out
    assert "our CPU int4/int8 kernels built (AVX2 path)" in out
    assert "GPTQModel 7.6.0; usable on cpu: gptq_torch_aten" in out
    assert "default model smollm2-gptq: can run" in out
    assert "[ERROR]" not in out.split("model smollm2-awq")[0]  # nothing wrong before the other (missing) models


def test_missing_default_model_files_exit_1_with_the_fix(machine: dict[str, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models" / "smollm2-135m-gptq" / "config.json").unlink()
    code, out = run(capsys)
    assert code == 1
    assert "gptq: files missing at" in out and "fix: build it with `python -m bot models prepare`" in out
    assert "default model smollm2-gptq: cannot run" in out


def test_a_gpu_without_cuda_torch_is_an_error(machine: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    machine["driver"] = T4_BY_DRIVER
    code, out = run(capsys)
    assert "[ERROR] a GPU is present but this torch has no CUDA: Tesla T4 (15.0 GiB, compute capability 7.5)" in out
    assert "download.pytorch.org/whl/cu" in out
    assert code == 0  # the default model still runs, on the CPU
    assert "has no GPU offload: GGUF runs on the CPU while a GPU is present" in out


def test_a_cuda_machine_without_nvcc_warns_about_slow_kernels(machine: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    machine["torch"] = CUDA_TORCH
    machine["gptq"] = ("7.6.0", ["gptq_torch", "gptq_triton"], {"gptq_marlin": "Marlin kernel requires CUDA."})
    code, out = run(capsys)
    assert "cuda:0 NVIDIA GeForce RTX 3090, 24.0 GiB, compute capability 8.6" in out
    assert "no nvcc: GPTQModel cannot build Marlin" in out and "fix: install the CUDA toolkit (nvcc)" in out
    assert "no fast GPU kernel usable (gptq_marlin: Marlin kernel requires CUDA.)" in out


def test_cpu_kernels_off_is_said(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QUANTBOT_CPU_KERNELS", "off")
    _, out = run(capsys)
    assert "QUANTBOT_CPU_KERNELS=off: our CPU kernels are off, torch's int4 kernel runs" in out


def test_a_failed_cpu_kernel_build_names_the_compiler(machine: dict[str, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    machine["cpu"] = ("AVX2", True, False, "RuntimeError: Ninja is required to load C++ extensions")
    machine["cxx"] = None
    _, out = run(capsys)
    assert "our CPU kernels did not build: RuntimeError: Ninja is required" in out
    assert "no C++ compiler" in out and "apt install g++" in out


def test_secrets_are_never_printed(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", SECRET)
    machine["db"] = OSError("connect to postgresql+asyncpg://bot:hunter2@db.example/quantbot refused")
    code, out = run(capsys)
    assert "Telegram: token set" in out and "Discord: token set" not in out
    assert "postgresql+asyncpg://bot:***@db.example/quantbot: cannot connect" in out
    assert SECRET not in out and "hunter2" not in out
    code_json, out_json = run(capsys, "--json")
    assert SECRET not in out_json and "hunter2" not in out_json and code == code_json == 0


def test_json_output_for_machines(machine: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    machine["db"] = ("0001", "0002")
    code, out = run(capsys, "--json")
    data = json.loads(out)
    assert data["exit_code"] == code == 0 and data["default_model"] == "smollm2-gptq" and data["default_can_run"]
    database = [f for f in data["findings"] if f["area"] == "database"]
    assert database[0]["status"] == "warn" and database[0]["fix"] == "python -m bot db upgrade"


def test_load_adds_the_kernel_report(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    def slow(profile: Any, settings: Any) -> dict[str, Any]:
        return {"summary": f"{profile.name}: GPTQ 4-bit on CPU, torch's int4 kernel, compiled [acceptable]",
                "rating": "acceptable", "costs": ["~1.4x slower than our int4 kernel"],
                "fixes": ["install a C++ compiler (g++) and ninja so our CPU kernel builds"]}

    monkeypatch.setattr(doctor, "load_report", slow)
    code, out = run(capsys, "--load")
    assert code == 0
    assert "[WARN ] smollm2-gptq: GPTQ 4-bit on CPU, torch's int4 kernel, compiled [acceptable]: ~1.4x slower" in out
    assert "fix: install a C++ compiler (g++)" in out


def test_a_default_model_that_does_not_load_exits_1(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bot.engines import EngineError

    def broken(profile: Any, settings: Any) -> dict[str, Any]:
        raise EngineError(f"model {profile.name!r} could not be loaded: SafetensorError: header too large")

    monkeypatch.setattr(doctor, "load_report", broken)
    code, out = run(capsys, "--load")
    assert code == 1 and "does not load: model 'smollm2-gptq' could not be loaded" in out


def test_an_unknown_default_model_exits_1(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DEFAULT_MODEL", "nope")
    code, out = run(capsys)
    assert code == 1 and "the default model 'nope' is not configured" in out


def test_a_real_sqlite_database_is_reported_migrated(machine: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.storage.migrate import upgrade

    monkeypatch.undo()  # the real database probe, on a real file
    url = f"sqlite+aiosqlite:///{tmp_path / 'q.db'}"
    assert doctor.database_facts(url)[0] is None  # empty file: no revision yet
    upgrade(url)
    current, head = doctor.database_facts(url)
    assert current == head is not None
