"""The batch's sampling step on its own (no model): every row of a batch picked in one go, each by its own
settings, the way Transformers' repetition penalty and top-p warper would pick it alone."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from bot.engines.base import CancelToken, GenerationParams
from bot.engines.batching import BatchScheduler, Request, Row, sample


def rows_with(*params: GenerationParams) -> list[Row]:
    return [Row(Request([1, 2, 3], p, 8, CancelToken()), None) for p in params]


def scheduler() -> BatchScheduler:
    return BatchScheduler(model=None, thread=None, end_ids=frozenset(), special_ids=frozenset(),  # type: ignore
                          device=torch.device("cpu"), max_batch=8, kv_budget_tokens=None)


def test_each_rows_repetition_penalty_is_transformers_own_over_its_own_tokens() -> None:
    """Rows of different penalties and lengths (shorter ones padded) score as Transformers' processor scores
    each alone; a row without a penalty is untouched."""
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(3, vocab, dtype=torch.bfloat16) * 4
    tokens = [[3, 7, 7, 12], [0, 49], [5]]
    penalties = [1.3, 1.1, 1.0]
    seen = torch.tensor([t + [vocab] * (4 - len(t)) for t in tokens])  # padding: the vocabulary size
    rows = rows_with(*(GenerationParams(repetition_penalty=p) for p in penalties))
    got = scheduler()._scores(rows, logits, seen)
    for i, (ids, penalty) in enumerate(zip(tokens, penalties, strict=True)):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[i:i + 1].float())[0]
        assert torch.equal(got[i], want), i


def test_top_p_draws_only_from_the_nucleus_by_each_rows_own_uniform() -> None:
    """The smallest set of most likely tokens holding top_p: tokens past it are never drawn, and a draw u picks
    the token whose share of the nucleus' cumulative mass first exceeds u."""
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: token 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    scores = probs.log().expand(4, 4).contiguous()
    temperature, top_p = torch.ones(4), torch.tensor([0.75, 0.75, 0.75, 1.0])
    picked = sample(scores, temperature, top_p, torch.tensor([0.0, 0.7, 0.999, 0.999]))
    # nucleus at 0.75: tokens 1 and 3 (0.5 + 0.3); u * 0.8 < 0.5 -> token 1, else token 3; top_p 1 keeps all
    # (drawn in vocabulary order: 0.999 falls in the last token's share)
    assert picked.tolist() == [1, 3, 3, 3]


def test_a_flat_row_beside_a_peaked_one_still_gets_its_whole_nucleus() -> None:
    """A row whose nucleus reaches past the first candidates (a flat distribution) is sorted in full; its
    neighbour's pick is unchanged by it."""
    vocab = 1000
    flat = torch.zeros(vocab)
    peaked = torch.full((vocab,), -30.0)
    peaked[7] = 0.0
    scores = torch.stack([flat, peaked])
    draws = torch.linspace(0, 0.999, 200)
    picks = [sample(scores, torch.ones(2), torch.tensor([0.9, 0.9]), torch.tensor([float(u), float(u)]))
             for u in draws]
    flat_picks = {int(p[0]) for p in picks}
    assert all(int(p[1]) == 7 for p in picks)
    assert len(flat_picks) > 150 and max(flat_picks) >= 400  # beyond the 256 candidates: the nucleus is 900


def test_each_row_widens_its_candidates_only_as_far_as_its_own_nucleus_needs() -> None:
    """Three rows in one batch: a nucleus of ~900 tokens (past the first candidates), one of ~5,400 (past the
    widest: sorted in full) and one token; each row draws from exactly its own nucleus."""
    vocab = 6000
    wide = torch.full((vocab,), -30.0)
    wide[:1000] = 0.0
    scores = torch.stack([wide, torch.zeros(vocab), torch.full((vocab,), -30.0)])
    scores[2, 7] = 0.0
    draws = torch.linspace(0, 0.999, 300)
    picks = torch.stack([sample(scores, torch.ones(3), torch.full((3,), 0.9), torch.full((3,), float(u)))
                         for u in draws])
    assert int(picks[:, 0].max()) < 1000 and len(set(picks[:, 0].tolist())) > 256
    assert int(picks[:, 1].max()) >= 4096 and len(set(picks[:, 1].tolist())) > 250
    assert set(picks[:, 2].tolist()) == {7}


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 0.9), (1.0, 1.0), (3.0, 0.95)])
def test_sampled_distribution_matches_transformers_top_p_warper(temperature: float, top_p: float) -> None:
    """Over many draws, the batched sampler picks each token as often as Transformers' TopPLogitsWarper and a
    multinomial draw would (total variation within sampling noise): a peaked nucleus, every token, and a nucleus
    wider than the first candidates."""
    torch.manual_seed(1)
    logits = torch.randn(1, 300) * 3
    warped = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits / temperature) if top_p < 1 \
        else logits / temperature
    want = torch.softmax(warped, dim=-1)[0]
    n = 100000  # the flat case's nucleus has ~250 tokens: fewer draws leave ~0.04 of noise
    generator = torch.Generator().manual_seed(2)
    picks = sample(logits.expand(n, -1), torch.full((n,), temperature), torch.full((n,), top_p),
                   torch.rand(n, generator=generator))
    got = torch.bincount(picks, minlength=300).float() / n
    assert float((got - want).abs().sum() / 2) < 0.03
    assert float(got[want == 0].sum()) == 0.0  # nothing outside the nucleus


def test_greedy_and_sampled_rows_are_picked_together_each_by_its_settings() -> None:
    torch.manual_seed(3)
    scores = torch.randn(3, 64) * 5
    greedy = GenerationParams(temperature=0.0)
    rows = rows_with(greedy, GenerationParams(temperature=1.0, top_p=0.95), greedy)
    rows[1].generator = torch.Generator().manual_seed(11)
    first = scheduler()._pick(rows, scores)
    rows[1].generator = torch.Generator().manual_seed(11)
    again = scheduler()._pick(rows, scores)
    assert first[0] == scores[0].argmax() and first[2] == scores[2].argmax()
    assert torch.equal(first, again)  # the seeded row repeats its draw
