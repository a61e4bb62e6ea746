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
