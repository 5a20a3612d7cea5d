"""The sampler on controlled logits: each parameter changes the distribution as defined, per row."""


from __future__ import annotations

import math

import pytest
import torch

from engine.llm.constraints import ForcedTokens
from engine.llm.sampler import CDF_CHUNK, PenaltyState, SamplerState, inverse_cdf, process_logits, sample
from engine.llm.sequence import Sequence
from engine.llm.types import SamplingParams
from tests.llm_fixtures import NothingAllowed

V = 8


def seq(prompt=(1, 2), output=(), stop_ids=(), seed=None, constraint=None, **params) -> Sequence:
    s = Sequence(seq_id=0, request_id="r", index=0, token_ids=list(prompt) + list(output),
                 num_prompt_tokens=len(prompt), params=SamplingParams(**params),
                 stop_token_ids=frozenset(stop_ids), constraint=constraint)
    if seed is not None:
        s.generator = torch.Generator().manual_seed(seed)
    return s


LOGITS = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])


def draw(seqs, rounds):
    """Empirical token frequencies for each sequence's settings: `rounds` rows of each, one batch."""
    rows = [s for s in seqs for _ in range(rounds)]
    result = sample(LOGITS.repeat(len(rows), 1), rows, torch.Generator().manual_seed(0))
    tokens = torch.tensor(result.token_ids).view(len(seqs), rounds)
    return torch.stack([torch.bincount(t, minlength=V) for t in tokens]).float() / rounds


def test_greedy_rows_take_the_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0], [9.0, 0, 0, 0, 0, 0, 0, 1.0]])
    for _ in range(20):
        result = sample(logits.clone(), [seq(temperature=0.0), seq(temperature=5.0)])
        assert result.token_ids[0] == 1


def test_temperature_matches_softmax_of_scaled_logits():
    freq = draw([seq(temperature=1.0), seq(temperature=2.0)], rounds=4000)
    for row, t in enumerate([1.0, 2.0]):
        expected = (LOGITS / t).softmax(-1)
        assert torch.allclose(freq[row], expected, atol=0.03)


def test_top_k_keeps_only_the_k_best():
    freq = draw([seq(top_k=3), seq(top_k=0)], rounds=1500)
    assert freq[0, 3:].sum() == 0
    expected = LOGITS[:3].softmax(-1)
    assert torch.allclose(freq[0, :3], expected, atol=0.04)
    assert freq[1, 3:].sum() > 0  # the neighbour row is not filtered


def test_top_p_keeps_the_smallest_nucleus():
    probs = LOGITS.softmax(-1)  # 0.63, 0.23, 0.086, ...
    freq = draw([seq(top_p=0.8)], rounds=1500)
    assert probs[0] < 0.8 <= probs[:2].sum()
    assert freq[0, 2:].sum() == 0
    assert torch.allclose(freq[0, :2], probs[:2] / probs[:2].sum(), atol=0.04)


def test_min_p_drops_tokens_below_a_share_of_the_best():
    probs = LOGITS.softmax(-1)
    freq = draw([seq(min_p=0.1)], rounds=1500)
    allowed = probs >= 0.1 * probs.max()
    assert freq[0, ~allowed].sum() == 0
    assert torch.allclose(freq[0, allowed], probs[allowed] / probs[allowed].sum(), atol=0.04)


def processed(seqs, penalties=None):
    logits = LOGITS.repeat(len(seqs), 1)
    process_logits(logits, seqs, penalties or PenaltyState(V, torch.device("cpu")))
    return logits


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    s = seq(prompt=(0,), output=(5,), repetition_penalty=2.0, temperature=0.0)
    expected = LOGITS.clone()
    expected[0] = 3.0 / 2.0
    expected[5] = -1.0 * 2.0
    assert torch.allclose(processed([s])[0], expected)
    assert sample(LOGITS[None].clone(), [s]).token_ids == [1]  # token 0 (3.0 -> 1.5) lost to token 1 (2.0)


