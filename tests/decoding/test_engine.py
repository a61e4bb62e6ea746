"""The engine end to end on tiny models: exactness, stopping, seeds, cancellation, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

import decoding.stepper as stepper_module
from decoding.adaptive import CostModel
from decoding.engine import Engine, EngineConfig
from decoding.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from decoding.models import ModelPair
from decoding.params import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SpeculationParams,
)
from decoding.speculative import propose
from tests.conftest import TEST_COSTS, make_engine

PROMPT_IDS = (10, 57, 203, 99, 14, 250, 31)


def reference_greedy(pair, prompt: tuple[int, ...], n: int) -> list[int]:
    """The target's own greedy continuation, through transformers' generate."""
    with torch.inference_mode():
        out = pair.target.model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


async def collect(engine: Engine, **fields):
    fields.setdefault("request_id", "test")
    handle = engine.submit(GenerationRequest(**fields))
    chunks = [chunk async for chunk in handle]
    return chunks


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def wait_until_idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not (stats.running or stats.waiting or stats.live_target_sequences
                or stats.live_draft_sequences):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("gamma", [None, 1, 3, 5])
@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_greedy_output_is_the_targets_own(request, pair_name: str, gamma, fast_path) -> None:
    pair = request.getfixturevalue(pair_name)
    pair = dataclasses.replace(pair, eos_token_ids=())  # compare full-length runs
    engine = make_engine(pair, fast_path=fast_path)
    try:
        chunks = await collect(
            engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=40,
            speculation=SpeculationParams(gamma),
        )
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, PROMPT_IDS, 40)
    usage = chunks[-1].usage
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    assert usage.completion_tokens == 40
    if pair_name == "same_pair" and gamma:
        assert usage.acceptance_rate == 1.0
        assert max(len(c.token_ids) for c in chunks) == gamma + 1
    if pair_name == "different_pair" and gamma:
        assert usage.acceptance_rate < 0.5


def sliding_pair(tmp_path) -> ModelPair:
    """A tiny target and draft (other weights: drafts get rejected) whose second layer
    attends to its last 8 positions only, the first to all."""
    from decoding.models import load_pair
    from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(320)
    for name, seed in (("target", 0), ("draft", 1)):
        make_tiny_model(tmp_path / name, seed=seed, tokenizer=tokenizer, sliding_window=8,
                        full_layers=1)
    pair = load_pair(str(tmp_path / "target"), str(tmp_path / "draft"), device="cpu",
                     dtype="float32", progress=False)
    return dataclasses.replace(pair, eos_token_ids=())


@pytest.mark.parametrize("gamma", [None, 0, 1, 3])
async def test_a_sliding_window_pair_is_exact_past_its_window(tmp_path, gamma) -> None:
    """The fast path refuses sliding-window models, so they run on transformers' own cache,
    whose sliding layers keep only their window: a rollback past it must still work (it
    raised) and give the target's own tokens; so must a draft never fed (γ 0, or one token:
    trimming its empty layers raised)."""
    pair = sliding_pair(tmp_path)
    engine = make_engine(pair)
    assert not engine.batched  # the transformers path
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=30,
                               speculation=SpeculationParams(gamma))
        one = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=1,
                            speculation=SpeculationParams(gamma))
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, PROMPT_IDS, 30)
    assert ids_of(one) == reference_greedy(pair, PROMPT_IDS, 1)
    usage = chunks[-1].usage
    assert usage.draft_tokens > usage.accepted_draft_tokens or gamma == 0  # rollbacks


async def test_a_sliding_layer_keeps_its_window_through_groups_of_plain_steps(
    tmp_path, monkeypatch
) -> None:
    """Plain steps taken several at once roll nothing back; the group still ends as a step
    does, so the sliding layer is trimmed back to its window after each group (else it kept
    every token of a request that never drafts)."""
    from decoding.runner import KVSequence

    pair = sliding_pair(tmp_path)
    held: list[int] = []
    real = KVSequence.forward

    def forward(self, tokens, num_logits=None):
        sliding = self._cache.layers[1]
        if sliding.is_initialized:
            held.append(sliding.keys.shape[-2])
        return real(self, tokens, num_logits)

    monkeypatch.setattr(KVSequence, "forward", forward)
    engine = make_engine(pair, decode_steps=4)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=30,
                               speculation=SpeculationParams(0))
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, PROMPT_IDS, 30)
    assert max(len(c.token_ids) for c in chunks) == 4  # in groups
    assert held and max(held) <= 7 + 3  # the window less one, and a group's first three


def test_a_sliding_layer_is_trimmed_back_to_its_window_at_each_step(tmp_path) -> None:
    """Recording the past (so that it can roll back), a sliding layer keeps every token it is
    given until the step's rollback trims it, with rejected tokens to drop or none; the full
    layer keeps every token."""
    from decoding.runner import ModelRunner

    sequence = ModelRunner(sliding_pair(tmp_path).target.model).new_sequence()
    full, sliding = sequence._cache.layers

    def held() -> tuple[int, int]:
        return full.keys.shape[-2], sliding.keys.shape[-2]

    sequence.forward(list(range(10, 30)))
    sequence.rollback(20)  # nothing to drop
    assert held() == (20, 7)  # the window less the position the next token takes
    sequence.forward([5, 6, 7])
    sequence.rollback(21)  # two rejected
    assert held() == (21, 7)
    sequence.release()


@pytest.mark.parametrize(
    "config",
    [{"fast_path": "on", "max_concurrent_requests": 1},
     {"fast_path": "off"},
     {"fast_path": "on", "max_concurrent_requests": 2}],
    ids=["one-request", "transformers-path", "batched"],
)
async def test_an_engine_that_measures_its_own_costs_starts_and_is_exact(
    different_pair, config
) -> None:
    """Without ``costs=`` the engine times its runners at start-up (every other engine test
    hands it costs): with nothing to batch (one request at a time, or the transformers path)
    as well as with batch sizes to time, it starts and serves the target's own greedy output."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = Engine(pair, EngineConfig(**config))
    try:
        assert set(engine.costs.target_s) >= {1, 2}
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=12)
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, PROMPT_IDS, 12)


@pytest.mark.parametrize("attention", [None, "flex"])
@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_a_mixed_batch_is_exact_for_every_request(
    request, pair_name: str, attention: str | None
) -> None:
    """Requests of different lengths, γ and start times share batched steps (joining and
    leaving between steps); each gets exactly the target's own greedy tokens. With the CPU's
    attention (SDPA) and with FlexAttention (uncompiled: PyTorch's reference)."""
    pair = dataclasses.replace(request.getfixturevalue(pair_name), eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=4, attention=attention)
    assert engine.batched
    assert engine.target.decoder.attention == engine.draft.decoder.attention == (
        attention or "sdpa")
    prompts = [PROMPT_IDS, (7, 8, 9), tuple(range(20, 61)), (300, 12, 5, 77, 41)]
    lengths = [30, 12, 25, 40]
    gammas = [None, 0, 2, 5]

    async def one(i: int):
        await asyncio.sleep(0.01 * i)  # staggered joins
        return ids_of(await collect(engine, prompt_token_ids=prompts[i],
                                    max_new_tokens=lengths[i],
                                    speculation=SpeculationParams(gammas[i])))

    try:
        outputs = await asyncio.gather(*(one(i) for i in range(4)))
    finally:
        engine.close()
    for prompt, n, output in zip(prompts, lengths, outputs, strict=True):
        assert output == reference_greedy(pair, prompt, n)


async def test_batched_steps_are_taken_together(same_pair, monkeypatch) -> None:
    from tests.steps import before_steps

    sizes: list[int] = []
    before_steps(monkeypatch, lambda states: sizes.append(len(states)))
    engine = make_engine(same_pair, fast_path="on", max_concurrent_requests=4)
    try:
        await asyncio.gather(*(collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=16,
                                       speculation=SpeculationParams(1)) for _ in range(4)))
    finally:
        engine.close()
    assert max(sizes) == 4


async def test_a_batched_steps_chunks_reach_their_callers_together(
    same_pair, monkeypatch
) -> None:
    """A batched round's puts are held and delivered at its end in one wake of each caller's
    loop (decoding.handle.delivered_together): woken at the first put, the loop took the GIL
    from the worker while it still put the others' chunks."""
    from decoding import handle
    from tests.steps import before_steps

    held: list[bool] = []
    before_steps(monkeypatch, lambda states: held.append(
        getattr(handle._held, "mailboxes", None) is not None))
    engine = make_engine(same_pair, fast_path="on", max_concurrent_requests=4)
    rounds = 0
    stepping = False  # the worker is inside step_batch, where every token is put
    step_batch = engine.stepper.step_batch

    def counted(ready):  # type: ignore[no-untyped-def]
        nonlocal rounds, stepping
        rounds += 1  # called once in every batched round
        stepping = True
        try:
            return step_batch(ready)
        finally:
            stepping = False

    monkeypatch.setattr(engine.stepper, "step_batch", counted)
    loop = asyncio.get_running_loop()
    wakes = woken_stepping = 0
    call_soon_threadsafe = loop.call_soon_threadsafe

    def woken(callback, *args):  # type: ignore[no-untyped-def]
        nonlocal wakes, woken_stepping
        wakes += 1
        woken_stepping += stepping
        return call_soon_threadsafe(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", woken)
    try:
        outputs = await asyncio.gather(*(
            collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=16,
                    speculation=SpeculationParams(1)) for _ in range(4)))
    finally:
        engine.close()
    assert held and all(held)
    # Never while the step puts its chunks (held, the first put of all woke the loop there),
    # and at most once a round, for its four requests' chunks.
    assert woken_stepping == 0
    assert 0 < wakes <= rounds
    assert len({tuple(ids_of(chunks)) for chunks in outputs}) == 1
    assert len(ids_of(outputs[0])) == 16


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_steps(
    same_pair, fast_path: str
) -> None:
    """With prefill_chunk = 4 a 41-token prompt takes 10 rounds to prefill; a request already
    decoding keeps taking steps in between, and both outputs stay the target's own."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, prefill_chunk=4, max_concurrent_requests=2)
    long_prompt = tuple(range(20, 61))
    try:
        short = engine.submit(GenerationRequest(
            request_id="short", prompt_token_ids=PROMPT_IDS, max_new_tokens=60,
            speculation=SpeculationParams(1),
        ))
        short_ids = list((await anext(aiter(short))).token_ids)  # decoding has begun
        long = engine.submit(GenerationRequest(
            request_id="long", prompt_token_ids=long_prompt, max_new_tokens=8,
        ))
        long_ids, rest = await asyncio.gather(
            collect_handle(long), collect_handle(short)
        )
        short_ids += rest
    finally:
        engine.close()
    assert short_ids == reference_greedy(pair, PROMPT_IDS, 60)
    assert long_ids == reference_greedy(pair, long_prompt, 8)
    began, ended = long.timeline.target_prefill_ns
    during = [s for s in short.timeline.steps if began < s.start_ns < ended]
    assert len(during) >= 3, (len(during), len(short.timeline.steps))


TOGETHER_PROMPTS = [PROMPT_IDS[:3], PROMPT_IDS, tuple(range(40, 53)), tuple(range(20, 61))]


async def _prefilled_together(pair, monkeypatch, fail: bool, prompts=TOGETHER_PROMPTS,
                              chunk: int = 4, scored: frozenset[int] = frozenset()
                              ) -> tuple[list[list[int]], list, list[str]]:
    """``prompts`` admitted at once to a batching engine (γ 2, so the draft sees the prompts
    too, prefill_chunk ``chunk``); their outputs, the rows of each batched prefill and the
    requests prefilled alone. With ``fail``, the first batched prefill's draft forward fails
    after it and the target's ran. The requests numbered in ``scored`` ask for their prompts'
    log-probabilities."""
    engine = make_engine(pair, fast_path="on", prefill_chunk=chunk, max_concurrent_requests=4)
    stepper = engine.stepper
    real, real_alone = stepper._prefill_chunks, stepper.prefill
    rows_seen: list[list[int]] = []
    alone: list[str] = []  # requests prefilled one by one, in order

    def recorded(rows):
        if len(rows) == 1:  # prefill: recorded in alone
            return real(rows)
        rows_seen.append([stop - begin for _, begin, stop in rows])
        with monkeypatch.context() as patch:
            if fail and len(rows_seen) == 1:
                draft_forward = stepper.draft.forward_packed

                def broken(*args, **kwargs):  # fails after the draft's caches moved
                    draft_forward(*args, **kwargs)
                    raise RuntimeError("draft prefill failed")
                patch.setattr(stepper.draft, "forward_packed", broken)
            return real(rows)

    def recorded_alone(running):
        alone.append(running.request.request_id)
        return real_alone(running)

    monkeypatch.setattr(stepper, "_prefill_chunks", recorded)
    monkeypatch.setattr(stepper, "prefill", recorded_alone)
    try:
        with engine._cond:  # admitted together
            handles = [engine.submit(GenerationRequest(
                request_id=f"r{i}", prompt_token_ids=prompt, max_new_tokens=12,
                speculation=SpeculationParams(2), prompt_logprobs=0 if i in scored else None))
                for i, prompt in enumerate(prompts)]
        outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
        await wait_until_idle(engine)
    finally:
        engine.close()
    assert all(h.timeline.draft_prefill_ns[1] for h in handles)  # the drafts saw the prompts
    return list(outputs), rows_seen, alone


async def test_prompts_arriving_together_are_prefilled_in_one_forward(
    different_pair, monkeypatch
) -> None:
    """Requests admitted in one round prefill their next chunks in one target forward and one
    draft forward (rows of 4, 4, 4 and 2 tokens, longest first: the three-token prompt caches
    two), not two forwards each; round by round while two or more still prefill, then the
    longest alone. Each output is still the target's own."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    outputs, rows, alone = await _prefilled_together(pair, monkeypatch, fail=False)
    assert rows[0] == [4, 4, 4, 2]
    assert rows[1] == [4, 4, 2] and rows[2] == [4, 4]  # 6 and 12 of the middle two cached
    assert all(len(r) >= 2 for r in rows)
    assert set(alone) == {"r3"}  # the longest, once the others are done
    assert outputs == [reference_greedy(pair, p, 12) for p in TOGETHER_PROMPTS]


