"""The engine: admission, a worker thread that owns the device, and per-request streams.

``Engine.submit(request)`` validates and admits a request at once (or raises), and returns a
:class:`RequestHandle`, an async iterator of :class:`~decoding.params.Chunk`. One worker thread
runs every forward pass, interleaving one speculative step per running request per round, so
the asyncio loop is never blocked by the device. Cancelling a handle (``aclose``) frees the
request's caches before its next step.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from decoding.adaptive import (
    AcceptanceEstimate,
    AdaptiveGamma,
    CostModel,
    StepCosts,
    measure_costs,
)
from decoding.batched import CATCH_UP_IN_BATCH, speculative_step_batch
from decoding.detokenize import IncrementalDetokenizer
from decoding.errors import (
    DeadlineExceededError,
    DeviceOutOfMemoryError,
    EngineFailedError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from decoding.handle import _END, RequestHandle, StepRecord
from decoding.models import ModelPair
from decoding.params import Chunk, FinishReason, GenerationRequest
from decoding.runner import ModelRunner
from decoding.speculative import Proposer, SequenceState, StepResult, propose, speculative_step
from decoding.validation import Limits, PreparedRequest, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    num_speculative_tokens: int | None = None  # the default γ; None adapts it per request
    max_speculative_tokens: int = 8  # the largest γ a request may ask for or adapt to
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_strings: int = 8
    max_concurrent_requests: int = 8  # requests decoding at once; the rest wait in the queue
    max_queue: int = 64  # waiting requests beyond which submit raises OverloadedError
    kv_token_budget: int = 0  # cache positions all running requests may reserve; 0 = no limit
    # "auto": the static-cache runners with batched steps when the model family is supported
    # (Llama/Qwen2), else transformers' DynamicCache one request at a time; "on" / "off" force.
    fast_path: str = "auto"
    # Longest sequence (prompt + output) on the fast path; sizes the preallocated cache slots.
    max_context: int = 4096
    # Fuse each layer's elementwise parts with torch.compile on the fast path (None: on CUDA,
    # where CUDA graphs replay them; a CPU forward is bound by reading weights, not launches).
    compile: bool | None = None
    # Prompt tokens prefilled per request per scheduling round; a longer prompt is prefilled over
    # several rounds, between which the running requests take their steps (0 = all at once).
    prefill_chunk: int = 512


@dataclass(frozen=True)
class EngineInfo:
    target_model: str
    draft_model: str
    vocab_size: int
    context_window: int
    device: str
    dtype: str
    draft_dtype: str
    config: EngineConfig


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests admitted and not finished
    waiting: int  # requests in the queue
    live_target_sequences: int  # KV caches alive on the target
    live_draft_sequences: int
    reserved_tokens: int  # KV positions reserved by running requests
    last_gamma: int  # γ of the most recent step


@dataclass
class _Running:
    request: GenerationRequest
    prepared: PreparedRequest
    handle: RequestHandle
    reservation: int
    detokenizer: IncrementalDetokenizer
    adaptive: AdaptiveGamma | None
    state: SequenceState | None = None
    output: list[int] = field(default_factory=list)
    ready: bool = False  # batched mode: prefilled and due a step in this round
    prefilled: int = 0  # prompt tokens cached so far (all but the last make a full prefill)
    draft_prefill: bool | None = None  # whether the prompt goes through the draft too
    finished: bool = False


class Engine:
    def __init__(
        self,
        pair: ModelPair,
        config: EngineConfig,
        costs: CostModel | None = None,
        proposer: Proposer = propose,
    ):
        if config.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {config.prefill_chunk}")
        self.pair = pair
        self.config = config
        self.proposer = proposer  # the draft model; benchmarks may swap in another proposer
        context_window = min(pair.target.context_window, pair.draft.context_window)
        self.batched = self._use_fast_path(pair, config)
        self.target: Any
        self.draft: Any
        if self.batched:
            from decoding.fast import StaticRunner

            context_window = min(context_window, config.max_context)
            # Room for a verify step (γ+1) and the padding of a batched draft catch-up.
            slot_len = context_window + config.max_speculative_tokens + 2
            slot_len = -(-slot_len // 128) * 128  # aligned: odd lengths get slow matmul kernels
            graphs = pair.device.type == "cuda"
            compile_ = graphs if config.compile is None else config.compile
            # One CUDA graph per shape a step uses: every batch size up to the concurrency limit
            # (padded to a power of two), the target at every verify width, the draft at one
            # token and at a two-token catch-up. Other shapes run eagerly.
            batches = sorted({min(2**i, config.max_concurrent_requests) for i in range(8)})
            verify_widths = tuple(range(1, config.max_speculative_tokens + 2))
            self.target = StaticRunner(
                pair.target.model, config.max_concurrent_requests, slot_len, cuda_graphs=graphs,
                graph_batch_sizes=batches, graph_widths=verify_widths, compile=compile_,
            )
            self.draft = StaticRunner(
                pair.draft.model, config.max_concurrent_requests, slot_len, cuda_graphs=graphs,
                graph_batch_sizes=batches, graph_widths=(1, 2), compile=compile_,
            )
        else:
            self.target = ModelRunner(pair.target.model)
            self.draft = ModelRunner(pair.draft.model)
        self.costs = costs or measure_costs(
            self.target, self.draft, config.max_speculative_tokens,
            max_batch=config.max_concurrent_requests if self.batched else 1,
            catch_up=max(0, min(64, context_window - 40)),
        )
        log.info(
            "forward costs in ms by tokens per forward: draft %s, target %s",
            _milliseconds(self.costs.draft_s), _milliseconds(self.costs.target_s),
        )
        self.limits = Limits(
            vocab_size=pair.target.vocab_size,
            context_window=context_window,
            max_speculative_tokens=config.max_speculative_tokens,
            default_max_new_tokens=config.default_max_new_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            max_stop_strings=config.max_stop_strings,
        )
        self.info = EngineInfo(
            target_model=pair.target.name,
            draft_model=pair.draft.name,
            vocab_size=pair.target.vocab_size,
            context_window=self.limits.context_window,
            device=str(pair.device),
            dtype=str(pair.dtype).removeprefix("torch."),
            draft_dtype=str(pair.draft_dtype).removeprefix("torch."),
            config=config,
        )
        self.on_fatal: list[Callable[[BaseException], None]] = []
        # The server's recent acceptance: the prior of each new request's adaptive γ.
        self.acceptance = AcceptanceEstimate(prior_alpha=0.7, prior_weight=4.0, decay=0.99)
        # What steps really cost against the cost model: corrects adaptive γ (worker thread only).
        self.step_costs = StepCosts(self.costs)
        self._cond = threading.Condition()
        self._running: list[_Running] = []
        self._waiting: collections.deque[_Running] = collections.deque()
        self._reserved = 0
        self._last_gamma = 0
        self._stopping = False
        self.failed: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="tandem-device-worker", daemon=True)
        self._worker.start()

    @staticmethod
    def _use_fast_path(pair: ModelPair, config: EngineConfig) -> bool:
        if config.fast_path == "off":
            return False
        from decoding.fast import supports

        supported = supports(pair.target.model) and supports(pair.draft.model)
        if config.fast_path == "on" and not supported:
            raise ValueError("fast_path='on' but the model family is not supported")
        return supported

    # ---- the caller's side (asyncio loop thread) -------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Validate and admit ``request``; raise InvalidRequestError, OverloadedError,
        ShuttingDownError or EngineFailedError at once instead of queueing without bound."""
        if self.failed is not None:
            raise EngineFailedError("the device worker has stopped")
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        prepared = prepare(request, self.pair.tokenizer, self.limits)
        gamma = self._max_gamma(request)
        reservation = len(prepared.prompt_ids) + prepared.max_new_tokens + gamma + 1
        budget = self.config.kv_token_budget
        if budget and reservation > budget:
            raise InvalidRequestError(
                "max_new_tokens",
                f"the request needs {reservation} KV cache positions (prompt + max_new_tokens"
                f" + γ + 1) but the server's budget is {budget}",
            )
        handle = RequestHandle(request.request_id, len(prepared.prompt_ids), self._wake)
        running = _Running(
            request=request,
            prepared=prepared,
            handle=handle,
            reservation=reservation,
            detokenizer=IncrementalDetokenizer(self.pair.tokenizer, request.stop),
            adaptive=self._adaptive(request),
        )
        with self._cond:
            self._admit_locked()  # earlier waiters first
            if not self._waiting and self._fits_locked(running):
                self._start_locked(running)
            elif len(self._waiting) < self.config.max_queue:
                self._waiting.append(running)
            else:
                raise OverloadedError(
                    f"{len(self._running)} requests running and {len(self._waiting)} waiting",
                    retry_after_s=1.0,
                )
            self._cond.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                live_target_sequences=self.target.live_sequences,
                live_draft_sequences=self.draft.live_sequences,
                reserved_tokens=self._reserved,
                last_gamma=self._last_gamma,
            )

    def stop_accepting(self) -> None:
        self._stopping = True

    def abort_all(self, err: BaseException) -> None:
        """End every request with ``err`` at its next step (shutdown after the grace period)."""
        with self._cond:
            for running in [*self._running, *self._waiting]:
                running.handle.abort_error = err
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._stopping = True
            for running in [*self._running, *self._waiting]:
                running.handle.cancelled = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _fixed_gamma(self, request: GenerationRequest) -> int | None:
        """The request's γ, else the server's default; None means adaptive."""
        gamma = request.speculation.num_speculative_tokens
        return self.config.num_speculative_tokens if gamma is None else gamma

    def _max_gamma(self, request: GenerationRequest) -> int:
        gamma = self._fixed_gamma(request)
        return self.config.max_speculative_tokens if gamma is None else gamma

    def _adaptive(self, request: GenerationRequest) -> AdaptiveGamma | None:
        if self._fixed_gamma(request) is not None:
            return None
        if _plans_alone(request):
            return AdaptiveGamma(self.costs, self.config.max_speculative_tokens)
        return AdaptiveGamma(
            self.costs, self.config.max_speculative_tokens, prior_alpha=self.acceptance.alpha
        )

    def _fits_locked(self, running: _Running) -> bool:
        budget = self.config.kv_token_budget
        return len(self._running) < self.config.max_concurrent_requests and (
            not budget or self._reserved + running.reservation <= budget
        )

    # ---- the worker thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        self._admit_locked()
                        if self._running or (self._stopping and not self._waiting):
                            break
                        self._cond.wait()
                    if self._stopping and not self._running and not self._waiting:
                        return
                    batch = list(self._running)
                for running in batch:
                    self._advance(running)
                if self.batched:
                    self._step_batch([r for r in batch if r.ready])
        except BaseException as err:  # the worker itself broke: nothing can be served any more
            log.critical("device worker died", exc_info=True)
            self._die(err)

    def _admit_locked(self) -> None:
        while self._waiting and (
            self._waiting[0].handle.cancelled
            or self._waiting[0].handle.abort_error is not None
            or self._fits_locked(self._waiting[0])
        ):
            running = self._waiting.popleft()
            if running.handle.cancelled:
                running.handle._put(_END)
                continue
            if running.handle.abort_error is not None:
                running.handle._put(running.handle.abort_error)
                running.handle._put(_END)
                continue
            self._start_locked(running)

    def _start_locked(self, running: _Running) -> None:
        running.handle.timeline.admitted_ns = time.time_ns()
        self._running.append(running)
        self._reserved += running.reservation

    def _advance(self, running: _Running) -> None:
        request = running.request
        if running.handle.cancelled:
            return self._finish(running, _END)
        if running.handle.abort_error is not None:
            return self._finish(running, running.handle.abort_error)
        if request.deadline is not None and time.monotonic() > request.deadline:
            return self._finish(running, DeadlineExceededError("the deadline passed"))
        if not self._prefilled(running):
            self._guarded(running, self._prefill)
        if self.batched:
            # Stepped together with the others, after every request had its turn here.
            running.ready = self._prefilled(running) and not running.finished
        elif self._prefilled(running) and not running.finished:
            self._guarded(running, self._step)

    def _guarded(self, running: _Running, work: Callable[[_Running], None]) -> None:
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

    def _step_batch(self, ready: list[_Running]) -> None:
        """One batched speculative step for every ready request. If it fails, each request
        is put back as it was and stepped alone, so a failure stays with its own request."""
        # Batched drafting runs the draft model itself; another proposer drafts alone, unless
        # it can pick each position's token inside the batched loop (``choose``).
        choose = None if self.proposer is propose else getattr(self.proposer, "choose", None)
        if len(ready) <= 1 or (self.proposer is not propose and choose is None):
            for running in ready:
                self._guarded(running, self._step)
            return
        states = [r.state for r in ready if r.state is not None]
        gammas = [self._gamma(r, batch=len(ready)) for r in ready]
        saved = [(len(s.tokens), s.target.length, s.draft.length, s.generator.get_state())
                 for s in states]
        start_ns = time.time_ns()
        try:
            started = time.perf_counter()
            results = speculative_step_batch(states, gammas, self.draft, self.target, choose)
            self.step_costs.observe(gammas, time.perf_counter() - started)
        except Exception:
            log.warning("batched step failed; stepping its requests one by one", exc_info=True)
            for state, (tokens, target_length, draft_length, rng) in zip(states, saved,
                                                                          strict=True):
                del state.tokens[tokens:]
                state.target.rollback(min(target_length, state.target.length))
                state.draft.rollback(min(draft_length, state.draft.length))
                state.generator.set_state(rng)
            for running, gamma in zip(ready, gammas, strict=True):
                self._guarded(running, functools.partial(self._step, gamma=gamma))
            return
        self._last_gamma = max(gammas)
        for running, result in zip(ready, results, strict=True):
            self._record(running, result, start_ns)
            self._guarded(running, functools.partial(self._emit, result=result))

    @staticmethod
    def _prefilled(running: _Running) -> bool:
        return (
            running.state is not None
            and running.prefilled >= len(running.prepared.prompt_ids) - 1
        )

    def _prefill(self, running: _Running) -> None:
        """Cache every prompt token but the last, which the first step feeds: the next chunk
        of them (``prefill_chunk``) per call, the first call also taking the cache slots."""
        if running.state is None:
            self._start_sequences(running)
        state = running.state
        assert state is not None
        end = len(running.prepared.prompt_ids) - 1
        chunk = self.config.prefill_chunk or end
        begin, stop = running.prefilled, min(end, running.prefilled + chunk)
        if begin >= stop:  # a one-token prompt: the first step feeds it
            return
        if running.draft_prefill is None:
            running.draft_prefill = self._drafts_from_the_start(running, end)
        timeline = running.handle.timeline
        start = time.time_ns()
        state.target.forward(state.tokens[begin:stop], num_logits=1)  # the logits are not needed
        middle = time.time_ns()
        timeline.target_prefill_ns = (timeline.target_prefill_ns[0] or start, middle)
        # A draft that will propose from the first step is prefilled with the target, chunk by
        # chunk (else its first step would feed it the whole prompt alone, stalling the batch).
        if running.draft_prefill:
            state.draft.forward(state.tokens[begin:stop], num_logits=1)
            done = time.time_ns()
            timeline.draft_prefill_ns = (timeline.draft_prefill_ns[0] or middle, done)
        running.prefilled = stop

    def _start_sequences(self, running: _Running) -> None:
        prompt = list(running.prepared.prompt_ids)
        seed = running.request.sampling.seed
        generator = torch.Generator(device=self.pair.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
        target = self.target.new_sequence()
        try:
            draft = self.draft.new_sequence()
        except BaseException:
            target.release()
            raise
        state = SequenceState(
            tokens=prompt,
            target=target,
            draft=draft,
            sampling=running.request.sampling,
            generator=generator,
            proposer=self.proposer,
        )
        running.state = state

    def _drafts_from_the_start(self, running: _Running, prompt: int) -> bool:
        """Whether the draft should see the prompt: always for a fixed γ > 0, never for γ = 0;
        with adaptive γ, only if drafting over the whole output is expected to pay for it (at
        the batch running now). A draft left out catches up if γ turns positive later."""
        if running.adaptive is None:
            return self._max_gamma(running.request) > 0
        remaining = running.prepared.max_new_tokens
        if _plans_alone(running.request):
            return running.adaptive.would_draft(catch_up=prompt, remaining=remaining)
        batch = max(1, len(self._running)) if self.batched else 1  # else stepped one by one
        return running.adaptive.would_draft(
            batch, self.step_costs.overhead(batch), catch_up=prompt, remaining=remaining
        )

    def _gamma(self, running: _Running, batch: int = 1) -> int:
        state = running.state
        assert state is not None
        # Never emit past max_new_tokens: a step emits up to γ+1 tokens (gpt-fast's clamp).
        # prompt + max_new_tokens <= context window, so this also keeps the caches inside it.
        remaining = running.prepared.max_new_tokens - len(running.output)
        if running.adaptive is not None:
            # What the draft must be fed alone before it drafts (a short lag rides along).
            lag = len(state.tokens) - state.draft.length
            catch_up = lag - 1 if lag > CATCH_UP_IN_BATCH else 0
            if _plans_alone(running.request):  # only its own history may decide its γ
                gamma = running.adaptive.next_gamma(1, catch_up=catch_up, remaining=remaining)
            else:
                gamma = running.adaptive.next_gamma(
                    batch, self.step_costs.overhead(batch), catch_up=catch_up, remaining=remaining
                )
        else:
            gamma = self._max_gamma(running.request)
        return max(0, min(gamma, remaining - 1))

    def _step(self, running: _Running, gamma: int | None = None) -> None:
        assert running.state is not None
        gamma = self._gamma(running) if gamma is None else gamma
        self._last_gamma = gamma
        start_ns = time.time_ns()
        started = time.perf_counter()
        result = speculative_step(running.state, gamma)
        self.step_costs.observe([gamma], time.perf_counter() - started)
        self._record(running, result, start_ns)
        self._emit(running, result)

    def _emit(self, running: _Running, result: StepResult) -> None:
        """Hand the step's tokens to the caller, stopping at EOS, a stop string or the length."""
        finish: FinishReason | None = None
        emitted: list[int] = []
        for token in result.emitted:
            emitted.append(token)
            running.output.append(token)
            if token in self.pair.eos_token_ids:
                finish = FinishReason.EOS
            elif running.detokenizer.add(token):
                finish = FinishReason.STOP
            elif len(running.output) >= running.prepared.max_new_tokens:
                finish = FinishReason.LENGTH
            if finish is not None:
                break
        usage = running.handle.usage
        usage.completion_tokens = len(running.output)
        text = running.detokenizer.delta(final=finish is not None)
        if finish is None:
            running.handle._put(Chunk(tuple(emitted), text))
        else:
            running.handle._put(Chunk(tuple(emitted), text, finish, usage))
            self._finish(running, _END)

    def _record(self, running: _Running, result: StepResult, start_ns: int) -> None:
        usage = running.handle.usage
        usage.target_forward_passes += 1
        usage.draft_tokens += result.num_drafted
        usage.accepted_draft_tokens += result.num_accepted
        for position in range(result.num_drafted):
            if position >= len(usage.drafted_by_position):
                usage.drafted_by_position.append(0)
                usage.accepted_by_position.append(0)
            usage.drafted_by_position[position] += 1
            usage.accepted_by_position[position] += position < result.num_accepted
        if running.adaptive is not None:
            running.adaptive.observe(result.num_drafted, result.num_accepted)
        self.acceptance.observe(result.num_drafted, result.num_accepted)
        running.handle.timeline.steps.append(
            StepRecord(
                start_ns=start_ns,
                gamma=result.num_drafted,
                accepted=result.num_accepted,
                emitted=len(result.emitted),
                draft_s=result.draft_seconds,
                verify_s=result.verify_seconds,
            )
        )

    def _finish(self, running: _Running, item: Any) -> None:
        running.finished = True
        running.ready = False
        if running.state is not None:
            running.state.target.release()
            running.state.draft.release()
        running.handle.timeline.finished_ns = time.time_ns()
        running.handle._put(item)
        if item is not _END:
            running.handle._put(_END)
        with self._cond:
            if running in self._running:
                self._running.remove(running)
                self._reserved -= running.reservation

    def _die(self, err: BaseException) -> None:
        self.failed = err
        with self._cond:
            everyone = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            self._reserved = 0
        for running in everyone:
            if running.state is not None:  # best effort: the process is about to exit
                with contextlib.suppress(Exception):
                    running.state.target.release()
                    running.state.draft.release()
            running.handle._put(EngineFailedError("the device worker has stopped"))
            running.handle._put(_END)
        for callback in self.on_fatal:
            callback(err)


def _milliseconds(seconds_by_tokens: dict[int, float]) -> str:
    return ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in sorted(seconds_by_tokens.items()))


def _plans_alone(request: GenerationRequest) -> bool:
    """A seeded sample's γ sequence decides which random draws it makes, so its γ must depend
    on nothing but the request: not the server's recent acceptance, not the batch it shares,
    not the step times measured while others ran (:class:`~decoding.adaptive.StepCosts`).
    Greedy output is the same at any γ, and an unseeded sample promises no repeatability."""
    return not request.sampling.greedy and request.sampling.seed is not None


def load_engine(
    target: str,
    draft: str,
    config: EngineConfig,
    *,
    device: str = "auto",
    dtype: str = "auto",
    draft_dtype: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Engine:
    """Load the pair, measure its costs (which also warms both models up), start the worker."""
    from decoding.models import load_pair

    pair = load_pair(
        target, draft, device=device, dtype=dtype, draft_dtype=draft_dtype,
        cache_dir=cache_dir, progress=progress,
    )
    return Engine(pair, config)
