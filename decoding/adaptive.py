"""Choosing γ from measured costs and observed acceptance.

Leviathan et al. 2023 (arXiv 2211.17192, Theorem 3.8 and Section 3.5): with per-token
acceptance α, a step that drafts γ tokens emits (1 - α^(γ+1)) / (1 - α) tokens on average. It
costs γ draft steps plus one target forward over γ+1 positions. Divided by what plain decoding
pays for the same tokens (one target forward over one position each), that is the expected
speedup; γ = 0 (plain decoding) is chosen whenever no γ beats 1.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MIN_SPEEDUP = 1.1
"""Speculate only where the formula promises at least this. It counts forward passes only, not
the host work a speculative step adds per request (drawing, accepting, rolling back), which a
marginal promise does not cover: on the CPU with 4 requests together, adaptive γ ran at 0.84x
speculation off where, with the costs measured in a run before, the formula promised it a small
gain."""

PROBE_MARGIN = 1.15
"""An accepted probe shortens the wait for the next only where the probes' pooled acceptance
promises this much more than :data:`MIN_SPEEDUP`: near the threshold the pooled estimate (about
30 probes) crosses it by chance, and each crossing brought probes back every few steps (on the
CPU, in :mod:`bench.policy` against run 5's costs, before riding along and this margin on
probing itself, 2 requests at α = 0.5 ran at 0.967x speculation off with no margin and a pooled
memory of 10 probes, 0.974x with these)."""

CATCH_UP_MARGIN = 2.0
"""Feed the draft tokens it has not seen (a whole prompt) only where drafting promises to save
at least this many times what feeding them costs: the saving is counted over every token the
request may still emit, an upper bound (it may stop early), and both sides come from forward
timings that vary by tens of percent on a shared machine. In one CPU serving run with 4
requests together, adaptive γ drafted where (worked out afterwards from that run's logged
costs) the promise was about equal to the catch-up's cost, and ran at 0.84x speculation off."""


@dataclass(frozen=True)
class CostModel:
    """Measured forward times by the number of tokens in one forward pass.

    A batch of b requests verifying γ+1 positions each is costed as one forward over b(γ+1)
    tokens, and b requests drafting as a forward over b tokens: both passes read the weights
    once and do b times the arithmetic, which is what makes speculation stop paying as the
    batch grows. Between measured sizes the time is interpolated linearly; beyond the largest
    it is extrapolated from the last two.
    """

    draft_s: dict[int, float]  # tokens in one draft forward -> seconds
    target_s: dict[int, float]  # tokens in one target forward -> seconds

    @classmethod
    def from_widths(cls, draft_step_s: float, target_forward_s: tuple[float, ...]) -> CostModel:
        """Batch-1 costs: one draft step, and the target over 1, 2, ... positions."""
        return cls({1: draft_step_s}, {k + 1: s for k, s in enumerate(target_forward_s)})

    @property
    def draft_step_s(self) -> float:
        return self.draft(1)

    @property
    def target_forward_s(self) -> tuple[float, ...]:
        return tuple(self.target(k) for k in range(1, max(self.target_s) + 1))

    def draft(self, tokens: int) -> float:
        cache = self._cache
        key = (False, tokens)
        if key not in cache:
            cache[key] = _interpolate(self.draft_s, tokens)
        return cache[key]

    def target(self, tokens: int) -> float:
        cache = self._cache
        key = (True, tokens)
        if key not in cache:
            cache[key] = _interpolate(self.target_s, tokens)
        return cache[key]

    @functools.cached_property
    def _cache(self) -> dict[tuple[bool, int], float]:
        """Interpolated costs by (target?, tokens): γ is chosen for every request at every step,
        and each choice asks for the same few sizes (24 interpolations per request at γmax 8)."""
        return {}

    def drafting(self, gamma: int, rows: int = 1, alpha: float = 1.0) -> float:
        """A step's draft forwards for ``rows`` requests drafting ``gamma`` each, at acceptance
        ``alpha``. The first feeds each row what its draft lags by, padded to the widest: two
        tokens after a step that accepted every draft token (the last draft token, which the
        draft never read, and the bonus token), else one; the others feed one each. So the
        first is two wide unless no row accepted all γ of its last step (as likely as
        (1 - α^γ)^rows): in a batch almost never one wide (16 rows at α = 0.7 and γ = 1: in
        0.3^16 of steps). On run 8's H200 the 0.5B draft took 1.40 ms over 2 rows and 1.34 ms
        over one; the cost model takes rows and tokens alike."""
        if gamma <= 0:
            return 0.0
        one = self.draft(rows)
        two_wide = 1.0 - (1.0 - min(1.0, alpha) ** gamma) ** rows
        return gamma * one + two_wide * (self.draft(2 * rows) - one)

    def expected_tokens(self, alpha: float, gamma: int) -> float:
        if alpha >= 1.0:
            return gamma + 1.0
        return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)

    def expected_speedup(
        self, alpha: float, gamma: int, batch: int = 1, overhead: float = 1.0
    ) -> float:
        """Leviathan's expected speedup over plain decoding; ``overhead``: how much more a
        speculative step really costs than the forwards it is made of (see :class:`StepCosts`)."""
        step_s = self.drafting(gamma, batch, alpha) + self.target(batch * (gamma + 1))
        return self.expected_tokens(alpha, gamma) * self.target(batch) / (step_s * overhead)

    def lone_speedup(
        self, alpha: float, gamma: int, batch: int = 1, overhead: float = 1.0
    ) -> float:
        """The expected speedup of a step of ``batch`` requests in which only one drafts γ
        (the others verify as many positions, padded, for one token each)."""
        step_s = (self.drafting(gamma, 1, alpha) + self.target(batch * (gamma + 1))) * overhead
        tokens = batch - 1 + self.expected_tokens(alpha, gamma)
        return tokens * self.target(batch) / (batch * step_s)

    def best_gamma(
        self,
        alpha: float,
        max_gamma: int,
        batch: int = 1,
        min_speedup: float = MIN_SPEEDUP,
        overhead: float = 1.0,
    ) -> int:
        """The γ of best expected speedup, or 0 where none is expected to reach
        ``min_speedup``. Asked for every request at every step: :meth:`expected_speedup`'s
        arithmetic, the same operations in the same order, without its calls per γ."""
        one, two, plain = self.draft(batch), self.draft(2 * batch), self.target(batch)
        accepts = min(1.0, alpha)
        best, best_speedup = 0, min_speedup
        for gamma in range(1, max_gamma + 1):
            two_wide = 1.0 - (1.0 - accepts**gamma) ** batch
            step_s = (gamma * one + two_wide * (two - one)) + self.target(batch * (gamma + 1))
            tokens = gamma + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
            speedup = tokens * plain / (step_s * overhead)
            if speedup > best_speedup:
                best, best_speedup = gamma, speedup
        return best

    def catch_up_pays(
        self,
        alpha: float,
        gamma: int,
        catch_up: int,
        remaining: int,
        batch: int = 1,
        overhead: float = 1.0,
        margin: float = CATCH_UP_MARGIN,
    ) -> bool:
        """Whether drafting γ at a time over the ``remaining`` tokens saves ``margin`` times
        what it costs first to feed the draft the ``catch_up`` tokens it has not seen (a whole
        prompt, when the draft was not prefilled). The catch-up is one draft forward over those
        tokens that the whole batch waits for; the saving is what the batch's steps save per
        token (plain decoding against speculation at this γ), shared among the ``batch``
        requests. ``remaining`` is what the request may still emit (its max_new_tokens left).
        (On this CPU, 4 requests of 32 tokens together each spent 0.37-0.51 s prefilling the
        draft, more than speculation saved them.)"""
        if gamma <= 0 or catch_up <= 0:
            return gamma > 0
        plain_s = self.target(batch)
        step_s = (self.drafting(gamma, batch, alpha) + self.target(batch * (gamma + 1))) * overhead
        saved_s = remaining * (plain_s - step_s / self.expected_tokens(alpha, gamma)) / batch
        return saved_s > margin * self.draft(catch_up)


