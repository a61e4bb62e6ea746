"""The logits processors and the acceptance rule on tiny hand-made distributions."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from decoding.errors import InvalidRequestError
from decoding.params import SamplingParams
from decoding.sampling import (
    Acceptance,
    accept_greedy,
    accept_sampled,
    accept_sampled_rows,
    processed_probs,
    sample,
    sample_rows,
)

VOCAB = 6


def _emitted_first_token_counts(draft_probs, target_probs, n: int, seed: int) -> torch.Tensor:
    """Run the acceptance rule with γ = 1 many times; count the first emitted token."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(n):
        draft_token = sample(draft_probs[:1], generator)
        result = accept_sampled(draft_token, draft_probs[:1], target_probs, generator)
        first = int(draft_token[0]) if result.num_accepted == 1 else result.bonus_token
        counts[first] += 1
    return counts


TARGET = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15, 0.00], [1 / 6] * 6])
DRAFT = torch.tensor([[0.30, 0.10, 0.30, 0.05, 0.05, 0.20]])


def test_rejection_rule_reproduces_the_target_distribution() -> None:
    n = 20_000
    counts = _emitted_first_token_counts(DRAFT, TARGET, n, seed=0)
    expected = TARGET[0] * n
    assert counts[5] == 0  # the target gives token 5 no mass: it must never come out
    support = expected > 0
    _, p_value = chisquare(counts[support].numpy(), expected[support].numpy())
    assert p_value > 0.01, (counts, expected)


def test_a_wrong_rule_fails_the_same_check() -> None:
    """Accepting every draft token (a broken sampler) yields the draft's distribution; the
    statistical check above must reject that, or it proves nothing."""
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.bincount(sample(DRAFT.expand(n, -1), generator), minlength=VOCAB).float()
    expected = TARGET[0] * n
    support = expected > 0
    scaled = counts[support] * expected[support].sum() / counts[support].sum()
    _, p_value = chisquare(scaled.numpy(), expected[support].numpy())
    assert p_value < 1e-6


# A context-free pair: the target's and the draft's distributions at each position do not
# depend on the tokens before it, so the first two tokens out must be distributed as the
# target's rows 0 and 1 independently.
TARGET_ROWS = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15, 0.00],
                            [0.30, 0.05, 0.05, 0.10, 0.10, 0.40],
                            [1 / 6] * 6])
DRAFT_ROWS = torch.tensor([[0.30, 0.10, 0.30, 0.05, 0.05, 0.20],
                           [0.05, 0.40, 0.30, 0.10, 0.10, 0.05]])


def _first_two_tokens(rule: str, n: int, seed: int) -> torch.Tensor:
    """Counts [vocab, vocab] of the first two tokens emitted by γ = 2 steps under ``rule``
    (``accept_sampled``, or ``accept_sampled_rows`` with the request beside another); where a
    step emits one token, a γ = 1 step from position 1 gives the second."""
    generator, other = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(-seed)

    def accept(drafts: torch.Tensor, draft: torch.Tensor, target: torch.Tensor) -> Acceptance:
        if rule == "accept_sampled":
            return accept_sampled(drafts, draft, target, generator)
        gamma = len(drafts)  # beside a request at γ = 1 with tokens of its own
        both = accept_sampled_rows(torch.cat([drafts, torch.tensor([2])]),
                                   torch.cat([draft, DRAFT_ROWS[:1]]),
                                   torch.cat([target, TARGET_ROWS[:2]]), [gamma, 1],
                                   [generator, other])
        return both[0]

    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(n):
        drafts = torch.cat([sample(DRAFT_ROWS[0:1], generator), sample(DRAFT_ROWS[1:2], generator)])
        result = accept(drafts, DRAFT_ROWS, TARGET_ROWS)
        out = [*drafts[: result.num_accepted].tolist(), result.bonus_token]
        if len(out) < 2:
            draft = sample(DRAFT_ROWS[1:2], generator)
            second = accept(draft, DRAFT_ROWS[1:2], TARGET_ROWS[1:])
            out.append(int(draft[0]) if second.num_accepted else second.bonus_token)
        counts[out[0], out[1]] += 1
    return counts


@pytest.mark.parametrize("rule", ["accept_sampled", "accept_sampled_rows"])
def test_the_first_two_tokens_of_a_step_follow_the_target_jointly(rule: str) -> None:
    """The first token's distribution (above) does not show a rule that is right at the first
    draft position and wrong after it: one uniform for every position, or counting accepted
    tokens rather than the accepted prefix (found by mutating the code)."""
    n = 30_000
    counts = _first_two_tokens(rule, n, seed=0).flatten()
    expected = (TARGET_ROWS[0][:, None] * TARGET_ROWS[1][None, :]).flatten() * n
    support = expected > 0
    assert counts[~support].sum() == 0  # no pair the target never makes
    _, p_value = chisquare(counts[support].numpy(), expected[support].numpy())
    assert p_value > 0.001, p_value


def test_full_acceptance_samples_the_bonus_from_the_target() -> None:
    generator = torch.Generator().manual_seed(1)
    same = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5, 0.5, 0.0]])
    bonuses = []
    for _ in range(200):
        result = accept_sampled(torch.tensor([1]), same[:1], same, generator)
        assert result.num_accepted == 1
        bonuses.append(result.bonus_token)
    assert set(bonuses) == {3, 4}


