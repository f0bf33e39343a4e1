"""GPTQ, AWQ and plain HF checkpoints through Transformers: quantized models whole on one GPU (GPTQModel refuses
CPU offload) or on the CPU, dtype from the checkpoint (fp16 where the GPU lacks bf16)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bot.engines import engine_thread, kernel_report, template_guard
from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats

if TYPE_CHECKING:
    from bot.engines.batching import BatchScheduler

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# --- tuning constants ---
DEFAULT_CONTEXT = 8192  # when neither the profile nor the config names one
# A tiny generation at load time: quantized kernels repack themselves on first use and torch.compile compiles
# the decode step (~1 min on a 2-core CPU), so the first person to ask does not wait for either.
WARMUP_TOKENS = 2
WARMUP_BATCH = ("Hello", "Say hi to everyone in this chat, please")  # two lengths: the padded batched step
COMPILE_OPTIONS = {"size_asserts": False}  # inductor settings for the compiled decode step
# Tokens that end an assistant turn in common chat templates (only those the vocabulary has are used).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")
# backend "auto" on a GPU: GPTQModel's kernels from fastest, each tried when the one before fails to build or load
GPU_BACKENDS = {"gptq": ("marlin", "exllama_v2", "triton", "torch"),
                "awq": ("marlin", "gemm", "gemm_triton", "torch_awq")}  # AwqConfig's names
BACKEND_ALIASES = {"exllama": "exllama_v2"}
FIT_MARGIN = 1.1  # the weights plus ~10% for activations and the first KV cache pages
GIB = 1024 ** 3
# Kernel and compile caches, under MODELS_DIR so a recreated container keeps them (an env var already set wins).
CACHE_DIRS = {"TORCH_EXTENSIONS_DIR": ".torch-extensions", "TORCHINDUCTOR_CACHE_DIR": ".inductor-cache",
              "TRITON_CACHE_DIR": ".triton-cache"}


def missing_files_message(profile: ModelProfile, path: Path | None) -> str:
    """A polite explanation of where the model was expected and how to make it."""
    where = f" at {path}" if path else ""
    if profile.hub_id:
        how = f"download it with `python -m bot models download {profile.hub_id}`"
    else:
        how = "build it with `python -m bot models prepare`"
    return f"the files of model {profile.name!r} were not found{where}; {how}"


def quiet_gptqmodel() -> None:
    """Keep GPTQModel's banner and INFO lines (printed straight to stdout) out of the chat unless logging at INFO."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return
    try:
        from logbar import LogBar  # GPTQModel's logger; set before gptqmodel is first imported
    except ImportError:
        return
    LogBar.shared().setLevel(logging.WARNING)


def context_length(profile_length: int | None, declared: int | None, max_context: int) -> int:
    """The profile's context, else the model's declared maximum (32k-128k for current 7B models), never more than
    MAX_CONTEXT: a long chat must not ask for more KV cache than the machine has."""
    return min(profile_length or declared or DEFAULT_CONTEXT, max_context)


def use_model_caches(models_dir: Path) -> dict[str, str]:
    """Point torch's extension builds (ours, GPTQModel's CUDA kernels), inductor and Triton at MODELS_DIR, unless
    the environment already chose or MODELS_DIR is read-only; returns the directories in use (unset: torch's)."""
    if os.access(models_dir, os.W_OK):
        for var, sub in CACHE_DIRS.items():
            os.environ.setdefault(var, str(models_dir / sub))
    return {var: os.environ.get(var, "") for var in CACHE_DIRS}


def backend_order(profile_backend: str, fmt: str, on_gpu: bool) -> list[str | None]:
    """The GPTQModel backends to try, in order; None leaves the choice to GPTQModel (CPU, unquantized)."""
    backend = BACKEND_ALIASES.get(profile_backend.strip().lower(), profile_backend.strip().lower())
    if backend != "auto":
        return [backend]
    if on_gpu and fmt in GPU_BACKENDS:
        return list(GPU_BACKENDS[fmt])
    return [None]


