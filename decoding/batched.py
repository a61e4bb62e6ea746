"""One speculative step for many requests at once, on runners that batch (``forward_packed``).

The same propose -> verify -> accept -> roll back as :func:`decoding.speculative.speculative_step`,
but every draft position is one batched draft forward over the requests still drafting, and the
verification is one batched target forward over all of them, each request at its own position
with its own γ, sampling parameters and random generator. Acceptance is per request, so each
request's tokens are exactly what it would get alone.

The host work per step is kept to a few operations for the whole batch, not a few per row
(on a GPU a small model's forward takes less time than a handful of launches and host syncs):
each forward's logits come as one tensor, greedy rows share one argmax per forward, sampled
rows share one :func:`~decoding.sampling.processed_probs` per distinct setting and one
division and argmax for their draws. Only what is a request's own runs per row: its draws from
its own generator, in the order it would make them alone. The host waits for the device only
after the verify: drawn tokens feed the next forward on the device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Protocol

import torch

from decoding.clock import StepClock
from decoding.fast.runner import MAX_CATCH_UP_REPLAYS, PAD_TOKEN
from decoding.logprobs import logprob_rows, unpack
from decoding.params import TokenLogprob
from decoding.penalties import Drafted, PenalizedRows, penalize
from decoding.sampling import (
    Acceptance,
    accept_sampled_rows,
    greedy_acceptance,
    processed_probs,
    sample_rows,
)
from decoding.speculative import SequenceState, StepResult, advance
from decoding.transfer import to_device

CATCH_UP_IN_BATCH = 2
"""A draft that lags by more tokens than this catches up alone first, so one long catch-up
does not pad every row of the batched draft forward."""


GRAPHED_CATCH_UP_ROWS = 4
"""Where one row's catch-up replays captured graphs, the fewest lagging drafts that catch up in
one forward: several rows of different lengths run uncaptured, which costs the launch of every
kernel (a catch-up longer than the graphs cover runs uncaptured alone too). Judgement, not
measured: on a GPU no batched catch-up has been timed yet; by the cost model one forward over
16 rows of 16 tokens costs a quarter of 16 replays."""


class BatchRunner(Protocol):
    def forward_packed(
        self,
        sequences: list,
        tokens: list[list[int]] | torch.Tensor,
        num_logits: list[int],
        *,
        lengths: list[int] | None = None,
        transient: bool = False,
    ) -> torch.Tensor: ...


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
    """Advance every state by 1..γ_i+1 tokens; both caches of each end holding a prefix of it.

    The host waits for the device once, after the verify: the draft tokens go from the
    drafting loop into the verify's input on the device, and come back with the target's."""
    clock = StepClock(states[0].target.device)
    drafts = _propose(states, gammas, draft, choose)
    clock.mark()
    widths = [gamma + 1 for gamma in gammas]
    fed, lengths = drafts.verify_input(states)
    # Row i's γ_i+1 logits end to end: [Σ(γ_i+1), vocab], read before the next forward.
    target_logits = target.forward_packed(
        [s.target for s in states], fed, widths, lengths=lengths, transient=True
    )
    committed = _commit(states, drafts, target_logits, widths)
    logprobs = _step_logprobs(states, target_logits, widths, [e for e, _ in committed])
    clock.mark()
    drafting, verifying = clock.gaps()
    return [
        StepResult(emitted, gamma, accepted, drafting, verifying, logprobs=row_logprobs)
        for (emitted, accepted), gamma, row_logprobs in zip(committed, gammas, logprobs,
                                                            strict=True)
    ]


def plain_steps_batch(
    states: list[SequenceState], steps: int, target: BatchRunner
) -> list[StepResult]:
    """:func:`decoding.speculative.plain_steps` for every state at once: ``steps`` batched
    target forwards, each fed the tokens the last one chose (on the device), one read-back."""
    clock = StepClock(states[0].target.device)
    pending: list[list[int]] | torch.Tensor = [s.tokens[s.target.length :] for s in states]
    sequences = [state.target for state in states]
    chosen: list[torch.Tensor] = []
    wanting, top = _wanting_logprobs(states)
    scored: list[torch.Tensor] = []  # each step's logprob rows of the requests that want them
    penalized = any(state.penalties is not None and state.penalties.needed(state.tokens)
                    for state in states)
    for _ in range(steps):
        logits = target.forward_packed(sequences, pending, [1] * len(states), transient=True)
        # What the steps before chose, [B, steps taken]: the penalties' history.
        so_far = torch.stack(chosen, dim=1) if chosen and penalized else None
        tokens = _draw(logits, states, [[] for _ in states],
                       [None if so_far is None else so_far[k] for k in range(len(states))])
        chosen.append(tokens)
        if wanting:  # read before the next forward, which may overwrite ``logits``
            picked = _subset(wanting, len(states), logits.device)
            scored.append(logprob_rows(logits[picked], tokens[picked], top))
        pending = tokens.view(-1, 1)
    rows: list[list[int]] = torch.stack(chosen, dim=1).tolist()  # [B, steps]
    for state, emitted in zip(states, rows, strict=True):
        state.tokens.extend(emitted)
    logprobs: list[list[TokenLogprob] | None] = [None] * len(states)
    if wanting:
        per_step = torch.stack(scored, dim=1).tolist()  # [len(wanting), steps, 1 + 2 top]
        for i, scores in zip(wanting, per_step, strict=True):
            logprobs[i] = unpack(scores, rows[i], states[i].top_logprobs or 0, top)
    clock.mark()
    (verifying,) = clock.gaps()
    return [
        StepResult(emitted, 0, 0, 0.0, verifying, num_forwards=steps, logprobs=row_logprobs)
        for emitted, row_logprobs in zip(rows, logprobs, strict=True)
    ]


def _wanting_logprobs(states: list[SequenceState]) -> tuple[list[int], int]:
    """The rows whose requests want log-probabilities, and the most alternatives any of them
    wants (computed for all, each row unpacking its own)."""
    wanting = [i for i, state in enumerate(states) if state.top_logprobs is not None]
    return wanting, max((states[i].top_logprobs or 0 for i in wanting), default=0)


def _subset(rows: list[int], count: int, device: torch.device) -> slice | torch.Tensor:
    """An index of ``rows`` among ``count``: a slice when they are all of them."""
    return slice(None) if len(rows) == count else to_device(rows, device)


def _step_logprobs(
    states: list[SequenceState],
    logits: torch.Tensor,
    widths: list[int],
    emitted: list[list[int]],
) -> list[list[TokenLogprob] | None]:
    """The log-probabilities of each emitted token of the requests that want them, from the
    packed target ``logits`` (row i's ``widths[i]`` end to end; its k-th emitted token was
    chosen from its k-th): one computation and one read-back for all of them."""
    wanting, top = _wanting_logprobs(states)
    result: list[list[TokenLogprob] | None] = [None] * len(states)
    if not wanting:
        return result
    starts = list(accumulate(widths, initial=0))
    positions = [starts[i] + k for i in wanting for k in range(len(emitted[i]))]
    tokens = [token for i in wanting for token in emitted[i]]
    device = logits.device
    rows = logprob_rows(logits[to_device(positions, device)], to_device(tokens, device), top)
    scores = iter(rows.tolist())
    for i in wanting:
        own = [next(scores) for _ in emitted[i]]
        result[i] = unpack(own, emitted[i], states[i].top_logprobs or 0, top)
    return result


@dataclass
class _Drafts:
    """A batched step's draft tokens: on the host where a ``choose`` picked them, else on the
    device as the drafting loop drew them, position by position (each position's rows, in
    order, and their tokens), not yet read back. ``probs``: each sampled row's per-position
    draft probabilities [1, vocab]."""

    gammas: list[int]
    probs: list[list[torch.Tensor]]
    host: list[list[int]] | None = None
    chosen: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    drawn: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    """Each penalized row's drawn tokens so far, each [1] on the device (the penalties of its
    next position follow them)."""

    def so_far(self, i: int) -> list[int] | list[torch.Tensor]:
        """Row i's draft tokens drawn so far, on the host or on the device (for its
        penalties; the row's own only where it has penalties)."""
        return self.host[i] if self.host is not None else self.drawn.get(i, [])

    def verify_input(
        self, states: list[SequenceState]
    ) -> tuple[list[list[int]] | torch.Tensor, list[int] | None]:
        """Each row's tokens for the verify (the ones its target has not seen, then its
        drafts), as host lists, or as one padded [B, W] tensor on the device and the rows'
        lengths; no wait either way."""
        prefixes = [state.tokens[state.target.length :] for state in states]
        if self.host is not None or not self.chosen:
            drafts = self.host or [[] for _ in states]
            return [p + d for p, d in zip(prefixes, drafts, strict=True)], None
        lengths = [len(p) + gamma for p, gamma in zip(prefixes, self.gammas, strict=True)]
        width = max(lengths)
        flat: list[int] = []
        for prefix in prefixes:
            flat.extend(prefix)
            flat.extend([PAD_TOKEN] * (width - len(prefix)))
        # Position j's token of row i goes to [i, len(prefix_i) + j]: one indexed store.
        places = [i * width + len(prefixes[i]) + j
                  for j, (rows, _) in enumerate(self.chosen) for i in rows]
        device = self.chosen[0][1].device
        fed = to_device(flat, device)
        fed[to_device(places, device)] = self.values
        return fed.view(len(states), width), lengths

    @functools.cached_property
    def values(self) -> torch.Tensor:
        """Every drawn token, position by position, on the device (once drafting is done)."""
        return torch.cat([tokens for _, tokens in self.chosen])

    def by_row(self, values: list[int]) -> list[list[int]]:
        """:attr:`values` read back, as each row's draft tokens."""
        drafts: list[list[int]] = [[] for _ in self.gammas]
        tokens = iter(values)
        for rows, _ in self.chosen:
            for i in rows:
                drafts[i].append(next(tokens))
        return drafts

    def row_major(self, rows: list[int]) -> list[int]:
        """Where each of ``rows``' draft tokens is in :attr:`values`, row by row."""
        offsets = list(accumulate((len(r) for r, _ in self.chosen), initial=0))
        rank = [{i: k for k, i in enumerate(r)} for r, _ in self.chosen]
        return [offsets[j] + rank[j][i] for i in rows for j in range(self.gammas[i])]


