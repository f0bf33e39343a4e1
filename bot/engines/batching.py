"""Continuous batching for a local Transformers model: one decode loop over every active reply.

Decoding is memory-bound: reading the weights once for eight rows costs little more than for one. A reply that
arrives while others decode is prefilled (with whoever arrived with it) and joins at the next step; a reply that
ends leaves at once and its slot is reused. The loop runs on the engine thread (:mod:`bot.engines.engine_thread`)
as numbered steps:

1. admit   - pending replies join while the batch has a free row and the KV cache budget allows
2. prefill - the joiners' prompts in one left-padded forward, after whatever start of each the prefix cache
             (:mod:`bot.engines.prefix_cache`) holds; their first tokens out at once; their cache joins
3. decode  - one forward for all rows: left-padded cache, a padding mask, each row's own positions
4. sample  - all rows at once, each with its own settings: repetition penalty over its own tokens, greedy or
             temperature/top-p drawn from its own seeded generator
5. emit    - the new tokens go to each reply's consumer (one host sync for the whole batch)
6. retire  - rows that hit an end-of-turn token, their budget or /stop leave (the prefix cache keeps their
             prompt and reply for the chat's next turn); padding no row needs is cut

The cache (:mod:`bot.engines.kv_cache`) holds rows of one length: a shorter row is padded on the left and masked,
so a batched greedy reply equals the same reply decoded alone (up to float rounding of near ties); each step
writes its column in place.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.nn import functional

from bot.engines.base import CancelToken, GenerationParams
from bot.engines.engine_thread import EngineThread
from bot.engines.kv_cache import BatchCache, Past
from bot.engines.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

# --- tuning constants ---
DEFAULT_MAX_BATCH = 8
KV_MEMORY_SHARE = 0.4  # of the memory free after loading, for the KV cache (copied when a row joins or leaves)
PREFILL_TOKENS_PER_STEP = 512  # padded prompt tokens in one prefill between two decode steps (running rows wait)
# Top-p looks at the most likely tokens first, then at more, and sorts the whole vocabulary only for a row whose
# nucleus reaches past those: sorting 49k logits cost 3.4 ms a row (15 ms for 8 rows, a whole decode step), the
# widest top-k 0.2 ms. On SmolLM2 at temperature 0.7 the first 256 held at least 93% of the mass in every step.
TOP_P_CANDIDATES = (256, 4096)


class BatchModel(Protocol):
    """The two forwards the scheduler needs from a model."""

    def prefill(self, prompts: list[list[int]], past: Past | None = None) -> tuple[torch.Tensor, BatchCache]:
        """Logits [rows, vocab] of each prompt's last token, and a fresh cache holding the prompts (after `past`,
        the rows' kept starts, when given)."""

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: BatchCache) -> torch.Tensor:
        """Logits [rows, vocab] for one new token per row ([rows, 1]); `mask` [rows, 1, 1, capacity]."""


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop", "length", "cancelled"


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(eq=False)
class Request:
    """One reply: its prompt, settings and the channel its tokens go out by (read from any thread)."""

    ids: list[int]
    params: GenerationParams
    max_new: int
    cancel: CancelToken
    out: queue.SimpleQueue[int | Finished | Failed] = field(default_factory=queue.SimpleQueue)
    finish: str = ""  # why it ended, once :meth:`stream` is done

    def stream(self) -> Iterator[int]:
        """Token ids as they are made; ends with the finish reason in :attr:`finish`, raises what failed it."""
        while True:
            item = self.out.get()
            if isinstance(item, Finished):
                self.finish = item.reason
                return
            if isinstance(item, Failed):
                raise item.error
            yield item


@dataclass(eq=False)
class Row:
    """A request's decoding state on the engine thread (its tokens so far and next input are its row of the
    :class:`Batch` tensors)."""

    request: Request
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # the reply's tokens so far

    @property
    def length(self) -> int:
        """Tokens this row will have in the cache at most (prompt and whole budget)."""
        return len(self.request.ids) + self.request.max_new