def load_with_fallback(load: Callable[[str | None], T], backends: Sequence[str | None],
                       name: str) -> tuple[T, str | None, list[str]]:
    """`load(backend)` for each backend in turn until one works: the model, that backend, and what failed before.
    Running out of memory (or not fitting) is not a kernel problem and is raised at once, as is the last failure."""
    failures: list[str] = []
    for i, backend in enumerate(backends):
        try:
            return load(backend), backend, failures
        except Exception as exc:  # noqa: BLE001 - a kernel that does not build or does not fit this checkpoint
            if i == len(backends) - 1 or isinstance(exc, EngineError) or "OutOfMemory" in type(exc).__name__:
                if failures:
                    raise EngineError(f"model {name!r} could not be loaded with any kernel: "
                                      + "; ".join([*failures, f"{backend}: {_short(exc)}"])) from exc
                raise
            failures.append(f"{backend}: {_short(exc)}")
            log.info("the %s kernel failed for %s (%s); loading again with %s", backend, name, _short(exc),
                     backends[i + 1])
            _release_gpu()
    raise EngineError(f"model {name!r}: no backend to load it with")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _release_gpu() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def check_fits(name: str, weights_bytes: int, free_bytes: int, gpu: str) -> None:
    """A clear error instead of a CPU offload GPTQModel refuses (or an out-of-memory error mid-load)."""
    if weights_bytes * FIT_MARGIN > free_bytes:
        raise EngineError(f"model {name!r} does not fit in {free_bytes / GIB:.1f} GiB free on {gpu}: its weights "
                          f"are {weights_bytes / GIB:.1f} GiB; free the GPU or pick a smaller model")


def weights_size(path: Path) -> int:
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def gpu_dtype(bf16_supported: bool) -> Any:
    """The checkpoint's dtype, but fp16 on GPUs without bf16 (pre-Ampere), where bf16 is emulated or refused."""
    import torch

    return "auto" if bf16_supported else torch.float16


