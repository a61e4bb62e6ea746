"""What the engine's worker does to running requests: prefill, choose γ, take speculative steps
(one request, or a batch on the fast path) and hand their tokens to the callers.

:class:`~decoding.engine.Engine` owns admission, the queue and the worker thread; a
:class:`Stepper` owns the two runners and everything a step needs (the proposer, the measured
costs, the server's acceptance estimate, the step-cost correction). It is only ever called from
the worker thread.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from decoding.adaptive import (
    AcceptanceEstimate,
    AdaptiveGamma,
    CostModel,
    ProbeSchedule,
    StepCosts,
)
from decoding.batched import CATCH_UP_IN_BATCH, plain_steps_batch, speculative_step_batch
from decoding.detokenize import IncrementalDetokenizer
from decoding.errors import DeviceOutOfMemoryError
from decoding.handle import RequestHandle, StepRecord
from decoding.logprobs import logprob_rows, unpack
from decoding.params import Chunk, FinishReason, GenerationRequest, TokenLogprob
from decoding.penalties import Penalties
from decoding.speculative import (
    Proposer,
    SequenceState,
    StepResult,
    plain_steps,
    propose,
    speculative_step,
)
from decoding.transfer import to_device
from decoding.validation import PreparedRequest

log = logging.getLogger("decoding.engine")

PREFILL_PAD_LIMIT = 1.5
"""Prompt chunks prefilled in one forward are padded to the longest; they go together only
while the padded tokens are at most this many times the real ones. On a GPU a short prefill's
eager forward costs its kernel launches (25-44 ms for the 1.5B target on the H200) far more
than its tokens, but a long chunk costs its arithmetic, and on a CPU every padded token does."""

PREFILL_BATCH_TOKENS = 4096
"""The most tokens, padding included, one batched prefill forward takes: its activations (and
attention's scores over the cached positions) grow with them, where one request's chunk alone
stays within ``prefill_chunk``. Sixteen 512-token chunks go in two forwards. Judgement, not
measured; a forward that runs out of device memory anyway falls back to one by one."""

PROMPT_LOGPROBS_SPAN = 256
"""Prompt positions whose logits one forward returns for a request's prompt_logprobs: each is
a row of the vocabulary in float32 (0.6 MB for Qwen2.5's 152k ids), so a whole prefill chunk
of 512 (or a whole prompt, ``prefill_chunk`` 0) goes in forwards of at most this many."""


@dataclass
class RunningRequest:
    """One admitted request, from the queue until it finishes."""

    request: GenerationRequest
    prepared: PreparedRequest
    handle: RequestHandle
    reservation: int  # KV cache positions it may use (prompt + max_new_tokens + γ + 1)
    detokenizer: IncrementalDetokenizer
    adaptive: AdaptiveGamma | None
    state: SequenceState | None = None
    output: list[int] = field(default_factory=list)
    ready: bool = False  # batched mode: prefilled and due a step in this round
    prefilled: int = 0  # prompt tokens cached so far (all but the last make a full prefill)
    draft_prefill: bool | None = None  # whether the prompt goes through the draft too
    finished: bool = False
    # The prompt's log-probabilities so far, when the request asks for them; handed over (and
    # set to None) with its first chunk.
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def is_prefilled(self) -> bool:
        return self.state is not None and self.prefilled >= len(self.prepared.prompt_ids) - 1


Finish = Callable[[RunningRequest, Any], None]
"""``finish(running, item)``: end a request with ``item`` (its last chunk, an error or the end
marker), release its caches and drop it from the running set."""


class Stepper:
    def __init__(
        self,
        *,
        target: Any,
        draft: Any,
        batched: bool,
        costs: CostModel,
        device: torch.device,
        eos_token_ids: frozenset[int] | tuple[int, ...],
        default_gamma: int | None,
        max_gamma: int,
        prefill_chunk: int,
        proposer: Proposer,
        finish: Finish,
        running_count: Callable[[], int],
        decode_steps: int = 1,
    ) -> None:
        self.target = target
        self.draft = draft
        self.batched = batched  # static-cache runners: every ready request in one step
        self.costs = costs
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.default_gamma = default_gamma  # None: adaptive
        self.max_gamma = max_gamma
        self.prefill_chunk = prefill_chunk
        self.decode_steps = decode_steps  # γ = 0 steps taken at once (see _plain_steps)
        self.proposer = proposer  # the draft model; benchmarks may swap in another proposer
        self._finish = finish
        self._running_count = running_count  # requests admitted and not finished, right now
        # The server's recent acceptance: the prior of each new request's adaptive γ.
        self.acceptance = AcceptanceEstimate(prior_alpha=0.7, prior_weight=4.0, decay=0.99)
        # When the requests stepped together probe (see ProbeSchedule), counted here per
        # batched step; stepped one by one, each request counts its own.
        self.probes = ProbeSchedule() if batched else None
        # What steps really cost against the cost model: corrects adaptive γ.
        self.step_costs = StepCosts(costs)
        # What steps are timed by, for the step-cost correction (a simulation swaps in its own).
        self.clock: Callable[[], float] = time.perf_counter
        self.last_gamma = 0
        self._steps_taken = 1  # plain steps the last step() took (see _step_each)
        self._asks_first = 0  # which of a batched step's requests is asked for its γ first

    # ---- γ ---------------------------------------------------------------------------------

    def fixed_gamma(self, request: GenerationRequest) -> int | None:
        """The request's γ, else the server's default; None means adaptive."""
        gamma = request.speculation.num_speculative_tokens
        return self.default_gamma if gamma is None else gamma

    def gamma_limit(self, request: GenerationRequest) -> int:
        """The most draft tokens one step of ``request`` may take."""
        gamma = self.fixed_gamma(request)
        return self.max_gamma if gamma is None else gamma

    def adaptive_for(self, request: GenerationRequest) -> AdaptiveGamma | None:
        if self.fixed_gamma(request) is not None:
            return None
        if plans_alone(request):  # its own probe schedule, too
            return AdaptiveGamma(self.costs, self.max_gamma)
        return AdaptiveGamma(
            self.costs, self.max_gamma, prior_alpha=self.acceptance.alpha, schedule=self.probes
        )

    def _batch(self) -> int:
        """The batch a step is costed at: every running request on the fast path, those still
        prefilling included (they join the next steps), else 1 (stepped one by one)."""
        return max(1, self._running_count()) if self.batched else 1

    def _gamma(self, running: RunningRequest) -> int:
        state = running.state
        assert state is not None
        # Never emit past max_new_tokens: a step emits up to γ+1 tokens (gpt-fast's clamp).
        # prompt + max_new_tokens <= context window, so this also keeps the caches inside it.
        remaining = running.prepared.max_new_tokens - len(running.output)
        if running.adaptive is not None:
            if remaining <= 1:
                return 0  # no room to draft: not asked, so no probe is spent on it
            # What the draft must be fed alone before it drafts (a short lag rides along).
            lag = len(state.tokens) - state.draft.length
            catch_up = lag - 1 if lag > CATCH_UP_IN_BATCH else 0
            if plans_alone(running.request):  # only its own history may decide its γ
                gamma = running.adaptive.next_gamma(1, catch_up=catch_up, remaining=remaining)
            else:
                batch = self._batch()
                gamma = running.adaptive.next_gamma(
                    batch, self.step_costs.overhead(batch), catch_up=catch_up, remaining=remaining
                )
        else:
            gamma = self.gamma_limit(running.request)
        return max(0, min(gamma, remaining - 1))

    def _alpha(self, running: RunningRequest) -> float:
        """The request's estimated acceptance; the server's for a fixed γ."""
        return (running.adaptive or self.acceptance).alpha

    def _drafts_from_the_start(self, running: RunningRequest, prompt: int) -> bool:
        """Whether the draft should see the prompt: always for a fixed γ > 0, never for γ = 0;
        with adaptive γ, only if drafting over the whole output is expected to pay for it (at
        the batch running now). A draft left out catches up if γ turns positive later. On a
        batching server that is judged at the upper bound of the server's acceptance, but only
        where the draft could be used: the request would draft or probe at its own estimate
        (:meth:`AdaptiveGamma.could_draft`), or the last step drafted, where a level draft may
        draft along with the others (:meth:`StepCosts.cap_for_batch`)."""
        remaining = running.prepared.max_new_tokens
        if remaining <= 1:  # its one token is the first step's own: nothing to draft
            return False
        if running.adaptive is None:
            return self.gamma_limit(running.request) > 0
        if plans_alone(running.request):
            return running.adaptive.would_draft(catch_up=prompt, remaining=remaining)
        batch = self._batch()
        overhead = self.step_costs.overhead(batch)
        usable = self.last_gamma > 0 or running.adaptive.could_draft(batch, overhead)
        return usable and running.adaptive.would_draft(
            batch, overhead, catch_up=prompt, remaining=remaining, alpha=self.acceptance.upper()
        )

    # ---- prefill ---------------------------------------------------------------------------

    def prefill(self, running: RunningRequest) -> None:
        """Cache every prompt token but the last, which the first step feeds: the next chunk
        of them (``prefill_chunk``) per call, the first call also taking the cache slots."""
        if running.state is None:
            self._start_sequences(running)
        begin, stop = self._next_chunk(running)
        if begin < stop:  # else a one-token prompt: the first step feeds it
            self._prefill_chunks([(running, begin, stop)])

    def _next_chunk(self, running: RunningRequest) -> tuple[int, int]:
        """Where the request's next prefill chunk begins and ends in its prompt."""
        end = len(running.prepared.prompt_ids) - 1
        begin = running.prefilled
        return begin, min(end, begin + (self.prefill_chunk or end))

    def prefill_batch(self, group: list[RunningRequest]) -> None:
        """The next prefill chunk of every request in ``group`` (a batching engine's requests
        still prefilling, in one round), the target's in one forward over several of them and
        the draft's in one over those whose draft sees the prompt, where :meth:`prefill` would
        run two forwards per request: a burst of 16 prompts was prefilled one by one before
        anyone's first step (on the H200, 25-44 ms per eager forward of the 1.5B target,
        however few its tokens). Rows are padded to the longest chunk, so they go together
        only while the padded tokens are at most :data:`PREFILL_PAD_LIMIT` times the real
        ones and at most :data:`PREFILL_BATCH_TOKENS` (longest first; a row that does not fit
        starts the next forward). A row that would go alone, or has no room for the padding,
        goes through :meth:`prefill`. If a batched forward fails, its requests are put back as
        they were and prefilled alone, so a failure stays with its own request."""
        for running in group:
            if running.state is None:
                self.guarded(running, self._start_sequences)
        rows: list[tuple[RunningRequest, int, int]] = []  # (request, chunk begin, chunk end)
        for running in group:
            if running.finished or running.state is None:
                continue
            begin, stop = self._next_chunk(running)
            if begin < stop:  # else a one-token prompt: the first step feeds it
                rows.append((running, begin, stop))
        # A request that wants its prompt's log-probabilities goes alone (its forwards return
        # every position's logits); the others group as if it were not there.
        scored = [row for row in rows if row[0].prompt_logprobs is not None]
        rows = [row for row in rows if row[0].prompt_logprobs is None]
        rows.sort(key=lambda row: row[2] - row[1], reverse=True)
        room = min(getattr(self.target, "max_len", 0), getattr(self.draft, "max_len", 0))
        forwards: list[list[tuple[RunningRequest, int, int]]] = []
        for row in rows:
            if forwards:
                last = forwards[-1]
                width = last[0][2] - last[0][1]
                real = sum(stop - begin for _, begin, stop in last) + row[2] - row[1]
                padded = (len(last) + 1) * width
                if (padded <= PREFILL_PAD_LIMIT * real and padded <= PREFILL_BATCH_TOKENS
                        and row[1] + width <= room):
                    last.append(row)
                    continue
            forwards.append([row])
        for together in [[row] for row in scored] + forwards:
            if len(together) == 1:
                self.guarded(together[0][0], self.prefill)
                continue
            states = [running.state for running, _, _ in together if running.state]
            saved = [(state.target.length, state.draft.length) for state in states]
            try:
                self._prefill_chunks(together)
            except Exception:
                log.warning("batched prefill failed; prefilling its requests one by one",
                            exc_info=True)
                for state, (target_length, draft_length) in zip(states, saved, strict=True):
                    state.target.rollback(min(target_length, state.target.length))
                    state.draft.rollback(min(draft_length, state.draft.length))
                for running, _, _ in together:
                    self.guarded(running, self.prefill)

    def _prefill_chunks(self, rows: list[tuple[RunningRequest, int, int]]) -> None:
        """Each row's prompt chunk [begin, stop) through the target, then through the drafts
        that see the prompt: one forward for all rows (one row: its own sequence's forward,
        which every runner has)."""
        states: list[SequenceState] = []
        for running, _, _ in rows:
            assert running.state is not None
            states.append(running.state)
        chunks = [state.tokens[begin:stop]
                  for state, (_, begin, stop) in zip(states, rows, strict=True)]
        start = time.time_ns()
        if rows[0][0].prompt_logprobs is not None:
            assert len(rows) == 1  # such a request goes alone (prefill_batch)
            self._score_prompt(rows[0][0], rows[0][1], rows[0][2])
        else:
            self._feed(self.target, [state.target for state in states], chunks)
        middle = time.time_ns()
        for running, _, _ in rows:
            timeline = running.handle.timeline
            timeline.target_prefill_ns = (timeline.target_prefill_ns[0] or start, middle)
            if running.draft_prefill is None:
                # Decided after the target's first chunk: requests that arrived meanwhile (a
                # burst comes in one by one) count in the batch this one will step in.
                running.draft_prefill = self._drafts_from_the_start(
                    running, len(running.prepared.prompt_ids) - 1)
        # A draft that will propose from the first step is prefilled with the target, chunk by
        # chunk (else its first step would feed it the whole prompt alone, stalling the batch).
        drafting = [i for i, (running, _, _) in enumerate(rows) if running.draft_prefill]
        if drafting:
            self._feed(self.draft, [states[i].draft for i in drafting],
                       [chunks[i] for i in drafting])
            done = time.time_ns()
            for i in drafting:
                timeline = rows[i][0].handle.timeline
                timeline.draft_prefill_ns = (timeline.draft_prefill_ns[0] or middle, done)
        for running, _, stop in rows:
            running.prefilled = stop

    @staticmethod
    def _score_prompt(running: RunningRequest, begin: int, stop: int) -> None:
        """Prompt tokens [begin, stop) into the target, keeping the log-probabilities their
        logits give the tokens after them, [begin + 1, stop + 1): the prompt's second token
        to its last, over the chunks (the last chunk ends before the prompt's last token)."""
        assert running.state is not None and running.prompt_logprobs is not None
        top = running.request.prompt_logprobs or 0
        tokens = running.state.tokens
        for piece in range(begin, stop, PROMPT_LOGPROBS_SPAN):
            end = min(stop, piece + PROMPT_LOGPROBS_SPAN)
            logits = running.state.target.forward(tokens[piece:end], num_logits=None)
            scored = tokens[piece + 1 : end + 1]
            rows = logprob_rows(logits, to_device(scored, logits.device), top)
            running.prompt_logprobs.extend(unpack(rows.tolist(), scored, top))

    @staticmethod
    def _feed(runner: Any, sequences: list[Any], chunks: list[list[int]]) -> None:
        """``chunks`` into ``sequences``, their logits not needed."""
        if len(sequences) == 1:
            sequences[0].forward(chunks[0], num_logits=1)
        else:
            runner.forward_packed(sequences, chunks, [1] * len(sequences), transient=True)

    def _start_sequences(self, running: RunningRequest) -> None:
        prompt = list(running.prepared.prompt_ids)
        request = running.request
        seed = request.sampling.seed
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        target = self.target.new_sequence()
        try:
            draft = self.draft.new_sequence()
        except BaseException:
            target.release()
            raise
        running.state = SequenceState(
            tokens=prompt,
            target=target,
            draft=draft,
            sampling=request.sampling,
            generator=generator,
            proposer=self.proposer,
            top_logprobs=request.top_logprobs if request.logprobs else None,
            penalties=Penalties.of(
                request.sampling, len(prompt),
                banned=[*(() if request.ignore_eos else self.eos_token_ids),
                        *request.stop_token_ids],
                min_output=request.min_new_tokens),
        )

    # ---- steps -----------------------------------------------------------------------------

    def guarded(self, running: RunningRequest, work: Callable[[RunningRequest], None]) -> None:
        """Run ``work`` for one request; a failure ends that request alone."""
        try:
            work(running)
        except torch.OutOfMemoryError:
            log.warning("out of device memory", extra={"request_id": running.request.request_id})
            self._finish(running, DeviceOutOfMemoryError("out of device memory"))
        except Exception as err:
            log.error(
                "request failed", exc_info=True, extra={"request_id": running.request.request_id}
            )
            self._finish(running, err)

    def _plain_steps(self, ready: list[RunningRequest]) -> int:
        """How many γ = 0 steps these requests take at once (:func:`plain_steps`): up to
        ``decode_steps``, never past a request's max_new_tokens, never past the step where an
        adaptive request would ask again whether to draft (a probe: see
        :meth:`AdaptiveGamma.plain_steps_allowed`), and one while any of them has emitted
        nothing yet (a first token is never held back)."""
        if self.decode_steps <= 1 or any(not running.output for running in ready):
            return 1
        steps = min(self.decode_steps,
                    *(r.prepared.max_new_tokens - len(r.output) for r in ready))
        for running in ready:
            if running.adaptive is not None:
                exact = plans_alone(running.request)
                steps = min(steps, running.adaptive.plain_steps_allowed(exact))
        return max(1, steps)

    def step(self, running: RunningRequest, gamma: int | None = None) -> None:
        """One speculative step of one request (several plain ones where γ = 0)."""
        assert running.state is not None
        gamma = self._gamma(running) if gamma is None else gamma
        self.last_gamma = gamma
        start_ns = time.time_ns()
        started = self.clock()
        steps = self._plain_steps([running]) if gamma == 0 else 1
        self._steps_taken = steps
        catch_up_s = self._catch_up_s([running.state], [gamma], batched=False)
        if steps > 1:
            result = plain_steps(running.state, steps)
        else:
            result = speculative_step(running.state, gamma)
        self.step_costs.observe([gamma], (self.clock() - started) / steps, catch_up_s)
        self._emit(running, result, start_ns)

    def step_batch(self, ready: list[RunningRequest]) -> None:
        """One batched speculative step for every ready request. If it fails, each request
        is put back as it was and stepped alone, so a failure stays with its own request."""
        # Batched drafting runs the draft model itself; another proposer drafts alone, unless
        # it can pick each position's token inside the batched loop (``choose``).
        choose = None if self.proposer is propose else getattr(self.proposer, "choose", None)
        if self.probes is not None and ready:
            self.probes.step()
        if len(ready) <= 1 or (self.proposer is not propose and choose is None):
            self._step_each(ready)
            return
        # Asked in turn, from the one after the last to probe: a probe due goes to the first
        # to ask for one, and a request whose γ the cap keeps at 0 asks at every step, so
        # asked always first it took every probe, and the others' estimates never moved
        # (bench.policy: 2 requests from a collapsed estimate at α = 0.9, one never drafted in
        # 128 tokens). Turning once per step is not enough: where the probe wait is a multiple
        # of the batch's steps, the same request is first at every probe. A request whose γ
        # cannot be had fails alone (guarded) and leaves the batch.
        asked: dict[int, int] = {}
        first = self._asks_first % len(ready)
        order = [*range(first, len(ready)), *range(first)]
        for i in order:
            self.guarded(ready[i], functools.partial(self._ask_gamma, asked, i))
        probed = [i for i in order if i in asked and ready[i].adaptive is not None
                  and ready[i].adaptive.probing]
        if probed:
            self._asks_first = probed[-1] + 1
        ready = [running for i, running in enumerate(ready) if i in asked]
        own = [gamma for _, gamma in sorted(asked.items())]
        if len(ready) <= 1:  # one left: alone, as a batch of one always is
            self._step_each(ready, own)
            return
        try:
            plan = self._plan_batch(ready, own)
        except Exception:  # the batch's own plan: each request alone at its own γ instead
            log.warning("planning a batched step failed; stepping its requests one by one",
                        exc_info=True)
            self._step_each(ready, own)
            return
        states, gammas, saved, steps, catch_up_s, two_wide = plan
        start_ns = time.time_ns()
        try:
            started = self.clock()
            if steps > 1:
                results = plain_steps_batch(states, steps, self.target)
            else:
                results = speculative_step_batch(states, gammas, self.draft, self.target, choose)
            self.step_costs.observe(gammas, (self.clock() - started) / steps, catch_up_s,
                                    two_wide)
            if self.probes is not None:
                self.probes.took(steps)
        except Exception:
            log.warning("batched step failed; stepping its requests one by one", exc_info=True)
            for state, (tokens, target_length, draft_length, rng) in zip(states, saved,
                                                                          strict=True):
                del state.tokens[tokens:]
                state.target.rollback(min(target_length, state.target.length))
                state.draft.rollback(min(draft_length, state.draft.length))
                state.generator.set_state(rng)
            self._step_each(ready, gammas)
            return
        self.last_gamma = max(gammas)
        for running, result in zip(ready, results, strict=True):
            self.guarded(running, functools.partial(self._emit, result=result, start_ns=start_ns))

    def _ask_gamma(self, asked: dict[int, int], i: int, running: RunningRequest) -> None:
        asked[i] = self._gamma(running)

    def _plan_batch(self, ready: list[RunningRequest], own: list[int]) -> tuple[
        list[SequenceState], list[int], list[tuple[int, int, int, torch.Tensor]], int, float,
        bool,
    ]:
        """What one batched step of ``ready`` at their own γs ``own`` will do: the states, the
        γs the batch's cap gives, each state as it was (to put back if the step fails), how
        many plain steps, the catch-up's expected seconds, and whether the first draft forward
        is two wide."""
        states = [r.state for r in ready if r.state is not None]
        lags = [len(s.tokens) - s.draft.length for s in states]
        # The first draft forward feeds each drafting row its lag, padded to the widest (a lag
        # of more than CATCH_UP_IN_BATCH is caught up first, then fed one).
        two_behind = [1 < lag <= CATCH_UP_IN_BATCH for lag in lags]
        # A fixed γ is what the request asked for; a seeded sample's γ is its own alone; a
        # probe is there to learn what the estimates the cap would judge it by do not know.
        adjustable = [r.adaptive is not None and not plans_alone(r.request)
                      and not r.adaptive.probing for r in ready]
        gammas = self.step_costs.cap_for_batch(
            own,
            [self._alpha(r) for r in ready],
            adjustable,
            level=[lag <= CATCH_UP_IN_BATCH for lag in lags],
            # Riding along, as its own γ (_gamma), never past its max_new_tokens.
            limits=[max(0, r.prepared.max_new_tokens - len(r.output) - 1) for r in ready],
            two_behind=two_behind,
            fixed=[r.adaptive is None for r in ready],
        )
        two_wide = any(g > 0 and two for g, two in zip(gammas, two_behind, strict=True))
        for running, free, asked, given in zip(ready, adjustable, own, gammas, strict=True):
            if free and running.adaptive is not None:
                running.adaptive.capped(asked > 0 and given == 0)
        saved = [(len(s.tokens), s.target.length, s.draft.length, s.generator.get_state())
                 for s in states]
        steps = self._plain_steps(ready) if max(gammas) == 0 else 1
        catch_up_s = self._catch_up_s(states, gammas, batched=True)
        return states, gammas, saved, steps, catch_up_s, two_wide

    def _step_each(self, ready: list[RunningRequest], gammas: list[int] | None = None) -> None:
        """Step each request alone (at ``gammas``, else its own γ), as one step of the batch:
        the shared probe schedule counts its longest group of plain steps."""
        longest = 1
        for i, running in enumerate(ready):
            self._steps_taken = 1
            if gammas is None and running.adaptive is not None:  # alone: no cap on its γ
                running.adaptive.capped(False)
            work = self.step if gammas is None else functools.partial(self.step, gamma=gammas[i])
            self.guarded(running, work)
            longest = max(longest, self._steps_taken)
        if self.probes is not None and ready:
            self.probes.took(longest)

    def _catch_up_s(
        self, states: list[SequenceState], gammas: list[int], batched: bool
    ) -> float:
        """The predicted cost of feeding lagging drafts before a step drafts: in a batch, the
        drafts more than :data:`CATCH_UP_IN_BATCH` behind are fed first (all their tokens but
        the last), in one forward padded to the longest where there are several
        (:func:`decoding.batched._catch_up`); alone, the first draft forward is as wide as
        the lag."""
        draft = self.costs.draft
        lags = [len(state.tokens) - state.draft.length
                for state, gamma in zip(states, gammas, strict=True) if gamma > 0]
        if not batched:
            return sum(draft(lag) - draft(1) for lag in lags if lag > 1)
        behind = [lag - 1 for lag in lags if lag > CATCH_UP_IN_BATCH]
        if len(behind) > 1:
            return draft(len(behind) * max(behind))
        return sum(draft(lag) for lag in behind)

    def _emit(self, running: RunningRequest, result: StepResult, start_ns: int) -> None:
        """Hand the step's tokens to the caller, stopping at EOS (unless the request ignores
        it), a stop string, one of its stop_token_ids or the length, and record the step.
        No stop string ends the output before the token after the first min_new_tokens, the
        earliest token that EOS or a stop_token_id can be (they are banned before it: see
        :class:`~decoding.penalties.Penalties`), as vLLM's min_tokens."""
        finish: FinishReason | None = None
        emitted: list[int] = []
        request = running.request
        for token in result.emitted:
            emitted.append(token)
            running.output.append(token)
            if token in self.eos_token_ids and not request.ignore_eos:
                finish = FinishReason.EOS
            elif (running.detokenizer.add(token, stop=len(running.output)
                                          > request.min_new_tokens)
                  or token in request.stop_token_ids):
                finish = FinishReason.STOP
            elif len(running.output) >= running.prepared.max_new_tokens:
                finish = FinishReason.LENGTH
            if finish is not None:
                break
        self._record(running, result, start_ns, kept=len(emitted))
        usage = running.handle.usage
        usage.completion_tokens = len(running.output)
        text = running.detokenizer.delta(final=finish is not None)
        logprobs = None if result.logprobs is None else tuple(result.logprobs[: len(emitted)])
        prompt_logprobs = None
        if running.prompt_logprobs is not None:  # the first chunk: the prompt's go with it
            prompt_logprobs, running.prompt_logprobs = tuple(running.prompt_logprobs), None
        if finish is None:
            running.handle._put(Chunk(tuple(emitted), text, logprobs=logprobs,
                                      prompt_logprobs=prompt_logprobs))
        else:  # the last chunk goes out once the request has given its place back
            self._finish(running, Chunk(tuple(emitted), text, finish, usage, logprobs,
                                        prompt_logprobs))

    def _record(
        self, running: RunningRequest, result: StepResult, start_ns: int, kept: int
    ) -> None:
        """Count the step in the request's usage and timeline as far as the output went: of
        its ``kept`` first emitted tokens (the rest fell after EOS, a stop string or the
        length). Where the output ends inside the accepted run, the draft tokens after that
        point count neither as drafted nor as accepted, so a draft that is always right reads
        α = 1; where it ends inside a group of plain steps, the forwards after it do not count.
        The draft's quality estimates take the step as it was."""
        accepted = min(result.num_accepted, kept)
        drafted = result.num_drafted if kept > result.num_accepted else kept
        usage = running.handle.usage
        # A group of plain steps emits a token per forward: those past the end count not.
        usage.target_forward_passes += min(result.num_forwards, kept)
        usage.draft_tokens += drafted
        usage.accepted_draft_tokens += accepted
        for position in range(drafted):
            if position >= len(usage.drafted_by_position):
                usage.drafted_by_position.append(0)
                usage.accepted_by_position.append(0)
            usage.drafted_by_position[position] += 1
            usage.accepted_by_position[position] += position < accepted
        if running.adaptive is not None:
            running.adaptive.observe(result.num_drafted, result.num_accepted)
            if not result.num_drafted:
                running.adaptive.took_plain_steps(result.num_forwards)
        self.acceptance.observe(result.num_drafted, result.num_accepted)
        running.handle.timeline.steps.append(
            StepRecord(
                start_ns=start_ns,
                gamma=drafted,
                accepted=accepted,
                emitted=kept,
                draft_s=result.draft_seconds,
                verify_s=result.verify_seconds,
            )
        )


def plans_alone(request: GenerationRequest) -> bool:
    """A seeded sample's γ sequence decides which random draws it makes, so its γ must depend
    on nothing but the request: not the server's recent acceptance, not the batch it shares,
    not the step times measured while others ran (:class:`~decoding.adaptive.StepCosts`).
    Greedy output is the same at any γ, and an unseeded sample promises no repeatability."""
    return not request.sampling.greedy and request.sampling.seed is not None
