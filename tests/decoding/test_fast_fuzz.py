"""Stateful fuzzing of the fast path's :class:`StaticRunner` against transformers.

Hypothesis drives a runner of a few slots through random operations: new sequences, one
sequence's forwards (a prefill, a decode step, a catch-up of several tokens, as host lists or a
long tensor), several sequences at once (``forward_batch``/``forward_packed``, ragged widths,
``num_logits`` per row, tokens as lists or a [B, T] tensor with ``lengths``, ``transient``
results), rollbacks, releases and slot reuse, and calls the runner documents as invalid
(which must raise and change nothing). After every forward each row's logits must equal
transformers' for that sequence's whole history, recomputed without a cache. The runner is
the eager one, and the stand-in CUDA graphs of tests/decoding/test_batched.py (padding of
batch sizes and widths, attended-length buckets, catch-up replays) with and without
catch-up widths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from transformers import Qwen2ForCausalLM

from decoding.fast.cache import CacheFullError
from decoding.fast.runner import StaticRunner, StaticSequence
from tests.decoding.test_batched import VOCAB, graphed_runner, qwen2
from tests.decoding.test_fast import one_thread, reference_logits  # noqa: F401 (autouse fixture)

SLOTS = 3
MAX_LEN = 64  # also the widest attended-length bucket of graphed_runner's stand-in graphs
MAX_FEED = 24  # one sequence's widest forward: a prefill, or a catch-up beyond 4 x 4 replays
MAX_BATCH_WIDTH = 8
ATOL = 1e-5  # tests/decoding/test_fast.py's parity tolerance (float32, rtol 0)

FUZZ = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

RUNNERS: dict[str, Callable[[Qwen2ForCausalLM], StaticRunner]] = {
    "eager": lambda model: StaticRunner(model, num_slots=SLOTS, max_len=MAX_LEN),
    "graphed": lambda model: graphed_runner(model, SLOTS, MAX_LEN),
    "graphed-catch-up": lambda model: graphed_runner(model, SLOTS, MAX_LEN, catch_up=(4,)),
}


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return qwen2(0)


def token_lists(n: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)


@dataclass
class Live:
    sequence: StaticSequence
    history: list[int] = field(default_factory=list)

    @property
    def room(self) -> int:
        return MAX_LEN - self.sequence.length


class RunnerMachine(RuleBasedStateMachine):
    def __init__(self, model: Qwen2ForCausalLM, make: Callable[[Qwen2ForCausalLM], StaticRunner]
                 ) -> None:
        super().__init__()
        self.model = model
        self.runner = make(model)
        self.live: list[Live] = []
        self.released: list[StaticSequence] = []

    # -- helpers ----------------------------------------------------------------------------

    def _check(self, rows: list[Live], fed: list[list[int]], keeps: list[int],
               logits: list[torch.Tensor]) -> None:
        """Extend each row's history by what it was fed, then compare its logits with
        transformers' for its last ``keep`` positions (before the runner's next forward)."""
        assert len(logits) == len(rows)
        for live, tokens, keep, got in zip(rows, fed, keeps, logits, strict=True):
            live.history.extend(tokens)
            assert live.sequence.length == len(live.history)
            expected = reference_logits(self.model, live.history)[-keep:]
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)

    def _with_room(self) -> list[Live]:
        return [live for live in self.live if live.room > 0]

    @staticmethod
    def _tensor(data: st.DataObject, rows: list[list[int]], width: int) -> torch.Tensor:
        """``rows`` as one [B, width] long tensor, padded at the end with arbitrary valid ids,
        contiguous or a strided view of a wider one."""
        padded = [row + data.draw(token_lists(width - len(row)), label="padding") for row in rows]
        if data.draw(st.booleans(), label="strided"):
            wide = torch.zeros(len(rows), 2 * width, dtype=torch.long)
            wide[:, ::2] = torch.tensor(padded)
            return wide[:, ::2]
        return torch.tensor(padded, dtype=torch.long)

    # -- rules ------------------------------------------------------------------------------

    @initialize(data=st.data())
    def open_with_prompts(self, data: st.DataObject) -> None:
        """Start with every slot taken, each sequence prefilled with a prompt (or empty)."""
        for _ in range(SLOTS):
            self.new_sequence()
            live = self.live[-1]
            count = data.draw(st.integers(0, MAX_FEED), label="prompt length")
            if count:
                prompt = data.draw(token_lists(count), label="prompt")
                self._check([live], [prompt], [count], [live.sequence.forward(prompt)])

    @precondition(lambda self: len(self.live) < SLOTS)
    @rule()
    def new_sequence(self) -> None:
        sequence = self.runner.new_sequence()
        assert sequence.length == 0 and sequence.slot not in {
            live.sequence.slot for live in self.live
        }
        self.live.append(Live(sequence))

    @precondition(lambda self: len(self.live) == SLOTS)
    @rule()
    def no_free_slot(self) -> None:
        with pytest.raises(CacheFullError):
            self.runner.new_sequence()

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        live = self.live.pop(data.draw(st.integers(0, len(self.live) - 1), label="row"))
        live.sequence.release()
        assert live.sequence.slot is None
        live.sequence.release()  # idempotent
        self.released.append(live.sequence)

    @precondition(lambda self: bool(self.released))
    @rule(data=st.data())
    def forward_released(self, data: st.DataObject) -> None:
        sequence = data.draw(st.sampled_from(self.released), label="released")
        with pytest.raises(RuntimeError, match="released"):
            sequence.forward([1])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.live), label="row")
        cached = live.sequence.length
        # Mostly a few tokens back, as after rejected drafts; sometimes anywhere.
        length = data.draw(
            st.one_of(st.integers(max(cached - 5, 0), cached), st.integers(0, cached)),
            label="length",
        )
        live.sequence.rollback(length)
        del live.history[length:]
        assert live.sequence.length == length

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def rollback_too_far(self, data: st.DataObject) -> None:
        live = data.draw(st.sampled_from(self.live), label="row")
        beyond = data.draw(
            st.one_of(st.integers(-3, -1), st.integers(live.sequence.length + 1, MAX_LEN + 2)),
            label="length",
        )
        with pytest.raises(ValueError, match="roll back"):
            live.sequence.rollback(beyond)

    @precondition(lambda self: bool(self._with_room()))
    @rule(data=st.data())
    def forward_one(self, data: st.DataObject) -> None:
        """One sequence: a prefill, a decode step or a catch-up; host list or 1-D tensor."""
        live = data.draw(st.sampled_from(self._with_room()), label="row")
        most = min(live.room, MAX_FEED)
        # Often a decode step or a catch-up (several tokens, one logit: graph replays).
        count = data.draw(st.one_of(st.integers(1, min(most, 4)), st.integers(1, most)),
                          label="count")
        tokens = data.draw(token_lists(count), label="tokens")
        keep = data.draw(st.one_of(st.just(1), st.none(), st.integers(1, count)),
                         label="num_logits")
        fed: list[int] | torch.Tensor = tokens
        if data.draw(st.booleans(), label="as tensor"):
            fed = self._tensor(data, [tokens], count)[0]
        logits = live.sequence.forward(fed, num_logits=keep)
        self._check([live], [tokens], [count if keep is None else keep], [logits])

    @precondition(lambda self: bool(self._with_room()))
    @rule(data=st.data())
    def forward_several(self, data: st.DataObject) -> None:
        """Some sequences (any order) in one forward: ragged rows, num_logits per row."""
        candidates = self._with_room()
        picks = data.draw(
            st.lists(st.integers(0, len(candidates) - 1), min_size=1,
                     max_size=len(candidates), unique=True),
            label="rows",
        )
        rows = [candidates[i] for i in picks]
        # Every row's padding is written past its length: all need room for the widest.
        width = data.draw(
            st.integers(1, min(MAX_BATCH_WIDTH, *(live.room for live in rows))), label="width"
        )
        counts = [data.draw(st.integers(1, width), label="count") for _ in rows]
        counts[data.draw(st.integers(0, len(rows) - 1), label="widest row")] = width
        keeps = [data.draw(st.integers(1, count), label="num_logits") for count in counts]
        tokens = [data.draw(token_lists(count), label="tokens") for count in counts]
        sequences = [live.sequence for live in rows]
        uniform = all(count == width for count in counts)
        how = data.draw(
            st.sampled_from(["forward_batch", "packed", "tensor"] + ["batch tensor"] * uniform),
            label="how",
        )
        transient = data.draw(st.booleans(), label="transient")
        logits: list[torch.Tensor]
        if how == "forward_batch":
            logits = self.runner.forward_batch(sequences, tokens, keeps)
        elif how == "batch tensor":
            logits = self.runner.forward_batch(sequences, self._tensor(data, tokens, width), keeps)
        else:
            fed: list[list[int]] | torch.Tensor = tokens
            lengths = None
            if how == "tensor":
                fed = self._tensor(data, tokens, width)
                if not uniform or data.draw(st.booleans(), label="explicit lengths"):
                    lengths = counts
            packed = self.runner.forward_packed(
                sequences, fed, keeps, lengths=lengths, transient=transient
            )
            assert packed.shape == (sum(keeps), VOCAB)
            logits = list(packed.split(keeps))
        self._check(rows, tokens, keeps, logits)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def invalid_forward(self, data: st.DataObject) -> None:
        """A forward the runner documents as invalid raises ValueError and changes nothing."""
        live = data.draw(st.sampled_from(self.live), label="row")
        # Neighbours with less room than this row: padded to its width, they overflow.
        tighter = [row for row in self.live if row.room < live.room]
        kinds = ["no room", "num_logits 0", "num_logits too many", "twice"]
        if tighter:
            kinds.append("neighbour without room")
        kind = data.draw(st.sampled_from(kinds), label="kind")
        runner, sequence = self.runner, live.sequence
        before = [row.sequence.length for row in self.live]
        if kind == "no room":
            with pytest.raises(ValueError, match="no room"):
                sequence.forward([1] * (live.room + 1))
        elif kind == "num_logits 0":
            with pytest.raises(ValueError, match="num_logits"):
                runner.forward_batch([sequence], [[1, 2]], [0])
        elif kind == "num_logits too many":
            with pytest.raises(ValueError, match="num_logits"):
                runner.forward_batch([sequence], [[1, 2]], [3])
        elif kind == "twice":
            with pytest.raises(ValueError, match="appears twice"):
                runner.forward_batch([sequence, sequence], [[1], [2]], [1, 1])
        else:  # a neighbour's one token, padded to this row's width, passes max_len
            neighbour = data.draw(st.sampled_from(tighter), label="neighbour")
            with pytest.raises(ValueError, match="no room"):
                runner.forward_batch(
                    [neighbour.sequence, sequence], [[1], [2] * (neighbour.room + 1)], [1, 1]
                )
        assert [row.sequence.length for row in self.live] == before

    @invariant()
    def bookkeeping(self) -> None:
        assert self.runner.live_sequences == len(self.live)
        for live in self.live:
            assert live.sequence.length == len(live.history) <= MAX_LEN

    def teardown(self) -> None:
        for live in self.live:
            live.sequence.release()
        assert self.runner.live_sequences == 0


@pytest.mark.parametrize("variant", list(RUNNERS))
def test_the_runner_equals_transformers_under_random_operations(model, variant: str) -> None:
    run_state_machine_as_test(lambda: RunnerMachine(model, RUNNERS[variant]), settings=FUZZ)