async def test_a_prompt_scored_for_its_logprobs_goes_alone_and_the_others_together(
    different_pair, monkeypatch
) -> None:
    """r2 asks for its prompt's log-probabilities: its chunks go alone (every position's
    logits), while r0, r1 and r3 share their forwards as if it were not there (it sorts
    between them: it used to split them into two forwards)."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    outputs, rows, alone = await _prefilled_together(pair, monkeypatch, fail=False,
                                                     scored=frozenset({2}))
    assert rows[0] == [4, 4, 2]  # r1, r3, r0
    assert alone.count("r2") == 3  # 12 of its 13 tokens, 4 at a time
    assert outputs == [reference_greedy(pair, p, 12) for p in TOGETHER_PROMPTS]


async def test_prompts_of_very_different_lengths_are_not_padded_to_the_longest(
    different_pair, monkeypatch
) -> None:
    """Whole prompts of 40, 6 and 2 tokens to cache (prefill_chunk 0): the 40 alone, since
    padding the others to it would more than double the tokens (PREFILL_PAD_LIMIT 1.5); the 6
    and the 2 together (12 padded for 8 real)."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    prompts = [PROMPT_IDS[:3], PROMPT_IDS, tuple(range(20, 61))]
    outputs, rows, alone = await _prefilled_together(pair, monkeypatch, fail=False,
                                                     prompts=prompts, chunk=0)
    assert rows == [[6, 2]] and alone == ["r2"]
    assert outputs == [reference_greedy(pair, p, 12) for p in prompts]


async def test_a_batched_prefill_takes_at_most_its_token_budget(
    different_pair, monkeypatch
) -> None:
    """With room for 14 tokens per batched prefill, padding included, the first round's rows of
    4, 4, 4 and 2 (14 real tokens, 16 padded) go in two forwards, [4, 4, 4] and then the 2
    alone; each output is still the target's own."""
    monkeypatch.setattr(stepper_module, "PREFILL_BATCH_TOKENS", 14)
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    outputs, rows, alone = await _prefilled_together(pair, monkeypatch, fail=False)
    assert rows[0] == [4, 4, 4] and alone[0] == "r0"
    assert all(4 * len(r) <= 14 for r in rows)
    assert outputs == [reference_greedy(pair, p, 12) for p in TOGETHER_PROMPTS]


async def test_a_batched_prefill_that_fails_midway_is_redone_one_by_one(
    different_pair, monkeypatch
) -> None:
    """The draft's forward of a batched prefill fails after it and the target's ran: each
    request's caches go back to where they were and it is prefilled alone in that round, so
    the outputs are those of a run without the failure. (Mutants: the target, or the draft,
    not rolled back; no request prefilled alone.)"""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    outputs, rows, alone = await _prefilled_together(pair, monkeypatch, fail=True)
    assert rows[0] == [4, 4, 4, 2]
    assert sorted(alone[:4]) == ["r0", "r1", "r2", "r3"]
    assert outputs == [reference_greedy(pair, p, 12) for p in TOGETHER_PROMPTS]


async def test_a_chunk_without_room_for_the_padding_is_prefilled_alone(
    different_pair, monkeypatch
) -> None:
    """The runners here take at most 23 tokens per sequence, padding included. A 20-token
    prompt prefilled 8 at a time is at its last chunk (positions 16-18) when two 12-token
    prompts arrive with chunks of 8: padded to 8, its chunk would end at 24, so it goes alone
    and the two go together, and no batched forward fails and falls back. (Mutant: without
    the room check, the three go together, the runner refuses the forward, and all three are
    redone one by one.) Each output is still the target's own."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", prefill_chunk=8, max_concurrent_requests=4)
    stepper = engine.stepper
    for runner in (stepper.target, stepper.draft):
        monkeypatch.setattr(runner, "max_len", 23)
    real_batch, real_chunks, real_alone = (
        stepper.prefill_batch, stepper._prefill_chunks, stepper.prefill)
    rows_seen: list[list[tuple[str, int, int]]] = []
    alone: list[tuple[str, int]] = []  # (request, where its chunk began)
    third_round, submitted = threading.Event(), threading.Event()

    def batch(group):
        real_batch(group)
        if [r.request.request_id for r in group] == ["first"] and group[0].prefilled == 16:
            third_round.set()  # the others arrive before the first's last chunk
            assert submitted.wait(5)

    def chunks(rows):
        if len(rows) > 1:
            rows_seen.append([(r.request.request_id, begin, stop) for r, begin, stop in rows])
        return real_chunks(rows)

    def prefill(running):
        alone.append((running.request.request_id, running.prefilled))
        return real_alone(running)

    monkeypatch.setattr(stepper, "prefill_batch", batch)
    monkeypatch.setattr(stepper, "_prefill_chunks", chunks)
    monkeypatch.setattr(stepper, "prefill", prefill)
    first_prompt, other_prompts = tuple(range(30, 50)), [tuple(range(60, 72)),
                                                         tuple(range(80, 92))]

    def request(name: str, prompt: tuple[int, ...], n: int) -> GenerationRequest:
        return GenerationRequest(request_id=name, prompt_token_ids=prompt, max_new_tokens=n,
                                 speculation=SpeculationParams(1))
    try:
        first = engine.submit(request("first", first_prompt, 2))
        assert await asyncio.to_thread(third_round.wait, 5)
        with engine._cond:  # admitted together
            others = [engine.submit(request(f"other{i}", prompt, 4))
                      for i, prompt in enumerate(other_prompts)]
        submitted.set()
        outputs = await asyncio.gather(*(collect_handle(h) for h in [first, *others]))
        await wait_until_idle(engine)
    finally:
        submitted.set()
        engine.close()
    assert rows_seen[0] == [("other0", 0, 8), ("other1", 0, 8)]
    assert ("first", 16) in alone
    assert not [name for name, begin in alone if name != "first"]  # no fallback
    assert outputs == [reference_greedy(pair, first_prompt, 2),
                       *[reference_greedy(pair, p, 4) for p in other_prompts]]


async def _two_together(engine: Engine, n: int = 12, gamma: int | None = 2
                        ) -> tuple[list[list[int]], list]:
    """Two requests for PROMPT_IDS admitted together: their outputs and handles."""
    with engine._cond:  # admitted together
        handles = [engine.submit(GenerationRequest(
            request_id=f"r{i}", prompt_token_ids=PROMPT_IDS, max_new_tokens=n,
            speculation=SpeculationParams(gamma))) for i in range(2)]
    outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
    await wait_until_idle(engine)
    return list(outputs), handles


async def test_the_step_costs_learn_when_a_first_draft_forward_fed_two_tokens_per_row(
    same_pair, monkeypatch
) -> None:
    """The draft has the target's weights, so every draft token is accepted: after the first
    step each draft lags by two (the last draft token and the bonus token), and the first draft
    forward of every later speculative step feeds two per row; the step costs are told so,
    and predict that step with it."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=2)
    seen: list[tuple[int, bool]] = []
    real = engine.stepper.step_costs.observe

    def observe(gammas, seconds, catch_up_s=0.0, two_wide=False):
        seen.append((max(gammas), two_wide))
        return real(gammas, seconds, catch_up_s, two_wide)

    monkeypatch.setattr(engine.stepper.step_costs, "observe", observe)
    try:
        outputs, _ = await _two_together(engine)
    finally:
        engine.close()
    wide = [two for gamma, two in seen if gamma > 0]
    assert len(wide) >= 3 and wide[0] is False and all(wide[1:])
    assert outputs == [reference_greedy(pair, PROMPT_IDS, 12)] * 2


async def test_requests_their_batch_keeps_from_drafting_still_probe(
    different_pair, monkeypatch
) -> None:
    """A batch whose cap makes every adaptive request's γ 0 at every step: told so, the
    requests probe when the shared schedule says one is due (one token each time), where
    otherwise their estimate would never move. (Mutant: the stepper does not tell them.)"""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=2)
    assert TEST_COSTS.best_gamma(0.7, 8, batch=2) > 0

    def cap(gammas, alphas, adjustable, **_):
        return [0 if free else gamma for gamma, free in zip(gammas, adjustable, strict=True)]

    monkeypatch.setattr(engine.stepper.step_costs, "cap_for_batch", cap)
    try:
        outputs, handles = await _two_together(engine, n=40, gamma=None)
    finally:
        engine.close()
    assert outputs == [reference_greedy(pair, PROMPT_IDS, 40)] * 2
    drafted = [step.gamma for handle in handles for step in handle.timeline.steps
               if step.gamma]
    assert drafted and set(drafted) == {1}  # probes, of one token each


