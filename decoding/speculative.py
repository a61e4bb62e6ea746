"""One speculative step: propose -> verify -> accept -> roll back.

The loop is gpt-fast's ``speculative_decode`` and Leviathan et al.'s Algorithm 1 (arXiv
2211.17192); the terms (γ, draft/accepted/bonus tokens) are defined in
:func:`decoding.sampling.accept_sampled`.

Invariant between steps, for a sequence ``tokens`` (prompt plus everything emitted):
the target's cache holds exactly ``tokens[:-1]``; the draft's holds a prefix of it (it lags by
one more token after a step that accepted all γ, and by more after steps with γ = 0). The last
token is always fed at the start of the next step, so no logits are ever recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from decoding.clock import StepClock
from decoding.logprobs import logprob_rows, unpack
from decoding.params import SamplingParams, TokenLogprob
from decoding.penalties import Drafted, Penalties
from decoding.runner import KVSequence
from decoding.sampling import (
    Acceptance,
    accept_sampled,
    greedy_acceptance,
    processed_probs,
    sample,
)
from decoding.transfer import to_device


@dataclass
class SequenceState:
    tokens: list[int]  # prompt + emitted tokens
    target: KVSequence
    draft: KVSequence
    sampling: SamplingParams
    generator: torch.Generator
    # Who drafts: the draft model by default. Any proposer keeps the output exact, since the
    # target decides every token; it must return draft probabilities when sampling.
    proposer: Proposer = field(default_factory=lambda: propose)
    # The alternatives per position to return with each output token's log-probability;
    # None: no log-probabilities (see decoding.logprobs).
    top_logprobs: int | None = None
    # The request's penalties on tokens already in the sequence, and its ban of ending tokens
    # before min_new_tokens (None: it has neither); the prompt is tokens[:prompt_length].
    penalties: Penalties | None = None

    def scored(self, logits: torch.Tensor, drafted: Drafted = None) -> torch.Tensor:
        """``logits`` [n, vocab] as this request chooses from them: penalized (see
        :meth:`decoding.penalties.Penalties.apply` for the rows and ``drafted``), else as
        they are."""
        if self.penalties is None or not self.penalties.needed(self.tokens):
            return logits
        return self.penalties.apply(logits, self.tokens, drafted)


Proposer = Callable[[SequenceState, int], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class StepResult:
    emitted: list[int]  # accepted draft tokens + the bonus token (1 to γ+1 ids)
    num_drafted: int  # γ used in this step
    num_accepted: int
    draft_seconds: float  # as the device ran them (see decoding.clock)
    verify_seconds: float  # the target's forward and the acceptance
    num_forwards: int = 1  # target forward passes (more than one: see plain_steps)
    logprobs: list[TokenLogprob] | None = None  # one per emitted token, if the request wants them


def propose(state: SequenceState, gamma: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft γ tokens one at a time. Returns draft_tokens [γ] and, when sampling,
    draft_probs [γ, vocab] (None when greedy).

    Each drawn token stays on the device and is fed from there to the next draft forward, so
    the host never waits for one: it can queue the whole loop while the device runs it, and
    the step reads all γ tokens back at once."""
    pending: list[int] | torch.Tensor = state.tokens[state.draft.length :]  # 1 token or more
    draft_tokens: list[torch.Tensor] = []
    draft_probs: list[torch.Tensor] = []
    for _ in range(gamma):
        logits = state.draft.forward(pending, num_logits=1)  # [1, vocab]
        pending = draw(state, logits, draft_probs, draft_tokens)
        draft_tokens.append(pending)
    tokens = (torch.cat(draft_tokens) if draft_tokens
              else torch.empty(0, dtype=torch.long, device=state.draft.device))
    return tokens, (torch.cat(draft_probs) if draft_probs else None)


