"""A remote engine: streams chat completions from any OpenAI-compatible server.

vLLM, TGI, llama.cpp's server (`python -m llama_cpp.server`) and Ollama all speak
`POST {base_url}/chat/completions` with `stream: true` (Server-Sent Events). The profile names the
server (`base_url`, e.g. `http://vllm:8000/v1`), the model it serves (`remote_model`) and an optional
API key. Cancelling closes the HTTP stream, which tells the server to stop generating.

Token counting (for history trimming), first that works wins:
1. the server's chat-aware tokenizer, vLLM's `POST /tokenize` with `messages` (exact);
2. the local tokenizer named by `profile.tokenizer` (a folder or hub id already on disk), with its
   chat template (exact when it matches the server's model);
3. the server's plain-text tokenizer, llama.cpp's `POST /extras/tokenize/count`, on the messages'
   roles and contents plus `TEMPLATE_TOKENS_PER_MESSAGE` per message and `TEMPLATE_TOKENS_REPLY`
   for the reply prompt (ChatML's markers: `<|im_start|>`, newline, `<|im_end|>`, newline);
4. an estimate: `ceil(characters / CHARS_PER_TOKEN_ESTIMATE)` per message plus the same overheads.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import httpx

from bot.engines import template_guard
from bot.engines.base import CancelToken, ChatMessage, Engine, EngineError, GenerationParams, StreamStats
from bot.logs import register_secret

if TYPE_CHECKING:
    from bot.config import ModelProfile, Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # reaching the server; a refused connection fails at once anyway
READ_TIMEOUT_S = 120.0  # longest wait for the next streamed chunk (a busy server may queue us)
CANCEL_POLL_S = 0.05  # how often a streaming reply checks for /stop while waiting for the server
PROBE_TIMEOUT_S = 3.0  # model list and tokenizer probes at load time
DEFAULT_CONTEXT_LENGTH = 2048  # when neither the profile nor the server says (llama.cpp's default n_ctx)
CHARS_PER_TOKEN_ESTIMATE = 3.5  # English text with BPE vocabularies; deliberately on the high side of counts
TEMPLATE_TOKENS_PER_MESSAGE = 4  # role markers of one message in a ChatML-like template
TEMPLATE_TOKENS_REPLY = 3  # "<|im_start|>assistant\n"

Counter = Literal["server-chat", "local", "server-text", "estimate"]


class OpenAIEngine(Engine):
    """Chat completions over HTTP; thread-safe so the queue may run several replies at once."""

    supports_concurrency: bool = True  # the server batches; the queue bounds it by REMOTE_CONCURRENCY

    def __init__(self, profile: ModelProfile, settings: Settings) -> None:
        if not profile.base_url:
            raise EngineError(f"model {profile.name!r} has format 'openai' but no base_url")
        self.name = profile.name
        self.profile = profile
        self.settings = settings
        self.base_url = profile.base_url.rstrip("/")
        self.remote_model = profile.remote_model or profile.name
        self._api_key = profile.api_key.get_secret_value() if profile.api_key else None
        register_secret(self._api_key)
        self._client: httpx.Client | None = None
        self._context_length = profile.context_length or DEFAULT_CONTEXT_LENGTH
        self._tokenizer: Any = None
        self._counter: Counter | None = None
        self._counter_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        """Open the HTTP client and look at the server; an unreachable server is not fatal."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=max(4, self.settings.remote_concurrency * 2)),
        )
        if self.profile.tokenizer:
            self._tokenizer = self._load_local_tokenizer(self.profile.tokenizer)
        try:
            response = self._client.get(f"{self.base_url}/models", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as exc:
            log.warning("model server %s not reachable at load (%s); replies will fail until it is up",
                        self.base_url, type(exc).__name__)
            return
        if response.status_code in (401, 403):
            self.unload()
            raise EngineError(f"the model server for {self.name!r} refused our API key (HTTP {response.status_code})")
        if response.is_success:
            self._read_model_list(response)

    def unload(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._tokenizer = None
        self._counter = None

    @property
    def loaded(self) -> bool:
        return self._client is not None

    @property
    def context_length(self) -> int:
        return self._context_length

    # --- tokens --------------------------------------------------------------------------------
    def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Prompt tokens of `messages` (see the module docstring for the order of methods)."""
        payload = [{"role": m.role, "content": m.content} for m in self._guard().messages(messages)]
        with self._counter_lock:
            counter = self._counter
        order: list[Counter] = [counter] if counter else ["server-chat", "local", "server-text", "estimate"]
        for method in order:
            count = self._count_with(method, payload)
            if count is not None:
                if method != "estimate":  # an estimate is never remembered: the server may come up
                    with self._counter_lock:
                        if self._counter is None:
                            log.info("counting tokens for %s with %s", self.name, method)
                            self._counter = method
                return count
        # The remembered method stopped working (server down): estimate this once, retry next time.
        return self._estimate(payload)

    def _count_with(self, method: Counter, payload: list[dict[str, str]]) -> int | None:
        if method == "server-chat":
            data = self._post_json("/tokenize", {"model": self.remote_model, "messages": payload,
                                                 "add_generation_prompt": True}, root=True)
            return int(data["count"]) if data and "count" in data else None
        if method == "local":
            if self._tokenizer is None:
                return None
            ids = self._tokenizer.apply_chat_template(payload, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            return len(ids)
        if method == "server-text":
            text = "\n".join(f"{m['role']}\n{m['content']}" for m in payload)
            data = self._post_json("/extras/tokenize/count", {"model": self.remote_model, "input": text}, root=True)
            if not data or "count" not in data:
                return None
            return int(data["count"]) + TEMPLATE_TOKENS_PER_MESSAGE * len(payload) - (len(payload) - 1) \
                + TEMPLATE_TOKENS_REPLY
        return self._estimate(payload)

    @staticmethod
    def _estimate(payload: list[dict[str, str]]) -> int:
        body = sum(math.ceil(len(m["role"]) / CHARS_PER_TOKEN_ESTIMATE)
                   + math.ceil(len(m["content"]) / CHARS_PER_TOKEN_ESTIMATE) for m in payload)
        return body + TEMPLATE_TOKENS_PER_MESSAGE * len(payload) + TEMPLATE_TOKENS_REPLY

    # --- generation ----------------------------------------------------------------------------
    def _stream(self, messages: list[ChatMessage], params: GenerationParams, cancel: CancelToken,
                stats: StreamStats) -> Iterator[str]:
        """The reply's text deltas; closing the generator or cancelling closes the stream."""
        client = self._require_client()
        body = self._request_body(messages, params)
        stats.finish_reason = "stop"
        done = threading.Event()
        try:
            with client.stream("POST", f"{self.base_url}/chat/completions", json=body) as response:
                if not response.is_success:
                    response.read()
                    raise EngineError(self._http_error_message(response))
                # /stop must not wait for the server's next chunk: hang up from a watcher thread.
                threading.Thread(target=_hang_up_on_cancel, args=(response, cancel, done), daemon=True,
                                 name=f"cancel-{self.name}").start()
                ended = False
                for data in _sse_data(response):
                    if cancel.cancelled:
                        break  # leaving the `with` closes the connection: the server stops generating
                    if data == "[DONE]":
                        ended = True
                        break
                    delta, finished = self._handle_chunk(data, stats)
                    ended = ended or finished
                    if delta:
                        yield delta
                    if cancel.cancelled:
                        break
                if not ended and not cancel.cancelled:
                    # llama.cpp's server, for one, just ends the stream when generation raises
                    raise EngineError(f"The model server for {self.name} ended the reply unexpectedly "
                                      "(its log says why). Please try again.")
        except EngineError:
            raise
        except httpx.HTTPError as exc:
            if not cancel.cancelled:  # (a hang-up of our own after /stop is not an error)
                raise self._transport_error(exc) from exc
        finally:
            done.set()

    def _transport_error(self, exc: httpx.HTTPError) -> EngineError:
        if isinstance(exc, httpx.ConnectError):
            return EngineError(f"The model server for {self.name} can't be reached right now. "
                               "Please try again in a moment.")
        if isinstance(exc, httpx.TimeoutException):
            return EngineError(f"The model server for {self.name} did not answer in time. Please try again.")
        # the connection dropped mid-reply: the server crashed or restarted
        return EngineError(f"The model server for {self.name} stopped in the middle of the reply. Please try again.")

    def _guard(self) -> template_guard.TemplateGuard:
        """The server templates and tokenizes: escape its special tokens (known from a local tokenizer)."""
        tokenizer = self._tokenizer
        return template_guard.for_tokenizer(tokenizer) if tokenizer is not None else template_guard.COMMON

    def _request_body(self, messages: list[ChatMessage], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.remote_model,
            "messages": [{"role": m.role, "content": m.content} for m in self._guard().messages(messages)],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if getattr(self.settings, "remote_extra_sampling", True) and params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty  # vLLM, TGI
            body["repeat_penalty"] = params.repetition_penalty  # llama.cpp, Ollama
        return body

    def _handle_chunk(self, data: str, stats: StreamStats) -> tuple[str, bool]:
        """(text delta, whether the server said the reply is finished) of one streamed event."""
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            log.debug("ignoring a non-JSON event from %s: %.80s", self.base_url, data)
            return "", False
        if "error" in chunk:
            raise EngineError(f"The model server for {self.name} reported an error: {_error_text(chunk)}")
        usage = chunk.get("usage")
        if usage:
            stats.prompt_tokens = int(usage.get("prompt_tokens") or stats.prompt_tokens)
            stats.completion_tokens = int(usage.get("completion_tokens") or stats.completion_tokens)
        delta, finished = "", False
        for choice in chunk.get("choices") or []:
            delta += (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                stats.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
                finished = True
        if delta and not usage:
            stats.completion_tokens += 1  # one chunk is one token on every server we know; usage corrects it
        return delta, finished

    # --- helpers -------------------------------------------------------------------------------
    def _require_client(self) -> httpx.Client:
        if self._client is None:
            raise EngineError(f"model {self.name!r} is not loaded")
        return self._client

    def _server_root(self) -> str:
        """`http://host:port` of `http://host:port/v1` (tokenize endpoints live outside /v1)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def _post_json(self, path: str, body: dict[str, Any], root: bool = False) -> dict[str, Any] | None:
        client = self._client
        if client is None:
            return None
        url = (self._server_root() if root else self.base_url) + path
        try:
            response = client.post(url, json=body, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        if not response.is_success:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _read_model_list(self, response: httpx.Response) -> None:
        try:
            models = response.json().get("data") or []
        except (ValueError, AttributeError):
            return
        ids = [m.get("id") for m in models if isinstance(m, dict)]
        mine = next((m for m in models if isinstance(m, dict) and m.get("id") == self.remote_model), None)
        if mine is None:
            log.warning("model server %s does not list %r (it serves %s)", self.base_url, self.remote_model, ids)
            return
        if self.profile.context_length is None and isinstance(mine.get("max_model_len"), int):
            self._context_length = mine["max_model_len"]  # vLLM reports its context window

    @staticmethod
    def _load_local_tokenizer(name: str) -> Any:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - counting falls back to the server or an estimate
            log.warning("could not load tokenizer %r for counting (%s); using the server or an estimate", name, exc)
            return None

    def _http_error_message(self, response: httpx.Response) -> str:
        code = response.status_code
        detail = _error_text(_json_or_none(response))
        if code in (401, 403):
            return f"The model server for {self.name} refused our API key (HTTP {code})."
        if code == 404:
            return f"The model server does not serve {self.remote_model!r} (HTTP 404){': ' + detail if detail else ''}."
        if code == 429:
            return f"The model server for {self.name} is overloaded right now. Please try again in a moment."
        if code >= 500:
            return f"The model server for {self.name} had an internal error (HTTP {code}). Please try again."
        return f"The model server for {self.name} rejected the request (HTTP {code}){': ' + detail if detail else ''}."


def _hang_up_on_cancel(response: httpx.Response, cancel: CancelToken, done: threading.Event) -> None:
    """Shut the stream's socket once `cancel` is set (wakes the blocked reader; the server sees EOF)."""
    while not done.wait(CANCEL_POLL_S):
        if cancel.cancelled:
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed
            return


def _sse_data(response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events stream (multi-line data joined with newlines)."""
    lines: list[str] = []
    for line in response.iter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive ping
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(data: Any) -> str:
    """The human part of an OpenAI-style (`{"error": {"message"}}`) or FastAPI (`{"detail"}`) error."""
    if not isinstance(data, dict):
        return ""
    error = data.get("error", data.get("detail"))
    if isinstance(error, dict):
        error = error.get("message", "")
    text = str(error or "")
    return text[:200]
