"""The prefix cache: a prompt that starts like a kept row computes only the rest, and gets what the whole prompt
would give."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bot.engines.kv_cache import Past
from bot.engines.prefix_cache import MIN_SHARED_TOKENS, PrefixCache
from bot.engines.transformers_engine import _Forwards
from bot.models.prepare import prepare
from tests.models_fixture import shared_models_dir


def layers(n: int, mark: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((2, n, 4), mark), torch.full((2, n, 4), mark)) for _ in range(3)]


def keep(cache: PrefixCache, tokens: list[int]) -> None:
    cache.keep(tokens, layers(len(tokens)))


def test_a_prompt_reuses_the_kept_row_it_shares_the_most_leading_tokens_with() -> None:
    cache = PrefixCache(1000)
    keep(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    keep(cache, [1, 2, 3, 4, 9, 9])
    hit = cache.longest([1, 2, 3, 4, 5, 6, 0, 0])
    assert hit is not None and hit[0].tokens[:6] == (1, 2, 3, 4, 5, 6) and hit[1] == 6
    # never the whole prompt: its last token's logits are the prefill's to compute
    hit = cache.longest([1, 2, 3, 4, 5, 6, 7, 8])
    assert hit is not None and hit[1] == 7
    assert cache.longest([1, 2, 3, 0, 0, 0]) is None  # below MIN_SHARED_TOKENS: computed with the rest
    assert MIN_SHARED_TOKENS == 4
    assert (cache.hits, cache.reused_tokens) == (2, 13)


def test_a_chat_s_next_turn_replaces_its_last_and_the_budget_drops_the_least_recently_used() -> None:
    cache = PrefixCache(20)
    keep(cache, [1, 2, 3, 4, 5])
    keep(cache, [1, 2, 3, 4, 5, 6, 7])  # the same chat, one turn on: it holds all of the first
    assert cache.tokens == 7
    keep(cache, [1, 2, 3, 4])  # nothing new: already held
    assert cache.tokens == 7
    keep(cache, [8, 8, 8, 8, 8, 8])
    assert cache.longest([1, 2, 3, 4, 5, 6, 0]) is not None  # now the most recently used
    keep(cache, [9, 9, 9, 9, 9, 9, 9, 9, 9])  # 22 tokens: the least recently used goes
    assert cache.tokens == 16
    assert cache.longest([8, 8, 8, 8, 8, 0]) is None
    assert cache.longest([1, 2, 3, 4, 5, 0]) is not None
    keep(cache, list(range(10, 40)))  # longer than the whole budget: not kept, nothing dropped
    assert cache.tokens == 16
    assert PrefixCache(0).longest([1, 2, 3, 4, 5]) is None


def test_rows_are_right_aligned_after_their_padding() -> None:
    past = Past.right_aligned([layers(3, 1.0), None, layers(1, 2.0)])
    assert past.mask.tolist() == [[True, True, True], [False, False, False], [False, False, True]]
    keys, values = past.layers[0]
    assert keys.shape == (3, 2, 3, 4) and values.shape == (3, 2, 3, 4)
    assert keys[0].eq(1.0).all() and keys[1].eq(0.0).all()
    assert keys[2, :, :2].eq(0.0).all() and keys[2, :, 2].eq(2.0).all()


@pytest.mark.slow
def test_logits_after_kept_starts_equal_the_whole_prompts_in_float32() -> None:
    """The reference build in float32, where only summation order differs: a batch of three prompts, one after a
    kept start of 20 tokens, one after 10, one with none (so both kinds of padding meet), gives each prompt's
    last-token logits as computed whole, and a cache that holds each prompt in full, at its own positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare(shared_models_dir(), ["hf"])[0].path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    class Engine:
        pass

    engine: Any = Engine()
    engine.model = model
    forwards = _Forwards(engine)
    system = {"role": "system", "content": "You are a helpful, concise assistant."}
    chats = [[system, {"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}],
             [system, {"role": "user", "content": "Tell me a long story about a dragon, please."}]]
    a, b = (tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False)["input_ids"] for c in chats)
    with torch.inference_mode():
        whole_a, _ = forwards.prefill([a])
        whole_b, _ = forwards.prefill([b])
        _, start_a = forwards.prefill([a[:20]])
        _, start_b = forwards.prefill([b[:10]])
        logits, cache = forwards.prefill([a[20:], b[10:], b], Past.right_aligned([start_a.row(0), start_b.row(0),
                                                                                  None]))
    for row, whole in ((0, whole_a), (1, whole_b), (2, whole_b)):
        assert torch.allclose(logits[row], whole[0], atol=1e-3), row
        assert logits[row].argmax() == whole[0].argmax()
    assert cache.positions.tolist() == [len(a), len(b), len(b)]
    assert cache.mask[:, :cache.width].sum(-1).tolist() == [len(a), len(b), len(b)]
