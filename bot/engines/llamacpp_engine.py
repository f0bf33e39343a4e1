"""GGUF models through llama.cpp (llama-cpp-python); all layers on the GPU when the build supports it."""

from __future__ import annotations

import codecs
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.engines import engine_thread, kernel_report, template_guard
from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats
from bot.engines.transformers_engine import missing_files_message

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

log = logging.getLogger(__name__)

# --- tuning constants ---
DEFAULT_CONTEXT = 4096  # KV cache size when the profile names none (capped by the model's training context)
N_BATCH = 512
TOP_K_OFF = 0  # llama.cpp: 0 disables top-k, matching the Transformers engine
MIN_P_OFF = 0.0
MAX_DEFAULT_THREADS = 8  # past this, decoding a small model gains nothing and hyper-threads only contend


def _resolve_gguf(profile: ModelProfile, settings: Settings) -> Path | None:
    path = profile.resolved_path(settings.models_dir)
    if path is not None and path.is_dir():
        if profile.gguf_file:
            return path / profile.gguf_file
        found = sorted(path.glob("*.gguf"))
        return found[0] if found else path / "missing.gguf"
    return path


def default_threads() -> int:
    """Every core this process may use, up to MAX_DEFAULT_THREADS (llama-cpp-python's own default is half,
    which leaves a 2-core machine decoding at 1 thread: ~70 instead of ~110 tokens/s here)."""
    return max(1, min(MAX_DEFAULT_THREADS, len(os.sched_getaffinity(0))))


class LlamaCppEngine(Engine):
    """One GGUF model in a llama.cpp context; the chat template comes from the GGUF metadata.

    llama.cpp's CPU work runs on the process's engine thread, like torch's: its OpenMP team is per calling thread,
    and once two threads had run a reply every reply decoded at half speed (measured: 90-92 tokens/s on the queue's
    first worker thread, 45-54 once a second one had run a reply, or once a torch model had loaded)."""

    def __init__(self, profile: ModelProfile, settings: Settings) -> None:
        self.name = profile.name
        self.profile = profile
        self.settings = settings
        self.llama: Any = None
        self._formatter: Any = None
        self._add_bos = False
        self._context_length = min(profile.context_length or DEFAULT_CONTEXT, settings.max_context)
        self.kernel_report: kernel_report.KernelReport | None = None
        self._lock = threading.Lock()
        self.thread = engine_thread.shared()

    def load(self) -> None:
        if self.llama is not None:
            return
        path = _resolve_gguf(self.profile, self.settings)
        if path is None or not path.is_file():
            raise EngineError(missing_files_message(self.profile, path))
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise EngineError("GGUF models need llama-cpp-python: install it with "
                              "`pip install 'llama-cpp-python[server]==0.3.36'`") from exc
        threads = self.settings.torch_threads or default_threads()
        try:
            offload = bool(llama_cpp.llama_supports_gpu_offload())
            gpu_layers = -1 if offload else 0
            llama = self.thread.call(lambda: llama_cpp.Llama(
                model_path=str(path), n_ctx=self._context_length, n_batch=N_BATCH, n_gpu_layers=gpu_layers,
                n_threads=threads, verbose=False,
            ))
        except Exception as exc:  # noqa: BLE001 - llama.cpp raises ValueError/RuntimeError on bad files
            log.exception("loading %s from %s failed", self.name, path)
            raise EngineError(f"model {self.name!r} could not be loaded from {path}: {exc}") from exc
        meta = llama.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            self.thread.call(llama.close)  # freed where it was made, not by the garbage collector's thread
            raise EngineError(f"model {self.name!r} ({path.name}) has no chat template in its GGUF metadata")

        def token_text(key: str) -> str:
            token_id = meta.get(key)
            return llama.detokenize([int(token_id)], special=True).decode("utf-8", "replace") if token_id else ""

        eos, bos = token_text("tokenizer.ggml.eos_token_id"), token_text("tokenizer.ggml.bos_token_id")
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        self._add_bos = meta.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self._context_length = min(llama.n_ctx(), self._context_length)  # llama.cpp may pad n_ctx up
        self.llama = llama
        self.kernel_report = kernel_report.gguf_report(
            self.name, kernel_report.gguf_quant(meta, path.name), gpu_layers, offload,
            gpu_present=offload or kernel_report.nvidia_gpu_visible(), threads=threads)
        kernel_report.log_report(self.kernel_report)
        log.info("loaded %s (gguf) with %s GPU layers, context %d", self.name, gpu_layers, self._context_length)

    @property
    def kernel_summary(self) -> str | None:
        """The one-line kernel report for admins (`/model`); None before a load."""
        return self.kernel_report.summary() if self.kernel_report else None

    def unload(self) -> None:
        if self.llama is not None:
            self.thread.call(self.llama.close)
        self.llama = None
        self.kernel_report = None

    @property
    def loaded(self) -> bool:
        return self.llama is not None

    @property
    def context_length(self) -> int:
        return self._context_length

    def _require_loaded(self) -> None:
        if self.llama is None:
            raise EngineError(f"model {self.name!r} is not loaded")

    def prompt_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Token ids of the chat-templated prompt, ending with the assistant generation prompt."""
        self._require_loaded()
        messages = template_guard.for_llama(self.llama).messages(messages)  # no forged template turns
        rendered = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        return self.llama.tokenize(rendered.prompt.encode("utf-8"), add_bos=self._add_bos, special=True)

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.prompt_ids(messages))

    def _stream(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                stats: StreamStats) -> Iterator[str]:
        self._require_loaded()
        import llama_cpp

        ids = self.prompt_ids(messages)
        stats.prompt_tokens = len(ids)
        max_new = self.reply_budget(len(ids), params)
        llama = self.llama
        vocab = llama._model.vocab
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self._lock:
            if params.seed is not None:
                llama.set_seed(params.seed)
            tokens = llama.generate(
                ids, temp=0.0 if params.greedy else params.temperature, top_p=1.0 if params.greedy else params.top_p,
                top_k=TOP_K_OFF, min_p=MIN_P_OFF, repeat_penalty=params.repetition_penalty, reset=True,
            )
            try:
                while (token := self.thread.call(lambda: next(tokens, None))) is not None:  # each step there
                    if cancel.cancelled:
                        return
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        stats.finish_reason = "stop"
                        break
                    stats.completion_tokens += 1
                    delta = utf8.decode(llama.detokenize([token]))
                    if delta:
                        yield delta
                    if cancel.cancelled:
                        return
                    if stats.completion_tokens >= max_new:
                        break
                tail = utf8.decode(b"", final=True).rstrip("\ufffd")
                if tail:
                    yield tail
            finally:
                self.thread.call(tokens.close)