def test_presence_and_frequency_penalties_count_output_tokens_only():
    s = seq(prompt=(3, 3, 3), output=(0, 0, 1), presence_penalty=0.5, frequency_penalty=1.0, temperature=0.0)
    expected = LOGITS.clone()
    expected[0] -= 2 * 1.0 + 0.5
    expected[1] -= 1 * 1.0 + 0.5
    assert torch.allclose(processed([s])[0], expected)


def test_penalty_counts_follow_sampled_tokens_and_free_rows_are_clean():
    sampler_state = SamplerState(V, torch.device("cpu"))
    state = sampler_state.penalties
    a = seq(prompt=(3,), frequency_penalty=1.0, temperature=0.0)
    plain = seq(temperature=0.0)
    for _ in range(3):  # greedy picks token 0 each time; its count grows step by step
        token = sample(LOGITS.repeat(2, 1), [a, plain], state=sampler_state).token_ids[0]
        a.token_ids.append(token)
    assert a.output_token_ids == [0, 0, 1]
    expected = LOGITS.clone()
    expected[0] -= 2.0
    expected[1] -= 1.0
    assert torch.allclose(processed([a], state)[0], expected)
    row = state.rows[a]
    state.release(a)
    assert state.counts[row].sum() == 0 and not state.seen_prompt[row].any()
    b = seq(prompt=(5,), output=(2,), repetition_penalty=2.0, temperature=0.0)
    processed([b], state)
    assert state.rows[b] == row and state.counts[row, 2] == 1 and state.seen_prompt[row].tolist() == [
        i == 5 for i in range(V)]


def test_logit_bias_adds_to_chosen_tokens():
    result = sample(LOGITS[None].clone(), [seq(logit_bias={7: 100.0}, temperature=0.0)])
    assert result.token_ids == [7]
    freq = draw([seq(logit_bias={0: -100.0, 1: -100.0})], rounds=300)
    assert freq[0, :2].sum() == 0


def test_min_new_tokens_suppresses_stop_tokens_until_reached():
    early = seq(output=(4,), stop_ids={0}, min_new_tokens=2, temperature=0.0)
    late = seq(output=(4, 4), stop_ids={0}, min_new_tokens=2, temperature=0.0)
    assert sample(LOGITS.repeat(2, 1), [early, late]).token_ids == [1, 0]


def test_seeded_rows_are_reproducible_whatever_the_neighbours():
    def tokens(batch):
        s = seq(seed=1234, temperature=1.5)
        rows = [seq(temperature=1.0) for _ in range(batch)] + [s]
        out = []
        for _ in range(30):
            out.append(sample(torch.randn(1, V).repeat(len(rows), 1) * 0 + LOGITS, rows).token_ids[-1])
        return out

    assert tokens(0) == tokens(5) == tokens(17)
    assert len(set(tokens(0))) > 1


def test_logprobs_are_the_models_distribution_before_filtering():
    expected = LOGITS.log_softmax(-1)
    for s in (seq(temperature=2.0, top_k=2, logprobs=3), seq(temperature=0.7, top_p=0.5, min_p=0.2, logprobs=3),
              seq(temperature=1.0, constraint=ForcedTokens([6]), logprobs=3)):
        result = sample(LOGITS[None].clone(), [s])
        chosen, top = result.logprobs[0]
        assert [t for t, _ in top] == [0, 1, 2]
        assert [lp for _, lp in top] == pytest.approx(expected[:3].tolist(), abs=1e-5)
        assert chosen == pytest.approx(expected[result.token_ids[0]].item(), abs=1e-5)
    assert sample(LOGITS[None].clone(), [seq(constraint=ForcedTokens([6]), logprobs=0)]).token_ids == [6]


def test_logprobs_are_always_finite():
    logits = LOGITS.clone()
    logits[4:] = -math.inf  # e.g. a model that masks tokens itself
    result = sample(logits[None].clone(), [seq(temperature=0.0, logprobs=V)])
    assert all(math.isfinite(lp) for _, lp in result.logprobs[0][1])
    assert sample(LOGITS[None].clone(), [seq(logprobs=0)]).logprobs[0][1] == []
    assert sample(LOGITS[None].clone(), [seq()]).logprobs == [None]


