"""Choosing γ from measured costs and observed acceptance.

Leviathan et al. 2023 (arXiv 2211.17192, Theorem 3.8 and Section 3.5): with per-token
acceptance α, a step that drafts γ tokens emits (1 - α^(γ+1)) / (1 - α) tokens on average. It
costs γ draft steps plus one target forward over γ+1 positions. Divided by what plain decoding
pays for the same tokens (one target forward over one position each), that is the expected
speedup; γ = 0 (plain decoding) is chosen whenever no γ beats 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from decoding.runner import ModelRunner


@dataclass(frozen=True)
class CostModel:
    draft_step_s: float  # one draft forward over one position
    target_forward_s: tuple[float, ...]  # [k-1]: one target forward over k positions, k >= 1

    @property
    def max_gamma(self) -> int:
        return len(self.target_forward_s) - 1

    def expected_tokens(self, alpha: float, gamma: int) -> float:
        if alpha >= 1.0:
            return gamma + 1.0
        return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)

    def expected_speedup(self, alpha: float, gamma: int) -> float:
        step_s = gamma * self.draft_step_s + self.target_forward_s[gamma]
        return self.expected_tokens(alpha, gamma) * self.target_forward_s[0] / step_s

    def best_gamma(self, alpha: float, max_gamma: int) -> int:
        best, best_speedup = 0, 1.0
        for gamma in range(1, min(max_gamma, self.max_gamma) + 1):
            speedup = self.expected_speedup(alpha, gamma)
            if speedup > best_speedup:
                best, best_speedup = gamma, speedup
        return best


class AcceptanceEstimate:
    """α as a decayed ratio of accepted to drafted tokens, starting from a prior worth
    ``prior_weight`` drafted tokens; old steps fade geometrically, so it follows the text."""

    def __init__(self, prior_alpha: float, prior_weight: float = 4.0, decay: float = 0.9):
        self._accepted = prior_alpha * prior_weight
        self._drafted = prior_weight
        self._decay = decay

    @property
    def alpha(self) -> float:
        return self._accepted / self._drafted

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted:
            self._accepted = self._accepted * self._decay + accepted
            self._drafted = self._drafted * self._decay + drafted


class AdaptiveGamma:
    """Per-request γ: the γ of best expected speedup at the request's estimated α.

    The estimate starts from the server's recent acceptance (``prior_alpha``). While γ is 0
    nothing is learned, so every ``probe_every`` plain steps one step drafts the γ that would
    pay at a high acceptance (``probe_alpha``); if even that γ is 0, speculation can never pay
    with these costs and no probe is made.
    """

    def __init__(
        self,
        costs: CostModel,
        max_gamma: int,
        prior_alpha: float = 0.7,
        probe_every: int = 8,
        probe_alpha: float = 0.9,
    ) -> None:
        self._costs = costs
        self._max_gamma = max_gamma
        self.estimate = AcceptanceEstimate(prior_alpha)
        self._probe_every = probe_every
        self._probe_gamma = costs.best_gamma(probe_alpha, max_gamma)
        self._plain_steps = 0

    @property
    def alpha(self) -> float:
        return self.estimate.alpha

    def next_gamma(self) -> int:
        gamma = self._costs.best_gamma(self.alpha, self._max_gamma)
        if gamma == 0 and self._probe_gamma > 0:
            self._plain_steps += 1
            if self._plain_steps >= self._probe_every:
                self._plain_steps = 0
                return self._probe_gamma
        return gamma

    def observe(self, drafted: int, accepted: int) -> None:
        self.estimate.observe(drafted, accepted)


def measure_costs(
    target: ModelRunner, draft: ModelRunner, max_gamma: int, context: int = 32, repeats: int = 3
) -> CostModel:
    """Time the draft's one-token step and the target's forward over 1..max_gamma+1 positions
    on the running models, after ``context`` tokens of cache. The minimum of ``repeats`` runs:
    other work on the machine only ever adds time, and a spike must not rule a width out."""
    prefix = [0] * context

    def timed(runner: ModelRunner, width: int) -> float:
        seq = runner.new_sequence()
        try:
            seq.forward(prefix, num_logits=1)
            samples = []
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                # as the step uses it; reading a value waits for the device
                float(seq.forward([0] * width, num_logits=1 if runner is draft else width)[0, 0])
                samples.append(time.perf_counter() - start)
                seq.rollback(context)
            return min(samples[1:])
        finally:
            seq.release()

    return CostModel(
        draft_step_s=timed(draft, 1),
        target_forward_s=tuple(timed(target, k) for k in range(1, max_gamma + 2)),
    )
