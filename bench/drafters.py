"""Benchmark-only proposers: a drafter whose acceptance rate is chosen, at a real draft's cost.

FOR BENCHMARKS ONLY. Nothing in the service uses this module. Random-weight models (the GPU
benchmark cannot upload real weights) agree on almost nothing, so a benchmark with them would
only ever measure α ≈ 0. :class:`ControlledProposer` fixes that: it runs the draft model's
forward passes exactly as :func:`decoding.speculative.propose` does (the same catch-up of the
tokens the draft has not cached, then one one-token forward per draft position, each read back
to the host), so a step costs what a real draft's step costs, but the tokens it proposes come
from the target's known greedy continuation of the sequence, each one swapped for a wrong token
with probability ``1 - alpha``. That gives a sweep over acceptance rates at real cost.

It knows the right tokens because the target's greedy continuation of every benchmark prompt is
computed up front with the target alone (:class:`GreedyOracle`). Whatever it proposes, the
target decides every token, so Tandem's output stays the target's own greedy output; only the
number of target passes changes.

Greedy only: a sampled request needs draft probabilities, which this proposer does not have.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from decoding.speculative import SequenceState
from decoding.transfer import to_device

Continuation = Callable[[Sequence[int], int], Sequence[int] | None]
"""``continuation(tokens, n)``: the target's greedy next tokens after ``tokens`` (at most
``n``; fewer or None where they are not known)."""

Generate = Callable[[Sequence[int], int], list[int]]
"""``generate(tokens, n)``: the target alone's ``n`` greedy tokens after ``tokens``."""


@dataclass
class OracleStats:
    lookups: int = 0
    refills: int = 0  # prefixes off every known path, continued with the target alone
    refill_seconds: float = 0.0  # time spent refilling; benchmarks subtract it from wall time


class GreedyOracle:
    """The target's greedy continuations, by prefix: a :data:`Continuation`.

    ``add(prefix, continuation)`` records that the target continues ``prefix`` greedily with
    ``continuation``. A lookup finds a recorded path that the sequence follows so far and
    returns its next tokens. When the sequence has left every path (in bfloat16 the target's
    verify pass over several positions can round differently from one-position decoding and
    pick another token at a near tie), and ``generate`` is given, the oracle continues the
    sequence with the target alone for ``refill_tokens`` tokens and records that as a new path;
    the time it takes, device-synchronised, is in ``stats.refill_seconds`` so that a benchmark
    can leave it out of its timings.
    """

    def __init__(self, generate: Generate | None = None, refill_tokens: int = 32) -> None:
        self._paths: list[tuple[int, int, tuple[int, ...], list[int]]] = []
        self._added = 0
        self._generate = generate
        self._refill_tokens = refill_tokens
        self.stats = OracleStats()

    def add(
        self, prefix: Sequence[int], continuation: Sequence[int], *, first: bool = False
    ) -> None:
        """Record a path. Lookups try longer prefixes first (a refilled path is more specific
        than its prompt's) and, among prefixes of one length, ``first`` paths before the rest,
        then the order they were added: where two recorded paths of one prompt part (two ways
        of computing the same greedy continuation that round differently), the preferred one
        is followed."""
        self._added += 1
        order = -self._added if first else self._added
        self._paths.append((len(prefix), order, tuple(prefix), list(continuation)))
        self._paths.sort(key=lambda path: (-path[0], path[1]))

    def __call__(self, tokens: Sequence[int], n: int) -> Sequence[int] | None:
        self.stats.lookups += 1
        tokens = list(tokens)
        for size, _, prefix, continuation in self._paths:
            done = len(tokens) - size
            if (
                0 <= done < len(continuation)
                and tuple(tokens[:size]) == prefix
                and tokens[size:] == continuation[:done]
            ):
                return continuation[done : done + n]
        if self._generate is None:
            return None
        # The engine's own queued work finishes first, outside the refill's time (which the
        # benchmark subtracts): the engine no longer waits for the device inside a step.
        _synchronize()
        started = time.perf_counter()
        continuation = self._generate(tokens, max(n, self._refill_tokens))
        _synchronize()
        self.stats.refills += 1
        self.stats.refill_seconds += time.perf_counter() - started
        self.add(tokens, continuation)
        return continuation[:n]


@dataclass
class ProposerStats:
    steps: int = 0
    proposed: int = 0
    replaced: int = 0  # tokens deliberately made wrong
    unknown: int = 0  # positions whose right token was not known (proposed at random)
    seconds: float = 0.0


@dataclass
class ControlledProposer:
    """A :data:`decoding.speculative.Proposer` with a chosen acceptance rate (benchmarks only).

    Each proposed token is the target's greedy token with probability ``alpha`` and otherwise a
    uniformly drawn other id, from this proposer's own seeded generator; the draft model's
    forward passes run as they would for a real draft. With ``alpha = 1`` every draft token is
    accepted, with ``alpha = 0`` none is, and in between a draft token at position i is accepted
    with probability ``alpha ** (i + 1)`` (the first wrong token ends the accepted prefix).
    """

    continuation: Continuation
    alpha: float
    vocab_size: int
    seed: int = 0
    stats: ProposerStats = field(default_factory=ProposerStats)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.vocab_size < 2:
            raise ValueError("the vocabulary needs at least two ids to propose a wrong one")
        self._rng = random.Random(self.seed)
        self._window_key: tuple[int, int, int] | None = None
        self._window: list[int] = []  # the right tokens of the current step, by position

    def __call__(
        self, state: SequenceState, gamma: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not state.sampling.greedy:
            raise ValueError("the controlled-acceptance proposer is greedy only")
        started = time.perf_counter()
        pending = state.tokens[state.draft.length :]  # the draft's catch-up, as in propose()
        tokens: list[int] = []
        for position in range(gamma):
            logits = state.draft.forward(pending, num_logits=1)  # [1, vocab]
            logits.argmax(-1)  # the real draft's argmax, queued (it reads tokens back once)
            token = self.choose(state, position)
            tokens.append(token)
            pending = [token]
        self.stats.steps += 1
        self.stats.seconds += time.perf_counter() - started
        return to_device(tokens, state.target.device), None  # as the real draft: no wait

    def choose(self, state: SequenceState, position: int) -> int:
        """The token proposed at draft position ``position`` (0-based) of the step that starts
        at ``state.tokens``; a drafting loop that runs the draft forwards itself (a batched
        one) can call this in place of taking the draft's argmax."""
        if not state.sampling.greedy:
            raise ValueError("the controlled-acceptance proposer is greedy only")
        key = (id(state), len(state.tokens), state.tokens[-1])
        if self._window_key != key or len(self._window) <= position:
            self._window_key = key
            self._window = list(self.continuation(state.tokens, max(position + 1, 8)) or ())
        self.stats.proposed += 1
        return self._choose(self._window[position] if position < len(self._window) else None)

    def _choose(self, right: int | None) -> int:
        if right is None:
            self.stats.unknown += 1
            return self._rng.randrange(self.vocab_size)
        if self._rng.random() < self.alpha:
            return right
        self.stats.replaced += 1
        wrong = self._rng.randrange(self.vocab_size - 1)
        return wrong + 1 if wrong >= right else wrong


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