async def test_whether_a_draft_sees_the_prompt_is_judged_at_the_servers_upper_bound(
    same_pair, monkeypatch
) -> None:
    """A batching server that has seen little decides whether to feed the drafts the prompts
    at the top of what its acceptance may be (AcceptanceEstimate.upper, 0.869 on the prior of
    0.7 alone), not at the estimate: the drafts that see the prompts are how it learns
    (judged at the estimate, 16 requests on run 8's 7B costs did not feed them at first, and
    learned only through probes that each fed a draft its whole prompt: bench.policy at
    α = 0.9, 1.145x speculation off against 1.224x)."""
    from decoding.adaptive import AdaptiveGamma

    asked: list[float | None] = []
    real = AdaptiveGamma.would_draft

    def would_draft(self, *args, alpha=None, **kwargs):
        asked.append(alpha)
        return real(self, *args, alpha=alpha, **kwargs)

    monkeypatch.setattr(AdaptiveGamma, "would_draft", would_draft)
    engine = make_engine(dataclasses.replace(same_pair, eos_token_ids=()), fast_path="on",
                         max_concurrent_requests=2)
    upper = engine.stepper.acceptance.upper()
    try:
        await _two_together(engine, gamma=None)
    finally:
        engine.close()
    assert upper == pytest.approx(0.869, abs=1e-3)
    assert asked == [upper, upper]


@pytest.mark.parametrize("last_gamma", [0, 2])
async def test_no_draft_sees_the_prompt_where_no_request_could_draft(
    same_pair, last_gamma
) -> None:
    """The upper bound says drafting could pay, but at the requests' own estimate (the prior)
    no γ pays and no probe would (a draft step 0.6 of a target's): a draft fed the prompt would
    never draft, so none is. (On run 8's 1.5B costs, bench.policy: 1 to 4 requests ran at
    0.967-0.987x speculation off at every α, each round feeding the drafts their prompts.)
    Unless the last step drafted: a level draft may draft along with the others (a request
    whose estimate is higher), so then the drafts are fed as before."""
    from decoding.adaptive import AdaptiveGamma
    from tests.decoding.test_adaptive import DEAR_DRAFT

    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = Engine(pair, EngineConfig(fast_path="on", max_concurrent_requests=2),
                    costs=DEAR_DRAFT)
    upper = engine.stepper.acceptance.upper()
    assert AdaptiveGamma(DEAR_DRAFT, 8, prior_alpha=engine.stepper.acceptance.alpha).would_draft(
        2, catch_up=len(PROMPT_IDS), remaining=32, alpha=upper)
    engine.stepper.last_gamma = last_gamma  # as a step before these requests left it
    try:
        outputs, handles = await _two_together(engine, n=32, gamma=None)
    finally:
        engine.close()
    fed = [h.timeline.draft_prefill_ns != (0, 0) for h in handles]
    assert fed == [bool(last_gamma)] * 2 and len(outputs[0]) == 32
    if not last_gamma:
        assert all(h.usage.draft_tokens == 0 for h in handles)


def test_a_negative_prefill_chunk_is_refused(same_pair) -> None:
    with pytest.raises(ValueError, match="prefill_chunk"):
        make_engine(same_pair, prefill_chunk=-1)


async def collect_handle(handle) -> list[int]:
    return [t async for chunk in handle for t in chunk.token_ids]


async def test_adaptive_gamma_stops_speculating_when_steps_cost_more_than_predicted(
    same_pair, monkeypatch
) -> None:
    """The draft agrees always (α = 1), so the cost model alone would draft at length; but
    every speculative step here takes 30 ms more than its forwards (as host work would), far
    above what the costs predict, so the engine learns it and decodes plainly, probing now and
    then; the output stays the target's own."""
    import decoding.stepper as stepper_module

    real = stepper_module.speculative_step

    def slow_when_drafting(state, gamma):
        if gamma > 0:
            time.sleep(0.03)
        return real(state, gamma)

    monkeypatch.setattr(stepper_module, "speculative_step", slow_when_drafting)
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    costs = CostModel.from_widths(0.0002, (0.002,) * 9)  # about what tiny models take
    engine = Engine(pair, EngineConfig(fast_path="on"), costs=costs)
    assert costs.best_gamma(1.0, 8) > 0
    try:
        handle = engine.submit(GenerationRequest(
            request_id="slow", prompt_token_ids=PROMPT_IDS, max_new_tokens=80,
        ))
        ids = [t async for chunk in handle for t in chunk.token_ids]
    finally:
        engine.close()
    assert ids == reference_greedy(pair, PROMPT_IDS, 80)
    gammas = [step.gamma for step in handle.timeline.steps]
    assert gammas[0] > 0  # it began by speculating
    later = gammas[5:]
    assert later.count(0) >= 0.7 * len(later), gammas


async def test_eos_inside_an_accepted_run_stops_there(same_pair) -> None:
    free_run = reference_greedy(same_pair, PROMPT_IDS, 30)
    eos = free_run[7]  # pretend this token is the end of sequence
    first = free_run.index(eos)
    engine = make_engine(dataclasses.replace(same_pair, eos_token_ids=(eos,)))
    try:
        handle = engine.submit(GenerationRequest(
            request_id="eos", prompt_token_ids=PROMPT_IDS, max_new_tokens=30,
            speculation=SpeculationParams(5)))
        chunks = [chunk async for chunk in handle]
    finally:
        engine.close()
    assert ids_of(chunks) == free_run[: first + 1]
    assert chunks[-1].finish_reason == FinishReason.EOS
    # Usage counts the draft as far as the output went, not past EOS: draft == target, so
    # every step's whole draft is accepted (α = 1), and each step but the last (cut inside its
    # accepted run, at EOS) also emits the target's own next token.
    usage = chunks[-1].usage
    assert usage.draft_tokens == usage.accepted_draft_tokens == usage.completion_tokens - (
        usage.target_forward_passes - 1
    )
    assert usage.acceptance_rate == 1.0
    assert sum(usage.accepted_by_position) == sum(usage.drafted_by_position) == (
        usage.accepted_draft_tokens
    )
    steps = handle.timeline.steps
    assert sum(step.emitted for step in steps) == usage.completion_tokens
    assert sum(step.accepted for step in steps) == usage.accepted_draft_tokens
    assert sum(step.gamma for step in steps) == usage.draft_tokens


async def test_a_stop_token_id_inside_an_accepted_run_ends_there(same_pair) -> None:
    """The stop token is returned (as vLLM does), nothing after it; its log-probability too."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    free_run = reference_greedy(pair, PROMPT_IDS, 20)
    stop_id = free_run[4]
    engine = make_engine(pair, fast_path="on")
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20,
                               speculation=SpeculationParams(6), stop_token_ids=(stop_id,),
                               logprobs=True)
    finally:
        engine.close()
    assert ids_of(chunks) == free_run[: free_run.index(stop_id) + 1]
    assert chunks[-1].finish_reason == FinishReason.STOP
    assert [lp.token_id for c in chunks for lp in c.logprobs] == ids_of(chunks)


async def test_ignore_eos_goes_on_to_max_new_tokens(same_pair) -> None:
    free_run = reference_greedy(dataclasses.replace(same_pair, eos_token_ids=()), PROMPT_IDS, 20)
    pair = dataclasses.replace(same_pair, eos_token_ids=(free_run[3],))
    engine = make_engine(pair)
    try:
        ignoring = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20,
                                 ignore_eos=True)
        stopping = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20)
    finally:
        engine.close()
    assert ids_of(ignoring) == free_run
    assert ignoring[-1].finish_reason == FinishReason.LENGTH
    assert ids_of(stopping) == free_run[: free_run.index(free_run[3]) + 1]
    assert stopping[-1].finish_reason == FinishReason.EOS


@pytest.mark.parametrize("include", [False, True], ids=["cut", "kept"])
@pytest.mark.parametrize(("gamma", "decode_steps"), [(5, 1), (0, 4)])
async def test_stop_string_inside_an_accepted_run_cuts_the_text(
    same_pair, gamma: int, decode_steps: int, include: bool
) -> None:
    """Inside a step's accepted run, or inside a group of plain steps (the group's later
    tokens dropped); the text ends before the stop string, or after it where the request
    keeps it (include_stop_str_in_output)."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    free_run = reference_greedy(pair, PROMPT_IDS, 40)
    text = pair.tokenizer.decode(free_run, skip_special_tokens=True)
    stop = text[12:15] if decode_steps == 1 else _stop_inside_a_group(pair, free_run, decode_steps)
    assert stop and text.find(stop) >= 0
    engine = make_engine(pair, decode_steps=decode_steps)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=40,
                               stop=(stop,), speculation=SpeculationParams(gamma),
                               include_stop_str_in_output=include)
    finally:
        engine.close()
    streamed = "".join(c.text for c in chunks)
    assert streamed == text[: text.find(stop) + (len(stop) if include else 0)]
    assert chunks[-1].finish_reason == FinishReason.STOP
    # the token ids end with the token that completed the stop string
    emitted = ids_of(chunks)
    assert stop in pair.tokenizer.decode(emitted, skip_special_tokens=True)
    assert stop not in pair.tokenizer.decode(emitted[:-1], skip_special_tokens=True)
    if decode_steps > 1:  # grouped, and the last group cut short
        assert len(chunks[1].token_ids) == decode_steps
        assert 1 <= len(chunks[-1].token_ids) < decode_steps


def _stop_inside_a_group(pair: ModelPair, free_run: list[int], group: int) -> str:
    """A 3-character stop string first completed by a token inside a group of plain steps
    (the first token comes alone, then groups of ``group``)."""
    def decode(ids: list[int]) -> str:
        return str(pair.tokenizer.decode(ids, skip_special_tokens=True))

    text = decode(free_run)
    for start in range(len(text) - 3):
        stop = text[start : start + 3]
        if "\ufffd" in stop or text.find(stop) != start:
            continue
        last = next(n for n in range(len(free_run) + 1) if stop in decode(free_run[:n])) - 1
        if last > group and last % group:  # after a whole group, inside the next
            return stop
    raise AssertionError("no stop string ends inside a group")


async def test_prompt_plus_max_new_tokens_equal_to_the_context_window(engine) -> None:
    context = engine.info.context_window
    prompt = tuple(range(3, 3 + context - 9))
    chunks = await collect(engine, prompt_token_ids=prompt, max_new_tokens=9,
                           speculation=SpeculationParams(5))
    assert chunks[-1].finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert len(prompt) + len(ids_of(chunks)) <= context
    if chunks[-1].finish_reason == FinishReason.LENGTH:
        assert len(ids_of(chunks)) == 9


