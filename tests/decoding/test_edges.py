"""Edges of the batched catch-up, the stepper's arguments to the cap and its step timing, the
cost model, probes and the KV cache: decisions no test pinned until a mutation review
(2026-11-27) changed each by a comparison or a term and the suite still passed. Each test here
fails on the mutant its docstring names (B: batched.py, S: stepper.py, A: adaptive.py, C:
fast/cache.py, G: fast/graphs.py); most drive one function with stand-ins rather than the engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.decoding.test_batched import pair  # noqa: F401  (the fixture)


class _Draft:
    def __init__(self, length: int, calls: list) -> None:
        self.length, self._calls = length, calls

    def forward(self, tokens, num_logits=None):
        self._calls.append(("alone", [len(tokens)]))
        self.length += len(tokens)


class _CatchUpRunner:
    def __init__(self, calls: list, max_len: int = 128) -> None:
        self._calls, self.max_len = calls, max_len

    def forward_packed(self, sequences, tokens, num_logits, **kwargs):
        self._calls.append(("together", [len(row) for row in tokens]))
        for sequence, row in zip(sequences, tokens, strict=True):
            sequence.length += len(row)


def _state(calls: list, tokens: int, draft: int) -> SimpleNamespace:
    return SimpleNamespace(tokens=[0] * tokens, draft=_Draft(draft, calls))


def test_a_draft_exactly_catch_up_in_batch_behind_is_not_fed_first() -> None:
    """B1: a draft CATCH_UP_IN_BATCH tokens behind rides the first draft forward (the stepper
    counts it level); one token more and it is fed first."""
    from decoding.batched import CATCH_UP_IN_BATCH, _catch_up

    calls: list = []
    at = [_state(calls, 20, 20 - CATCH_UP_IN_BATCH) for _ in range(2)]
    _catch_up(at, _CatchUpRunner(calls))  # type: ignore[arg-type]
    assert calls == []
    assert [s.draft.length for s in at] == [20 - CATCH_UP_IN_BATCH] * 2
    past = [_state(calls, 20, 19 - CATCH_UP_IN_BATCH) for _ in range(2)]
    _catch_up(past, _CatchUpRunner(calls))  # type: ignore[arg-type]
    assert calls == [("together", [CATCH_UP_IN_BATCH] * 2)]


def test_a_row_with_exactly_room_for_the_padding_catches_up_with_the_others() -> None:
    """B2: a slot holds the padded catch-up when length + width == max_len (the runner's own
    bound), so that row is fed in the one forward, not alone."""
    from decoding.batched import _catch_up

    calls: list = []
    widest, full = _state(calls, 70, 8), _state(calls, 72, 67)  # widths 61 and 4; 67 + 61 = 128
    _catch_up([widest, full], _CatchUpRunner(calls, max_len=128))  # type: ignore[list-item]
    assert calls == [("together", [61, 4])]
    assert [s.draft.length for s in (widest, full)] == [69, 71]


def test_a_catch_up_exactly_as_long_as_the_graphs_cover_replays_them_alone() -> None:
    """B4: a row's catch-up of MAX_CATCH_UP_REPLAYS x the widest graph still runs as replays
    (the runner's own bound is <=), so two such rows are fed alone, not in one forward."""
    from decoding.batched import _catch_up
    from decoding.fast.runner import MAX_CATCH_UP_REPLAYS

    calls: list = []
    graphed = _CatchUpRunner(calls, max_len=1024)
    graphed.graphs = SimpleNamespace(widest=lambda batch: 8)  # type: ignore[attr-defined]
    graphed.catch_up_in_graphs = True  # type: ignore[attr-defined]
    width = MAX_CATCH_UP_REPLAYS * 8
    _catch_up([_state(calls, 11 + width, 10) for _ in range(2)], graphed)  # type: ignore[misc]
    assert calls == [("alone", [width])] * 2
    calls.clear()
    _catch_up([_state(calls, 12 + width, 10) for _ in range(2)], graphed)  # type: ignore[misc]
    assert calls == [("together", [width + 1] * 2)]


def test_a_batched_step_where_no_row_drafts_is_the_plain_step(pair) -> None:  # noqa: F811
    """B6: speculative_step_batch with every γ 0 (a batched step of one plain step, the
    engine's decode_steps 1) verifies from host lists and emits each row's plain token; it
    must not fail (the engine would quietly step every request alone)."""
    from decoding.batched import speculative_step_batch
    from decoding.speculative import speculative_step
    from tests.decoding.test_batched import SETTINGS, _runners, _states

    target, draft = _runners(pair, graphs=False)
    batched = _states(target, draft, seed=11)
    alone = _states(*_runners(pair, graphs=False), seed=11)
    for _ in range(3):
        results = speculative_step_batch(batched, [0] * len(SETTINGS), draft, target)
        singles = [speculative_step(state, 0) for state in alone]
        assert [(r.emitted, r.num_accepted) for r in results] == [
            (s.emitted, s.num_accepted) for s in singles]
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


class _CapCalled(BaseException):
    """Stops a stand-in step at its cap (not an Exception: a batch whose plan raises one is
    stepped request by request instead)."""


def _cap_arguments(lags: list[int], left: list[int], probing: list[bool] | None = None,
                   steps: int = 1, asked: list | None = None, first_probes: bool = False
                   ) -> dict:
    """What Stepper.step_batch hands StepCosts.cap_for_batch for adaptive, unseeded requests
    whose drafts lag by ``lags`` and that may still emit ``left`` tokens (a γ of 3 each), in
    the last of ``steps`` steps; ``asked``: the requests in the order asked for their γ;
    ``first_probes``: the first asked in each step probes."""
    asked = [] if asked is None else asked
    from decoding.speculative import propose
    from decoding.stepper import Stepper

    seen: dict = {}

    class Costs:
        def cap_for_batch(self, gammas, alphas, adjustable, **kwargs):
            seen.update(gammas=gammas, adjustable=adjustable, **kwargs)
            raise _CapCalled

    stepper = Stepper.__new__(Stepper)
    stepper.proposer, stepper.probes, stepper.step_costs = propose, None, Costs()
    stepper._asks_first = 0

    def gamma(running: SimpleNamespace) -> int:
        if first_probes:  # the first asked in each step takes the probe due
            running.adaptive.probing = len(asked) % len(lags) == 0
        asked.append(running)
        return 3

    stepper._gamma = gamma  # type: ignore[method-assign]
    stepper._alpha = lambda running: 0.7  # type: ignore[method-assign]
    ready = []
    for k, (lag, remaining) in enumerate(zip(lags, left, strict=True)):
        ready.append(SimpleNamespace(
            state=SimpleNamespace(tokens=[0] * 50, draft=SimpleNamespace(length=50 - lag)),
            adaptive=SimpleNamespace(probing=bool(probing and probing[k])),
            request=SimpleNamespace(sampling=SimpleNamespace(greedy=True, seed=None)),
            prepared=SimpleNamespace(max_new_tokens=20),
            output=[0] * (20 - remaining),
        ))
    for _ in range(steps):
        with pytest.raises(_CapCalled):
            stepper.step_batch(ready)  # type: ignore[arg-type]
    return seen


def test_a_batch_asks_its_requests_for_their_gamma_from_the_one_after_the_last_to_probe(
) -> None:
    """A probe due goes to the first request to ask for one; a request whose γ the batch's cap
    keeps at 0 asks at every step, so asked always first it took every probe (bench.policy: 2
    requests from a collapsed estimate at α = 0.9, one never drafted in 128 tokens). The
    requests are asked from the one after the last to probe, so the probes go round; with no
    probe, the order stays (turning it every step would line the same request up first at
    every probe wherever the wait is a multiple of the batch's steps)."""
    def order(first_probes: bool) -> list[int]:
        asked: list = []
        _cap_arguments([1, 1, 1], [10, 10, 10], steps=3, asked=asked,
                       first_probes=first_probes)
        ids = {id(running): k for k, running in enumerate(asked[:3])}
        return [ids[id(running)] for running in asked]

    assert order(True) == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert order(False) == [0, 1, 2] * 3


def test_a_draft_catch_up_in_batch_behind_rides_along() -> None:
    """S1: the cap's ``level`` is what _catch_up does not feed first: lag <= CATCH_UP_IN_BATCH
    (such a draft rides the batch's first draft forward), not lag < CATCH_UP_IN_BATCH."""
    from decoding.batched import CATCH_UP_IN_BATCH

    lags = [1, CATCH_UP_IN_BATCH, CATCH_UP_IN_BATCH + 1]
    seen = _cap_arguments(lags, [10, 10, 10])
    assert seen["level"] == [True, True, False]
    # Only a draft two behind is fed two tokens in the first draft forward; one further
    # behind is caught up to one first.
    assert seen["two_behind"] == [False, True, False]
    assert seen["limits"] == [9, 9, 9]
    assert seen["adjustable"] == [True, True, True]
    assert seen["fixed"] == [False, False, False]  # all adaptive: none drafts a γ of its own


def test_a_batch_pads_its_catch_up_to_the_longest_lag_in_the_cost_charged() -> None:
    """S5: two lagging drafts are fed in one forward padded to the longest (8 and 3 tokens:
    2 rows x 8), and that is what the step is charged, not 8 + 3 tokens."""
    from decoding.stepper import Stepper
    from tests.decoding.test_adaptive import run5_costs

    costs = run5_costs("7b")
    stepper = Stepper.__new__(Stepper)
    stepper.costs = costs
    states = [SimpleNamespace(tokens=[0] * 30, draft=SimpleNamespace(length=30 - lag))
              for lag in (9, 4)]
    charged = stepper._catch_up_s(states, [2, 2], batched=True)  # type: ignore[arg-type]
    assert charged == pytest.approx(costs.draft(2 * 8))
    assert charged != pytest.approx(costs.draft(8 + 3))


def test_a_lone_group_of_plain_steps_is_timed_per_step(monkeypatch) -> None:
    """S7: stepped alone, a group of k plain steps is recorded as its time / k (what one
    step costs), as a batched group is; else plain steps read k times their prediction and
    the speculative overhead (spec / plain) vanishes."""
    import decoding.stepper as stepper_module
    from decoding.speculative import StepResult
    from decoding.stepper import Stepper

    observed = []

    class Costs:
        def observe(self, gammas, seconds, catch_up_s=0.0):
            observed.append((gammas, seconds, catch_up_s))

    times = iter([10.0, 18.0])
    stepper = Stepper.__new__(Stepper)
    from tests.decoding.test_adaptive import GPU_LIKE

    stepper.costs, stepper.step_costs, stepper.clock = GPU_LIKE, Costs(), lambda: next(times)
    stepper.decode_steps = 4
    stepper._emit = lambda running, result, start_ns: None  # type: ignore[method-assign]
    monkeypatch.setattr(stepper_module, "plain_steps",
                        lambda state, steps: StepResult([1] * steps, 0, 0, 0.0, 1.0, steps))
    running = SimpleNamespace(
        state=SimpleNamespace(tokens=[0] * 10, draft=SimpleNamespace(length=5)),
        adaptive=None, prepared=SimpleNamespace(max_new_tokens=100), output=[1, 2],
    )
    stepper.step(running, gamma=0)  # type: ignore[arg-type]
    assert observed == [([0], pytest.approx(2.0), 0.0)]


def test_a_seeded_greedy_request_plans_with_the_server() -> None:
    """S8: greedy output is the same at any γ, so a greedy request with a seed does not plan
    alone: it starts from the server's acceptance and shares the batch's probe schedule
    (a seeded sample does neither)."""
    from decoding.adaptive import AcceptanceEstimate, ProbeSchedule
    from decoding.params import GenerationRequest, SamplingParams
    from decoding.stepper import Stepper, plans_alone
    from tests.decoding.test_adaptive import GPU_LIKE

    stepper = Stepper.__new__(Stepper)
    stepper.costs, stepper.max_gamma, stepper.default_gamma = GPU_LIKE, 8, None
    stepper.probes = ProbeSchedule()
    stepper.acceptance = AcceptanceEstimate(prior_alpha=0.2)
    greedy = GenerationRequest(request_id="g", prompt_token_ids=(1, 2),
                               sampling=SamplingParams(seed=3))
    sampled = GenerationRequest(request_id="s", prompt_token_ids=(1, 2),
                                sampling=SamplingParams(temperature=0.8, seed=3))
    assert not plans_alone(greedy) and plans_alone(sampled)
    shared = stepper.adaptive_for(greedy)
    assert shared is not None and shared._schedule is stepper.probes
    assert shared.alpha == pytest.approx(0.2)
    own = stepper.adaptive_for(sampled)
    assert own is not None and own._schedule is not stepper.probes


def test_requests_stepped_one_by_one_count_their_longest_group_of_plain_steps() -> None:
    """S9: stepped one by one as one step of the batch, the shared probe schedule counts the
    longest group of plain steps any of them took (4 here), not the last one's (1)."""
    from decoding.adaptive import ProbeSchedule
    from decoding.stepper import Stepper

    stepper = Stepper.__new__(Stepper)
    stepper.probes = ProbeSchedule(every=16)
    stepper.step = lambda running, gamma=None: setattr(  # type: ignore[method-assign]
        stepper, "_steps_taken", running.steps)
    stepper.probes.step()
    told: list[bool] = []
    adaptive = SimpleNamespace(capped=told.append)
    stepper._step_each([SimpleNamespace(steps=4, adaptive=adaptive),  # type: ignore[list-item]
                        SimpleNamespace(steps=1, adaptive=None)])
    assert stepper.probes.steps_left() == 16 - 4
    # Stepped alone, no cap holds its γ back: a request the batch had capped drafts its own.
    assert told == [False]
    # Not so after a failed batched step, where each goes alone at the γ the cap gave it.
    stepper._step_each([SimpleNamespace(steps=1, adaptive=adaptive)],  # type: ignore[list-item]
                       gammas=[0])
    assert told == [False]


def test_lone_speedup_is_one_drafter_beside_plain_rows() -> None:
    """A1, A2: a step in which one of ``batch`` requests drafts γ: one one-row draft forward
    per position and a verify of batch x (γ+1) positions, for the drafter's expected tokens
    and one token from each of the others. At α = 0 the batch makes one token per request."""
    from tests.decoding.test_adaptive import run5_costs

    costs = run5_costs("7b")
    for batch in (1, 2, 4, 8):
        step = costs.draft(1) + costs.target(2 * batch)
        assert costs.lone_speedup(0.0, 1, batch) == pytest.approx(costs.target(batch) / step)
    # The drafter's first draft forward two tokens wide after it accepted all γ (0.7²).
    step = 2 * costs.draft(1) + 0.49 * (costs.draft(2) - costs.draft(1)) + costs.target(12)
    expected = (3 + costs.expected_tokens(0.7, 2)) * costs.target(4) / (4 * step * 1.2)
    assert costs.lone_speedup(0.7, 2, 4, overhead=1.2) == pytest.approx(expected)


def test_step_costs_bucket_batches_by_the_next_power_of_two() -> None:
    """A4: batch sizes share a correction by the power of two they round up to (1; 2; 3-4;
    5-8): steps of 2 correct batches of 2 only."""
    from decoding.adaptive import CostModel, StepCosts

    steps = StepCosts(CostModel.from_widths(0.1, (1.0,) * 9), min_samples=1)
    steps.observe([2, 2], 2 * steps.predicted([2, 2]))
    assert steps.overhead(2) == pytest.approx(2.0)
    assert steps.overhead(1) == steps.overhead(3) == steps.overhead(4) == 1.0
    steps.observe([1, 1, 1], 3 * steps.predicted([1, 1, 1]))
    assert steps.overhead(4) == pytest.approx(3.0) and steps.overhead(5) == 1.0


def test_a_step_where_some_rows_draft_counts_as_speculative() -> None:
    """A5: a batched step is speculative where any row drafts (it pays for the draft
    forwards and the wide verify), not only where every row does."""
    from decoding.adaptive import CostModel, StepCosts

    steps = StepCosts(CostModel.from_widths(0.1, (1.0,) * 9), min_samples=3)
    for _ in range(3):
        steps.observe([2, 0], 2 * steps.predicted([2, 0]))
    assert steps.overhead(2) == pytest.approx(2.0)


def test_the_cap_charges_the_overhead_to_drafting_only() -> None:
    """A6: the measured overhead is what speculative steps cost beyond their forwards; the
    cap judges drafting by it and plain steps by their forwards. Four requests that keep γ 3
    at no overhead (test_one_drafter_does_not_make_a_whole_batch_verify_wide) go plain where
    speculation has been costing twice its prediction."""
    from decoding.adaptive import CostModel, StepCosts

    costs = CostModel(draft_s={1: 0.2, 4: 0.21}, target_s={1: 1.0, 4: 1.02, 16: 1.1})
    steps = StepCosts(costs, min_samples=1)
    assert steps.cap_for_batch([3] * 4, [0.9] * 4, [True] * 4) == [3] * 4
    steps.observe([3] * 4, 2 * steps.predicted([3] * 4))
    steps.observe([0] * 4, steps.predicted([0] * 4))
    assert steps.overhead(4) == pytest.approx(2.0)
    assert steps.cap_for_batch([3] * 4, [0.9] * 4, [True] * 4) == [0] * 4


def _shrinking():
    """Verification nearly free alone, not for eight (test_gamma_shrinks_as_the_batch_grows)."""
    from decoding.adaptive import CostModel

    return CostModel(
        draft_s={1: 0.2, 2: 0.21, 4: 0.22, 8: 0.25},
        target_s={**{k: 1.0 + 0.02 * k for k in range(1, 10)}, 16: 2.4, 32: 4.8, 72: 10.8},
    )


def test_whether_to_probe_is_asked_again_when_the_batch_changes() -> None:
    """A11: in a batch of 8 no probe could pay, so none is made; once the request steps alone,
    where one could, it probes when the schedule says so (the probe's γ is cached per batch
    and overhead, not once for good)."""
    from decoding.adaptive import AdaptiveGamma

    adaptive = AdaptiveGamma(_shrinking(), max_gamma=8, prior_alpha=0.0, probe_every=2)
    assert [adaptive.next_gamma(8, remaining=1000) for _ in range(10)] == [0] * 10
    assert max(adaptive.next_gamma(1, remaining=1000) for _ in range(4)) > 0


def test_an_accepted_probe_in_a_batch_is_judged_at_that_batch() -> None:
    """A12: a probe made in a batch of 8 on run 5's 7B costs does not pay for itself there
    (lone_speedup < MIN_SPEEDUP): after two failed probes (wait 4 -> 8 -> 16) an accepted one
    does not halve the wait as it would alone (test_an_accepted_probe_that_pays_for_itself_
    shortens_the_wait), the pooled acceptance (1 of 3) not paying either."""
    from decoding.adaptive import MIN_SPEEDUP, AdaptiveGamma
    from tests.decoding.test_adaptive import probe_until_accepted, run5_costs

    costs = run5_costs("7b")
    assert costs.lone_speedup(0.9, 1, 8) < MIN_SPEEDUP < costs.lone_speedup(0.9, 1, 1)
    adaptive = AdaptiveGamma(costs, max_gamma=8, prior_alpha=0.0, probe_every=4)
    probe_until_accepted(adaptive, [0, 0, 1], batch=8)
    assert adaptive._schedule.every == 16


def test_a_probe_after_an_accepted_one_still_needs_its_catch_up_to_pay() -> None:
    """A15: the probe that follows an accepted one at once (a streak) is still 0 where
    feeding the draft first would not pay over the tokens left."""
    from decoding.adaptive import AdaptiveGamma
    from tests.decoding.test_adaptive import run5_costs

    adaptive = AdaptiveGamma(run5_costs("7b"), max_gamma=8, prior_alpha=0.0, probe_every=2)
    while not adaptive.next_gamma(remaining=1000):
        adaptive.observe(0, 0)
    adaptive.observe(1, 1)  # accepted: a streak would follow
    assert adaptive.next_gamma(catch_up=5000, remaining=4) == 0


def test_a_slot_freed_twice_is_refused_and_handed_out_once() -> None:
    """C1: freeing a slot that was already given back is an error, and the slot is handed
    out once (a second free must not put it on the free list twice, for two sequences)."""
    import torch

    from decoding.fast.cache import StaticKVCache

    cache = StaticKVCache(num_layers=1, num_slots=2, num_kv_heads=1, max_len=4, head_dim=2,
                          dtype=torch.float32, device="cpu")
    slot = cache.allocate()
    cache.free(slot)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(slot)
    assert cache.free_slots == 2
    assert {cache.allocate(), cache.allocate()} == {0, 1}


def test_the_caches_max_len_is_always_a_kv_bucket(pair) -> None:  # noqa: F811
    """G3: graphs are captured up to the cache's max_len whatever buckets are asked for, so
    a sequence past the largest bucket asked for still replays a graph (of max_len)."""
    import torch

    from decoding.fast.model import FastDecoder
    from tests.decoding.test_batched import EagerGraphs

    decoder = FastDecoder(pair[0])
    cache = decoder.new_cache(num_slots=2, max_len=64)
    graphs = EagerGraphs(decoder, cache, (1,), (1,), (16,))
    assert graphs.kv_lengths == [16, 64]
    slot = cache.allocate()
    with torch.inference_mode():  # as the runner runs it
        assert graphs.run([[5]], [slot], [40]) is not None and graphs.replays == 1
    assert EagerGraphs(decoder, decoder.new_cache(num_slots=2, max_len=64), (1,), (1,),
                       ()).kv_lengths == [64]


def test_a_first_draft_forward_is_two_wide_only_for_a_drafting_row_two_behind(
    monkeypatch,
) -> None:
    """What a batched step tells the step costs: its first draft forward fed two tokens per
    row only where a drafting row's draft lagged by exactly two. A draft further behind is
    caught up first and then fed one; a row one behind is fed one."""
    import decoding.stepper as stepper_module
    from decoding.speculative import propose
    from decoding.stepper import Stepper

    told: list[bool] = []

    class Costs:
        def cap_for_batch(self, gammas, alphas, adjustable, **kwargs):
            return gammas

        def observe(self, gammas, seconds, catch_up_s=0.0, two_wide=False):
            told.append(two_wide)

    stepper = Stepper.__new__(Stepper)
    stepper.proposer, stepper.probes, stepper.step_costs = propose, None, Costs()
    stepper._asks_first, stepper.clock = 0, lambda: 0.0
    stepper.draft = stepper.target = None
    stepper._gamma = lambda running: 2  # type: ignore[method-assign]
    stepper._alpha = lambda running: 0.7  # type: ignore[method-assign]
    stepper._catch_up_s = lambda states, gammas, batched: 0.0  # type: ignore[method-assign]
    stepper._emit = lambda running, result, start_ns: None  # type: ignore[method-assign]
    monkeypatch.setattr(stepper_module, "speculative_step_batch",
                        lambda states, gammas, draft, target, choose: [None] * len(states))

    def step(lags: list[int]) -> bool:
        stepper.step_batch([SimpleNamespace(  # type: ignore[list-item]
            state=SimpleNamespace(tokens=[0] * 50, draft=SimpleNamespace(length=50 - lag),
                                  target=SimpleNamespace(length=49),
                                  generator=SimpleNamespace(get_state=lambda: None)),
            adaptive=None, prepared=SimpleNamespace(max_new_tokens=20), output=[0] * 10,
        ) for lag in lags])
        return told[-1]

    assert step([1, 2]) is True
    assert step([1, 3]) is False and step([3, 3]) is False and step([1, 1]) is False
