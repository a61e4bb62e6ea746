"""After every step the draft's cache holds exactly what it should: a prefix of the sequence
(never a rejected draft token), and all of it but the tokens it was not fed (after a rejection
that is every token but the bonus; after full acceptance, all but the last two). A draft that
keeps a rejected token's K/V proposes from a wrong context (acceptance drops, silently); one
rolled back too far re-feeds tokens at every step. Neither changes the output, so no
exactness test sees them."""

from __future__ import annotations

import pytest
import torch

from decoding.batched import speculative_step_batch
from decoding.fast.runner import StaticRunner
from decoding.params import SamplingParams
from decoding.runner import ModelRunner
from decoding.speculative import SequenceState, speculative_step
from tests.decoding.test_batched import qwen2

PROMPT = [5, 17, 42, 8, 77, 3]


@pytest.fixture(scope="module")
def models():
    return qwen2(0), qwen2(1)  # different weights: drafts are rejected early and often


def _state(target, draft, params, seed) -> SequenceState:
    state = SequenceState(tokens=list(PROMPT), target=target.new_sequence(),
                          draft=draft.new_sequence(), sampling=params,
                          generator=torch.Generator().manual_seed(seed))
    state.target.forward(PROMPT[:-1])
    state.draft.forward(PROMPT[:-1])
    return state


def _check_draft(state: SequenceState, draft_model, gamma: int, accepted: int) -> bool:
    """Asserts the draft cache's length and contents; returns whether the step rejected a
    draft token before the last two positions (where a kept rejected token shows)."""
    expected = len(state.tokens) - 1 - (1 if accepted == gamma and gamma > 0 else 0)
    assert state.draft.length == expected, (state.draft.length, len(state.tokens), accepted)
    length = state.draft.length
    cached = state.draft.forward(state.tokens[length:])[-1]
    state.draft.rollback(length)
    with torch.inference_mode():
        fresh = draft_model(torch.tensor([state.tokens])).logits[0, -1].float()
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)
    return accepted <= gamma - 2


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=3)])
@pytest.mark.parametrize("runner", ["transformers", "static"])
def test_the_draft_cache_is_the_sequence_after_every_step(models, params, runner) -> None:
    target_model, draft_model = models
    make = ModelRunner if runner == "transformers" else (
        lambda model: StaticRunner(model, num_slots=1, max_len=128))
    state = _state(make(target_model), make(draft_model), params, seed=3)
    exposed = 0
    for gamma in [4, 4, 3, 4, 2, 4, 4, 4]:
        result = speculative_step(state, gamma)
        exposed += _check_draft(state, draft_model, gamma, result.num_accepted)
    assert exposed > 0  # the check above saw a rejection that could leave a stale token


def test_each_draft_cache_in_a_batch_is_its_sequence_after_every_step(models) -> None:
    target_model, draft_model = models
    target = StaticRunner(target_model, num_slots=3, max_len=128)
    draft = StaticRunner(draft_model, num_slots=3, max_len=128)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7)]
    states = [_state(target, draft, p, seed=10 + k) for k, p in enumerate(params)]
    exposed = 0
    for gammas in ([4, 4, 4], [4, 2, 3], [3, 4, 4], [4, 4, 4]):
        results = speculative_step_batch(states, gammas, draft, target)
        for state, gamma, result in zip(states, gammas, results, strict=True):
            exposed += _check_draft(state, draft_model, gamma, result.num_accepted)
    assert exposed > 0