async def test_seeded_request_is_the_same_alone_and_beside_others(different_pair) -> None:
    engine = make_engine(different_pair)
    sampled = dict(prompt_token_ids=PROMPT_IDS, max_new_tokens=24,
                   sampling=SamplingParams(temperature=0.8, top_k=50, seed=1234),
                   speculation=SpeculationParams(3))
    try:
        alone = ids_of(await collect(engine, **sampled))
        beside = await beside_others(engine, sampled, others_tokens=24)
    finally:
        engine.close()
    assert beside == alone


async def beside_others(engine: Engine, request: dict, others_tokens: int) -> list[int]:
    """The ids ``request`` gets while three seeded samples run beside it."""
    others = [
        collect(engine, prompt_token_ids=(5, 6, 7), max_new_tokens=others_tokens,
                sampling=SamplingParams(temperature=1.0, seed=s))
        for s in range(3)
    ]
    results = await asyncio.gather(collect(engine, **request), *others)
    return ids_of(results[0])


async def test_a_seeded_adaptive_request_ignores_what_others_make_steps_cost(
    different_pair,
) -> None:
    """Measured step costs depend on what else runs; a seeded sample's γ (and so its random
    draws) must not: here steps beside others are made to look 100x dearer, and the seeded
    request still samples exactly what it sampled alone."""
    engine = make_engine(different_pair, fast_path="on", max_concurrent_requests=4)
    engine.step_costs.overhead = lambda batch: 1.0 if batch == 1 else 100.0  # type: ignore[method-assign]
    sampled = dict(prompt_token_ids=PROMPT_IDS, max_new_tokens=24,
                   sampling=SamplingParams(temperature=0.8, top_k=50, seed=99))
    try:
        handle = engine.submit(GenerationRequest(request_id="alone", **sampled))
        alone = [t async for chunk in handle for t in chunk.token_ids]
        assert any(step.gamma > 0 for step in handle.timeline.steps)  # it does speculate
        beside = await beside_others(engine, sampled, others_tokens=40)
    finally:
        engine.close()
    assert beside == alone


async def test_chat_messages_use_the_chat_template(engine, same_pair) -> None:
    chunks = await collect(engine, messages=(ChatMessage("user", "def add(a, b):"),),
                           max_new_tokens=5)
    expected_prompt = same_pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": "def add(a, b):"}], add_generation_prompt=True,
        tokenize=False)
    assert chunks[-1].usage.prompt_tokens == len(same_pair.tokenizer.encode(expected_prompt))


async def test_cancelling_frees_the_caches(engine, monkeypatch) -> None:
    from tests.steps import before_steps

    # 10 ms a step: the request is still running when it is looked at and cancelled
    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    handle = engine.submit(GenerationRequest(request_id="c", prompt_token_ids=PROMPT_IDS,
                                             max_new_tokens=100))
    await handle.__anext__()
    assert engine.stats().live_target_sequences == 1
    await handle.aclose()
    await wait_until_idle(engine)
    chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=4)
    assert chunks[-1].finish_reason is not None


async def test_deadline_stops_the_request(engine) -> None:
    handle = engine.submit(GenerationRequest(request_id="d", prompt_token_ids=PROMPT_IDS,
                                             max_new_tokens=100, deadline=time.monotonic()))
    with pytest.raises(DeadlineExceededError):
        async for _ in handle:
            pass
    await wait_until_idle(engine)


async def test_overload_is_refused_at_once(same_pair) -> None:
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=1)
    try:
        request = GenerationRequest(request_id="o", prompt_token_ids=PROMPT_IDS,
                                    max_new_tokens=100)
        first, second = engine.submit(request), engine.submit(request)
        with pytest.raises(OverloadedError):
            engine.submit(request)
        await first.aclose()
        await second.aclose()
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_a_cancelled_waiter_leaves_the_queue_at_once(same_pair, monkeypatch) -> None:
    """Not only at the head of the queue: a waiter cancelled behind another no longer counts
    against max_queue, nor in the queue depth."""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=2)
    try:
        request = GenerationRequest(request_id="q", prompt_token_ids=PROMPT_IDS,
                                    max_new_tokens=100)
        running, first, second = (engine.submit(request) for _ in range(3))
        await second.aclose()
        assert engine.stats().waiting == 1
        third = engine.submit(request)  # the queue holds first and third now
        assert engine.stats().waiting == 2
        with pytest.raises(OverloadedError):
            engine.submit(request)
        for handle in (running, first, third):
            await handle.aclose()
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_waiters_start_by_priority_then_arrival(same_pair, monkeypatch) -> None:
    """One slot, held; four waiters of priorities 3, 0, 3, -1 start lowest first, and in
    arrival order within one priority."""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=4)
    try:
        holder = engine.submit(GenerationRequest(request_id="h", prompt_token_ids=PROMPT_IDS,
                                                 max_new_tokens=30))
        waiters = {
            name: engine.submit(GenerationRequest(request_id=name, prompt_token_ids=PROMPT_IDS,
                                                  max_new_tokens=2, priority=priority))
            for name, priority in (("a", 3), ("b", 0), ("c", 3), ("d", -1))
        }
        assert engine.stats().waiting == 4
        await asyncio.gather(*(collect_handle(h) for h in (holder, *waiters.values())))
        started = sorted(waiters, key=lambda name: waiters[name].timeline.admitted_ns)
        assert started == ["d", "b", "a", "c"]
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_an_urgent_waiter_starts_where_the_head_does_not_fit(
    same_pair, monkeypatch
) -> None:
    """The head of the queue waits for KV budget; a more urgent request that fits goes
    ahead of it and starts at once, where one of the same priority queues behind it."""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))  # the holder runs a while
    engine = make_engine(same_pair, max_concurrent_requests=4, max_queue=4, kv_token_budget=64)
    try:
        def request(name: str, new: int, priority: int = 0) -> GenerationRequest:
            return GenerationRequest(request_id=name, prompt_token_ids=PROMPT_IDS,
                                     max_new_tokens=new, priority=priority,
                                     speculation=SpeculationParams(2))
        holder = engine.submit(request("h", 30))  # 7 + 30 + 3 = 40 of 64 positions
        big = engine.submit(request("big", 30))  # 40 more: waits
        same = engine.submit(request("same", 5))  # 15 would fit, but waits behind big
        assert engine.stats().waiting == 2
        urgent = engine.submit(request("urgent", 5, priority=-1))  # fits: starts now
        assert engine.stats().waiting == 2
        assert urgent.timeline.admitted_ns and not same.timeline.admitted_ns
        await asyncio.gather(*(collect_handle(h) for h in (holder, big, same, urgent)))
        await wait_until_idle(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("via", ["submit", "submit_async"])
async def test_a_full_queue_refuses_no_urgent_request_that_starts_at_once(
    same_pair, monkeypatch, via: str
) -> None:
    """The one queue place is taken by a waiter the KV budget holds back: a more urgent
    request that fits starts without a place; one of the same priority is refused."""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))  # the holder runs a while
    engine = make_engine(same_pair, max_concurrent_requests=4, max_queue=1, kv_token_budget=64)

    def request(name: str, new: int, priority: int = 0) -> GenerationRequest:
        return GenerationRequest(request_id=name, prompt_token_ids=PROMPT_IDS,
                                 max_new_tokens=new, priority=priority,
                                 speculation=SpeculationParams(2))

    async def submit(request: GenerationRequest):
        if via == "submit":
            return engine.submit(request)
        return await engine.submit_async(request)

    try:
        holder = await submit(request("h", 30))  # 40 of 64 positions
        big = await submit(request("big", 30))  # waits: the queue is full
        with pytest.raises(OverloadedError):
            await submit(request("same", 5))
        urgent = await submit(request("urgent", 5, priority=-1))
        assert urgent.timeline.admitted_ns and engine.stats().waiting == 1
        await asyncio.gather(*(collect_handle(h) for h in (holder, big, urgent)))
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_tokenize_counts_and_is_refused_as_a_call_that_generates(
    same_pair, monkeypatch
) -> None:
    """Tokenize shares the tokenizing threads: with the slot taken and the queue full it is
    refused before it is tokenized, and once a drain began it is refused too. Otherwise it
    gives the prompt's ids, whatever the context window (128 here), counted in
    ``stats().preparing`` while it is tokenized."""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=1)
    try:
        long = GenerationRequest(request_id="t", prompt_token_ids=tuple(range(5, 305)))
        assert await engine.tokenize_async(long) == tuple(range(5, 305))
        request = GenerationRequest(request_id="q", prompt_token_ids=PROMPT_IDS,
                                    max_new_tokens=100)
        running, waiting = engine.submit(request), engine.submit(request)
        with pytest.raises(OverloadedError):
            await engine.tokenize_async(long)
        for handle in (running, waiting):
            await handle.aclose()
        await wait_until_idle(engine)
        import decoding.engine as engine_module

        seen = []
        real = engine_module.prompt_ids_of

        def counted(*args):
            seen.append(engine.stats().preparing)
            return real(*args)

        monkeypatch.setattr(engine_module, "prompt_ids_of", counted)
        await engine.tokenize_async(long)
        assert seen == [1] and engine.stats().preparing == 0
        engine.stop_accepting()
        with pytest.raises(ShuttingDownError):
            await engine.tokenize_async(long)
    finally:
        engine.close()


async def test_a_tokenize_call_cancelled_while_it_waits_for_a_thread_is_not_tokenized(
    same_pair, monkeypatch
) -> None:
    """Both tokenizing threads busy for 0.5 s: a third call cancelled while it waits for one
    is never tokenized, and is no longer counted."""
    import decoding.engine as engine_module

    real, tokenized = engine_module.prompt_ids_of, []

    def slow(request, *args):
        time.sleep(0.5)
        tokenized.append(request.request_id)
        return real(request, *args)

    monkeypatch.setattr(engine_module, "prompt_ids_of", slow)
    engine = make_engine(same_pair)
    try:
        def call(name: str):
            return asyncio.create_task(engine.tokenize_async(
                GenerationRequest(request_id=name, prompt_token_ids=PROMPT_IDS)))

        busy = [call(f"busy{i}") for i in range(engine_module.TOKENIZING_THREADS)]
        await asyncio.sleep(0.1)
        waiting = call("cancelled")
        await asyncio.sleep(0.1)
        waiting.cancel()
        assert await asyncio.gather(*busy) == [PROMPT_IDS] * len(busy)
        await asyncio.sleep(0.7)  # time for the cancelled call's thread to get its turn
        assert sorted(tokenized) == [f"busy{i}" for i in range(len(busy))]
        assert waiting.cancelled() and engine.stats().preparing == 0
    finally:
        engine.close()