class BatchScheduler:
    """Owns the batch of one loaded model; :meth:`submit` from any thread, the loop runs on `thread`."""

    def __init__(self, model: BatchModel, thread: EngineThread, end_ids: frozenset[int], special_ids: frozenset[int],
                 device: torch.device, max_batch: int, kv_budget_tokens: int | None,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.model, self.thread = model, thread
        self.end_ids, self.special_ids = end_ids, special_ids
        self.device = device
        self.max_batch = max(1, max_batch)
        self.kv_budget_tokens = kv_budget_tokens  # rows x padded length the cache may hold; None: unbounded
        self.prefix_cache = prefix_cache  # rows that left, for prompts that start the same way; None: none kept
        self.batch: Batch | None = None  # the rows decoding; None when none is
        self._ended: list[tuple[Request, str]] = []  # replies that ended this step, told once their rows left
        self._pending: list[Request] = []
        self._lock = threading.Lock()
        self._looping = False
        self.peak_rows = 0  # the widest batch so far (benchmarks and tests read it)

    # --- any thread ---

    def submit(self, request: Request) -> Request:
        with self._lock:
            self._pending.append(request)
            start = not self._looping
            self._looping = True
        if start:
            self.thread.submit(self._loop)
        return request

    def run_together(self, requests: list[Request]) -> None:
        """On the engine thread (warm-up): these requests in one batch, decoded to their end before returning."""
        with self._lock:
            self._pending.extend(requests)
            self._looping = True
        self._loop()

    @property
    def rows(self) -> list[Row]:
        return self.batch.rows if self.batch is not None else []

    @property
    def cache(self) -> BatchCache | None:
        return self.batch.cache if self.batch is not None else None

    @property
    def active(self) -> int:
        return len(self.rows) + len(self._pending)

    # --- the loop (engine thread) ---

    def _loop(self) -> None:
        try:
            with torch.inference_mode():  # every tensor of the batch an inference tensor (else Dynamo recompiles)
                self._steps()
        except Exception as exc:  # noqa: BLE001 - a bug in a step: its replies fail, the next submit starts afresh
            log.exception("the batch loop failed")
            self.fail_all(exc)
            with self._lock:
                self._looping = False

    def _steps(self) -> None:
        while True:
            self.thread.run_pending()  # loads, counts and calls posted meanwhile wait at most one step
            with self._lock:
                if not self.rows and not self._pending:
                    self._looping = False
                    break
            self._admit_and_prefill()  # steps 1-2
            if self.rows:
                self._step()  # steps 3-6

    def _admit_and_prefill(self) -> None:
        """Steps 1-2: the joiners' prompts in one forward, each first token out at once; the next decode step
        includes them."""
        joiners = self._admit()
        if not joiners:
            return
        try:
            joined = self._prefill(joiners)
        except Exception as exc:  # noqa: BLE001 - these replies fail; the batch goes on
            log.warning("prefill of %d prompts failed: %r", len(joiners), exc)
            for request in joiners:
                request.out.put(Failed(exc))
            return
        if joined is None:
            return
        try:
            self._join(joined)
        except Exception as exc:  # noqa: BLE001 - the batch's cache may be half merged: its replies fail too
            log.warning("joining the batch failed: %r", exc)
            for row in joined.rows + self.rows:
                row.request.out.put(Failed(exc))
            self.batch = None

    def _admit(self) -> list[Request]:
        """1. admit: the oldest pending requests while they fit, first come first served (no one jumps a reply
        waiting for room); cancelled ones leave at once."""
        joiners: list[Request] = []
        with self._lock:
            for request in list(self._pending):
                if request.cancel.cancelled:
                    self._pending.remove(request)
                    request.out.put(Finished("cancelled"))
                    continue
                if not self._fits([*joiners, request]):
                    break
                self._pending.remove(request)
                joiners.append(request)
        return joiners

    def _fits(self, joiners: list[Request]) -> bool:
        """Room for these joiners: free rows, the padded cache within the KV budget, and their padded prompts
        within one prefill (a single prompt always fits, however long)."""
        if len(self.rows) + len(joiners) > self.max_batch:
            return False
        if len(joiners) > 1 and len(joiners) * max(len(r.ids) for r in joiners) > PREFILL_TOKENS_PER_STEP:
            return False
        lengths = [row.length for row in self.rows] + [len(r.ids) + r.max_new for r in joiners]
        return self.kv_budget_tokens is None or len(lengths) == 1 or \
            len(lengths) * max(lengths) <= self.kv_budget_tokens

    def _prefill(self, requests: list[Request]) -> Batch | None:
        """2. prefill: the prompts in one forward (left-padded), each first token sampled and emitted; the rows
        still going, as a batch to join (None when every one ended at its first token)."""
        rows = [self._new_row(request) for request in requests]
        # A seeded reply is prefilled whole: kept rows were computed in other shapes (decode steps, other batches),
        # whose float rounding would move its draws, and a seed promises the same reply to the same prompt.
        found = [self.prefix_cache.longest(request.ids) if self.prefix_cache and request.params.seed is None
                 else None for request in requests]
        shared = [hit[1] if hit else 0 for hit in found]  # leading tokens a kept row already holds
        past = None
        if any(shared):
            past = Past.right_aligned([[(k[:, :n], v[:, :n]) for k, v in hit[0].layers] if hit else None
                                       for hit, n in zip(found, shared, strict=True)])
        logits, cache = self.model.prefill([r.ids[n:] for r, n in zip(requests, shared, strict=True)], past)
        # The repetition penalty looks at the text so far without the chat template's special tokens, which every
        # prompt repeats; penalizing <|im_end|> would keep the model from ending its turn.
        vocab = logits.shape[-1]
        own = [[t for t in request.ids if t not in self.special_ids] for request in requests]
        width = max(1, *(len(ids) for ids in own))
        seen = torch.tensor([ids + [vocab] * (width - len(ids)) for ids in own], device=self.device)
        picked = self._pick(rows, self._scores(rows, logits, seen))
        going, ids = self._emit(rows, picked)
        joined = Batch(rows, cache, seen, picked, vocab)
        joined.add_seen(ids, self.special_ids)
        self._tell_ended()
        if not going:
            return None
        if len(going) < len(rows):
            joined.keep(going)
        return joined

    def _new_row(self, request: Request) -> Row:
        params = request.params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return Row(request, generator)

    def _join(self, joined: Batch) -> None:
        if self.batch is None:
            self.batch = joined
        else:
            self.batch.join(joined)
        self.peak_rows = max(self.peak_rows, len(self.rows))

    def _step(self) -> None:
        """Steps 3-6 for every row."""
        leaving = [i for i, row in enumerate(self.rows) if row.request.cancel.cancelled]
        self._ended.extend((self.rows[i].request, "cancelled") for i in leaving)
        self._retire(leaving)
        batch = self.batch
        if batch is None:
            return
        rows, cache = batch.rows, batch.cache
        try:
            # 3. decode
            logits = self.model.decode(batch.last[:, None], cache.positions[:, None], cache.step_mask(), cache)
            # 4. sample
            picked = self._pick(rows, self._scores(rows, logits, batch.seen))
            # 5. emit (its .tolist() is the one host sync of the step)
            going, ids = self._emit(rows, picked)
            batch.add_seen(ids, self.special_ids)
        except Exception as exc:  # noqa: BLE001 - out of memory, a kernel error: these rows fail, the loop goes on
            log.warning("a batched decode step of %d rows failed: %r", len(rows), exc)
            self._ended = []
            for row in rows:
                row.request.out.put(Failed(exc))
            self._retire(list(range(len(rows))), keep_kv=False)
            return
        cache.advance()
        batch.last = picked
        # 6. retire
        self._retire(sorted(set(range(len(rows))) - set(going)))

    def _scores(self, rows: list[Row], logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """4. sample, part one: [rows, vocab] float scores, each row's repetition penalty applied over its own
        tokens (`seen`), as Transformers' RepetitionPenaltyLogitsProcessor does with one penalty for a batch: a
        gather and a scatter of the seen tokens' scores (0.17 ms for 8 rows; a mask over the vocabulary took 3 ms).
        Padding points at a spare column past the vocabulary."""
        penalties = [row.request.params.repetition_penalty or 1.0 for row in rows]
        if all(p == 1.0 for p in penalties):
            return logits.float()
        rows_n, vocab = logits.shape
        scores = torch.empty(rows_n, vocab + 1, dtype=torch.float32, device=logits.device)
        scores[:, :vocab] = logits
        penalty = torch.tensor(penalties, device=scores.device)[:, None]
        picked = scores.gather(1, seen)
        scores.scatter_(1, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
        return scores[:, :vocab]

    def _pick(self, rows: list[Row], scores: torch.Tensor) -> torch.Tensor:
        """4. sample, part two: [rows] token ids: the best score for greedy rows, a draw for the others."""
        picked = scores.argmax(dim=-1)
        drawn = [i for i, row in enumerate(rows) if not row.request.params.greedy]
        if not drawn:
            return picked
        params = [rows[i].request.params for i in drawn]
        index = torch.tensor(drawn, device=scores.device)
        uniforms = torch.cat([torch.rand(1, generator=rows[i].generator, device=scores.device) for i in drawn])
        tokens = sample(scores.index_select(0, index),
                        torch.tensor([p.temperature for p in params], device=scores.device),
                        torch.tensor([p.top_p for p in params], device=scores.device), uniforms)
        return picked.index_copy(0, index, tokens)

    def _emit(self, rows: list[Row], picked: torch.Tensor) -> tuple[list[int], list[int]]:
        """5. emit each row's token; the indices of the rows still going, and every row's token. The others'
        consumers are told why they ended once they have left the batch (:meth:`_tell_ended`)."""
        going: list[int] = []
        ids = picked.tolist()
        for i, (row, token) in enumerate(zip(rows, ids, strict=True)):
            request = row.request
            if token in self.end_ids:
                self._ended.append((request, "stop"))
                continue
            request.out.put(token)
            row.tokens.append(token)
            if len(row.tokens) >= request.max_new:
                self._ended.append((request, "length"))
            elif request.cancel.cancelled:
                self._ended.append((request, "cancelled"))
            else:
                going.append(i)
        return going, ids

    def _retire(self, indices: list[int], keep_kv: bool = True) -> None:
        """6. retire: drop these rows from the batch (the prefix cache keeps their prompts and replies), then the
        leading columns only padding fills; then tell the replies that ended."""
        gone = set(indices)
        if self.batch is not None and gone and keep_kv and self.prefix_cache is not None:
            for i in sorted(gone):
                row, layers = self.batch.rows[i], self.batch.cache.row(i)
                self.prefix_cache.keep((row.request.ids + row.tokens)[:layers[0][0].shape[1]], layers)
        if self.batch is not None and gone:
            keep = [i for i in range(len(self.batch.rows)) if i not in gone]
            if keep:
                self.batch.keep(keep)
            else:
                self.batch = None
        self._tell_ended()

    def _tell_ended(self) -> None:
        """Each ended reply's consumer learns why only now, after its row left: when a reply's stream is over,
        the memory its row held is free."""
        ended, self._ended = self._ended, []
        for request, reason in ended:
            request.out.put(Finished(reason))

    def fail_all(self, error: BaseException) -> None:
        """Unload: every reply still here ends with `error` (engine thread, between steps)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for request in [row.request for row in self.rows] + pending:
            request.out.put(Failed(error))
        self.batch, self._ended = None, []


@dataclass(eq=False)
class Batch:
    """Rows decoding together, with what the next step needs of them (row i of each tensor is `rows[i]`'s). A
    prefill makes one of its joiners; the scheduler's grows by :meth:`join` and shrinks by :meth:`keep`."""

    rows: list[Row]
    cache: BatchCache
    seen: torch.Tensor  # [rows, n] the tokens each row's repetition penalty covers; `vocab` is padding (none)
    last: torch.Tensor  # [rows] each row's newest token, the next step's input
    vocab: int

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay, in this order."""
        index = torch.tensor(indices, device=self.last.device)
        self.rows = [self.rows[i] for i in indices]
        self.cache.keep(index)
        self.seen, self.last = self.seen.index_select(0, index), self.last.index_select(0, index)

    def join(self, other: Batch) -> None:
        """Add the rows of another batch (a prefill's) below these."""
        self.cache.join(other.cache)
        width = max(self.seen.shape[1], other.seen.shape[1])
        self.seen = torch.cat([functional.pad(t, (0, width - t.shape[1]), value=self.vocab)
                               for t in (self.seen, other.seen)])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows

    def add_seen(self, ids: list[int], special_ids: frozenset[int]) -> None:
        """One more column of `seen`: each row's new token, or padding for a special one."""
        column = [[self.vocab if t in special_ids else t] for t in ids]
        self.seen = torch.cat([self.seen, torch.tensor(column, device=self.seen.device)], dim=1)


def sample(scores: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
           uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `scores` [rows, vocab] at the row's `temperature`, among the smallest set of most likely
    tokens that holds its `top_p` of the probability (what Transformers' TopPLogitsWarper keeps), picked by inverse
    CDF with the row's own `uniforms` draw in [0, 1) (so a seed gives the same reply in any batch). All rows in a few
    batched ops (a per-row multinomial cost 0.7 ms a row and step); a row with top_p 1 draws from every token in
    vocabulary order, without sorting; a row whose nucleus is wider than the candidates is the only one sorted."""
    probs = torch.softmax(scores / temperature[:, None], dim=-1)
    picked = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    todo = torch.arange(probs.shape[0], device=probs.device)  # the rows still to pick
    whole = top_p >= 1.0
    if bool(whole.any()):
        picked[whole] = _draw(probs[whole], None, uniforms[whole])
        todo = todo[~whole]
    vocab = probs.shape[-1]
    for width in sorted({min(w, vocab) for w in (*TOP_P_CANDIDATES, vocab)}):
        if todo.numel() == 0:
            break
        part = probs if todo.numel() == probs.shape[0] else probs[todo]  # no copy while every row is still to pick
        values, indices = torch.topk(part, width) if width < vocab else torch.sort(part, descending=True)
        nucleus = top_p[todo]
        enough = values.sum(-1) >= nucleus if width < vocab else torch.ones_like(todo, dtype=torch.bool)
        if not bool(enough.all()):  # these rows' nuclei reach past the candidates: they try a wider set
            values, indices, nucleus = values[enough], indices[enough], nucleus[enough]
        rows, todo = todo[enough], todo[~enough]
        before = torch.cumsum(values, dim=-1) - values  # mass of the tokens ranked above each one
        kept = values.masked_fill((before >= nucleus[:, None]) & (before > 0), 0.0)  # the first always stays
        picked[rows] = _draw(kept, indices, uniforms[rows])
    return picked


def _draw(weights: torch.Tensor, indices: torch.Tensor | None, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token where the cumulative `weights` first pass its uniform's share of their total; `indices`
    names the columns' tokens (None: column i is token i)."""
    cdf = torch.cumsum(weights, dim=-1)
    choice = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (choice if indices is None else indices.gather(1, choice)).squeeze(1)


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """What one token of one row costs in the KV cache of a decoder with this config."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for the KV cache now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024 ** 3  # unknown (not Linux): assume a modest machine


def kv_budget_tokens(config: Any, dtype: torch.dtype, device: torch.device) -> int:
    """Rows x padded length the cache may hold, from the memory free after loading."""
    return int(KV_MEMORY_SHARE * free_memory_bytes(device) // kv_bytes_per_token(config, dtype))
