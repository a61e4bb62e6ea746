"""The engine: admission, a worker thread that owns the device, and per-request streams.

``Engine.submit(request)`` (or ``await Engine.submit_async(request)`` on an event loop)
validates and admits a request at once (or raises), and returns a
:class:`RequestHandle`, an async iterator of :class:`~decoding.params.Chunk`. One worker thread
runs every forward pass, so the asyncio loop is never blocked by the device: each round it
prefills the next chunk of new prompts and takes one speculative step per running request
(all of them in one batched step on the fast path), through a :class:`~decoding.stepper.Stepper`.
Cancelling a handle (``aclose``) frees the request's caches before its next step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from decoding.adaptive import (
    AcceptanceEstimate,
    CostModel,
    StepCosts,
    batch_sizes,
    measure_costs,
)
from decoding.detokenize import IncrementalDetokenizer
from decoding.errors import (
    DeadlineExceededError,
    EngineFailedError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)
from decoding.handle import _END, RequestHandle, delivered_together
from decoding.models import ModelPair
from decoding.params import GenerationRequest
from decoding.runner import ModelRunner
from decoding.speculative import Proposer, propose
from decoding.stepper import RunningRequest, Stepper
from decoding.validation import Limits, PreparedRequest, input_field, prepare, prompt_ids_of

log = logging.getLogger(__name__)

_T = TypeVar("_T")

TOKENIZING_THREADS = 2
"""Prompts :meth:`Engine.submit_async` tokenizes at once. A fast tokenizer releases the GIL, so
each takes a core beside the device worker; more calls wait their turn off the event loop."""


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
    # How the fast path attends: "matmul", "sdpa" or "flex" (FlexAttention, compiled; not yet
    # timed on a GPU); None: "matmul" on CUDA, "sdpa" elsewhere.
    attention: str | None = None
    # Prompt tokens prefilled per request per scheduling round; a longer prompt is prefilled over
    # several rounds, between which the running requests take their steps (0 = all at once).
    prefill_chunk: int = 512
    # Steps with γ = 0 (speculation off, or adaptive γ at 0) taken at once: each target forward
    # is fed the last one's token on the device and the host reads them back together, so it
    # does not hold the device up between tokens (as vLLM's multi-step scheduling). Tokens then
    # stream in groups of this many; a request's first token is never held back. None: 4 with
    # CUDA graphs on the fast path, else 1.
    decode_steps: int | None = None


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
    preparing: int = 0  # calls being tokenized (Engine.submit_async), not yet admitted


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
        if config.decode_steps is not None and config.decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {config.decode_steps}")
        from decoding.fast.model import ATTENTIONS

        if config.attention is not None and config.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)} or None, "
                             f"got {config.attention!r}")
        self.pair = pair
        self.config = config
        context_window = min(pair.target.context_window, pair.draft.context_window)
        self.batched = self._use_fast_path(pair, config)
        self.target: Any
        self.draft: Any
        if self.batched:
            from decoding.fast import StaticRunner
            from decoding.fast.runner import GRAPH_LAST_ONLY_WIDTHS

            context_window = min(context_window, config.max_context)
            # Room for a verify step (γ+1) and the padding of a batched draft catch-up.
            slot_len = context_window + config.max_speculative_tokens + 2
            slot_len = -(-slot_len // 128) * 128  # aligned: odd lengths get slow matmul kernels
            graphs = pair.device.type == "cuda"
            compile_ = graphs if config.compile is None else config.compile
            # One CUDA graph per shape a step uses: every batch size up to the concurrency limit
            # (padded to a power of two), the target at every verify width, the draft at one
            # token and at a two-token catch-up, and for one request alone at catch-ups of up
            # to 32 tokens. Both models also have last-only graphs for prefills and longer
            # catch-ups (GRAPH_LAST_ONLY_WIDTHS). Other shapes run eagerly.
            batches = batch_sizes(config.max_concurrent_requests)
            verify_widths = tuple(range(1, config.max_speculative_tokens + 2))
            self.target = StaticRunner(
                pair.target.model, config.max_concurrent_requests, slot_len, cuda_graphs=graphs,
                graph_batch_sizes=batches, graph_widths=verify_widths,
                graph_last_only_widths=GRAPH_LAST_ONLY_WIDTHS, compile=compile_,
                attention=config.attention,
            )
            self.draft = StaticRunner(
                pair.draft.model, config.max_concurrent_requests, slot_len, cuda_graphs=graphs,
                graph_batch_sizes=batches, graph_widths=(1, 2),
                graph_catch_up_widths=(4, 8, 16, 32),
                graph_last_only_widths=GRAPH_LAST_ONLY_WIDTHS, compile=compile_,
                attention=config.attention,
            )
        else:
            self.target = ModelRunner(pair.target.model)
            self.draft = ModelRunner(pair.draft.model)
        self.costs = costs or measure_costs(
            self.target, self.draft, config.max_speculative_tokens,
            max_batch=config.max_concurrent_requests if self.batched else 1,
            # The draft fed 64 tokens at once, after measure_costs' 32 of context: must fit.
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
        self.stepper = Stepper(
            target=self.target,
            draft=self.draft,
            batched=self.batched,
            costs=self.costs,
            device=pair.device,
            eos_token_ids=pair.eos_token_ids,
            default_gamma=config.num_speculative_tokens,
            max_gamma=config.max_speculative_tokens,
            prefill_chunk=config.prefill_chunk,
            proposer=proposer,
            finish=self._finish,
            running_count=lambda: len(self._running),
            decode_steps=config.decode_steps or (
                4 if self.batched and getattr(self.target, "graphs", None) is not None else 1
            ),
        )
        self._cond = threading.Condition()
        self._running: list[RunningRequest] = []
        self._waiting: collections.deque[RunningRequest] = collections.deque()
        self._reserved = 0
        self._stopping = False  # no new calls (a drain, or close)
        self._admitting = True  # False once the drain ended or the engine closed
        self._preparing = 0  # calls of submit_async being tokenized, admitted after
        self._tokenizing = threading.BoundedSemaphore(TOKENIZING_THREADS)
        self.failed: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="tandem-device-worker", daemon=True)
        self._worker.start()

    @property
    def proposer(self) -> Proposer:
        """Who drafts for new requests: the draft model, or a benchmark's proposer."""
        return self.stepper.proposer

    @proposer.setter
    def proposer(self, proposer: Proposer) -> None:
        self.stepper.proposer = proposer

    @property
    def acceptance(self) -> AcceptanceEstimate:
        """The server's recent acceptance, the prior of each new request's adaptive γ."""
        return self.stepper.acceptance

    @property
    def step_costs(self) -> StepCosts:
        """What steps really cost against the cost model (read and written by the worker)."""
        return self.stepper.step_costs

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
        ShuttingDownError or EngineFailedError at once instead of queueing without bound.
        Tokenizes the prompt on the calling thread: on an event loop, use :meth:`submit_async`."""
        self._check_accepting()
        return self._admit(request, prepare(request, self.pair.tokenizer, self.limits))

    async def submit_async(self, request: GenerationRequest) -> RequestHandle:
        """:meth:`submit`, with the validation and tokenizing in a worker thread: a prompt of
        a few megabytes takes seconds to tokenize, which must not stall the caller's event
        loop (and every other call and health check on it). At most
        :data:`TOKENIZING_THREADS` prompts are tokenized at once; a call cancelled while it
        waits for its turn is not tokenized at all, and a full queue refuses a call before
        its prompt is tokenized. A call that was accepted before a drain began is admitted
        during the drain (``stats().preparing`` counts it until then)."""
        with self._preparing_call(request):
            prepared = await self._in_tokenizing_thread(
                lambda: prepare(request, self.pair.tokenizer, self.limits))
            assert prepared is not None  # None only after a cancellation, which raised
            return self._admit(request, prepared)

    @contextlib.contextmanager
    def _preparing_call(self, request: GenerationRequest) -> Iterator[None]:
        """Count a call that is about to be tokenized in ``stats().preparing`` while the block
        runs, or refuse it (ShuttingDownError, EngineFailedError, OverloadedError) before it
        is tokenized."""
        self._check_accepting()
        with self._cond:
            self._admit_locked()  # cancelled waiters out of the count
            # The calls being tokenized are on their way to the same places: a burst must not
            # all pass this check, each be tokenized, and then be refused. A free slot is a
            # place only while nobody of the same priority or a more urgent one waits for it
            # (a waiter held back by the KV budget, or a budget spent, keeps new calls out of
            # the free slots).
            budget = self.config.kv_token_budget
            free = 0 if not self._may_pass_locked(request) or (
                budget and self._reserved >= budget) else max(
                0, self.config.max_concurrent_requests - len(self._running)
            )
            if len(self._waiting) + self._preparing >= self.config.max_queue + free:
                raise self._overloaded_locked()
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify_all()

    async def _in_tokenizing_thread(self, work: Callable[[], _T]) -> _T | None:
        """``work()`` in a worker thread once one of the :data:`TOKENIZING_THREADS` is free;
        never run (None) for a caller cancelled while it waited for one."""
        skip = threading.Event()

        def run() -> _T | None:
            with self._tokenizing:
                return None if skip.is_set() else work()

        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            skip.set()
            raise

    async def tokenize_async(self, request: GenerationRequest) -> tuple[int, ...]:
        """The token ids ``request``'s input becomes, as :meth:`submit_async` would feed them
        (chat template and truncation included, no limit on the length), without generating:
        tokenized in a worker thread, one of the :data:`TOKENIZING_THREADS`. Raises
        InvalidRequestError for its input. It shares those threads with the calls that
        generate, so it is refused and counted as one of them is before it is tokenized
        (OverloadedError with the queue full, ShuttingDownError once a drain began)."""
        with self._preparing_call(request):
            ids = await self._in_tokenizing_thread(
                lambda: prompt_ids_of(request, self.pair.tokenizer, self.limits))
        assert ids is not None  # None only after a cancellation, which raised
        return ids

    def _check_accepting(self) -> None:
        if self.failed is not None:
            raise EngineFailedError("the device worker has stopped")
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")

    def _admit(self, request: GenerationRequest, prepared: PreparedRequest) -> RequestHandle:
        """Start ``request`` now, queue it, or raise OverloadedError (on the caller's loop).
        Once the drain has ended (``abort_all``) or the engine closed, it is refused."""
        if self.failed is not None:
            raise EngineFailedError("the device worker has stopped")
        if not self._admitting:
            raise ShuttingDownError("the server is shutting down")
        gamma = self.stepper.gamma_limit(request)
        reservation = len(prepared.prompt_ids) + prepared.max_new_tokens + gamma + 1
        budget = self.config.kv_token_budget
        if budget and reservation > budget:
            if request.max_new_tokens is not None:
                raise InvalidRequestError(
                    "max_new_tokens",
                    f"the request needs {reservation} KV cache positions (prompt + "
                    f"max_new_tokens + γ + 1) but the server's budget is {budget}",
                )
            # The default max_new_tokens, as at the context window, is what the budget leaves.
            room = budget - len(prepared.prompt_ids) - gamma - 1
            if room < 1:
                raise InvalidRequestError(
                    input_field(request),
                    f"prompt has {len(prepared.prompt_ids)} tokens; with γ + 1 = {gamma + 1} "
                    f"more that leaves no room to generate in the server's KV budget of "
                    f"{budget} positions",
                )
            if request.min_new_tokens > room:
                raise InvalidRequestError(
                    "min_new_tokens",
                    f"must be at most {room}, what the server's KV budget of {budget} "
                    f"positions leaves after the prompt and γ + 1, got {request.min_new_tokens}",
                )
            prepared = dataclasses.replace(prepared, max_new_tokens=room)
            reservation = budget
        handle = RequestHandle(request.request_id, len(prepared.prompt_ids), self._wake)
        running = RunningRequest(
            request=request,
            prepared=prepared,
            handle=handle,
            reservation=reservation,
            detokenizer=IncrementalDetokenizer(self.pair.tokenizer, request.stop,
                                               request.include_stop_str_in_output),
            adaptive=self.stepper.adaptive_for(request),
            prompt_logprobs=None if request.prompt_logprobs is None else [],
        )
        with self._cond:
            # Again, under the lock the worker's death and the drain's end take: either may
            # have come since the check above, and a request queued after it is never ended.
            if self.failed is not None:
                raise EngineFailedError("the device worker has stopped")
            if not self._admitting:
                raise ShuttingDownError("the server is shutting down")
            self._admit_locked()  # earlier waiters first, and cancelled ones out of the count
            if self._may_pass_locked(request) and self._fits_locked(running):
                self._start_locked(running)  # before the queue, which may be full
            elif len(self._waiting) < self.config.max_queue:
                self._enqueue_locked(running)
            else:
                raise self._overloaded_locked()
            self._cond.notify()
        return handle

    def _may_pass_locked(self, request: GenerationRequest) -> bool:
        """Whether ``request`` may start before every waiter: none waits, or it is more
        urgent (a lower priority value) than the head of the queue, as waiters start in order
        of priority (a waiter the KV budget holds back is passed by a more urgent request
        that fits)."""
        return not self._waiting or request.priority < self._waiting[0].request.priority

    def _enqueue_locked(self, running: RunningRequest) -> None:
        """Queue ``running`` after every waiter of its priority or a more urgent one (a lower
        value), before the others."""
        priority = running.request.priority
        place = len(self._waiting)
        while place and self._waiting[place - 1].request.priority > priority:
            place -= 1
        self._waiting.insert(place, running)

    def _overloaded_locked(self) -> OverloadedError:
        return OverloadedError(
            f"{len(self._running)} requests running and {len(self._waiting)} waiting",
            retry_after_s=1.0,
        )

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                running=len(self._running),
                waiting=sum(not _dropped(running) for running in self._waiting),
                live_target_sequences=self.target.live_sequences,
                live_draft_sequences=self.draft.live_sequences,
                reserved_tokens=self._reserved,
                last_gamma=self.stepper.last_gamma,
                preparing=self._preparing,
            )

    def stop_accepting(self) -> None:
        self._stopping = True

    def abort_all(self, err: BaseException) -> None:
        """End every request with ``err`` at its next step (shutdown after the grace period),
        and refuse the calls still being tokenized."""
        with self._cond:
            self._admitting = False
            for running in [*self._running, *self._waiting]:
                running.handle.abort_error = err
            self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker."""
        with self._cond:
            self._stopping = True
            self._admitting = False
            for running in [*self._running, *self._waiting]:
                running.handle.cancelled = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _fits_locked(self, running: RunningRequest) -> bool:
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
                        if self._running or self._done_locked():
                            break
                        self._cond.wait()
                    if not self._running and self._done_locked():
                        return
                    batch = list(self._running)
                if not self.batched:
                    for running in batch:
                        self._advance(running)
                    continue
                with delivered_together():  # one step's chunks, every caller woken once
                    for running in batch:
                        self._advance(running)
                    live = [r for r in batch if not r.finished]
                    self.stepper.prefill_batch([r for r in live if not r.is_prefilled])
                    for running in live:
                        # Asked again: the batched prefill takes time, in which a call may go.
                        if not running.finished and (end := self._ending(running)) is not None:
                            self._finish(running, end)
                        running.ready = running.is_prefilled and not running.finished
                    self.stepper.step_batch([r for r in batch if r.ready])
        except BaseException as err:  # the worker itself broke: nothing can be served any more
            log.critical("device worker died", exc_info=True)
            self._die(err)

    def _done_locked(self) -> bool:
        """Whether the worker may stop: no new calls, none waiting, and none being tokenized
        that could still be admitted."""
        return self._stopping and not self._waiting and not (self._preparing and self._admitting)

    def _admit_locked(self) -> None:
        """End the waiters that were cancelled or aborted or whose deadline passed, wherever
        they are in the queue (they must not count against ``max_queue``), then start waiters
        in order while the first one fits. (While any wait, requests run, and the worker
        comes here every round.)"""
        if any(_dropped(running) for running in self._waiting):
            kept: collections.deque[RunningRequest] = collections.deque()
            for running in self._waiting:
                end = self._ending(running)
                if end is None:
                    kept.append(running)
                    continue
                running.handle._put(end)
                if end is not _END:
                    running.handle._put(_END)
            self._waiting = kept
        while self._waiting and self._fits_locked(self._waiting[0]):
            self._start_locked(self._waiting.popleft())

    def _start_locked(self, running: RunningRequest) -> None:
        running.handle.timeline.admitted_ns = time.time_ns()
        self._running.append(running)
        self._reserved += running.reservation

    def _advance(self, running: RunningRequest) -> None:
        """Check the request is still wanted; stepped one by one, prefill its next chunk and
        step it (a batching engine prefills and steps this round's requests together after
        every one had its turn here)."""
        end = self._ending(running)
        if end is not None:
            return self._finish(running, end)
        if self.batched:  # prefilled together (Stepper.prefill_batch), then stepped together
            return None
        stepper = self.stepper
        if not running.is_prefilled:
            stepper.guarded(running, stepper.prefill)
        if running.is_prefilled and not running.finished:
            stepper.guarded(running, stepper.step)

    @staticmethod
    def _ending(running: RunningRequest) -> Any:
        """How ``running`` ends now, if it is no longer wanted (cancelled, aborted, past its
        deadline): the item to end it with; else None."""
        if running.handle.cancelled:
            return _END
        if running.handle.abort_error is not None:
            return running.handle.abort_error
        deadline = running.request.deadline
        if deadline is not None and time.monotonic() > deadline:
            return DeadlineExceededError("the deadline passed")
        return None

    def _finish(self, running: RunningRequest, item: Any) -> None:
        """End ``running`` with ``item`` (its last chunk, an error, or just the end marker).
        Its caches and its place are given back before the item goes out, so a caller that
        has read its last chunk never finds itself still counted (and a call it makes next
        refused), and in the same step, so a drain that sees no request running has every
        last item already put (in a batched round, held until the round ends: see
        :func:`~decoding.handle.delivered_together`; the server's drain also waits for its
        calls to end)."""
        running.finished = True
        running.ready = False
        if running.state is not None:
            running.state.target.release()
            running.state.draft.release()
        running.handle.timeline.finished_ns = time.time_ns()
        with self._cond:  # one step: a drain never sees it gone before its last item is out
            if running in self._running:
                self._running.remove(running)
                self._reserved -= running.reservation
            running.handle._put(item)
            if item is not _END:
                running.handle._put(_END)

    def _die(self, err: BaseException) -> None:
        with self._cond:  # a call being admitted sees it or is among everyone below
            self.failed = err
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


def _dropped(running: RunningRequest) -> bool:
    """Whether a waiter is no longer wanted (see :meth:`Engine._ending`)."""
    return Engine._ending(running) is not None


def _milliseconds(seconds_by_tokens: dict[int, float]) -> str:
    return ", ".join(f"{k}: {v * 1e3:.1f}" for k, v in sorted(seconds_by_tokens.items()))


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