def draw(
    state: SequenceState,
    logits: torch.Tensor,
    draft_probs: list[torch.Tensor],
    drawn: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The next token from logits [1, vocab] after the sequence and the tokens ``drawn`` since
    (each [1], on the device), as a [1] tensor on their device: the argmax when greedy, else a
    sample from the processed distribution, whose probabilities [1, vocab] go on
    ``draft_probs``."""
    logits = state.scored(logits, drawn)
    if state.sampling.greedy:
        return logits.argmax(-1)
    probs = processed_probs(logits, state.sampling)
    draft_probs.append(probs)
    return sample(probs, state.generator)


def verify(state: SequenceState, draft_tokens: torch.Tensor) -> torch.Tensor:
    """Score the last sequence token and every draft token in one target forward pass.
    Returns target_logits [γ+1, vocab]. The draft tokens are fed from the device, so the
    forward is queued behind the drafting without waiting for it."""
    fed = state.tokens[state.target.length :]
    if len(draft_tokens):
        device = state.target.device
        return state.target.forward(
            torch.cat([to_device(fed, device), draft_tokens.to(device)]),
            num_logits=len(draft_tokens) + 1,
        )
    return state.target.forward(fed, num_logits=1)


def accept(
    state: SequenceState,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
) -> tuple[Acceptance, list[int]]:
    """The acceptance, and the draft tokens on the host (read back with the target's choice
    where it can: greedy reads both in one copy)."""
    target_logits = state.scored(target_logits, draft_tokens)
    if state.sampling.greedy:
        ids: list[int] = torch.cat([draft_tokens, target_logits.argmax(-1)]).tolist()
        gamma = len(draft_tokens)
        return greedy_acceptance(ids[:gamma], ids[gamma:]), ids[:gamma]
    target_probs = processed_probs(target_logits, state.sampling)  # [γ+1, vocab]
    if draft_probs is None:  # γ = 0: plain sampling from the target
        return Acceptance(0, int(sample(target_probs, state.generator)[0])), []
    result = accept_sampled(draft_tokens, draft_probs, target_probs, state.generator)
    return result, draft_tokens.tolist()


def speculative_step(state: SequenceState, gamma: int) -> StepResult:
    """Advance ``state`` by 1..γ+1 tokens; both caches end holding a prefix of the sequence."""
    clock = StepClock(state.target.device)
    if gamma > 0:
        draft_tokens, draft_probs = state.proposer(state, gamma)
    else:
        draft_tokens = torch.empty(0, dtype=torch.long, device=state.target.device)
        draft_probs = None
    clock.mark()
    target_logits = verify(state, draft_tokens)
    emitted, num_accepted = commit(state, draft_tokens, draft_probs, target_logits)
    logprobs = None
    if state.top_logprobs is not None:  # emitted token k was chosen from row k
        rows = logprob_rows(
            target_logits[: len(emitted)], to_device(emitted, target_logits.device),
            state.top_logprobs,
        )
        logprobs = unpack(rows.tolist(), emitted, state.top_logprobs)
    clock.mark()
    drafting, verifying = clock.gaps()
    return StepResult(emitted, gamma, num_accepted, drafting, verifying, logprobs=logprobs)


def plain_steps(state: SequenceState, steps: int) -> StepResult:
    """``steps`` steps with γ = 0 in a row: each target forward is fed the token the last one
    chose, on the device, and the host reads all of them back at once (on a GPU it queues the
    forwards while the device runs them, rather than waiting after each for its token). The
    tokens are the ones ``steps`` calls of ``speculative_step(state, 0)`` emit: the same
    choice from the same logits, the same draws from the request's generator in the same
    order. The draft is not run; it falls behind by ``steps`` tokens, as it would."""
    clock = StepClock(state.target.device)
    pending: list[int] | torch.Tensor = state.tokens[state.target.length :]
    chosen: list[torch.Tensor] = []
    rows: list[torch.Tensor] = []
    for _ in range(steps):
        logits = state.target.forward(pending, num_logits=1)  # [1, vocab]
        pending = draw(state, logits, [], chosen)
        chosen.append(pending)
        if state.top_logprobs is not None:
            rows.append(logprob_rows(logits, pending, state.top_logprobs))
    emitted: list[int] = torch.cat(chosen).tolist()
    state.tokens.extend(emitted)  # the target holds all but the last, as after any step
    # Nothing to roll back, but said, as every step says it: a transformers cache's
    # sliding-window layers keep what they are fed until then (see KVSequence.rollback).
    state.target.rollback(state.target.length)
    logprobs = None
    if state.top_logprobs is not None:
        logprobs = unpack(torch.cat(rows).tolist(), emitted, state.top_logprobs)
    clock.mark()
    (verifying,) = clock.gaps()
    return StepResult(emitted, 0, 0, 0.0, verifying, num_forwards=steps, logprobs=logprobs)


def commit(
    state: SequenceState,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
) -> tuple[list[int], int]:
    """Accept, extend the sequence with the accepted tokens and the bonus token, and roll both
    caches back past the rejected ones (the bonus token is fed at the next step).
    Returns the emitted tokens and the number of accepted draft tokens."""
    result, draft_ids = accept(state, draft_tokens, draft_probs, target_logits)
    emitted = [*draft_ids[: result.num_accepted], result.bonus_token]
    advance(state, emitted, result.num_accepted)
    return emitted, result.num_accepted


def advance(state: SequenceState, emitted: list[int], num_accepted: int) -> None:
    """Extend the sequence with ``emitted`` (the accepted tokens and the bonus token) and roll
    both caches back past the rejected draft tokens."""
    prior_length = len(state.tokens)
    state.tokens.extend(emitted)
    state.target.rollback(prior_length + num_accepted)
    state.draft.rollback(min(state.draft.length, prior_length + num_accepted))