def _propose(
    states: list[SequenceState], gammas: list[int], draft: BatchRunner, choose: Choose | None
) -> _Drafts:
    """Draft position by position; at position j, one forward over the requests with γ > j.

    The drawn tokens stay on the device and feed the next position's forward from there, so
    the host queues the whole loop without waiting for the device."""
    drafts = _Drafts(list(gammas), [[] for _ in states])
    _catch_up([s for s, gamma in zip(states, gammas, strict=True) if gamma], draft)
    if choose is not None:
        drafts.host = [[] for _ in states]
    for position in range(max(gammas, default=0)):
        rows = [i for i, gamma in enumerate(gammas) if gamma > position]
        pending: list[list[int]] | torch.Tensor
        if position == 0:
            pending = [states[i].tokens[states[i].draft.length :] for i in rows]
        elif drafts.host is not None:
            pending = [[drafts.host[i][-1]] for i in rows]
        else:
            pending = _still_drafting(*drafts.chosen[-1], rows).view(-1, 1)
        logits = draft.forward_packed(  # [len(rows), vocab], read before the next forward
            [states[i].draft for i in rows], pending, [1] * len(rows), transient=True
        )
        tokens = _draw(logits, [states[i] for i in rows], [drafts.probs[i] for i in rows],
                       [drafts.so_far(i) for i in rows])
        if choose is None:
            drafts.chosen.append((rows, tokens))
            for k, i in enumerate(rows):
                if states[i].penalties is not None:
                    drafts.drawn.setdefault(i, []).append(tokens[k : k + 1])
        else:
            assert drafts.host is not None
            for i in rows:
                drafts.host[i].append(choose(states[i], position))
    return drafts