async def until(condition, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (polling the event loop), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class SlowPrepare:
    """Tokenizing made to take ``seconds``: ``calls`` are the ids of the requests tokenized
    (in the order they finished), ``most`` how many were tokenized at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        import decoding.engine as engine_module

        self._real = engine_module.prepare
        self._seconds = seconds
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0
        self.calls: list[str] = []
        monkeypatch.setattr(engine_module, "prepare", self)

    def __call__(self, request, *args):
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        time.sleep(self._seconds)
        with self._lock:
            self._now -= 1
            self.calls.append(request.request_id)
        return self._real(request, *args)


async def test_submit_async_tokenizes_off_the_event_loop(engine, monkeypatch) -> None:
    """A prompt that takes long to tokenize (megabytes of text) stalls nothing else on the
    caller's event loop."""
    SlowPrepare(monkeypatch, 0.5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        handle = await engine.submit_async(
            GenerationRequest(request_id="slow", prompt="def f():", max_new_tokens=3)
        )
    finally:
        ticker.cancel()
    assert ticks >= 10, ticks  # the loop ran on while the prompt was being tokenized
    assert len(ids_of([chunk async for chunk in handle])) == 3
    with pytest.raises(InvalidRequestError, match="prompt"):  # errors still surface
        await engine.submit_async(GenerationRequest(request_id="bad", prompt=""))


async def test_tokenizing_is_bounded_and_skipped_for_a_call_cancelled_before_its_turn(
    engine, monkeypatch
) -> None:
    from decoding.engine import TOKENIZING_THREADS

    slow = SlowPrepare(monkeypatch, 1.0)  # long enough for the first ones to overlap

    def submit_one(i: int) -> asyncio.Task:
        return asyncio.create_task(engine.submit_async(GenerationRequest(
            request_id=f"t{i}", prompt="def f():", max_new_tokens=2)))

    submit = [submit_one(i) for i in range(TOKENIZING_THREADS)]
    await until(lambda: slow.most == TOKENIZING_THREADS)  # these are tokenizing now
    submit.append(submit_one(TOKENIZING_THREADS))  # this one waits its turn
    await until(lambda: engine.stats().preparing == TOKENIZING_THREADS + 1)
    submit[-1].cancel()
    for task in submit[:-1]:
        assert len(ids_of([chunk async for chunk in await task])) == 2
    await asyncio.sleep(1.2)  # time enough for a third tokenizing to end
    assert sorted(slow.calls) == [f"t{i}" for i in range(TOKENIZING_THREADS)]
    assert slow.most == TOKENIZING_THREADS
    assert engine.stats().preparing == 0


async def test_a_burst_is_refused_before_tokenizing_beyond_the_places_left(
    same_pair, monkeypatch
) -> None:
    """Calls still being tokenized count against the queue: of a burst of 12 with one
    request running, one slot free and a queue of 2, at most 3 are tokenized; the rest are
    refused at once."""
    engine = make_engine(same_pair, max_concurrent_requests=2, max_queue=2)
    try:
        busy = engine.submit(GenerationRequest(request_id="busy", prompt_token_ids=PROMPT_IDS,
                                               max_new_tokens=100))
        slow = SlowPrepare(monkeypatch, 0.2)
        burst = [asyncio.create_task(engine.submit_async(GenerationRequest(
            request_id=f"b{i}", prompt_token_ids=PROMPT_IDS, max_new_tokens=2)))
            for i in range(12)]
        results = await asyncio.gather(*burst, return_exceptions=True)
        refused = [r for r in results if isinstance(r, OverloadedError)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert len(refused) == 9 and len(served) == 3, results
        assert len(slow.calls) == 3
        for handle in served:
            assert len(ids_of([chunk async for chunk in handle])) == 2
        await busy.aclose()
        await wait_until_idle(engine)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "limits",
    [
        dict(max_concurrent_requests=1, max_queue=1),
        # Slots are free, but the KV budget holds the queue's head back: a new call could not
        # take a free slot either.
        dict(max_concurrent_requests=4, max_queue=1,
             kv_token_budget=len(PROMPT_IDS) + 100 + 8 + 1),
    ],
    ids=["no-slot", "budget-spent"],
)
async def test_a_full_queue_refuses_a_call_before_tokenizing_it(
    same_pair, monkeypatch, limits
) -> None:
    engine = make_engine(same_pair, **limits)
    try:
        request = GenerationRequest(request_id="q", prompt_token_ids=PROMPT_IDS,
                                    max_new_tokens=100)
        first, second = engine.submit(request), engine.submit(request)
        assert (engine.stats().running, engine.stats().waiting) == (1, 1)
        slow = SlowPrepare(monkeypatch, 0.0)
        with pytest.raises(OverloadedError):
            await engine.submit_async(request)
        assert slow.calls == [] and engine.stats().preparing == 0
        for handle in (first, second):
            await handle.aclose()
        await wait_until_idle(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("gamma", [None, 2])
async def test_a_default_max_new_tokens_is_what_the_kv_budget_leaves(same_pair, gamma) -> None:
    """As at the context window: a request that leaves max_new_tokens unset gets the default
    or what the budget leaves, whichever is less (it was refused, naming max_new_tokens); one
    whose prompt leaves nothing is refused naming its input; one that asks for more than fits
    is refused naming max_new_tokens."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, kv_token_budget=60, default_max_new_tokens=64,
                         max_speculative_tokens=8)
    reserve = (8 if gamma is None else gamma) + 1  # γ + 1, at the request's most γ
    speculation = SpeculationParams(gamma)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, speculation=speculation)
        assert len(ids_of(chunks)) == 60 - len(PROMPT_IDS) - reserve
        assert chunks[-1].finish_reason == FinishReason.LENGTH
        # Where the default fits, it is the default.
        small = make_engine(pair, kv_token_budget=60, default_max_new_tokens=5)
        try:
            assert len(ids_of(await collect(small, prompt_token_ids=PROMPT_IDS))) == 5
        finally:
            small.close()
        with pytest.raises(InvalidRequestError, match=r"^prompt_token_ids: prompt has"):
            await collect(engine, prompt_token_ids=(5,) * (60 - reserve),
                          speculation=speculation)
        with pytest.raises(InvalidRequestError, match=r"^max_new_tokens: "):
            await collect(engine, prompt_token_ids=PROMPT_IDS, speculation=speculation,
                          max_new_tokens=60 - len(PROMPT_IDS) - reserve + 1)
        # min_new_tokens at most what the budget leaves: then the output is that long.
        with pytest.raises(InvalidRequestError, match=r"^min_new_tokens: must be at most "):
            await collect(engine, prompt_token_ids=PROMPT_IDS, speculation=speculation,
                          min_new_tokens=60 - len(PROMPT_IDS) - reserve + 1)
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, speculation=speculation,
                               min_new_tokens=60 - len(PROMPT_IDS) - reserve)
        assert len(ids_of(chunks)) == 60 - len(PROMPT_IDS) - reserve
        await wait_until_idle(engine)
        assert engine.stats().reserved_tokens == 0
    finally:
        engine.close()


@pytest.mark.parametrize("event", ["worker died", "drain ended"])
async def test_a_call_admitted_as_the_worker_dies_or_the_drain_ends_is_refused(
    same_pair, monkeypatch, event
) -> None:
    """Between admission's first check and its queueing the worker may die (which ends every
    request it knows of) or the drain end: the call must be refused then, not queued where
    nothing would ever end it."""
    import decoding.engine as engine_module
    from decoding.errors import EngineFailedError

    engine = make_engine(same_pair)
    real = engine_module.IncrementalDetokenizer

    def in_between(*args, **kwargs):  # built after the first check, before the queueing
        if event == "worker died":
            engine._die(RuntimeError("stand-in worker death"))
        else:
            engine.abort_all(ShuttingDownError("drained"))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", in_between)
    expected = EngineFailedError if event == "worker died" else ShuttingDownError
    try:
        with pytest.raises(expected):
            engine.submit(GenerationRequest(request_id="late", prompt_token_ids=PROMPT_IDS,
                                            max_new_tokens=4))
        stats = engine.stats()
        assert (stats.running, stats.waiting, stats.reserved_tokens) == (0, 0, 0)
    finally:
        engine.close()


@pytest.mark.parametrize("fast_path", ["off", "on"])
async def test_a_failure_choosing_one_requests_gamma_fails_it_alone(
    same_pair, monkeypatch, fast_path
) -> None:
    """A batched step asks each request for its γ before the batch is built: a failure there
    (injected) ends that request alone; it killed the device worker, and every request."""
    from decoding.adaptive import AdaptiveGamma
    from tests.steps import before_steps

    real = AdaptiveGamma.next_gamma
    bad: set[int] = set()

    def next_gamma(self, *args, **kwargs):
        if id(self) in bad:
            raise RuntimeError("stand-in failure choosing this request's γ")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdaptiveGamma, "next_gamma", next_gamma)
    before_steps(monkeypatch, lambda states: time.sleep(0.005))
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, max_concurrent_requests=2)
    try:
        good = engine.submit(GenerationRequest(request_id="good", prompt_token_ids=PROMPT_IDS,
                                               max_new_tokens=20,
                                               speculation=SpeculationParams(1)))
        first = await anext(aiter(good))
        with engine._cond:  # marked before the worker can ask it
            victim = engine.submit(GenerationRequest(request_id="victim",
                                                     prompt_token_ids=PROMPT_IDS,
                                                     max_new_tokens=20))  # adaptive γ
            bad.add(id([*engine._running, *engine._waiting][-1].adaptive))
        with pytest.raises(RuntimeError, match="stand-in failure"):
            await collect_handle(victim)
        rest = await collect_handle(good)
        assert engine.failed is None
        assert ids_of([first]) + rest == reference_greedy(pair, PROMPT_IDS, 20)
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_a_batched_step_whose_plan_fails_steps_its_requests_alone(
    same_pair, monkeypatch
) -> None:
    """The batch's own plan (the cap on its γs, the catch-up estimate) failing (injected) is
    no request's fault: this step its requests take alone at their own γs, and go on."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=2)
    real = engine.stepper.step_costs.cap_for_batch
    failures: list[int] = []

    def cap_for_batch(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("stand-in failure planning the batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.stepper.step_costs, "cap_for_batch", cap_for_batch)
    prompts = [PROMPT_IDS, (7, 8, 9)]
    try:
        outputs = await asyncio.gather(*(collect(
            engine, request_id=f"r{i}", prompt_token_ids=prompt, max_new_tokens=12,
            speculation=SpeculationParams(2)) for i, prompt in enumerate(prompts)))
        assert failures == [1] and engine.failed is None
    finally:
        engine.close()
    for prompt, chunks in zip(prompts, outputs, strict=True):
        assert ids_of(chunks) == reference_greedy(pair, prompt, 12)


async def test_a_waiter_past_its_deadline_leaves_the_queue(same_pair, monkeypatch) -> None:
    """Ended at its deadline, not when a place frees: it held its place in the queue (new
    calls were refused as overload) and a drain waited for it. (Through gRPC the call is
    cancelled at its deadline anyway; the engine's own callers have only the deadline.)"""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.02))
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=1)
    try:
        busy = engine.submit(GenerationRequest(request_id="busy", prompt_token_ids=PROMPT_IDS,
                                               max_new_tokens=100,
                                               speculation=SpeculationParams(0)))
        late = engine.submit(GenerationRequest(request_id="late", prompt_token_ids=PROMPT_IDS,
                                               max_new_tokens=4,
                                               deadline=time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(collect_handle(late), 2.0)  # busy runs for 2 s or more
        assert engine.stats().waiting == 0
        other = engine.submit(GenerationRequest(request_id="other", prompt_token_ids=PROMPT_IDS,
                                                max_new_tokens=4))  # the queue has room
        await other.aclose()
        await busy.aclose()
        await wait_until_idle(engine)
    finally:
        engine.close()


async def test_a_request_cancelled_during_a_batched_prefill_takes_no_further_step(
    same_pair, monkeypatch
) -> None:
    """The README promises generation stops before the request's next step: a call that
    goes while another request's prefill runs in the same round is not stepped after it."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", prefill_chunk=4, max_concurrent_requests=2)
    stepper = engine.stepper
    real_prefill, real_step = stepper.prefill_batch, stepper.step_batch
    in_prefill, cancelled = threading.Event(), threading.Event()
    stepped_after: list[str] = []

    def prefill_batch(group):
        if any(r.request.request_id == "long" for r in group) and not in_prefill.is_set():
            in_prefill.set()
            assert cancelled.wait(5)  # "short" is cancelled while "long" prefills
        return real_prefill(group)

    def step_batch(ready):
        if cancelled.is_set():
            stepped_after.extend(r.request.request_id for r in ready)
        return real_step(ready)

    monkeypatch.setattr(stepper, "prefill_batch", prefill_batch)
    monkeypatch.setattr(stepper, "step_batch", step_batch)
    try:
        short = engine.submit(GenerationRequest(request_id="short", prompt_token_ids=PROMPT_IDS,
                                                max_new_tokens=100,
                                                speculation=SpeculationParams(0)))
        await anext(aiter(short))
        long = engine.submit(GenerationRequest(request_id="long",
                                               prompt_token_ids=tuple(range(20, 61)),
                                               max_new_tokens=4))
        assert await asyncio.to_thread(in_prefill.wait, 5)
        await short.aclose()
        cancelled.set()
        assert len(await collect_handle(long)) == 4
        await wait_until_idle(engine)
    finally:
        cancelled.set()
        engine.close()
    assert "short" not in stepped_after and "long" in stepped_after


@pytest.mark.parametrize("gamma", [None, 3])
async def test_a_request_for_one_token_never_feeds_its_draft(same_pair, gamma) -> None:
    """Its one token is the first step's own, at γ 0: a draft fed the prompt is never used
    (with a draft this cheap, adaptive γ fed it). Two tokens may draft one, and then do."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on")
    try:
        for n in (1, 2):
            handle = engine.submit(GenerationRequest(
                request_id=f"n{n}", prompt_token_ids=(10, 57, 203), max_new_tokens=n,
                speculation=SpeculationParams(gamma)))
            assert ids_of([c async for c in handle]) == reference_greedy(pair, (10, 57, 203), n)
            fed = handle.timeline.draft_prefill_ns != (0, 0)
            assert fed is (n == 2 and handle.usage.draft_tokens > 0)
    finally:
        engine.close()


async def test_no_request_is_counted_gone_before_its_last_chunk_is_out(
    same_pair, monkeypatch
) -> None:
    """What a drain relies on: once ``stats()`` shows nothing running, every finished
    request's last chunk is already on its way (a worker slow to put it is waited for)."""
    from decoding.handle import RequestHandle

    real_put = RequestHandle._put
    out: list[bool] = []

    def slow_put(self, item) -> None:
        if getattr(item, "finish_reason", None) is not None:
            time.sleep(0.3)  # the worker stalls just before the last chunk goes out
            real_put(self, item)
            out.append(True)
        else:
            real_put(self, item)

    monkeypatch.setattr(RequestHandle, "_put", slow_put)
    engine = make_engine(same_pair)
    try:
        handle = engine.submit(GenerationRequest(request_id="last", prompt_token_ids=PROMPT_IDS,
                                                 max_new_tokens=3))
        await until(lambda: engine.stats().running == 0)
        assert out == [True]
        assert ids_of([chunk async for chunk in handle]) != []
    finally:
        engine.close()


async def test_a_finished_request_is_no_longer_counted_when_its_caller_sees_the_end(
    same_pair,
) -> None:
    """With one place and no queue, calls made one after another, each once the last one's
    stream has ended, are never refused: the place is given back before the last chunk."""
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=0)
    try:
        for i in range(60):
            handle = engine.submit(GenerationRequest(request_id=f"s{i}",
                                                     prompt_token_ids=PROMPT_IDS,
                                                     max_new_tokens=1 + i % 3))
            async for chunk in handle:
                if chunk.finish_reason is not None:
                    stats = engine.stats()
                    assert stats.running == stats.reserved_tokens == 0, stats
    finally:
        engine.close()


async def test_a_call_being_tokenized_when_the_drain_begins_is_served(
    engine, monkeypatch
) -> None:
    """It was accepted before the drain: it runs (the worker waits for it), while a call
    still being tokenized when the drain ends is refused."""
    from decoding.errors import ShuttingDownError

    SlowPrepare(monkeypatch, 0.3)
    early = asyncio.create_task(engine.submit_async(GenerationRequest(
        request_id="early", prompt="def f():", max_new_tokens=3)))
    await until(lambda: engine.stats().preparing == 1)
    engine.stop_accepting()
    with pytest.raises(ShuttingDownError):
        await engine.submit_async(GenerationRequest(request_id="late", prompt="x"))
    assert engine.stats().preparing == 1
    assert len(ids_of([chunk async for chunk in await early])) == 3
    assert engine.stats().preparing == 0

    drained = make_engine(engine.pair)
    try:
        cut = asyncio.create_task(drained.submit_async(GenerationRequest(
            request_id="cut", prompt="def f():", max_new_tokens=3)))
        await until(lambda: drained.stats().preparing == 1)
        drained.stop_accepting()
        drained.abort_all(ShuttingDownError("the grace period is over"))
        with pytest.raises(ShuttingDownError):
            await cut
        await wait_until_idle(drained)
    finally:
        drained.close()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "input"),
        ({"prompt": "x", "prompt_token_ids": (1,)}, "input"),
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": ()}, "prompt_token_ids"),
        ({"prompt_token_ids": (1, 99999)}, "prompt_token_ids[1]"),
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 100000}, "max_new_tokens"),
        ({"prompt_token_ids": (1,) * 120, "max_new_tokens": 20}, "max_new_tokens"),
        ({"prompt_token_ids": (1,) * 200}, "prompt_token_ids"),
        ({"prompt": "x", "stop": ("",)}, "stop[0]"),
        ({"prompt": "x", "stop": ("a",) * 9}, "stop"),
        ({"prompt": "x", "stop": ("a", "<|im_start|>")}, "stop[1]"),  # never in the text
        ({"prompt": "x", "speculation": SpeculationParams(99)},
         "speculation.num_speculative_tokens"),
        ({"messages": (ChatMessage("wizard", "hi"),)}, "messages[0].role"),
        ({"messages": ()}, "messages"),
        ({"prompt": "x", "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"prompt": "x", "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
        ({"prompt": "x", "stop_token_ids": (3, 99999)}, "stop_token_ids[1]"),
        ({"prompt": "x", "stop_token_ids": (3,) * 65}, "stop_token_ids"),
    ],
)
async def test_invalid_requests_name_the_field_and_the_engine_goes_on(engine, fields, field):
    with pytest.raises(InvalidRequestError) as err:
        engine.submit(GenerationRequest(request_id="bad", **fields))
    assert err.value.field == field
    assert engine.stats().running == 0
    chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=3)
    assert chunks[-1].finish_reason is not None