def test_greedy_acceptance_takes_the_longest_agreeing_prefix() -> None:
    target_logits = torch.full((4, VOCAB), -1.0)
    for row, token in enumerate([2, 4, 1, 5]):
        target_logits[row, token] = 1.0
    assert accept_greedy(torch.tensor([2, 4, 1]), target_logits) == Acceptance(3, 5)
    assert accept_greedy(torch.tensor([2, 3, 1]), target_logits).num_accepted == 1
    assert accept_greedy(torch.tensor([2, 3, 1]), target_logits).bonus_token == 4
    assert accept_greedy(torch.tensor([0, 4, 1]), target_logits) == Acceptance(0, 2)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_keeps_only_the_k_most_likely(top_k: int) -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3, 1.9]])
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_k=top_k))
    kept = set(torch.nonzero(probs[0]).flatten().tolist())
    assert kept == set(torch.topk(logits[0], top_k).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    assert set(sample(probs.expand(500, -1), generator).tolist()) <= kept


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.8, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p: float) -> None:
    logits = torch.log(torch.tensor([[0.35, 0.25, 0.2, 0.1, 0.06, 0.04]]))
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    kept = torch.nonzero(probs[0]).flatten().tolist()
    sorted_mass = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04]).cumsum(0)
    expected = int((sorted_mass < top_p - 1e-6).sum()) + 1
    assert kept == list(range(min(expected, VOCAB)))
    assert torch.isclose(probs.sum(), torch.tensor(1.0))


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    cold = processed_probs(logits, SamplingParams(temperature=0.5))
    hot = processed_probs(logits, SamplingParams(temperature=2.0))
    assert cold[0, 2] > torch.softmax(logits, -1)[0, 2] > hot[0, 2]
    greedy = processed_probs(logits, SamplingParams(temperature=0.0))
    assert greedy.tolist() == [[0.0, 0.0, 1.0]]


@pytest.mark.parametrize("temperature", [1e-50, 1e-40, 1e-20])
def test_a_temperature_too_small_for_float32_samples_like_greedy(temperature: float) -> None:
    """1e-50 is 0 in float32: dividing by it made every probability NaN (0 / 0)."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9]])
    probs = processed_probs(logits, SamplingParams(temperature=temperature))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"temperature": -0.1}, "sampling.temperature"),
        ({"temperature": 2.5}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_p": float("nan")}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"min_p": -0.1}, "sampling.min_p"),
        ({"min_p": 1.5}, "sampling.min_p"),
        ({"min_p": float("nan")}, "sampling.min_p"),
        ({"min_p": "0.1"}, "sampling.min_p"),
    ],
)
def test_invalid_sampling_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("rows", [1, 3])
def test_sample_draws_what_multinomial_draws(rows: int) -> None:
    """The same tokens from the same generator state, and the generator left in the same
    state, as ``torch.multinomial`` (seeded requests keep their outputs); row by row alike."""
    for seed in range(20):
        scores = torch.randn(rows, 500, generator=torch.Generator().manual_seed(1000 + seed))
        probs = processed_probs(scores, SamplingParams(temperature=1.0, top_p=0.9))
        theirs, ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=theirs).squeeze(-1)
        assert torch.equal(sample(probs, ours), expected)
        assert torch.equal(ours.get_state(), theirs.get_state())
        generators = [torch.Generator().manual_seed(seed + row) for row in range(rows)]
        alone = [sample(probs[row : row + 1], generators[row]) for row in range(rows)]
        generators = [torch.Generator().manual_seed(seed + row) for row in range(rows)]
        assert torch.equal(sample_rows(probs, generators), torch.cat(alone))


def test_accept_sampled_rows_gives_each_request_what_it_gets_alone() -> None:
    """Rows with γ = 0, full acceptance, rejections: the same results as accept_sampled (or a
    plain sample for γ = 0) row by row, and every generator left in the same state."""
    vocab, gammas = 40, [3, 0, 4, 1, 2, 3]
    noise = torch.Generator().manual_seed(5)
    for seed in range(30):
        target = torch.softmax(torch.randn(sum(gammas) + len(gammas), vocab, generator=noise), -1)
        draft = torch.softmax(torch.randn(sum(gammas), vocab, generator=noise) * 0.3, -1)
        if seed % 3 == 0:  # the draft agrees with the target: everything is accepted
            draft = torch.cat([target[sum(gammas[:k]) + k :][:gamma]
                               for k, gamma in enumerate(gammas)])
        tokens = torch.cat([sample(draft[i : i + 1], noise) for i in range(sum(gammas))])
        together = [torch.Generator().manual_seed(seed * 10 + k) for k in range(len(gammas))]
        results = accept_sampled_rows(tokens, draft, target, gammas, together)
        start = scored = 0
        for k, gamma in enumerate(gammas):
            alone = torch.Generator().manual_seed(seed * 10 + k)
            rows = target[scored : scored + gamma + 1]
            expected = (
                accept_sampled(tokens[start : start + gamma], draft[start : start + gamma],
                               rows, alone)
                if gamma else Acceptance(0, int(sample(rows, alone)[0]))
            )
            assert results[k] == expected
            assert torch.equal(together[k].get_state(), alone.get_state())
            start, scored = start + gamma, scored + gamma + 1