def quantization_override(path: Path, fmt: str, backend: str | None) -> Any:
    """The checkpoint's own quantization config with `backend` set (Transformers merges it over the stored one)."""
    if backend is None or fmt not in ("gptq", "awq"):
        return None
    import json

    from transformers import AwqConfig, GPTQConfig

    stored = dict(json.loads((path / "config.json").read_text()).get("quantization_config") or {})
    stored["backend"] = backend
    return (GPTQConfig if fmt == "gptq" else AwqConfig).from_dict(stored)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # tokens before this were fully emitted
        self._read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True).rstrip("\ufffd")
        self._prefix = self._read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class TransformersEngine(Engine):
    """One Transformers causal LM; quantized kernels come from GPTQModel (GPTQ and AWQ)."""

    def __init__(self, profile: ModelProfile, settings: Settings) -> None:
        self.name = profile.name
        self.profile = profile
        self.settings = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self._context_length = context_length(profile.context_length, None, settings.max_context)
        self._eos_ids: list[int] = []
        self._special_ids: frozenset[int] = frozenset()
        self.max_batch = settings.max_batch
        self.thread = engine_thread.shared()  # every torch op of this engine runs there
        self.scheduler: BatchScheduler | None = None
        self._decode_step: Callable[..., Any] | None = None  # model.forward, compiled or not
        self.compiled = False
        self.compile_error: str | None = None  # why torch.compile failed at warm-up (decoding eagerly since)
        self.backend: str | None = None  # the GPTQModel backend asked for (None: GPTQModel's choice)
        self.backend_failures: list[str] = []
        self.kernel_report: kernel_report.KernelReport | None = None

    # --- loading ---

    def model_path(self) -> Path:
        path = self.profile.resolved_path(self.settings.models_dir)
        if path is None:
            raise EngineError(f"model {self.name!r} has no path configured")
        return path

    @property
    def max_concurrent(self) -> int:
        """Replies this engine decodes at once (the queue admits this many)."""
        return self.max_batch

    def load(self) -> None:
        if self.model is None:
            self.thread.call(self._load)

    def _load(self) -> None:
        path = self.model_path()
        if not (path / "config.json").is_file():
            raise EngineError(missing_files_message(self.profile, path))
        started = time.perf_counter()
        # GPTQModel 7.6 sizes its CPU pool to (cores+1)//2 and fails on 2 cores; see bot.models.prepare.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
        use_model_caches(self.settings.models_dir)
        quiet_gptqmodel()
        try:
            import torch
            from transformers import AutoTokenizer

            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            on_gpu = torch.cuda.is_available()
            tokenizer = AutoTokenizer.from_pretrained(path)
            order = backend_order(self.profile.backend, self.profile.format, on_gpu)
            model, self.backend, self.backend_failures = load_with_fallback(
                lambda backend: self._from_pretrained(path, backend, on_gpu), order, self.name)
            model.eval()
        except EngineError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt files, missing kernels, out of memory
            log.exception("loading %s from %s failed", self.name, path)
            raise EngineError(f"model {self.name!r} could not be loaded from {path}: {type(exc).__name__}: {exc}") \
                from exc
        if tokenizer.chat_template is None:
            raise EngineError(f"model {self.name!r} has no chat template in {path}")
        self.tokenizer, self.model = tokenizer, model
        configured = getattr(model.config, "max_position_embeddings", None)
        self._context_length = context_length(self.profile.context_length, configured, self.settings.max_context)
        self._eos_ids = self._end_of_turn_ids()
        self._special_ids = frozenset(tokenizer.all_special_ids) | frozenset(self._eos_ids)
        # Where a load's time goes differs by CPU by 10x and more (repacking and load-time kernel races, compiling):
        # the log line says, so a slow /model switch can be traced to its phase.
        phases: dict[str, float] = {}

        def lap(phase: str) -> None:
            phases[phase] = time.perf_counter() - started - sum(phases.values())

        lap("weights")
        if model.device.type == "cpu":
            from bot.engines import cpu

            cpu.prepare_model(model, native=self.settings.cpu_kernels != "off", max_batch=self.max_batch)
            lap("kernels")
        self._decode_step = self._compile_decode_step()
        self.scheduler = self._new_scheduler()
        self._warm_up()
        lap("compile + warm-up" if self.compiled else "warm-up")
        self.kernel_report = self.describe_kernels()
        kernel_report.log_report(self.kernel_report)
        log.info("loaded %s (%s) on %s, dtype %s, context %d, in %.1f s (%s)", self.name, self.profile.format,
                 model.device, model.dtype, self._context_length, sum(phases.values()),
                 ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in phases.items()))

    def _from_pretrained(self, path: Path, backend: str | None, on_gpu: bool) -> Any:
        """One load attempt with one GPTQModel backend: a quantized model whole on GPU 0 (after checking it fits),
        anything else on the CPU, or spread by accelerate when it is unquantized."""
        import torch
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"device_map": "cpu", "dtype": "auto"}
        if on_gpu:
            kwargs["dtype"] = gpu_dtype(torch.cuda.is_bf16_supported())
            if self.profile.format in ("gptq", "awq"):
                free, _total = torch.cuda.mem_get_info(0)
                check_fits(self.name, weights_size(path), free, torch.cuda.get_device_name(0))
                kwargs["device_map"] = {"": 0}
            else:
                kwargs["device_map"] = "auto"
        override = quantization_override(path, self.profile.format, backend)
        if override is not None:
            kwargs["quantization_config"] = override
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)

    def describe_kernels(self) -> kernel_report.KernelReport:
        """What the loaded model's layers run on, rated for this device (see bot.engines.kernel_report)."""
        self._require_loaded()
        from bot.engines.cpu import native

        model = self.model
        device = model.device.type
        quant_config = getattr(model.config, "quantization_config", None)
        sym = kernel_report.config_value(quant_config, "sym") if self.profile.format == "gptq" else None
        note = None
        if self.backend_failures:
            note = f"backend {self.backend} ({', '.join(f.split(':')[0] for f in self.backend_failures)} failed)"
        facts = kernel_report.LoadFacts(
            device=device, compiled=self.compiled, compile_error=self.compile_error,
            cpu_kernels_off=self.settings.cpu_kernels == "off", native_error=native.build_error(),
            sym=sym, nvcc=kernel_report.nvcc_on_path() if device == "cuda" else None, backend_note=note,
            torch_int4_faster=not getattr(model, "quantbot_int4_race", {"ours_faster": True})["ours_faster"],
            dense_prompts_from=getattr(model, "quantbot_dense_prompts", {}).get("from_rows"))
        quant = kernel_report.quant_label(self.profile.format, quant_config, model.dtype)
        label = None
        if device == "cuda":
            import torch

            label = f"GPU ({torch.cuda.get_device_name(model.device.index or 0)})"
        report = kernel_report.inspect_modules(self.name, quant, model.modules(), facts, label)
        for failure in self.backend_failures:
            report.degrade("acceptable", f"preferred kernel failed ({failure})",
                            kernel_report.FIX_NVCC if facts.nvcc is False else "")
        return report

    @property
    def kernel_summary(self) -> str | None:
        """The one-line kernel report for admins (`/model`); None before a load."""
        return self.kernel_report.summary() if self.kernel_report else None

    def _warm_up(self) -> None:
        """Run the kernels once so the first person to ask does not wait for their one-time set-up."""
        params = GenerationParams(max_new_tokens=WARMUP_TOKENS, temperature=0.0)
        hello = [ChatMessage("user", "Hello")]
        if self.count_tokens(hello) >= self._context_length:
            return
        try:
            while True:
                try:
                    for _ in self.stream_chat(hello, params, CancelToken()):
                        pass
                    if self.max_batch > 1:  # the batched step is a second graph: compile it now, not mid-chat
                        self._warm_up_batch(params)
                    if self.compiled:
                        self._decode_step = checking_fewer_guards(self._decode_step)
                    return
                except EngineError as exc:
                    if not self.compiled:
                        raise
                    # No C++ compiler, an unsupported op: the eager model is slower but just as right (the kernel
                    # report warns once, with the fix).
                    self.compile_error = _short(exc.__cause__ or exc)
                    log.info("torch.compile failed for %s (%s); decoding without it", self.name, self.compile_error)
                    self._decode_step, self.compiled = self.model.forward, False
                    if self.model.device.type == "cpu":
                        from bot.engines import cpu

                        cpu.undo_decode_attention(self.model)  # it was SDPA before compiling
        except Exception as exc:  # noqa: BLE001 - a model that cannot generate is not loaded
            self.unload()
            raise EngineError(f"model {self.name!r} loaded but could not generate: {type(exc).__name__}: {exc}") \
                from exc

    def _warm_up_batch(self, params: GenerationParams) -> None:
        from bot.engines.batching import Request

        assert self.scheduler is not None
        requests = [Request(self.prompt_ids([ChatMessage("user", text)]), params, WARMUP_TOKENS, CancelToken())
                    for text in WARMUP_BATCH]
        self.scheduler.run_together(requests)
        for request in requests:
            for _ in request.stream():
                pass

    def _new_scheduler(self) -> BatchScheduler:
        from bot.engines.batching import BatchScheduler, kv_budget_tokens
        from bot.engines.prefix_cache import PrefixCache

        model = self.model
        budget = kv_budget_tokens(model.config, model.dtype, model.device)
        kept = PrefixCache(min(self.settings.prefix_cache_tokens, budget // 4)) if self.settings.prefix_cache_tokens \
            else None
        return BatchScheduler(
            _Forwards(self), self.thread, frozenset(self._eos_ids), self._special_ids, model.device, self.max_batch,
            budget, kept)

    def _compile_decode_step(self) -> Callable[..., Any]:
        """The one-token forward, compiled when TORCH_COMPILE asks (auto: on CPU, where per-token Python overhead
        dominates; GPU decoding stays eager until it has been measured there)."""
        mode = self.settings.torch_compile
        self.compiled = mode == "on" or (mode == "auto" and self.model.device.type == "cpu")
        if not self.compiled:
            return self.model.forward
        import torch

        log.info("compiling the decode step of %s with torch.compile (once per load)", self.name)
        if self.model.device.type == "cpu":
            from bot.engines import cpu

            cpu.use_decode_attention(self.model)  # one query: plain math that inductor fuses
        # dynamic=True: one graph for every cache length, instead of a recompile per length. Inductor's size asserts
        # re-check ~700 inputs a step (~0.6 ms of ~16) that Dynamo's guards have just checked.
        return torch.compile(self.model.forward, dynamic=True, options=COMPILE_OPTIONS)

    def _end_of_turn_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return sorted(ids)

    def unload(self) -> None:
        self.thread.call(self._unload)

    def _unload(self) -> None:
        if self.scheduler is not None:
            self.scheduler.fail_all(EngineError(f"model {self.name!r} was unloaded"))
            self.scheduler = None
        compiled = self.compiled
        self.model = self.tokenizer = self._decode_step = None
        self.compiled = False
        self.compile_error = None
        self.kernel_report = None
        try:
            import gc

            import torch

            if compiled:
                torch._dynamo.reset()  # drop the compiled graphs, which hold on to the old model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def context_length(self) -> int:
        return self._context_length

    # --- prompting ---

    def _require_loaded(self) -> None:
        if self.model is None:
            raise EngineError(f"model {self.name!r} is not loaded")

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
        self._require_loaded()
        messages = template_guard.for_tokenizer(self.tokenizer).messages(messages)  # no forged template turns
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.prompt_ids(messages))

    def _stream(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                stats: StreamStats) -> Iterator[str]:
        """Join the engine's batch and turn its tokens into text here, on the caller's thread (no torch work)."""
        from bot.engines.batching import Request

        self._require_loaded()
        assert self.scheduler is not None
        ids = self.prompt_ids(messages)
        stats.prompt_tokens = len(ids)
        request = self.scheduler.submit(Request(ids, params, self.reply_budget(len(ids), params), cancel))
        decoder = IncrementalDecoder(self.tokenizer)
        for token in request.stream():
            stats.completion_tokens += 1
            delta = decoder.push(token)
            if delta:
                yield delta
        stats.finish_reason = request.finish
        tail = decoder.flush()
        if tail and request.finish != "cancelled":
            yield tail


def checking_fewer_guards(step: Callable[..., T]) -> Callable[..., T]:
    """The compiled step, once the warm-up has compiled its graphs, checking only the guards that tell them apart:
    Dynamo re-checks ~700 inputs on every call otherwise (~2 ms of a ~17 ms step on two cores). A call that would
    need a new graph raises instead of running a wrong one; that call then runs with every guard (and compiles)."""
    import torch

    def run(**kwargs: Any) -> T:
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return step(**kwargs)
        except RuntimeError as exc:
            if "skip_guard_eval_unsafe" not in str(exc):
                raise
            log.info("a decode step needed a graph the warm-up did not compile; compiling it")
            return step(**kwargs)

    return run


class _Forwards:
    """The engine's model as :class:`bot.engines.batching.BatchModel`: prompts eager, one-token steps through the
    (compiled) decode step."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine

    def prefill(self, prompts: list[list[int]], past: Any = None) -> tuple[Any, Any]:
        """The prompts left-padded into one eager forward (each row's positions count its own tokens only), after
        `past` (:class:`bot.engines.kv_cache.Past`: the rows' kept starts) when given."""
        import torch
        from transformers import DynamicCache

        from bot.engines.kv_cache import BatchCache

        model = self.engine.model
        width = max(len(ids) for ids in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=model.device)
        cache = DynamicCache(config=model.config)
        if past is not None:
            for layer, (keys, values) in enumerate(past.layers):
                cache.update(keys, values, layer)
            mask = torch.cat([past.mask, mask], dim=1)
        padded: dict[str, Any] = {}
        if past is not None or not bool(mask.all()):
            padded = {"attention_mask": mask.long(),
                      "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -width:]}
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1, **padded).logits
        return logits[:, -1, :], BatchCache.from_prompt(cache, mask)

    def decode(self, tokens: Any, positions: Any, mask: Any, cache: Any) -> Any:
        step = self.engine._decode_step
        assert step is not None
        return step(input_ids=tokens, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1).logits[:, -1, :]