def _catch_up(drafting: list[SequenceState], draft: BatchRunner) -> None:
    """Feed each drafting row's draft what it lags by, all but the last token, where that is
    more than :data:`CATCH_UP_IN_BATCH`: in one forward over those rows, padded to the longest
    (a row whose cache slot has no room for that padding is fed alone). Rows fall behind
    together: a batch whose γ was 0 for a few groups of plain steps catches up all at once,
    and one forward over 16 rows of 16 tokens costs about what a few one-row forwards do (on
    run 5's H200 costs, by the cost model: 8.7 ms against 34 ms fed one by one)."""
    lagging = [s for s in drafting if len(s.tokens) - s.draft.length > CATCH_UP_IN_BATCH]
    if not lagging:
        return
    width = max(len(s.tokens) - 1 - s.draft.length for s in lagging)
    room = getattr(draft, "max_len", 0)
    together = [s for s in lagging if s.draft.length + width <= room]
    if len(together) >= (GRAPHED_CATCH_UP_ROWS if _replays_alone(draft, width) else 2):
        draft.forward_packed([s.draft for s in together],
                             [s.tokens[s.draft.length : -1] for s in together],
                             [1] * len(together), transient=True)  # the logits are not needed
    else:
        together = []
    fed = {id(s) for s in together}
    for state in lagging:
        if id(state) not in fed:
            state.draft.forward(state.tokens[state.draft.length : -1], num_logits=1)