def _interpolate(points: dict[int, float], tokens: int) -> float:
    sizes = sorted(points)
    if tokens <= sizes[0] or len(sizes) == 1:
        return points[sizes[0]] * (max(tokens, 1) / sizes[0] if tokens > sizes[0] else 1.0)
    for low, high in itertools.pairwise(sizes):
        if tokens <= high:
            share = (tokens - low) / (high - low)
            return points[low] + share * (points[high] - points[low])
    low, high = sizes[-2], sizes[-1]
    slope = max(0.0, (points[high] - points[low]) / (high - low))
    return points[high] + slope * (tokens - high)


class AcceptanceEstimate:
    """The per-token acceptance α of Leviathan's formula, estimated from the steps seen.

    A step stops judging draft tokens at the first rejection, so the tokens after it say
    nothing about α: accepted / drafted would read low whenever γ > 1 (a true 0.9 reads 0.64
    at γ = 8). The estimate is accepted / judged, judged = accepted + 1 if the step rejected a
    token, else accepted; the maximum-likelihood α of a geometric run. It starts from a prior
    worth ``prior_weight`` judged tokens, and old steps fade geometrically so it follows the text.
    """

    def __init__(self, prior_alpha: float, prior_weight: float = 4.0, decay: float = 0.9):
        self._accepted = prior_alpha * prior_weight
        self._judged = prior_weight
        self._decay = decay

    @property
    def alpha(self) -> float:
        return self._accepted / self._judged

    def upper(self, z: float = 1.0) -> float:
        """The Wilson score bound ``z`` standard deviations above :attr:`alpha`, counting the
        (decayed) judged tokens as the sample: far above it while little has been seen (the
        prior alone: 0.87 for a prior of 0.7 worth 4 tokens), near it once much has."""
        n, p = self._judged, self.alpha
        if n <= 0:
            return 1.0
        spread = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
        return min(1.0, (p + z * z / (2.0 * n) + spread) / (1.0 + z * z / n))

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted:
            judged = accepted + (1 if accepted < drafted else 0)
            self._accepted = self._accepted * self._decay + accepted
            self._judged = self._judged * self._decay + judged


