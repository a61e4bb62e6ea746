"""A batch groups its sampled rows by their settings; rows that share a temperature (and a
top-k, or a top-p) but differ in another (min-p too) must still each get their own distribution. The
batched step's SETTINGS (tests/decoding/test_batched.py) have no two rows like that."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from decoding.batched import _processed, speculative_step_batch
from decoding.fast.runner import StaticRunner
from decoding.params import SamplingParams
from decoding.sampling import processed_probs
from decoding.speculative import SequenceState, speculative_step
from tests.decoding.test_batched import qwen2

SETTINGS = [
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=1.0),  # same temperature and top-k as row 0, top-p apart
    SamplingParams(),  # greedy, between them
    SamplingParams(temperature=1.0, top_k=5),  # same temperature and top-p as row 1
    SamplingParams(temperature=1.0, top_k=5, top_p=0.5),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=0.7, top_k=20),  # top-k apart only
    SamplingParams(temperature=0.7, top_k=20, min_p=0.5),  # min-p apart only
]


def test_each_row_is_processed_with_its_own_settings() -> None:
    logits = torch.randn(len(SETTINGS) * 2, 300, generator=torch.Generator().manual_seed(0))
    states = [SimpleNamespace(sampling=params) for params in SETTINGS]
    spans = [(2 * k, 2 * k + 2) for k in range(len(SETTINGS))]
    _, rows = _processed(logits, spans, states)  # type: ignore[arg-type]
    for k, params in enumerate(SETTINGS):
        if params.greedy:
            assert rows[k] is None
            continue
        expected = processed_probs(logits[spans[k][0] : spans[k][1]], params)
        torch.testing.assert_close(rows[k], expected, rtol=0, atol=1e-6, msg=f"row {k}")


def _states(target: StaticRunner, draft: StaticRunner) -> list[SequenceState]:
    states = []
    for row, params in enumerate(SETTINGS):
        prompt = [5 + row, 17, 42, 8, 77, 3 + row]
        state = SequenceState(tokens=list(prompt), target=target.new_sequence(),  # type: ignore[arg-type]
                              draft=draft.new_sequence(), sampling=params,  # type: ignore[arg-type]
                              generator=torch.Generator().manual_seed(50 + row))
        state.target.forward(prompt[:-1])
        state.draft.forward(prompt[:-1])
        states.append(state)
    return states


def test_a_batch_of_rows_differing_in_top_p_top_k_or_min_p_alone_is_each_row_alone() -> None:
    target_model, draft_model = qwen2(0), qwen2(1)
    size = len(SETTINGS)
    target = StaticRunner(target_model, num_slots=size, max_len=96)
    draft = StaticRunner(draft_model, num_slots=size, max_len=96)
    batched = _states(target, draft)
    alone = _states(StaticRunner(target_model, num_slots=size, max_len=96),
                    StaticRunner(draft_model, num_slots=size, max_len=96))
    for step in range(6):
        gammas = [3 if step % 2 else 1] * size
        results = speculative_step_batch(batched, gammas, draft, target)
        for state, gamma, result in zip(alone, gammas, results, strict=True):
            single = speculative_step(state, gamma)
            assert (result.emitted, result.num_accepted) == (single.emitted, single.num_accepted)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]