def _replays_alone(draft: BatchRunner, width: int) -> bool:
    """Whether one row's catch-up of ``width`` tokens runs as captured graph replays (else it
    runs uncaptured as well, and several rows are better fed in one forward)."""
    graphs = getattr(draft, "graphs", None)
    return bool(graphs is not None and getattr(draft, "catch_up_in_graphs", False)
                and width <= MAX_CATCH_UP_REPLAYS * graphs.widest(1))


def _still_drafting(
    previous_rows: list[int], tokens: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """The entries of ``tokens`` (one per row of ``previous_rows``) for ``rows``, a
    subsequence of ``previous_rows``: ``tokens`` itself when they are the same rows."""
    if rows == previous_rows:
        return tokens
    index = {row: k for k, row in enumerate(previous_rows)}
    return tokens[to_device([index[row] for row in rows], tokens.device)]


def _draw(
    logits: torch.Tensor,
    states: list[SequenceState],
    probs: list[list[torch.Tensor]],
    drawn: Sequence[Drafted],
) -> torch.Tensor:
    """:func:`decoding.speculative.draw` for every row of ``logits`` [R, vocab] (state k's
    row k, after its sequence and then ``drawn[k]``), with one operation for all rows where it
    can: one argmax for the greedy rows, :func:`_processed` and :func:`sample_rows` for the
    sampled ones (each from its own generator, in row order). Returns the tokens [R] on the
    device, not waiting for them. A sampled row's probabilities [1, vocab] go on
    ``probs[k]``."""
    logits = _scored(logits, [(k, k + 1) for k in range(len(states))], states, drawn)
    greedy = [state.sampling.greedy for state in states]
    if all(greedy):
        return logits.argmax(-1)
    sampled = [k for k, is_greedy in enumerate(greedy) if not is_greedy]
    packed, row_probs = _processed(logits, [(k, k + 1) for k in range(len(states))], states)
    for k in sampled:
        row = row_probs[k]
        assert row is not None
        probs[k].append(row)
    chosen = sample_rows(packed, [states[k].generator for k in sampled])
    if len(sampled) < len(states):  # greedy rows too: their argmax, the others' draws
        chosen = logits.argmax(-1).index_copy_(0, to_device(sampled, logits.device), chosen)
    return chosen


def _scored(
    logits: torch.Tensor,
    spans: Sequence[tuple[int, int]],
    states: Sequence[SequenceState],
    drafted: Sequence[Drafted],
) -> torch.Tensor:
    """``logits`` as the requests choose from them: state k's rows ``logits[start:stop]``
    penalized where it has penalties (after its sequence and ``drafted[k]``), all in one
    :func:`~decoding.penalties.penalize`, as a new float32 tensor; ``logits`` itself where no
    state has any."""
    parts = [PenalizedRows(state.penalties, state.tokens, drafted[k], *spans[k])
             for k, state in enumerate(states)
             if state.penalties is not None and state.penalties.needed(state.tokens)]
    return penalize(logits, parts) if parts else logits


def _processed(
    logits: torch.Tensor, spans: Sequence[tuple[int, int]], states: Sequence[SequenceState]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """:func:`processed_probs` of each sampled state's rows ``logits[start:stop]`` under its
    settings. Returns them end to end in state order, [Σ rows, vocab] float32, and each
    state's own (a view; None for a greedy state). One call per distinct temperature, top-k,
    top-p and min-p: the function works row by row, so each state's rows come out as they would
    alone, up to the rounding of top-p's sums (a reduction kernel, on a GPU or several CPU
    threads, may add a row in another order when there are more rows, as the batched
    forward's own kernels already do to the logits)."""
    sampled = [k for k, state in enumerate(states) if not state.sampling.greedy]
    groups: dict[tuple[float, int, float, float], list[int]] = {}
    for k in sampled:
        params = states[k].sampling
        setting = (params.temperature, params.top_k, params.top_p, params.min_p)
        groups.setdefault(setting, []).append(k)
    sizes = [spans[k][1] - spans[k][0] for k in sampled]
    if len(groups) == 1:
        packed = processed_probs(_rows(logits, [spans[k] for k in sampled]),
                                 states[sampled[0]].sampling)
    else:
        packed = logits.new_empty(sum(sizes), logits.shape[-1], dtype=torch.float32)
        offsets = dict(zip(sampled, accumulate(sizes, initial=0), strict=False))
        for members in groups.values():
            rows = [offsets[k] + j for k in members for j in range(spans[k][1] - spans[k][0])]
            group_probs = processed_probs(
                _rows(logits, [spans[k] for k in members]), states[members[0]].sampling
            )
            packed.index_copy_(0, to_device(rows, logits.device), group_probs)
    result: list[torch.Tensor | None] = [None] * len(states)
    for k, part in zip(sampled, packed.split_with_sizes(sizes), strict=True):
        result[k] = part
    return packed, result


def _rows(logits: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``logits[start:stop]`` of every span, end to end: a view when they are adjacent."""
    if all(stop == spans[n + 1][0] for n, (_, stop) in enumerate(spans[:-1])):
        return logits[spans[0][0] : spans[-1][1]]
    return torch.cat([logits[start:stop] for start, stop in spans])


def _commit(
    states: list[SequenceState],
    drafts: _Drafts,
    logits: torch.Tensor,
    widths: list[int],
) -> list[tuple[list[int], int]]:
    """:func:`decoding.speculative.commit` for every row of the packed target ``logits``
    (row i's γ_i+1 end to end): the greedy rows from one argmax, the sampled rows by
    :func:`_processed` and :func:`accept_sampled_rows`, each from its own generator; the
    draft tokens and the greedy rows' choices come back to the host in one copy. Returns each
    row's emitted tokens and accepted count."""
    spans = list(pairwise(accumulate(widths, initial=0)))
    greedy = [state.sampling.greedy for state in states]
    results: list[Acceptance | None] = [None] * len(states)
    device = logits.device
    on_device = drafts.host is None and bool(drafts.chosen)
    logits = _scored(logits, spans, states, [drafts.so_far(i) for i in range(len(states))])
    if not all(greedy):
        sampled = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
        target_probs, _ = _processed(logits, spans, states)  # the sampled rows', in order
        if on_device:
            draft_tokens = drafts.values[to_device(drafts.row_major(sampled), device)]
        else:
            host = drafts.host or [[] for _ in states]
            draft_tokens = to_device([t for i in sampled for t in host[i]], device)
        draft_probs = [p for i in sampled for p in drafts.probs[i]]
        accepted = accept_sampled_rows(
            draft_tokens,
            torch.cat(draft_probs) if draft_probs else logits.new_empty(0, logits.shape[-1]),
            target_probs,
            [drafts.gammas[i] for i in sampled],
            [states[i].generator for i in sampled],
        )
        for i, acceptance in zip(sampled, accepted, strict=True):
            results[i] = acceptance
    # One read-back: the draft tokens (unless on the host already), then the target's argmax.
    parts = [drafts.values] if on_device else []
    if any(greedy):
        parts.append(logits.argmax(-1))
    ids: list[int] = torch.cat(parts).tolist() if parts else []
    drawn = sum(drafts.gammas) if on_device else 0
    draft_ids = drafts.by_row(ids[:drawn]) if on_device else drafts.host or [[] for _ in states]
    target_tokens = ids[drawn:]
    for i, (start, stop) in enumerate(spans):
        if greedy[i]:
            results[i] = greedy_acceptance(draft_ids[i], target_tokens[start:stop])
    committed = []
    for state, draft_tokens_i, result in zip(states, draft_ids, results, strict=True):
        assert result is not None
        emitted = [*draft_tokens_i[: result.num_accepted], result.bonus_token]
        advance(state, emitted, result.num_accepted)
        committed.append((emitted, result.num_accepted))
    return committed