async def test_a_failing_request_fails_alone(engine, monkeypatch) -> None:
    from tests.steps import before_steps

    def faulty(states):
        if any(state.tokens[0] == 66 for state in states):
            raise RuntimeError("injected fault /secret/path")

    before_steps(monkeypatch, faulty)
    bad = collect(engine, prompt_token_ids=(66, 1, 2), max_new_tokens=10)
    good = collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=10)
    results = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert results[1][-1].finish_reason is not None
    await wait_until_idle(engine)


async def test_a_request_failing_in_a_group_of_plain_steps_fails_alone(
    same_pair, monkeypatch
) -> None:
    from tests.steps import before_steps

    def faulty(states):
        if any(state.tokens[0] == 66 and len(state.tokens) > 6 for state in states):
            raise RuntimeError("injected fault")

    before_steps(monkeypatch, faulty)
    engine = make_engine(same_pair, decode_steps=4)
    plain = SpeculationParams(0)
    try:
        bad = collect(engine, prompt_token_ids=(66, 1, 2), max_new_tokens=20, speculation=plain)
        good = collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20, speculation=plain)
        results = await asyncio.gather(bad, good, return_exceptions=True)
        assert isinstance(results[0], RuntimeError)
        assert results[1][-1].finish_reason is not None
        assert max(len(chunk.token_ids) for chunk in results[1]) == 4  # it ran grouped
        await wait_until_idle(engine)
    finally:
        engine.close()


def test_start_up_logs_the_costs_adaptive_gamma_uses(same_pair, caplog) -> None:
    caplog.set_level("INFO", logger="decoding.engine")
    engine = make_engine(same_pair)
    engine.close()
    [message] = [r.getMessage() for r in caplog.records if "forward costs" in r.getMessage()]
    assert "draft 1: 100.0" in message and "target 1: 1000.0, 2: 1050.0" in message


async def test_the_draft_skips_a_prompt_that_speculation_would_not_pay_back(same_pair) -> None:
    """On the fast path (batched steps), with costs where four requests together save too
    little per token to pay for feeding the draft a 41-token prompt within 16 tokens
    (tests/decoding/test_adaptive.py's LOADED), four adaptive requests admitted together never
    prefill the draft nor draft; the same request alone does both. Every output is the
    target's own."""
    from tests.decoding.test_adaptive import LOADED

    prompt = tuple(range(20, 61))
    expected = reference_greedy(same_pair, prompt, 16)
    engine = Engine(same_pair, EngineConfig(fast_path="on", max_concurrent_requests=4),
                    costs=LOADED)
    request = GenerationRequest(request_id="r", prompt_token_ids=prompt, max_new_tokens=16)
    try:
        with engine._cond:  # admitted together, before the worker's first round
            handles = [engine.submit(request) for _ in range(4)]
        together = await asyncio.gather(*(collect_handle(h) for h in handles))
        alone = engine.submit(request)
        alone_ids = await collect_handle(alone)
    finally:
        engine.close()
    assert together == [expected] * 4 and alone_ids == expected
    for handle in handles:
        assert handle.timeline.draft_prefill_ns == (0, 0)
        assert handle.usage.draft_tokens == 0
    assert alone.timeline.draft_prefill_ns != (0, 0)
    assert alone.usage.draft_tokens > 0


