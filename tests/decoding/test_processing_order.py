"""Temperature comes before top-p (Hugging Face's order, as decoding.sampling.processed_probs
says): the nucleus is chosen on the tempered distribution. Exact probabilities, no sampling."""

from __future__ import annotations

import pytest
import torch

from decoding.params import SamplingParams
from decoding.sampling import processed_probs

BASE = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)


@pytest.mark.parametrize(
    ("temperature", "top_p", "kept"),
    [
        # T = 0.5: tempered probs ∝ p^2 = [.533, .3, .133, .033]; mass before each token
        # 0, .533, .833, .967 -> top_p .8 keeps 2 (untempered: 0, .4, .7, .9 -> 3).
        (0.5, 0.8, 2),
        # T = 2: tempered probs ∝ sqrt(p) = [.325, .282, .230, .163]; mass before each
        # token 0, .325, .607, .837 -> top_p .65 keeps 3 (untempered: 0, .4, .7 -> 2).
        (2.0, 0.65, 3),
    ],
)
def test_top_p_is_chosen_on_the_tempered_distribution(temperature, top_p, kept) -> None:
    logits = BASE.log().float()[None]
    probs = processed_probs(logits, SamplingParams(temperature=temperature, top_p=top_p))[0]
    tempered = BASE ** (1 / temperature)
    tempered = tempered / tempered.sum()
    expected = torch.zeros(4, dtype=torch.float64)
    expected[:kept] = tempered[:kept] / tempered[:kept].sum()
    assert torch.nonzero(probs).flatten().tolist() == list(range(kept))
    torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-6)


def test_top_p_is_chosen_after_top_k() -> None:
    """Top-k first, then top-p on what top-k kept (renormalised). Probabilities
    [.3, .25, .2, .15, .1], top_k 3 -> [.4, .333, .267]; mass before each 0, .4, .733 ->
    top_p .6 keeps 2. (Top-p on the whole distribution first keeps 3: 0, .3, .55 < .6.)"""
    base = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    probs = processed_probs(base.log().float()[None],
                            SamplingParams(temperature=1.0, top_k=3, top_p=0.6))[0]
    expected = torch.tensor([0.3, 0.25, 0, 0, 0], dtype=torch.float64) / 0.55
    assert torch.nonzero(probs).flatten().tolist() == [0, 1]
    torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-6)


def test_top_k_of_all_but_one_token_drops_the_least_likely() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.9, 0.0]])
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_k=4))[0]
    expected = torch.softmax(logits[0].masked_fill(torch.arange(5) == 2, float("-inf")), -1)
    assert probs[2] == 0
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


def test_min_p_is_chosen_after_top_p() -> None:
    """Min-p last (Hugging Face's order). Probabilities [.4, .3, .15, .1, .05]: top_p .8 keeps
    [.4, .3, .15] (mass before each 0, .4, .7), renormalised [.47, .35, .18]. Min_p .4 then
    drops .18 (< .4 * .47); min_p .3 keeps it (> .3 * .47). Had min_p .3 come first, it would
    keep the same three, and top-p .8 after it would drop .18 (mass before it .82): 2 kept."""
    base = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    logits = base.log().float()[None]
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.8, min_p=0.4))[0]
    assert torch.nonzero(probs).flatten().tolist() == [0, 1]
    probs = processed_probs(logits, SamplingParams(temperature=1.0, top_p=0.8, min_p=0.3))[0]
    expected = torch.tensor([0.4, 0.3, 0.15, 0, 0], dtype=torch.float64) / 0.85
    assert torch.nonzero(probs).flatten().tolist() == [0, 1, 2]
    torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.7, min_p=0.2),
        SamplingParams(temperature=1.3, top_k=40, min_p=0.1),
        SamplingParams(temperature=0.9, top_p=0.9, min_p=0.1),
        SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.02),
        SamplingParams(temperature=1.0, min_p=1.0),
    ],
)
def test_the_distribution_is_hugging_faces(params: SamplingParams) -> None:
    """Against transformers' own warpers in their own order (temperature, top-k, top-p,
    min-p) on random logits: the same kept tokens and the same probabilities."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    logits = 3 * torch.randn(16, 400, generator=torch.Generator().manual_seed(7))
    theirs = torch.softmax(warpers(torch.zeros(16, 1, dtype=torch.long), logits.clone()), -1)
    ours = processed_probs(logits, params)
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