STEP_COST_WINDOW = 9
"""How many recent steps of each kind and batch size :class:`StepCosts` keeps: it reads their
median, so that no single step moves it. The decayed mean it used before was not: on the H200
(2026-11-27, run 7) single speculative steps that also waited for something else (a benchmark's
oracle, 1-3 s inside a step of about 8 ms) took the mean to 22.9 and 66.4 times the prediction,
which turned every γ, probes included, to 0 for the rest of the run."""

STEP_COST_EXPIRY = 8
"""Plain observations of a batch size (a group of plain steps taken at once counts once), with
no speculative step of that size between them, after which its speculative steps are forgotten:
an overhead that stopped speculation can only be measured again by speculating, so it is then
trusted as 1 until ``min_samples`` new speculative steps measure it anew. Each forgetting
doubles the wait for the next, up to :data:`STEP_COST_MAX_EXPIRY`, until a speculative step
comes while the window is full (speculation has run for a while at the measured overhead),
which resets it: a real overhead then costs ``min_samples`` dearer steps per wait, the waits
growing, and a stale one no longer stops speculation for good. (Forgetting only the oldest step
kept the window at the edge of ``min_samples``: one speculative step in every 9 observations
under a real 3x overhead. Resetting the wait at any speculative step with ``min_samples``
remembered let the occasional probe keep it at 8-64 under a real overhead.)"""

STEP_COST_MAX_EXPIRY = 256
"""The longest wait, in plain observations, before speculative steps are forgotten."""