async def test_a_drafting_request_stops_when_plain_ones_join_its_batch(same_pair) -> None:
    """A request that drafts alone (tests/decoding/test_adaptive.py's LOADED costs) would make
    three newcomers verify as wide as it drafts, while they, with 8 tokens to make, would not
    win back feeding their 41-token prompts to the draft; while they run beside it its steps
    are plain (but for a probe now and then), and it drafts again once they have gone. Every
    output is the target's own."""
    from tests.decoding.test_adaptive import LOADED

    pair = dataclasses.replace(same_pair, eos_token_ids=())
    prompt = tuple(range(20, 61))
    engine = Engine(pair, EngineConfig(fast_path="on", max_concurrent_requests=4), costs=LOADED)
    try:
        first = engine.submit(GenerationRequest(
            request_id="first", prompt_token_ids=PROMPT_IDS, max_new_tokens=120))
        first_ids = list((await anext(aiter(first))).token_ids)  # decoding, drafting
        with engine._cond:  # admitted together, before the worker's next round
            others = [engine.submit(GenerationRequest(
                request_id=f"other{i}", prompt_token_ids=prompt, max_new_tokens=8))
                for i in range(3)]
        first_rest, *other_ids = await asyncio.gather(
            collect_handle(first), *(collect_handle(h) for h in others))
    finally:
        engine.close()
    assert first_ids + first_rest == reference_greedy(pair, PROMPT_IDS, 120)
    assert other_ids == [reference_greedy(pair, prompt, 8)] * 3
    began = min(h.timeline.steps[0].start_ns for h in others)
    ended = max(h.timeline.steps[-1].start_ns for h in others)
    beside = [s.gamma for s in first.timeline.steps if began <= s.start_ns <= ended]
    after = [s.gamma for s in first.timeline.steps if s.start_ns > ended]
    assert first.timeline.steps[0].gamma > 0
    # Plain, but for a one-token probe when the shared schedule calls for one (the batch caps
    # its own γ, so it learns nothing else there).
    assert beside and set(beside) <= {0, 1} and beside.count(1) <= 1 + len(beside) // 8, beside
    assert after and max(after) > 0, after
    assert all(h.usage.draft_tokens == 0 for h in others)


async def test_a_request_stepping_while_others_prefill_is_costed_with_them(same_pair) -> None:
    """Four requests admitted together; the one with the short prompt is prefilled first and
    steps alone while the other three are still prefilling (prefill_chunk 64 < their 100
    tokens). Its γ is chosen for the batch of four it is about to step in, where feeding the
    draft its 41-token prompt does not pay within 16 tokens (tests/decoding/test_adaptive.py's
    LOADED), not for the lone step it takes first, where it would."""
    from tests.decoding.test_adaptive import LOADED

    pair = dataclasses.replace(same_pair, eos_token_ids=())
    short, long_ = tuple(range(20, 61)), tuple(range(20, 120))
    engine = Engine(pair, EngineConfig(fast_path="on", max_concurrent_requests=4,
                                       prefill_chunk=64), costs=LOADED)
    try:
        with engine._cond:  # admitted together, before the worker's first round
            handles = [engine.submit(GenerationRequest(
                request_id=str(i), prompt_token_ids=prompt, max_new_tokens=16))
                for i, prompt in enumerate([short, long_, long_, long_])]
        outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
    finally:
        engine.close()
    assert outputs[0] == reference_greedy(pair, short, 16)
    assert outputs[1:] == [reference_greedy(pair, long_, 16)] * 3
    first_step = handles[0].timeline.steps[0].start_ns
    assert all(first_step < h.timeline.target_prefill_ns[1] for h in handles[1:])  # it did
    assert [h.usage.draft_tokens for h in handles] == [0, 0, 0, 0]


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_plain_steps_taken_together_change_nothing_but_the_grouping(
    different_pair, fast_path: str
) -> None:
    """With decode_steps = 4, γ = 0 requests (greedy alone and beside others, seeded samples,
    an EOS inside a group) get the tokens they get one step at a time; the first token comes
    alone, the rest in groups of up to 4, never past max_new_tokens; every token is one
    target forward."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    free_run = reference_greedy(pair, PROMPT_IDS, 30)
    plain = SpeculationParams(0)
    greedy = dict(prompt_token_ids=PROMPT_IDS, max_new_tokens=30, speculation=plain)
    sampled = dict(prompt_token_ids=PROMPT_IDS, max_new_tokens=23, speculation=plain,
                   sampling=SamplingParams(temperature=0.8, top_k=50, seed=7))
    results = {}
    for steps in (1, 4):
        engine = make_engine(pair, decode_steps=steps, fast_path=fast_path)
        try:
            chunks = await collect(engine, **greedy)
            together = await asyncio.gather(*(collect(engine, **greedy) for _ in range(3)))
            results[steps] = (ids_of(await collect(engine, **sampled)),
                              [ids_of(c) for c in together])
        finally:
            engine.close()
        assert ids_of(chunks) == free_run
        assert [len(c.token_ids) for c in chunks] == [1] + [steps] * (29 // steps) + (
            [29 % steps] if 29 % steps else []
        )
        assert chunks[-1].usage.target_forward_passes == 30
    assert results[4] == results[1]
    assert results[4][1] == [free_run] * 3
    eos_pair = dataclasses.replace(pair, eos_token_ids=(free_run[6],))
    engine = make_engine(eos_pair, decode_steps=4, fast_path=fast_path)
    try:
        chunks = await collect(engine, **greedy)
    finally:
        engine.close()
    assert ids_of(chunks) == free_run[: free_run.index(free_run[6]) + 1]
    assert chunks[-1].finish_reason == FinishReason.EOS
    # The forwards of the group after the EOS are not counted.
    assert chunks[-1].usage.target_forward_passes == len(ids_of(chunks))


async def test_a_seeded_adaptive_sample_drafts_where_it_would_one_step_at_a_time(
    different_pair,
) -> None:
    """A seeded sample with adaptive γ falls to γ = 0 on the different pair and probes now and
    then; its draws depend on where it drafts. Plain steps taken 4 at once, alone or beside a
    request drafting 3, end each group where a probe is due: the same tokens and forwards as
    one step at a time."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    seeded = SamplingParams(temperature=0.8, top_k=50, seed=7)

    async def run(decode_steps: int, beside: bool) -> tuple[list[int], int, list[int]]:
        engine = make_engine(pair, decode_steps=decode_steps, fast_path="on",
                             max_new_tokens_limit=256)
        try:
            with engine._cond:  # admitted together
                handle = engine.submit(GenerationRequest(
                    request_id="seeded", prompt_token_ids=PROMPT_IDS, max_new_tokens=60,
                    sampling=seeded))
                others = [engine.submit(GenerationRequest(
                    request_id="drafting", prompt_token_ids=PROMPT_IDS, max_new_tokens=40,
                    speculation=SpeculationParams(3)))] if beside else []
            tokens = await collect_handle(handle)
            for other in others:
                await collect_handle(other)
        finally:
            engine.close()
        return tokens, handle.usage.target_forward_passes, [s.gamma for s in handle.timeline.steps]

    tokens, forwards, gammas = await run(1, beside=False)
    # it went plain, and drafted again in a probe after 7 plain steps or more
    first_plain = gammas.index(0)
    assert gammas[first_plain : first_plain + 7] == [0] * 7 and max(gammas[first_plain:]) > 0
    for decode_steps, beside in ((4, False), (4, True), (1, True)):
        grouped = await run(decode_steps, beside)
        assert grouped[:2] == (tokens, forwards), (decode_steps, beside)


def test_decode_steps_below_one_are_refused(same_pair) -> None:
    with pytest.raises(ValueError, match="decode_steps"):
        make_engine(same_pair, decode_steps=0)


@pytest.mark.parametrize("fast_path", ["on", "off"])
def test_an_unknown_attention_is_refused_on_either_path(same_pair, fast_path: str) -> None:
    with pytest.raises(ValueError, match="attention must be one of matmul, sdpa, flex or None"):
        make_engine(same_pair, fast_path=fast_path, attention="flash")


def collapsed_engine(pair, costs: CostModel, **config) -> Engine:
    """A batching engine whose server acceptance estimate has fallen to 0, at ``costs``,
    without the correction from measured step times (tiny CPU models' steps cost nothing
    like ``costs``)."""
    from decoding.adaptive import AcceptanceEstimate, StepCosts

    engine = Engine(dataclasses.replace(pair, eos_token_ids=()),
                    EngineConfig(fast_path="on", max_concurrent_requests=2, **config),
                    costs=costs)
    engine.stepper.acceptance = AcceptanceEstimate(prior_alpha=0.0)
    engine.stepper.step_costs = StepCosts(costs, min_samples=10**9)
    return engine


async def together(engine: Engine, tokens: int) -> tuple[list, list[list[int]]]:
    """Two requests for PROMPT_IDS admitted in the same round; their handles and outputs."""
    request = GenerationRequest(request_id="r", prompt_token_ids=PROMPT_IDS,
                                max_new_tokens=tokens)
    try:
        with engine._cond:  # admitted together, before the worker's next round
            handles = [engine.submit(request) for _ in range(2)]
        outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
    finally:
        engine.close()
    return handles, list(outputs)


async def test_requests_together_recover_from_a_server_estimate_of_no_acceptance(
    same_pair,
) -> None:
    """A server whose acceptance estimate has fallen to 0 starts each request at γ 0; only
    probes can show that the draft agrees now (here it is the target itself). With two
    requests stepped together, each probe was capped at the estimate that had made its γ 0,
    so none ever drafted (a simulation against run 5's costs: 1.000x speculation off where a
    fixed γ gave 1.27-1.71x). Probes now go through; what they accept lifts the estimates
    until the requests draft on their own. Every output is the target's own."""
    # A GPU-like card: drafting and verifying a few more positions cost little. (Here the
    # draft is the target: its steps really cost what the target's do.)
    costs = CostModel(draft_s={1: 0.0002, 2: 0.0002}, target_s={1: 0.002, 4: 0.00204, 18: 0.0022})
    engine = collapsed_engine(same_pair, costs)
    pair = engine.pair
    handles, outputs = await together(engine, 120)
    assert outputs == [reference_greedy(pair, PROMPT_IDS, 120)] * 2
    for handle in handles:
        gammas = [step.gamma for step in handle.timeline.steps]
        assert gammas[0] == 0, gammas  # the estimate starts at the server's 0
        assert max(gammas) > 1, gammas  # beyond one-token probes: drafting on its own
        assert handle.usage.accepted_draft_tokens == handle.usage.draft_tokens > 8


async def test_no_probe_is_spent_on_a_request_with_one_token_left(same_pair) -> None:
    """Two requests of 8 tokens, one token per step: the shared probe schedule falls due at
    the batch's eighth step, where each has one token left and no room to draft. Neither is
    asked for γ, so the probe stays due for the next steps; it used to be taken by the first
    request, cut to γ 0 by its length, and lost."""
    costs = CostModel(draft_s={1: 1e-6, 2: 1e-6}, target_s={1: 1.0, 4: 1.02, 18: 1.1})
    engine = collapsed_engine(same_pair, costs, decode_steps=1)
    pair = engine.pair
    handles, outputs = await together(engine, 8)
    assert outputs == [reference_greedy(pair, PROMPT_IDS, 8)] * 2
    assert [len(h.timeline.steps) for h in handles] == [8, 8]  # one token a step, no drafts
    assert engine.stepper.probes is not None and engine.stepper.probes.probe_due