def test_a_constraint_that_allows_nothing_fails_only_its_row():
    rows = [seq(temperature=0.0), seq(constraint=NothingAllowed(), temperature=0.0),
            seq(temperature=1.0, seed=3, logprobs=1)]
    result = sample(LOGITS.repeat(3, 1), rows)
    assert result.token_ids[0] == 0 and set(result.errors) == {1}
    assert "allows no token" in result.errors[1]
    assert result.logprobs[2] is not None and math.isfinite(result.logprobs[2][0])


def test_constraint_mask_applies_to_its_row_only():
    forced = seq(constraint=ForcedTokens([6, 7]), temperature=0.0)
    free = seq(temperature=0.0)
    assert sample(LOGITS.repeat(2, 1), [forced, free]).token_ids == [6, 0]


def test_grammar_rows_are_masked_in_one_batch_next_to_free_rows(tokenizer):
    from engine.llm.grammar import constraint_factory

    factory = constraint_factory(tokenizer, {"type": "json_object"}, None, None)
    vocab = len(tokenizer) + 3  # an lm_head padded past the tokenizer
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, len(tokenizer):] = 100.0  # padding ids would win if they were not masked
    rows = [seq(constraint=factory(0), temperature=0.0), seq(temperature=0.0),
            seq(constraint=factory(1), temperature=1.0, seed=1), seq(constraint=ForcedTokens([5]), temperature=0.0)]
    allowed = factory(2).allowed_token_mask(vocab)
    result = sample(logits.clone(), rows)
    assert not result.errors
    assert allowed[result.token_ids[0]] and allowed[result.token_ids[2]]
    assert result.token_ids[1] >= len(tokenizer)  # the free row is untouched
    assert result.token_ids[3] == 5


@pytest.mark.parametrize("vocab", [7, CDF_CHUNK, 3 * CDF_CHUNK + 41, 32000])
def test_inverse_cdf_picks_what_one_float64_cdf_would(vocab):
    """The two-level inverse CDF against the plain one (a float64 cumsum of the whole row): the same
    token for every u, apart from u within rounding of a boundary; never a token of probability 0."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(200, vocab, generator=gen) * 4
    logits[:, ::3] = float("-inf")  # zero-probability tokens everywhere, whole chunks of them too
    logits[:100, : vocab // 2] = float("-inf")
    logits[5] = float("-inf")
    logits[5, vocab - 1] = 0.0  # a single allowed token, at the very end
    probs = logits.softmax(-1)
    u = torch.rand(200, 1, dtype=torch.float64, generator=gen)
    u[0], u[1] = 0.0, 1.0 - 2**-53
    cdf = probs.double().cumsum(-1)
    want = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp(max=vocab - 1)
    got = inverse_cdf(probs, u)
    assert (probs.gather(1, got[:, None]) > 0).all()
    assert got[5] == vocab - 1
    assert (got == want).float().mean() >= 0.99


def test_inverse_cdf_follows_the_distribution():
    probs = torch.zeros(1, 1000)
    probs[0, [3, 500, 999]] = torch.tensor([0.2, 0.5, 0.3])
    u = torch.rand(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    picks = inverse_cdf(probs.expand(20000, -1).contiguous(), u)
    share = {t: (picks == t).float().mean().item() for t in (3, 500, 999)}
    assert set(picks.tolist()) == {3, 500, 999}
    assert abs(share[3] - 0.2) < 0.015 and abs(share[500] - 0.5) < 0.015 and abs(share[999] - 0.3) < 0.015


def test_greedy_ties_take_the_first_maximal_token():
    """As transformers' argmax: of equal best logits, the lowest token id (also for 64 rows x 32k)."""
    logits = torch.zeros(64, 32000)
    logits[:, [20000, 100, 31999]] = 1.0
    seqs = [Sequence(i, f"r{i}", 0, [1, 2], 2, SamplingParams(temperature=0.0)) for i in range(64)]
    assert sample(logits, seqs).token_ids == [100] * 64