class StepCosts:
    """What steps really cost against what :class:`CostModel` predicts from their forwards.

    The formula counts forward passes; a real speculative step also draws and accepts per
    request, rolls back, pads a batch to its widest row and lets a lagging draft catch up. Per
    batch size (rounded up to a power of two) and kind of step (plain: every γ = 0;
    speculative), this keeps the median of measured over predicted seconds of the last
    :data:`STEP_COST_WINDOW` steps, and :meth:`overhead` is the speculative ratio over the plain
    one (the plain one taken as 1 until plain steps of that size were seen): the factor by which
    speculation really costs more than predicted. It only ever penalises (at least 1), and only
    while ``min_samples`` speculative steps of that size are remembered (never, with more than
    ``window``: the correction is off); a run of plain steps makes it forget them
    (:data:`STEP_COST_EXPIRY`).
    """

    def __init__(self, costs: CostModel, window: int = STEP_COST_WINDOW, min_samples: int = 3,
                 expiry: int = STEP_COST_EXPIRY, max_expiry: int = STEP_COST_MAX_EXPIRY) -> None:
        self._costs = costs
        self._window = window
        self._min_samples = min_samples
        self._base_expiry = expiry
        self._max_expiry = max_expiry
        self._ratios: dict[tuple[int, bool], collections.deque[float]] = {}
        self._plain_since: dict[int, int] = {}  # plain observations since a speculative one
        self._expiry: dict[int, int] = {}  # the current wait per bucket

    @staticmethod
    def _bucket(batch: int) -> int:
        return 1 << max(0, batch - 1).bit_length()

    def predicted(self, gammas: list[int], two_wide: float = 0.0) -> float:
        """The forwards of one step of ``len(gammas)`` requests: one draft forward per draft
        position over the requests still drafting, one target forward over every row padded
        to the widest. ``two_wide``: whether (or how likely) the first draft forward feeds
        two tokens per row (see :meth:`CostModel.drafting`)."""
        costs, widest = self._costs, max(gammas)
        rows = [sum(1 for g in gammas if g > j) for j in range(widest)]
        drafts = sum(costs.draft(n) for n in rows)
        if rows:
            drafts += two_wide * (costs.draft(2 * rows[0]) - costs.draft(rows[0]))
        return drafts + costs.target(len(gammas) * (widest + 1))

    def observe(self, gammas: list[int], seconds: float, catch_up_s: float = 0.0,
                two_wide: bool = False) -> None:
        """Record one step that took ``seconds``; ``catch_up_s``: what the forwards feeding a
        lagging draft were predicted to cost (:meth:`CostModel.catch_up_pays` has charged
        them already; counted here as overhead they made the speculative ratio read high after
        every group of plain steps, and once that turned γ to 0 no speculative step could
        correct it); ``two_wide``: whether its first draft forward fed two tokens per row."""
        bucket, speculative = self._bucket(len(gammas)), max(gammas) > 0
        ratio = seconds / (self.predicted(gammas, float(two_wide)) + catch_up_s)
        window = self._ratios.setdefault(
            (bucket, speculative), collections.deque(maxlen=self._window))
        if speculative:
            if len(window) >= self._window:  # speculating for a while at the measured overhead
                self._expiry[bucket] = self._base_expiry
            window.append(ratio)
            self._plain_since[bucket] = 0
            return
        window.append(ratio)
        since = self._plain_since.get(bucket, 0) + 1
        spec = self._ratios.get((bucket, True))
        wait = self._expiry.get(bucket, self._base_expiry)
        if since >= wait and spec:
            spec.clear()
            self._expiry[bucket] = min(2 * wait, self._max_expiry)
        self._plain_since[bucket] = since

    def _ratio(self, bucket: int, speculative: bool) -> float | None:
        window = self._ratios.get((bucket, speculative))
        return statistics.median(window) if window else None

    def overhead(self, batch: int) -> float:
        bucket = self._bucket(batch)
        if len(self._ratios.get((bucket, True), ())) < self._min_samples:
            return 1.0
        spec = self._ratio(bucket, True)
        assert spec is not None
        return max(1.0, spec / (self._ratio(bucket, False) or 1.0))

    def describe(self) -> dict[str, dict[str, float]]:
        """What is remembered, per "bucket/plain" and "bucket/spec": the median ratio and how
        many steps it is of, and per bucket the :meth:`overhead` it gives (for reports)."""
        def name(key: tuple[int, bool]) -> str:
            return f"{key[0]}/{'spec' if key[1] else 'plain'}"
        keys = sorted(k for k, window in self._ratios.items() if window)
        return {
            "ratio": {name(k): statistics.median(self._ratios[k]) for k in keys},
            "samples": {name(k): float(len(self._ratios[k])) for k in keys},
            "overhead": {str(b): self.overhead(b) for b in sorted({b for b, _ in keys})},
        }

    def cap_for_batch(
        self,
        gammas: list[int],
        alphas: list[float],
        adjustable: list[bool],
        min_speedup: float = MIN_SPEEDUP,
        level: list[bool] | None = None,
        limits: list[int] | None = None,
        two_behind: list[bool] | None = None,
        fixed: list[bool] | None = None,
    ) -> list[int]:
        """The requests' own γs, capped where that makes the whole batched step pay more.

        Each request picks its γ as if the batch drafted alike, but one step serves them all:
        it runs a draft forward for every position up to the widest γ and verifies every row
        padded to the widest γ+1. One request drafting 2 beside three plain ones makes all
        four verify 3 positions for at most 2 tokens more (on this CPU with the real pair at
        batch 4, such steps took 1.4x as long as plain ones). This tries every cap c on the
        ``adjustable`` requests' γ (the others keep theirs) and takes the one of most expected
        tokens per predicted second (overhead included), unless it promises less than
        ``min_speedup`` over the cap 0.

        An adjustable request whose draft is ``level`` with its sequence drafts c whatever
        its own γ, up to its ``limits`` entry (the draft tokens it has room for before its
        max_new_tokens): the step verifies its row that wide anyway, so its own draft tokens
        cost only a wider draft batch. (With run 5's 7B costs and 16 requests at α = 0.8, the
        estimates of a few fell below paying; the cap then judged the whole batch by padding
        them and stopped everyone drafting, the drafts fell behind, and adaptive γ ran at
        0.90x speculation off where a fixed γ of 1 gave 1.04x: ``bench.policy``.)

        ``two_behind``: the requests whose draft lags by two tokens: where one of them drafts,
        the first draft forward is two tokens wide (:meth:`CostModel.drafting`). ``fixed``: the
        requests drafting a γ of their own asking: where one does, the batch drafts whatever
        the adjustable ones want, and level ones may ride along; a probe alone does not make
        them try (every row probing was measured costly, see :data:`PROBE_ROWS`)."""
        drafting = [g > 0 and free for g, free in zip(gammas, adjustable, strict=True)]
        if fixed is not None:
            drafting += [g > 0 and own for g, own in zip(gammas, fixed, strict=True)]
        if not any(drafting):
            return gammas
        overhead = self.overhead(len(gammas))
        rides = level if level is not None else [False] * len(gammas)
        room = limits if limits is not None else [sys.maxsize] * len(gammas)
        behind = two_behind if two_behind is not None else [False] * len(gammas)

        def capped(cap: int) -> list[int]:
            return [(min(cap, limit) if ride else min(g, cap)) if free else g
                    for g, free, ride, limit in zip(gammas, adjustable, rides, room, strict=True)]

        def rate(row_gammas: list[int]) -> float:
            tokens = sum(self._costs.expected_tokens(a, g)
                         for a, g in zip(alphas, row_gammas, strict=True))
            wide = any(g > 0 and two for g, two in zip(row_gammas, behind, strict=True))
            seconds = (self.predicted(row_gammas, float(wide))
                       * (overhead if max(row_gammas) > 0 else 1.0))
            return tokens / seconds

        best = max(range(1, max(gammas) + 1), key=lambda cap: rate(capped(cap)))
        if rate(capped(best)) < min_speedup * rate(capped(0)):
            best = 0
        return capped(best)


PROBE_ROWS = 4
"""While at most this many requests run (those prefilling included), every request that
would probe when a probe is due probes in that step (one token each); while more run, one
request. A probe's main cost is the whole batch's: every row's verify padded to two positions.
The draft forward for a few rows more costs little, and each row learns from its own judged
token. Chosen in ``bench.policy`` on run 8's 7B costs (two draws): from a collapsed server
estimate (0) at α = 0.7, 4 requests ran at 1.163x speculation off with every row probing
against 0.978x with one; every row probing in batches of 8 and 16 cost them at α = 0 (one
draw, prior 0: 16 requests 0.950x against 0.992x) and 16 requests at α = 0.7 (0.91x against
0.97-0.99x). Why it costs them that much was not looked into. 4 is where those runs changed,
not a measured optimum."""


