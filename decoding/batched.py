"""One speculative step for many requests at once, on runners that batch (``forward_batch``).

The same propose -> verify -> accept -> roll back as :func:`decoding.speculative.speculative_step`,
but every draft position is one batched draft forward over the requests still drafting, and the
verification is one batched target forward over all of them, each request at its own position
with its own γ, sampling parameters and random generator. Acceptance is per request, so each
request's tokens are exactly what it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import torch

from decoding.speculative import SequenceState, StepResult, commit, draw

CATCH_UP_IN_BATCH = 2
"""A draft that lags by more tokens than this catches up alone first, so one long catch-up
does not pad every row of the batched draft forward."""


class BatchRunner(Protocol):
    def forward_batch(
        self, sequences: list, tokens: list[list[int]], num_logits: list[int]
    ) -> list[torch.Tensor]: ...


Choose = Callable[[SequenceState, int], int]
"""``choose(state, position)``: the token to propose at a draft position in place of the draft
model's own (a benchmark's controlled-acceptance proposer); the draft forwards still run."""


def speculative_step_batch(
    states: list[SequenceState],
    gammas: list[int],
    draft: BatchRunner,
    target: BatchRunner,
    choose: Choose | None = None,
) -> list[StepResult]:
    """Advance every state by 1..γ_i+1 tokens; both caches of each end holding a prefix of it."""
    start = time.perf_counter()
    drafts, probs = _propose(states, gammas, draft, choose)
    drafted = time.perf_counter()
    fed = [s.tokens[s.target.length :] + d for s, d in zip(states, drafts, strict=True)]
    target_logits = target.forward_batch(
        [s.target for s in states], fed, [g + 1 for g in gammas]
    )  # each [γ_i+1, vocab]
    committed = [
        commit(
            state,
            torch.tensor(tokens, dtype=torch.long, device=logits.device),
            torch.cat(draft_probs) if draft_probs else None,  # [γ, vocab]
            logits,
        )
        for state, tokens, draft_probs, logits in zip(
            states, drafts, probs, target_logits, strict=True
        )
    ]
    verified = time.perf_counter()
    return [
        StepResult(emitted, gamma, accepted, drafted - start, verified - drafted)
        for (emitted, accepted), gamma in zip(committed, gammas, strict=True)
    ]


def _propose(
    states: list[SequenceState], gammas: list[int], draft: BatchRunner, choose: Choose | None
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Draft position by position; at position j, one forward over the requests with γ > j.
    Returns each request's draft tokens and, when sampling, its per-position probabilities."""
    drafts: list[list[int]] = [[] for _ in states]
    probs: list[list[torch.Tensor]] = [[] for _ in states]
    for state, gamma in zip(states, gammas, strict=True):
        lag = len(state.tokens) - state.draft.length
        if gamma and lag > CATCH_UP_IN_BATCH:
            state.draft.forward(state.tokens[state.draft.length : -1], num_logits=1)
    for position in range(max(gammas, default=0)):
        rows = [i for i, gamma in enumerate(gammas) if gamma > position]
        pending = [
            states[i].tokens[states[i].draft.length :] if position == 0 else [drafts[i][-1]]
            for i in rows
        ]
        logits = draft.forward_batch([states[i].draft for i in rows], pending, [1] * len(rows))
        for i, row_logits in zip(rows, logits, strict=True):  # row_logits: [1, vocab]
            token = draw(states[i], row_logits, probs[i])
            drafts[i].append(token if choose is None else choose(states[i], position))
    return drafts, probs
