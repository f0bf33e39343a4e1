"""GPTQ, AWQ and plain HF checkpoints through Transformers (`device_map="auto"`, dtype from the checkpoint)."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

log = logging.getLogger(__name__)

# --- tuning constants ---
DEFAULT_CONTEXT = 8192  # when neither the profile nor the config names one
JOIN_TIMEOUT_S = 30.0  # waiting for the generate() thread after a cancel
WARMUP_TOKENS = 2  # a tiny generation at load time: quantized kernels prepare themselves on first use (~10 s on CPU)
# Tokens that end an assistant turn in common chat templates (only those the vocabulary has are used).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")

_DONE = object()


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


class _TokenQueueStreamer:
    """A Transformers streamer that hands new token ids to the consuming thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first sends the prompt
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(_DONE)


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
        self._context_length = profile.context_length or DEFAULT_CONTEXT
        self._eos_ids: list[int] = []
        self._lock = threading.Lock()

    # --- loading ---

    def model_path(self) -> Path:
        path = self.profile.resolved_path(self.settings.models_dir)
        if path is None:
            raise EngineError(f"model {self.name!r} has no path configured")
        return path

    def load(self) -> None:
        if self.model is not None:
            return
        path = self.model_path()
        if not (path / "config.json").is_file():
            raise EngineError(missing_files_message(self.profile, path))
        # GPTQModel 7.6 sizes its CPU pool to (cores+1)//2 and fails on 2 cores; see bot.models.prepare.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
        quiet_gptqmodel()
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if self.settings.torch_threads:
                torch.set_num_threads(self.settings.torch_threads)
            device_map = "auto" if torch.cuda.is_available() else "cpu"
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype="auto")
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
        self._context_length = self.profile.context_length or configured or DEFAULT_CONTEXT
        self._eos_ids = self._end_of_turn_ids()
        self._warm_up()
        log.info("loaded %s (%s) on %s, dtype %s", self.name, self.profile.format, model.device, model.dtype)

    def _warm_up(self) -> None:
        """Run the kernels once so the first person to ask does not wait for their one-time set-up."""
        params = GenerationParams(max_new_tokens=WARMUP_TOKENS, temperature=0.0)
        hello = [ChatMessage("user", "Hello")]
        if self.count_tokens(hello) >= self._context_length:
            return
        try:
            for _ in self.stream_chat(hello, params, CancelToken()):
                pass
        except Exception as exc:  # noqa: BLE001 - a model that cannot generate is not loaded
            self.unload()
            raise EngineError(f"model {self.name!r} loaded but could not generate: {type(exc).__name__}: {exc}") \
                from exc

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
        self.model = None
        self.tokenizer = None
        try:
            import gc

            import torch

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
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_tokens(self, messages: list[ChatMessage]) -> int:
        return len(self.prompt_ids(messages))

    def stream_chat(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                    stats: StreamStats | None = None) -> Iterator[str]:
        self._require_loaded()
        import torch

        stats = stats if stats is not None else StreamStats()
        ids = self.prompt_ids(messages)
        stats.prompt_tokens = len(ids)
        max_new = self.reply_budget(len(ids), params)
        stop_flag = threading.Event()  # set when the consumer goes away

        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                halt = cancel.cancelled or stop_flag.is_set()
                return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

        streamer = _TokenQueueStreamer()
        input_ids = torch.tensor([ids], device=self.model.device)
        kwargs: dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]), eos_token_id=self._eos_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos_ids[0],
            repetition_penalty=params.repetition_penalty,
        )
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                failure.append(exc)
            finally:
                streamer.end()

        decoder = IncrementalDecoder(self.tokenizer)
        start = time.perf_counter()
        finish = "length"
        with self._lock:
            worker = threading.Thread(target=run, name=f"generate-{self.name}", daemon=True)
            worker.start()
            try:
                while True:
                    item = streamer.queue.get()
                    if item is _DONE:
                        break
                    if item in self._eos_ids:
                        finish = "stop"
                        continue
                    stats.completion_tokens += 1
                    if stats.first_token_s is None:
                        stats.first_token_s = time.perf_counter() - start
                    delta = decoder.push(item)
                    if delta:
                        yield delta
                    if cancel.cancelled:
                        finish = "cancelled"
                        break
                if failure:
                    exc = failure[0]
                    log.error("generation with %s failed: %r", self.name, exc)
                    raise EngineError(f"model {self.name!r} failed while writing the reply: "
                                      f"{type(exc).__name__}") from exc
                if cancel.cancelled:
                    finish = "cancelled"
                tail = decoder.flush()
                if tail and finish != "cancelled":
                    yield tail
            finally:
                stop_flag.set()
                worker.join(JOIN_TIMEOUT_S)
                stats.total_s = time.perf_counter() - start
                stats.finish_reason = finish
                if stats.total_s > 0 and stats.completion_tokens:
                    decode_s = stats.total_s - (stats.first_token_s or 0.0)
                    stats.extra["tokens_per_s"] = (stats.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0