class ProbeSchedule:
    """When a request whose estimate says γ = 0 (or whose own γ its batch caps to 0, or whose
    catch-up would not pay) drafts anyway (a probe), to learn whether the draft agrees: once
    ``every`` steps have passed since the last probe (:attr:`probe_due`), the first request that
    asks probes (while up to :data:`PROBE_ROWS` run, every one that asks in that step). A
    step whose probes accept nothing doubles the wait, up to ``max_every``. One whose probes
    accept some halves it, down to the first wait, where what the last 30 or so probes accepted,
    all requests together, would make speculation pay (with a margin, :data:`PROBE_MARGIN`) at
    the batch size it was made at, or where such a probe pays for itself (see
    :class:`AdaptiveGamma`'s probes that follow an accepted one); else the wait stays. The wait
    moves at the next step, once for all the rows that probed. Where the draft agrees often but
    not often enough, a wait that fell at every accepted probe kept probes coming every few
    steps, each a wasted step. (Halving at every accepted probe of one request alone, on run 5's
    7B costs in ``bench.policy``, at α = 0.7 from a server estimate of 0: 1.094x speculation
    off, against 0.997x by the pooled acceptance alone.)

    A request of an engine that steps requests one by one, or one that must plan alone (a
    seeded sample), has its own, counting its own plain steps. The requests a batching engine
    steps together share one, counting the batch's steps: one probing step per ``every``
    steps of the batch whatever its size (one request probing in it where more than
    :data:`PROBE_ROWS` run), and the backoff outlives each request. A probe pads every
    row's verify to two positions and feeds its draft what it has not seen (on run 5's 7B
    costs, about one plain step's time each at batch 2), so 16 requests each probing every 8
    of their own steps would probe twice per step between them."""

    def __init__(self, every: int = 8, max_every: int = 256) -> None:
        self._base = self.every = every
        self._max_every = max_every
        self._count = 0
        self._claimed = 0
        self.probe_due = False
        self._results: tuple[bool, Callable[[float], bool]] | None = None
        # What the last 30 or so probes accepted, all requests together.
        self.acceptance = AcceptanceEstimate(prior_alpha=0.5, prior_weight=4.0, decay=0.97)

    def step(self) -> None:
        """A step begins (:meth:`took` counts the rest of a group of plain steps)."""
        if self._claimed:  # requests probed in the last step: the wait runs from it
            self.start()
        self._settle()
        self._count += 1
        self.probe_due = self._count >= self.every

    def _settle(self) -> None:
        """Move the wait once for the probes of the last probing step, however many rows
        probed in it: doubled where none accepted, halved where some did and speculation
        pays at the pooled acceptance."""
        self.every, self._results = self.wait, None

    @property
    def wait(self) -> int:
        """The wait once the last probing step's results have moved it: :attr:`every` moves
        only at the next :meth:`step` (for reports between steps)."""
        if self._results is None:
            return self.every
        accepted_any, pays = self._results
        if not accepted_any:
            return min(self.every * 2, self._max_every)
        if pays(self.acceptance.alpha):
            return max(self._base, self.every // 2)
        return self.every

    def took(self, steps: int) -> None:
        """The step :meth:`step` began took ``steps`` plain steps at once."""
        self._count += max(0, steps - 1)

    def steps_left(self) -> int:
        """Steps until a probe is due, the next one included."""
        return max(1, self.every - self._count)

    def claim(self, batch: int) -> None:
        """A request probes in a step while ``batch`` requests run: with up to
        :data:`PROBE_ROWS` the others asked in the same step may probe too (the next step
        starts the wait), with more the next probe is ``every`` steps away."""
        self._claimed += 1
        if batch > PROBE_ROWS or self._claimed >= batch:
            self.start()

    def start(self) -> None:
        """A request probes in this step: the next one is ``every`` steps away."""
        self._count = 0
        self._claimed = 0
        self.probe_due = False

    def observe(self, drafted: int, accepted: int) -> None:
        """A probe outside the schedule (one following an accepted probe): it counts toward
        the pooled acceptance only."""
        self.acceptance.observe(drafted, accepted)

    def result(self, drafted: int, accepted: int, pays: Callable[[float], bool]) -> None:
        """A probe drafted ``drafted`` tokens and ``accepted`` of them; ``pays(α)``: whether
        speculation would pay for the step it was made in at an acceptance α."""
        self.acceptance.observe(drafted, accepted)
        accepted_any = bool(accepted) or (self._results is not None and self._results[0])
        self._results = (accepted_any, pays)


class AdaptiveGamma:
    """Per-request γ: the γ of best expected speedup at the request's estimated α.

    The estimate starts from the server's recent acceptance (``prior_alpha``). While γ is 0
    nothing is learned, so when its :class:`ProbeSchedule` says so, one step drafts the γ, at
    most ``max_probe_gamma``, that would pay best at a high acceptance (``probe_alpha``): a
    probe is there to learn whether the draft agrees at all; the first rejection ends what it
    can teach, and on a GPU each extra draft token of a failed probe is a wasted draft step.
    Where speculation would not promise :data:`MIN_SPEEDUP` times :data:`PROBE_MARGIN` even at
    that acceptance, at the batch size of the step, no probe is made: it would not pay before
    the probes had paid for themselves. (Run 5's H200 costs for the 1.5B target and the 0.5B
    draft, c = 0.62: at most 1.11x alone and 1.18x for 2 requests, at α = 0.9. Probing where a
    one-token draft promised 1.1x, 2 requests ran at 0.946-0.980x speculation off in
    ``bench.policy``.)

    A probe whose token is accepted is followed by another at once, until one is rejected,
    where such a probe pays for itself with this request drafting alone in its batch
    (:meth:`CostModel.lone_speedup` at ``probe_alpha``; one request alone on run 5's 7B costs,
    not two or more): one accepted token moves an estimate that remembers about 30 judged
    tokens by little. (On the CPU, :mod:`bench.policy` against those costs, one request at
    α = 0.9 starting from a server estimate of 0: 1.513x speculation off without, 1.749x with.)

    In a batch a probe is not capped with the others (:attr:`probing`): judged at the estimate
    that had made its γ 0, it was always cancelled, and a server whose acceptance estimate had
    fallen to 0 never drafted again while two or more requests ran.
    """

    def __init__(
        self,
        costs: CostModel,
        max_gamma: int,
        prior_alpha: float = 0.7,
        probe_every: int = 8,
        probe_alpha: float = 0.9,
        max_probe_every: int = 256,
        max_probe_gamma: int = 1,
        schedule: ProbeSchedule | None = None,
    ) -> None:
        self._costs = costs
        self._max_gamma = max_gamma
        # About 30 judged tokens of memory: with less, a request's estimate swung by ±0.15
        # at α 0.7, and in a batch one unlucky run turned its γ, and then (through the cap
        # on the batch) everyone's, to 0 for good (a simulation against run 5's costs).
        self.estimate = AcceptanceEstimate(prior_alpha, prior_weight=10.0, decay=0.97)
        self._owns_schedule = schedule is None  # else the engine counts the batch's steps
        self._schedule = schedule or ProbeSchedule(probe_every, max_probe_every)
        self._probe_alpha = probe_alpha
        self._max_probe_gamma = min(max_gamma, max_probe_gamma)
        self._probing = False
        self._streak = self._streaking = False
        self._probed_at = (1, 1.0)  # the batch and overhead of the last probe
        self._probe_key: tuple[int, float] | None = None  # see _probe_gamma
        self._probe = 0
        # Why the last next_gamma gave 0: a paying γ whose catch-up would not pay (declined),
        # a step counted toward the next probe (counted).
        self._declined = self._counted = False
        self._capped = False  # see capped()

    @property
    def alpha(self) -> float:
        return self.estimate.alpha

    @property
    def probing(self) -> bool:
        """Whether the γ the last :meth:`next_gamma` gave is a probe."""
        return self._probing

    def next_gamma(
        self, batch: int = 1, overhead: float = 1.0, catch_up: int = 0, remaining: int = 0
    ) -> int:
        """γ for the next step. ``catch_up``: tokens the draft must be fed alone before it can
        draft (0 when it is level); ``remaining``: tokens the request may still emit. A γ whose
        saving over ``remaining`` does not pay for the catch-up is 0 (see
        :meth:`CostModel.catch_up_pays`)."""
        gamma = self._costs.best_gamma(self.alpha, self._max_gamma, batch, overhead=overhead)
        self._declined = self._counted = self._probing = False
        fallback = 0  # what a step that does not probe drafts
        if gamma > 0:
            pays = self._pays(self.alpha, gamma, catch_up, remaining, batch, overhead)
            self._declined = not pays
            if pays and not self._capped:
                self._streak = False
                return gamma
            # Declined (its catch-up would not pay) or capped by its batch: such steps learn
            # nothing, so it probes when a probe is due, as at γ 0.
            fallback = gamma if pays else 0
        probe = self._probe_gamma(batch, overhead)
        if probe <= 0:
            return fallback
        probe_pays = functools.partial(
            self._pays, self._probe_alpha, probe, catch_up, remaining, batch, overhead
        )
        # A streak only while the estimate says γ 0: a request that would draft (capped or
        # declined) probes on the schedule, and drafts its own γ where the batch lets it.
        streak = not gamma and self._streak and self._costs.lone_speedup(
            self._probe_alpha, probe, batch, overhead) >= MIN_SPEEDUP and probe_pays()
        if not streak:
            self._streak = False
            if self._owns_schedule:
                self._schedule.step()
            if not (self._schedule.probe_due and probe_pays()):
                # A due probe whose catch-up would not pay is declined as such a γ is: that
                # only gets less likely as the draft falls behind and the tokens left shrink,
                # so only a seeded sample's plain steps wait for it (counted, the steps left
                # to a due probe stayed 1, and every plain step of the batch was taken alone).
                if self._schedule.probe_due:
                    self._declined = True
                else:
                    self._counted = True
                return fallback
            if self._owns_schedule:
                self._schedule.start()
            else:  # shared by a batch: its other requests may probe in this step too
                self._schedule.claim(batch)
        self._probing, self._streaking = True, streak
        self._probed_at = (batch, overhead)
        return probe

    def _probe_gamma(self, batch: int, overhead: float) -> int:
        """The probe's γ at this batch size and overhead, 0 where probing is not worth it:
        where speculation, found to be this good, would not pay with the margin pooled probes
        must show too. Asked at every plain step, and the same until the batch or the measured
        overhead changes: the last answer is kept."""
        key = (batch, overhead)
        if self._probe_key != key:
            worth = self._costs.best_gamma(
                self._probe_alpha, self._max_gamma, batch, overhead=overhead,
                min_speedup=MIN_SPEEDUP * PROBE_MARGIN,
            )
            self._probe_key, self._probe = key, min(self._max_probe_gamma, worth)
        return self._probe

    def capped(self, capped: bool) -> None:
        """Whether the batch's cap (:meth:`StepCosts.cap_for_batch`) made the γ > 0 that the
        last :meth:`next_gamma` gave 0. While it does, the request learns nothing at its own
        γ, so it probes when a probe is due, as at γ 0 (and as one whose catch-up would not
        pay does). Before, only γ 0 probed: in ``bench.policy`` on run 8's 7B costs, with a
        draft's first forward costed two tokens wide, 16 requests from the default estimate
        drafted nothing at α = 0.9, where a fixed γ of 2 gave 1.207x."""
        self._capped = capped

    def plain_steps_allowed(self, exact: bool = False) -> int:
        """After :meth:`next_gamma` gave 0: how many plain steps, that one included, the
        request may take before it must be asked again, so that it drafts at the same tokens
        as it would asked before every step (plain steps taken at once, see
        ``EngineConfig.decode_steps``): up to the step a probe is due. While ``exact`` (a
        seeded sample, whose draws depend on where it drafts) and a paying γ waits only for
        its catch-up to pay, one: that can only get less likely as the draft falls behind
        and the tokens left shrink, but not where the measured catch-up costs are out of
        order. Count the steps taken with :meth:`took_plain_steps`. (After a γ > 0 that a
        batch's cap made 0: up to the step a probe is due where the cap had made it 0 the step
        before too (see :meth:`capped`), else any number.)"""
        if self._declined and exact:
            return 1
        if self._counted:
            return self._schedule.steps_left()
        return sys.maxsize

    def took_plain_steps(self, steps: int) -> None:
        """Count a group of ``steps`` plain steps begun by a :meth:`next_gamma` of 0 (which
        counted the first) toward the next probe (a shared schedule: the engine counts)."""
        if self._counted and self._owns_schedule:
            self._schedule.took(steps)

    def would_draft(
        self, batch: int = 1, overhead: float = 1.0, catch_up: int = 0, remaining: int = 0,
        alpha: float | None = None,
    ) -> bool:
        """Whether the next step would draft at the current estimate (or at ``alpha``), a
        catch-up of ``catch_up`` tokens included (no probe counted): decides whether to
        prefill the draft."""
        alpha = self.alpha if alpha is None else alpha
        gamma = self._costs.best_gamma(alpha, self._max_gamma, batch, overhead=overhead)
        return self._pays(alpha, gamma, catch_up, remaining, batch, overhead)

    def could_draft(self, batch: int = 1, overhead: float = 1.0) -> bool:
        """Whether this request may draft at all while its estimate stays where it is: the
        estimate gives a γ > 0, or the request would probe when a probe is due. Where neither,
        a draft fed the prompt waits for an estimate that only the request's own drafting can
        raise."""
        gamma = self._costs.best_gamma(self.alpha, self._max_gamma, batch, overhead=overhead)
        return gamma > 0 or self._probe_gamma(batch, overhead) > 0

    def _pays(
        self, alpha: float, gamma: int, catch_up: int, remaining: int, batch: int, overhead: float
    ) -> bool:
        return self._costs.catch_up_pays(alpha, gamma, catch_up, remaining, batch, overhead)

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted and not self._probing:  # drafted its own γ: not capped any more
            self._capped = False
        if self._probing and drafted:
            self._probing = False
            self._streak = accepted > 0
            if self._streaking:
                self._schedule.observe(drafted, accepted)
            else:
                costs, max_gamma = self._costs, self._max_gamma
                batch, overhead = self._probed_at
                # Where a probe pays for itself (as a streak's must), it costs nothing to
                # come back sooner; else only where the pooled acceptance says drafting pays.
                pays_alone = costs.lone_speedup(
                    self._probe_alpha, drafted, batch, overhead) >= MIN_SPEEDUP
                self._schedule.result(drafted, accepted, lambda alpha: pays_alone or (
                    costs.best_gamma(alpha, max_gamma, batch, overhead=overhead,
                                     min_speedup=MIN_SPEEDUP * PROBE_MARGIN) > 0))
        self.estimate.observe(drafted, accepted)


DRAFT_CHAIN = 4
"""Draft forwards per timed run of :func:`measure_costs`' draft step."""


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, … up to ``max_batch`` and ``max_batch`` itself, 128 at most: the batch sizes
    the engine captures graphs for and :func:`measure_costs` times."""
    return sorted({min(2**i, max(1, max_batch)) for i in range(8)})


def measure_costs(
    target: Any,
    draft: Any,
    max_gamma: int,
    max_batch: int = 1,
    context: int = 32,
    repeats: int = 3,
    catch_up: int = 64,
) -> CostModel:
    """Time the runners as the steps use them, after ``context`` tokens of cache: the draft's
    one-token step and the target's forward over 1..max_gamma+1 positions, and, for runners that
    batch (``forward_batch``), the draft step and the target over 1 and max_gamma+1 positions
    per row at the batch sizes the engine captures graphs for (:func:`batch_sizes`; a size of as
    many tokens as one timed already is not timed again); and the draft over ``catch_up`` tokens
    at once, what feeding it a prompt costs (timed as that many one-token rows where that is a
    batch size; longer ones are extrapolated). A draft step is timed as drafting runs it:
    ``DRAFT_CHAIN`` forwards, each fed the previous one's argmax on the device, then one wait
    (on a GPU the host queues a step while the device runs the last). Each figure is the minimum
    of ``repeats`` runs: other work on the machine only ever adds time, and a spike must not
    rule a width out. The widths of one batch size are timed in turn, round by round."""
    batched = hasattr(target, "forward_batch") and hasattr(draft, "forward_batch")
    # Up to max_batch itself (it stopped at 8, and run 8's 7B costs held no plain step of more
    # than 8 rows: 16 came from 8 rows and 2 x 9 tokens). A size whose plain step is as many
    # tokens as a width already timed at batch 1 is still costed from that one (see below).
    batches = batch_sizes(max_batch)[1:] if batched else []

    def fastest(
        runner: Any, batch: int, runs: dict[int, Callable[[list[Any]], float]]
    ) -> dict[int, float]:
        """For each key of ``runs``, the least of ``repeats`` timings ``run(sequences)`` of
        ``batch`` sequences holding ``context`` tokens (rolled back after each), after a round
        that warms up. Each round times every run once, in turn: a slow spell of the machine
        then falls on all of them alike, not on some widths (on the CPU, one start-up that
        timed each width's runs back to back read 5 tokens 26% cheaper than 4; in five that
        took them in turn, 5 tokens were from 9% cheaper to 4% dearer: bench/RESULTS.md)."""
        sequences = [runner.new_sequence() for _ in range(batch)]
        try:
            for sequence in sequences:
                sequence.forward([0] * context, num_logits=1)
            samples: dict[int, list[float]] = {key: [] for key in runs}
            for attempt in range(repeats + 1):
                for key, run in runs.items():
                    seconds = run(sequences)
                    for sequence in sequences:
                        sequence.rollback(context)
                    if attempt:
                        samples[key].append(seconds)
            return {key: min(times) for key, times in samples.items()}
        finally:
            for sequence in sequences:
                sequence.release()

    def timed(runner: Any, batch: int, width: int, logits: int) -> Callable[[list[Any]], float]:
        def run(sequences: list[Any]) -> float:
            start = time.perf_counter()
            if batch == 1:
                out = [sequences[0].forward([0] * width, num_logits=logits)]
            else:
                out = runner.forward_batch(sequences, [[0] * width] * batch, [logits] * batch)
            float(out[-1][0, 0])  # reading a value waits for the device
            return time.perf_counter() - start

        return run

    def chained(runner: Any, batch: int) -> Callable[[list[Any]], float]:
        def run(sequences: list[Any]) -> float:
            start = time.perf_counter()
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=runner.device)
            for _ in range(DRAFT_CHAIN):
                if batch == 1:
                    out = sequences[0].forward(tokens.view(1), num_logits=1)
                else:
                    out = runner.forward_packed(sequences, tokens, [1] * batch, transient=True)
                tokens = out.argmax(-1).view(batch, 1)
            tokens.tolist()  # waits for the device
            return (time.perf_counter() - start) / DRAFT_CHAIN

        return run

    alone = {1: chained(draft, 1)}
    if catch_up > 1 and catch_up not in batches:  # else timed as that many rows, below
        alone[catch_up] = timed(draft, 1, catch_up, 1)
    draft_s = fastest(draft, 1, alone)
    for b in batches:
        draft_s[b] = fastest(draft, b, {b: chained(draft, b)})[b]
    target_s = fastest(target, 1, {k: timed(target, 1, k, k) for k in range(1, max_gamma + 2)})
    for b in batches:
        # One request's verify of as many tokens is measured already: the model takes both as
        # one size, and a second timing of it (of other rows) made the curve jump (run 5: 4
        # tokens above 5).
        widths = [w for w in sorted({1, max_gamma + 1}) if b * w not in target_s]
        target_s.update(fastest(target, b, {b * w: timed(target, b, w, w) for w in widths}))
    return CostModel(draft_s, target_s)