async def test_a_failed_batched_group_counts_only_the_steps_taken(different_pair,
                                                                  monkeypatch) -> None:
    """The shared probe schedule counts the batch's steps. When a batched group of plain
    steps fails and its requests are stepped one by one, only what they then take counts:
    counting the whole failed group as well brought the next probe that much early. Here the
    draft disagrees, so every step emits one token per request whether it probes or not, and
    the steps counted equal the tokens each request emitted."""
    import decoding.stepper as stepper_module

    costs = CostModel(draft_s={1: 1e-6, 2: 1e-6}, target_s={1: 1.0, 4: 1.02, 18: 1.1})
    engine = collapsed_engine(different_pair, costs, decode_steps=8)
    pair = engine.pair
    probes = engine.stepper.probes
    assert probes is not None
    counted = []
    step, took = probes.step, probes.took
    monkeypatch.setattr(probes, "step", lambda: (counted.append(1), step())[1])
    monkeypatch.setattr(probes, "took", lambda n: (counted.append(n - 1), took(n))[1])
    real = stepper_module.plain_steps_batch
    calls = []

    def failing_once(states, steps, target):
        calls.append(steps)
        if len(calls) == 1:  # the group up to the first due probe
            raise RuntimeError("a batched group failed")
        return real(states, steps, target)

    monkeypatch.setattr(stepper_module, "plain_steps_batch", failing_once)
    handles, outputs = await together(engine, 40)
    assert outputs == [reference_greedy(pair, PROMPT_IDS, 40)] * 2
    assert len(calls) > 2 and calls[0] > 1  # the failed call was a group
    assert all(h.usage.accepted_draft_tokens == 0 for h in handles)
    assert sum(counted) == 40


async def test_a_request_riding_along_never_drafts_past_its_last_token(same_pair) -> None:
    """Beside a request that drafts, an adaptive request whose draft is level drafts the
    batch's γ (its row is verified that wide anyway); at its last token it has no room to
    draft, and it does not, whatever the batch's γ. Every output is the target's own."""
    from decoding.adaptive import StepCosts

    costs = CostModel(draft_s={1: 0.0002, 2: 0.0002}, target_s={1: 0.002, 4: 0.00204, 18: 0.0022})
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = Engine(pair, EngineConfig(fast_path="on", max_concurrent_requests=2), costs=costs)
    engine.stepper.step_costs = StepCosts(costs, min_samples=10**9)
    long = GenerationRequest(request_id="long", prompt_token_ids=PROMPT_IDS, max_new_tokens=60)
    short = GenerationRequest(request_id="short", prompt_token_ids=PROMPT_IDS, max_new_tokens=9)
    try:
        with engine._cond:  # admitted together, before the worker's next round
            handles = [engine.submit(long), engine.submit(short)]
        outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
    finally:
        engine.close()
    assert outputs == [reference_greedy(pair, PROMPT_IDS, n) for n in (60, 9)]
    steps = handles[1].timeline.steps
    assert max(step.gamma for step in steps) > 0  # it drafted with the batch
    emitted = 0
    for step in steps:
        assert step.gamma <= 9 - emitted - 1, [(s.gamma, s.emitted) for s in steps]
        emitted += step.emitted


# ---- gaps a mutation review found (each test fails on the mutant it names) -------------------


async def test_a_step_never_drafts_past_max_new_tokens(same_pair, monkeypatch) -> None:
    """A step emits up to γ+1 tokens, so its γ is at most the tokens left less one (gpt-fast's
    clamp); else the target verifies a position past max_new_tokens, past the context window
    where prompt + max_new_tokens fills it. (Mutant: a clamp to the tokens left.)"""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    seen: list[tuple[int, int]] = []  # (γ, tokens still to emit)
    real = stepper_module.speculative_step

    def spy(state, gamma):
        seen.append((gamma, 9 - (len(state.tokens) - len(PROMPT_IDS))))
        return real(state, gamma)

    monkeypatch.setattr(stepper_module, "speculative_step", spy)
    engine = make_engine(pair)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=9,
                               speculation=SpeculationParams(5))
    finally:
        engine.close()
    assert len(ids_of(chunks)) == 9 and len(seen) >= 2
    assert all(gamma <= remaining - 1 for gamma, remaining in seen), seen
    assert chunks[-1].usage.draft_tokens == 5 + 2  # 6 tokens, then γ = 2 for the last 3


def _last_draft_token_wrong(vocab: int):
    """The draft model's proposals with the last token of each changed: with the target's own
    weights, every step accepts all but the last."""
    def proposer(state, gamma):
        tokens, probs = propose(state, gamma)
        if gamma:
            tokens = tokens.clone()
            tokens[-1] = (tokens[-1] + 1) % vocab
        return tokens, probs
    return proposer


async def test_usage_where_the_output_ends_at_the_last_accepted_draft_token(same_pair) -> None:
    """Every step drafts 4 and the 4th is rejected. Where EOS is the 3rd token the output
    ends at the last accepted draft token: the rejected one after it counts neither as drafted
    nor as accepted (mutant: `>=` for `>`). Per position, a rejected position counts as drafted
    and not accepted (mutant: `<=` for `<`)."""
    free_run = reference_greedy(same_pair, PROMPT_IDS, 12)
    assert free_run.index(free_run[2]) == 2
    pair = dataclasses.replace(same_pair, eos_token_ids=(free_run[2],))
    engine = make_engine(pair)
    engine.proposer = _last_draft_token_wrong(pair.target.vocab_size)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=12,
                               speculation=SpeculationParams(4))
        long = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=9,
                             speculation=SpeculationParams(4), ignore_eos=True)
    finally:
        engine.close()
    assert ids_of(chunks) == free_run[:3] and chunks[-1].finish_reason == FinishReason.EOS
    usage = chunks[-1].usage
    assert (usage.draft_tokens, usage.accepted_draft_tokens) == (3, 3)
    usage = long[-1].usage  # 4 + 4 + 1 tokens: two steps drafting 4, accepting 3
    assert ids_of(long) == reference_greedy(same_pair, PROMPT_IDS, 9)
    assert (usage.draft_tokens, usage.accepted_draft_tokens) == (8, 6)
    assert usage.drafted_by_position == [2, 2, 2, 2]
    assert usage.accepted_by_position == [2, 2, 2, 0]


async def test_a_stop_token_is_returned_with_its_text(same_pair) -> None:
    """The stop token is returned, as vLLM does, and its text with it: the text is the token
    ids' text. (Mutant: the stop token ids checked before the token reaches the
    detokenizer.)"""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    free_run = reference_greedy(pair, PROMPT_IDS, 20)

    def decode(ids: list[int]) -> str:
        return str(pair.tokenizer.decode(ids, skip_special_tokens=True))

    stop_id = next(t for t in free_run[2:] if decode([t]).strip())
    engine = make_engine(pair)
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20,
                               speculation=SpeculationParams(4), stop_token_ids=(stop_id,))
    finally:
        engine.close()
    assert chunks[-1].finish_reason == FinishReason.STOP and ids_of(chunks)[-1] == stop_id
    assert "".join(c.text for c in chunks) == decode(ids_of(chunks))


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
async def test_a_batched_step_failing_after_it_ran_changes_no_output(
    different_pair, monkeypatch, seeded: bool
) -> None:
    """A batched step that fails after it advanced the tokens, the caches and the random
    generators: each request is put back as it was and stepped alone, so the outputs are
    those of a run without the failure. (The fault tests' failures come before the step runs,
    leaving nothing to restore. Mutants: the tokens, or the generators, not restored.)"""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    requests = [
        GenerationRequest(
            request_id=f"r{i}", prompt_token_ids=PROMPT_IDS[i:], max_new_tokens=16,
            speculation=SpeculationParams(3),
            sampling=SamplingParams(temperature=0.8, top_k=50, seed=100 + i) if seeded
            else SamplingParams(),
        )
        for i in range(2)
    ]

    async def run(fail: bool) -> list[list[int]]:
        engine = make_engine(pair, fast_path="on", max_concurrent_requests=2)
        failed = []
        real = stepper_module.speculative_step_batch

        def failing_once(states, gammas, draft, target, choose=None):
            results = real(states, gammas, draft, target, choose)
            if fail and not failed:
                failed.append(gammas)
                raise RuntimeError("failed after the step ran")
            return results

        monkeypatch.setattr(stepper_module, "speculative_step_batch", failing_once)
        try:
            with engine._cond:  # admitted together, stepped as one batch
                handles = [engine.submit(r) for r in requests]
            outputs = await asyncio.gather(*(collect_handle(h) for h in handles))
            await wait_until_idle(engine)
        finally:
            engine.close()
        assert failed or not fail
        return list(outputs)

    expected = await run(fail=False)
    assert await run(fail=True) == expected
    if not seeded:
        assert expected == [reference_greedy(pair, r.prompt_token_ids, 16) for r in requests]


async def test_a_waiter_aborted_at_shutdown_gets_the_error(same_pair, monkeypatch) -> None:
    """abort_all ends running requests and waiters alike with the error, not with a bare end
    of stream (a unary call would then have no chunk to answer with). (Mutant: a waiter given
    only the end.)"""
    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    engine = make_engine(same_pair, max_concurrent_requests=1, max_queue=1)
    try:
        request = GenerationRequest(request_id="w", prompt_token_ids=PROMPT_IDS,
                                    max_new_tokens=100)
        running, waiting = engine.submit(request), engine.submit(request)
        assert (engine.stats().running, engine.stats().waiting) == (1, 1)
        engine.stop_accepting()
        engine.abort_all(ShuttingDownError("the grace period is over"))
        for handle in (running, waiting):
            with pytest.raises(ShuttingDownError):
                async for _ in handle:
                    pass
        await wait_until_idle(engine)
    finally:
        engine.close()


def test_on_cuda_each_model_gets_its_graph_shapes(same_pair, monkeypatch) -> None:
    """What the engine asks of each runner where the models are on a CUDA device (recorded
    here without one): graphs at every batch size up to the limit, the target at each verify
    width, the draft at one and two tokens and at catch-ups, and both with last-only graphs
    for prefills and longer catch-ups."""
    import decoding.fast as fast
    from decoding.fast.runner import GRAPH_LAST_ONLY_WIDTHS

    asked: list[dict[str, object]] = []

    class Recorded(Exception):
        pass

    def record(model, num_slots, max_len, **options):
        asked.append(options)
        if len(asked) == 2:
            raise Recorded
        return object()

    monkeypatch.setattr(fast, "StaticRunner", record)
    pair = dataclasses.replace(same_pair, device=torch.device("cuda"))
    with pytest.raises(Recorded):
        Engine(pair, EngineConfig(max_concurrent_requests=5, max_speculative_tokens=3),
               costs=TEST_COSTS)
    target, draft = asked
    assert target["cuda_graphs"] and draft["cuda_graphs"]
    assert list(target["graph_batch_sizes"]) == list(draft["graph_batch_sizes"]) == [1, 2, 4, 5]
    assert target["graph_widths"] == (1, 2, 3, 4) and draft["graph_widths"] == (1, 2)
    assert draft["graph_catch_up_widths"] == (4, 8, 16, 32)
    assert "graph_catch_up_widths" not in target
    assert target["graph_last_only_widths"] == draft["graph_last_only_widths"] == (
        GRAPH_LAST_ONLY_WIDTHS)


async def test_a_truncated_prompt_generates_from_its_last_tokens(same_pair) -> None:
    """truncate_prompt_tokens: the output is the target's own after the kept tokens, and the
    usage counts those."""
    pair = dataclasses.replace(same_pair, eos_token_ids=())
    engine = make_engine(pair)
    try:
        chunks = await collect(engine, prompt_token_ids=(3, 4, 5, *PROMPT_IDS), max_new_tokens=8,
                               truncate_prompt_tokens=len(PROMPT_IDS))
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, PROMPT_IDS, 8)
    assert chunks[-1].usage.prompt_tokens == len(PROMPT_IDS)
