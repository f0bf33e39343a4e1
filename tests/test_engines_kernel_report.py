"""The kernel report: what each quantized layer runs on, rated for the device, one warning with the fix when slow.

Module trees are fakes named like the real classes (the report only reads class names and a few attributes), so
these run without a model; one slow test checks the report of the real embedded GPTQ build.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from bot.config import ModelProfile, Settings
from bot.engines import kernel_report
from bot.engines.base import EngineError
from bot.engines.kernel_report import LoadFacts, gguf_report, inspect_modules, log_report
from bot.engines.llamacpp_engine import LlamaCppEngine
from bot.engines.transformers_engine import (
    TransformersEngine,
    backend_order,
    check_fits,
    context_length,
    load_with_fallback,
    use_model_caches,
)

GPTQ4 = "GPTQ 4-bit"


def layer(class_name: str, quantized: bool = True) -> nn.Module:
    """A module whose class has the name of a real kernel class (GPTQModel's or ours)."""
    module = type(class_name, (nn.Module,), {})()
    if quantized:
        module.qweight = None
    return module


def tree(*children: nn.Module) -> list[nn.Module]:
    root = nn.Module()
    for i, child in enumerate(children):
        root.add_module(f"layer{i}", child)
    return list(root.modules())


def test_cpu_on_our_kernels_is_fast_and_says_so_in_one_line() -> None:
    modules = tree(*(layer("NativeInt4Linear") for _ in range(4)), layer("Int8Linear", quantized=False))
    report = inspect_modules("smollm2-gptq", GPTQ4, modules, LoadFacts(device="cpu", compiled=True))
    assert report.summary() == "smollm2-gptq: GPTQ 4-bit on CPU, our int4 kernel, 8-bit head, compiled"
    assert report.rating == "fast" and report.warning() is None


def test_cpu_kernels_off_runs_torchs_kernel_and_the_warning_says_why() -> None:
    facts = LoadFacts(device="cpu", compiled=True, cpu_kernels_off=True)
    report = inspect_modules("smollm2-gptq", GPTQ4, tree(layer("PackedInt4Linear"), layer("PackedInt4Linear")), facts)
    assert "torch's int4 kernel" in report.summary() and report.rating == "acceptable"
    warning = report.warning()
    assert warning is not None
    assert "QUANTBOT_CPU_KERNELS=off" in warning and "~1.4x slower than our int4 kernel" in warning


def test_a_failed_kernel_build_names_the_compiler_as_the_fix() -> None:
    facts = LoadFacts(device="cpu", compiled=True, native_error="RuntimeError: Ninja is required")
    report = inspect_modules("m", GPTQ4, tree(layer("PackedInt4Linear")), facts)
    warning = report.warning() or ""
    assert "C++ compiler (g++)" in warning and "Ninja is required" in warning


def test_eager_after_a_failed_compile_is_degraded_with_the_fix() -> None:
    facts = LoadFacts(device="cpu", compiled=False, compile_error="CalledProcessError: g++ not found")
    report = inspect_modules("m", GPTQ4, tree(layer("NativeInt4Linear")), facts)
    assert "eager (torch.compile failed)" in report.summary() and report.rating == "acceptable"
    warning = report.warning() or ""
    assert "~1.8x slower than the compiled decode step" in warning and "g++ not found" in warning


def test_eager_by_choice_on_a_gpu_is_not_a_problem() -> None:
    report = inspect_modules("m", GPTQ4, tree(layer("MarlinLinear")), LoadFacts(device="cuda"))
    assert report.summary() == "m: GPTQ 4-bit on GPU, Marlin, eager" and report.warning() is None


@pytest.mark.parametrize(("class_name", "label"), [
    ("MarlinLinear", "Marlin"), ("AwqMarlinLinear", "Marlin"), ("ExllamaV2Linear", "ExLlama"),
    ("MacheteLinear", "Machete"), ("AwqGEMVFastLinear", "AWQ GEMV-fast"),
])
def test_fast_gpu_kernels(class_name: str, label: str) -> None:
    report = inspect_modules("m", GPTQ4, tree(layer(class_name)), LoadFacts(device="cuda"))
    assert report.kernels == {label: 1} and report.rating == "fast"


def test_the_generic_torch_kernel_on_a_gpu_is_slow_and_an_asymmetric_checkpoint_is_the_reason() -> None:
    facts = LoadFacts(device="cuda", sym=False, nvcc=True)
    report = inspect_modules("qwen-7b", GPTQ4, tree(*(layer("TorchLinear") for _ in range(3))), facts)
    assert report.rating == "slow"
    warning = report.warning() or ""
    assert "~15x slower than Marlin" in warning and "Marlin needs sym=True" in warning


def test_without_nvcc_the_fix_is_the_cuda_toolkit() -> None:
    facts = LoadFacts(device="cuda", sym=True, nvcc=False)
    report = inspect_modules("m", GPTQ4, tree(layer("TritonV2Linear")), facts)
    assert report.kernels == {"Triton": 1} and report.rating == "acceptable"
    assert "install the CUDA toolkit (nvcc)" in (report.warning() or "")


def test_mixed_kernels_are_counted_and_the_worst_one_rates_the_model() -> None:
    modules = tree(layer("NativeInt4Linear"), layer("NativeInt4Linear"), layer("TorchAtenLinear"))
    report = inspect_modules("m", GPTQ4, modules, LoadFacts(device="cpu", compiled=True))
    assert report.kernels == {"our int4 kernel": 2, "GPTQModel's aten int4 layer (not repacked)": 1}
    assert "our int4 kernel (2 layers)" in report.summary() and report.rating == "acceptable"


def test_an_unknown_quantized_layer_is_named_not_hidden() -> None:
    report = inspect_modules("m", GPTQ4, tree(layer("FancyNewQuantLinear")), LoadFacts(device="cuda"))
    assert report.kernels == {"FancyNewQuantLinear": 1} and report.rating == "acceptable"


def test_the_backend_reaches_transformers_over_the_checkpoints_own_config(tmp_path: Path) -> None:
    """Transformers merges a passed config's loading attributes (backend) over the stored quantization config."""
    import json

    from bot.engines.transformers_engine import quantization_override

    stored = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": stored}))
    config = quantization_override(tmp_path, "awq", "gemm_triton")
    assert config.get_loading_attributes()["backend"] == "gemm_triton" and config.bits == 4
    assert quantization_override(tmp_path, "awq", None) is None  # the CPU: GPTQModel chooses


def test_plain_linear_layers_are_not_kernels() -> None:
    report = inspect_modules("m", "unquantized bfloat16", tree(nn.Linear(4, 4)), LoadFacts(device="cpu"))
    assert report.kernels == {} and report.summary() == "m: unquantized bfloat16 on CPU, eager"


@pytest.mark.parametrize(("native", "label"), [(True, "our int4 kernel"), (False, "torch's int4 kernel")])
def test_gptqmodel_cpu_layers_after_repacking_are_reported_by_what_they_became(native: bool, label: str) -> None:
    """The real repacking (GPTQModel's CPU layers -> ours or torch's; q/k/v fused into one matmul)."""
    from bot.engines.cpu.int4 import q8_int4_runs_here, streamline
    from tests.test_engines_cpu_int4 import Attention

    if native and q8_int4_runs_here():
        label = "our int4 kernel with 8-bit activations"

    attn = Attention(act_order=False)
    before = inspect_modules("m", GPTQ4, attn.modules(), LoadFacts(device="cpu", compiled=True))
    assert before.kernels == {"GPTQModel's aten int4 layer (not repacked)": 4} and before.rating == "acceptable"
    streamline(attn, native=native, rows=None)  # no race: its winner would depend on the host's load
    after = inspect_modules("m", GPTQ4, attn.modules(), LoadFacts(device="cpu", compiled=True))
    assert after.kernels == {label: 2}  # the fused q/k/v and o_proj


def test_a_slow_path_is_one_warning_and_a_fast_one_none(caplog: pytest.LogCaptureFixture) -> None:
    slow = inspect_modules("m", GPTQ4, tree(layer("TorchLinear"), layer("TorchLinear")),
                           LoadFacts(device="cuda", nvcc=False))
    fast = inspect_modules("m", GPTQ4, tree(layer("MarlinLinear")), LoadFacts(device="cuda"))
    with caplog.at_level(logging.INFO, logger="bot.engines.kernel_report"):
        log_report(slow)
        log_report(fast)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "fix: install the CUDA toolkit" in warnings[0]
    assert any(r.levelno == logging.INFO and "Marlin" in r.getMessage() for r in caplog.records)


def test_gguf_on_the_cpu_while_a_gpu_idles_is_slow() -> None:
    idle = gguf_report("qwen-gguf", "Q4_K_M", gpu_layers=0, offload_supported=False, gpu_present=True, threads=8)
    assert idle.rating == "slow" and "-DGGML_CUDA=on" in (idle.warning() or "")
    cpu_only = gguf_report("smollm2-gguf", "Q4_1", gpu_layers=0, offload_supported=False, gpu_present=False,
                           threads=2)
    assert cpu_only.summary() == "smollm2-gguf: GGUF Q4_1 on CPU, llama.cpp, 2 threads"
    offloaded = gguf_report("qwen-gguf", "Q4_K_M", gpu_layers=-1, offload_supported=True, gpu_present=True, threads=8)
    assert offloaded.rating == "fast" and "on GPU" in offloaded.summary()


# --- the engine side: what it feeds the report, its load order and limits ---

def settings_for(tmp_path: Path, **values: Any) -> Settings:
    return Settings(models_dir=tmp_path, _env_file=None, include_embedded_models=False,  # type: ignore[arg-type]
                    **values)


def fake_model(*layers: nn.Module, device: str = "cpu", sym: bool | None = None) -> Any:
    root = nn.Module()
    for i, child in enumerate(layers):
        root.add_module(f"layer{i}", child)
    root.device = torch.device(device)
    root.dtype = "torch.bfloat16"
    root.config = SimpleNamespace(quantization_config={"bits": 4, "sym": sym})
    return root


def gptq_engine(tmp_path: Path, **values: Any) -> TransformersEngine:
    return TransformersEngine(ModelProfile(name="smollm2-gptq", format="gptq", path="x"),
                              settings_for(tmp_path, **values))


def test_the_engine_reports_cpu_kernels_off(tmp_path: Path) -> None:
    engine = gptq_engine(tmp_path, cpu_kernels="off")
    engine.model, engine.compiled = fake_model(layer("PackedInt4Linear")), True
    report = engine.describe_kernels()
    assert report.summary().startswith("smollm2-gptq: GPTQ 4-bit on CPU, torch's int4 kernel, compiled")
    assert "QUANTBOT_CPU_KERNELS=off" in (report.warning() or "")


def test_the_engine_decodes_eagerly_after_a_failed_compile_and_reports_it(tmp_path: Path) -> None:
    """The warm-up is where a compile failure shows: the engine goes on eagerly, and the report says why."""
    engine = gptq_engine(tmp_path)
    model = fake_model(layer("NativeInt4Linear"))
    model.config._attn_implementation = "sdpa"
    engine.model, engine.compiled, engine._decode_step = model, True, lambda **_: None
    engine.max_batch = 1  # the one-reply warm-up is where the compile fails first
    calls: list[bool] = []

    def stream_chat(*_: Any) -> Any:
        calls.append(engine.compiled)
        if engine.compiled:
            cause = RuntimeError("C++ compile error: g++ not found")
            raise EngineError("failed while writing the reply") from cause
        yield "hi"

    engine.count_tokens = lambda _messages: 5  # type: ignore[method-assign]
    engine.stream_chat = stream_chat  # type: ignore[method-assign]
    engine._warm_up()
    assert calls == [True, False] and not engine.compiled
    report = engine.describe_kernels()
    assert "eager (torch.compile failed)" in report.summary()
    assert "g++ not found" in (report.warning() or "")


def test_kernel_summary_is_what_admins_see(tmp_path: Path) -> None:
    engine = gptq_engine(tmp_path)
    assert engine.kernel_summary is None  # nothing loaded
    engine.model, engine.compiled = fake_model(layer("NativeInt4Linear")), True
    engine.kernel_report = engine.describe_kernels()
    assert engine.kernel_summary == "smollm2-gptq: GPTQ 4-bit on CPU, our int4 kernel, compiled"


def test_a_gpu_backend_that_failed_shows_in_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_report, "nvcc_on_path", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA GeForce RTX 3090")
    engine = gptq_engine(tmp_path)
    engine.model = fake_model(layer("ExllamaV2Linear"), device="cuda", sym=True)
    engine.backend, engine.backend_failures = "exllama_v2", ["marlin: RuntimeError: nvcc not found"]
    report = engine.describe_kernels()
    assert report.summary().startswith("smollm2-gptq: GPTQ 4-bit on GPU (NVIDIA GeForce RTX 3090), ExLlama, eager, "
                                       "backend exllama_v2 (marlin failed)")
    warning = report.warning() or ""
    assert "marlin: RuntimeError: nvcc not found" in warning and "install the CUDA toolkit" in warning


class FakeLoader:
    """Stands in for one Transformers load per backend; the ones in `broken` raise as a failed kernel build."""

    def __init__(self, *broken: str, error: type[Exception] = RuntimeError) -> None:
        self.broken, self.error, self.tried = set(broken), error, []

    def __call__(self, backend: str | None) -> str:
        self.tried.append(backend)
        if backend in self.broken:
            raise self.error(f"{backend} kernel build failed: nvcc not found")
        return f"model on {backend}"


def test_auto_on_a_gpu_falls_back_to_the_next_kernel(caplog: pytest.LogCaptureFixture) -> None:
    loader = FakeLoader("marlin")
    order = backend_order("auto", "gptq", on_gpu=True)
    model, used, failures = load_with_fallback(loader, order, "qwen-7b")
    assert loader.tried == ["marlin", "exllama_v2"] and model == "model on exllama_v2" and used == "exllama_v2"
    assert failures == ["marlin: RuntimeError: marlin kernel build failed: nvcc not found"]


def test_when_every_kernel_fails_the_error_lists_each() -> None:
    loader = FakeLoader("marlin", "exllama_v2", "triton", "torch")
    with pytest.raises(EngineError) as raised:
        load_with_fallback(loader, backend_order("auto", "gptq", on_gpu=True), "qwen-7b")
    assert loader.tried == ["marlin", "exllama_v2", "triton", "torch"]
    assert all(f"{b}: RuntimeError" in str(raised.value) for b in loader.tried)


def test_out_of_memory_is_not_retried_with_another_kernel() -> None:
    class OutOfMemoryError(RuntimeError):
        pass

    loader = FakeLoader("marlin", error=OutOfMemoryError)
    with pytest.raises(OutOfMemoryError):
        load_with_fallback(loader, backend_order("auto", "gptq", on_gpu=True), "qwen-7b")
    assert loader.tried == ["marlin"]


def test_a_named_backend_is_used_alone_and_the_cpu_leaves_the_choice_to_gptqmodel() -> None:
    assert backend_order("exllama", "gptq", on_gpu=True) == ["exllama_v2"]
    assert backend_order("Triton", "awq", on_gpu=False) == ["triton"]
    assert backend_order("auto", "gptq", on_gpu=False) == [None]
    assert backend_order("auto", "hf", on_gpu=True) == [None]
    assert backend_order("auto", "awq", on_gpu=True) == ["marlin", "gemm", "gemm_triton", "torch_awq"]
    assert ModelProfile(name="m", format="gptq").backend == "auto"


def test_a_model_too_big_for_the_gpu_is_a_clear_error_not_an_offload() -> None:
    with pytest.raises(EngineError, match=r"does not fit in 7\.5 GiB free on NVIDIA T4"):
        check_fits("qwen-14b", weights_bytes=9 * 1024**3, free_bytes=int(7.5 * 1024**3), gpu="NVIDIA T4")
    check_fits("qwen-7b", weights_bytes=5 * 1024**3, free_bytes=int(7.5 * 1024**3), gpu="NVIDIA T4")


@pytest.mark.parametrize(("profile", "declared", "cap", "want"), [
    (None, 131072, 8192, 8192),  # a 7B model's declared maximum is capped
    (None, 2048, 8192, 2048),  # a small model keeps its own
    (16384, 131072, 8192, 8192),  # the cap holds over a profile too
    (4096, 131072, 8192, 4096),
    (None, None, 8192, 8192),
])
def test_max_context_caps_the_context(profile: int | None, declared: int | None, cap: int, want: int) -> None:
    assert context_length(profile, declared, cap) == want


def test_max_context_comes_from_the_environment_and_caps_both_engines(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONTEXT", "2048")
    settings = settings_for(tmp_path)
    assert settings.max_context == 2048 and Settings(_env_file=None).max_context == 2048  # type: ignore[call-arg]
    gguf = LlamaCppEngine(ModelProfile(name="g", format="gguf", path="g.gguf", context_length=32768), settings)
    assert gguf.context_length == 2048
    assert TransformersEngine(ModelProfile(name="t", format="gptq", path="t"), settings).context_length == 2048


def test_cpu_kernels_setting_reads_quantbot_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).cpu_kernels == "on"  # type: ignore[call-arg]
    monkeypatch.setenv("QUANTBOT_CPU_KERNELS", "off")
    assert Settings(_env_file=None).cpu_kernels == "off"  # type: ignore[call-arg]


def unset_cache_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, and restored after the test even when the code under test sets them (setenv records the original)."""
    from bot.engines.transformers_engine import CACHE_DIRS

    for var in CACHE_DIRS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def test_kernel_caches_live_under_models_dir_unless_already_set(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    unset_cache_dirs(monkeypatch)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere/triton")
    dirs = use_model_caches(tmp_path)
    assert dirs["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".torch-extensions")
    assert dirs["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".inductor-cache")
    assert dirs["TRITON_CACHE_DIR"] == "/elsewhere/triton"


def test_a_read_only_models_dir_keeps_torchs_own_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unset_cache_dirs(monkeypatch)
    use_model_caches(tmp_path / "missing")  # does not exist: nothing can be written there
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


@pytest.mark.slow
def test_the_real_gptq_build_reports_the_kernel_that_won() -> None:
    """The embedded GPTQ build on this CPU: every layer on the int4 kernel that won the race at load (ours on
    AVX2, torch's on AVX-512/AMX), the 8-bit head where it won too, no warning. Eager by choice (tests run with
    TORCH_COMPILE=off, see conftest), which is not a degraded path."""
    from bot.models.prepare import prepare
    from tests.models_fixture import shared_models_dir

    models = shared_models_dir()
    prepare(models, ["gptq"])
    settings = Settings(models_dir=models, _env_file=None, torch_compile="off")  # type: ignore[call-arg]
    engine = TransformersEngine(settings.profiles["smollm2-gptq"], settings)
    engine.load()
    try:
        report = engine.kernel_report
        assert report is not None
        model = engine.model
        from bot.engines.cpu.int4 import Q8Int4Linear

        ours = ("our int4 kernel with 8-bit activations"
                if any(isinstance(m, Q8Int4Linear) for m in model.modules()) else "our int4 kernel")
        int4 = ours if model.quantbot_int4_race["ours_faster"] else "torch's int4 kernel (faster than ours here)"
        race = getattr(model, "quantbot_head_race", {})
        head = ", 8-bit head" if race.get("ours_faster") else ""
        if race.get("by_width"):
            head = ", 8-bit head for one chat" if race["seconds"]["ours"][1] < race["seconds"]["torch"][1] \
                else ", 8-bit head for batches"
        dense = model.quantbot_dense_prompts["from_rows"] if hasattr(model, "quantbot_dense_prompts") else None
        prompts = f", prompts of {dense}+ tokens on bf16 matmuls" if dense else ""
        assert report.summary() == f"smollm2-gptq: GPTQ 4-bit on CPU, {int4}{head}{prompts}, eager"
        assert report.warning() is None
    finally:
        engine.unload()


def test_prompts_on_unpacked_weights_are_named() -> None:
    """Where long prompts unpack the int4 weights for bf16 matmuls (faster here from 32-64 tokens), the line says
    from how many tokens; decoding still runs on the int4 kernel."""
    modules = tree(*(layer("PackedInt4Linear") for _ in range(4)))
    facts = LoadFacts(device="cpu", compiled=True, torch_int4_faster=True, dense_prompts_from=32)
    report = inspect_modules("m", GPTQ4, modules, facts)
    assert report.summary() == "m: GPTQ 4-bit on CPU, torch's int4 kernel (faster than ours here), " \
                               "prompts of 32+ tokens on bf16 matmuls, compiled"
    assert report.rating == "fast"


def test_torch_int4_kernel_that_won_the_race_is_fast() -> None:
    """On a CPU where torch's int4 kernel beat ours at load, running it is the fast path, not a fallback."""
    from bot.engines.cpu.int4 import PackedInt4Linear
    from bot.engines.kernel_report import LoadFacts, inspect_modules

    layer = PackedInt4Linear.__new__(PackedInt4Linear)
    won = inspect_modules("m", "GPTQ 4-bit", [layer], LoadFacts(device="cpu", compiled=True, torch_int4_faster=True))
    fallback = inspect_modules("m", "GPTQ 4-bit", [layer], LoadFacts(device="cpu", compiled=True))
    assert won.rating == "fast" and "faster than ours" in won.summary()
    assert fallback.rating != "fast"
