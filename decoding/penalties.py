"""Penalties on tokens already in a sequence, and a request's own biases and bans, applied to
the logits before anything else.

- **logit bias** (OpenAI's API, vLLM): a request's own amount added to the logits of the
  token ids it names;
- **repetition** (Keskar et al. 2019, "CTRL", arXiv 1909.05858; Hugging Face's
  ``RepetitionPenaltyLogitsProcessor``, vLLM): the logit of a token that is in the prompt or
  the output is divided by the penalty where it is positive, else multiplied by it;
- **frequency** and **presence** (OpenAI's API, vLLM): the logit of a token is lowered by the
  frequency penalty once for every time it is in the output, and by the presence penalty once
  if it is there at all.

Before ``min_new_tokens`` output tokens, a request's ending tokens (EOS, stop_token_ids) get
no probability at all (their logits -inf).

The bias first, then repetition, then the other two, then temperature, top-k, top-p and
min-p (:func:`decoding.sampling.processed_probs`), as vLLM orders the penalties; greedy
decoding takes the argmax of the penalized logits, as Hugging Face's ``generate`` does.

Speculative decoding stays exact: the target's logits at a verify position are penalized for
the sequence *with the draft tokens before that position*, which is the sequence the target
would have penalized for had it chosen those tokens itself, and the rejection rule then
compares the distributions the two models really drew from. The draft is penalized the same
way, only so that it proposes what the target will keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from decoding.params import SamplingParams
from decoding.transfer import to_device

Drafted = torch.Tensor | Sequence[int] | Sequence[torch.Tensor] | None
"""Tokens that follow a sequence before the rows being penalized: on the device (one tensor,
or one tensor per token) or on the host."""


@dataclass
class _Counts:
    """What the penalties read for one vocabulary size on one device: which ids the prompt
    holds, and how many times each is in the output (the first ``counted`` output tokens)."""

    prompt: torch.Tensor  # [vocab] bool
    output: torch.Tensor  # [vocab] float32
    counted: int = 0


@dataclass
class Penalties:
    """One request's penalties and the counts they read, kept on the device and brought up to
    date with the request's tokens as they grow. Emitted tokens are final (a rollback drops only
    draft tokens, which are never counted here), so each is counted once; only where a failed
    step's tokens are taken back are the counts made again.

    Also the ban of ending tokens before ``min_output`` output tokens (a request's
    ``min_new_tokens``): the ``banned`` ids (its EOS ids, unless it ignores them, and its
    stop_token_ids) get no probability at an output position before that, as transformers'
    ``MinNewTokensLengthLogitsProcessor`` and vLLM's ``min_tokens`` do."""

    params: SamplingParams
    prompt_length: int
    banned: tuple[int, ...] = ()
    min_output: int = 0
    _counts: dict[tuple[torch.device, int], _Counts] = field(default_factory=dict)

    def needed(self, tokens: Sequence[int]) -> bool:
        """Whether the logits after ``tokens`` (and any drafts) change: penalties, or a ban
        that has not yet ended."""
        return self.params.penalized or len(tokens) - self.prompt_length < self.min_output

    @classmethod
    def of(cls, params: SamplingParams, prompt_length: int, banned: Sequence[int] = (),
           min_output: int = 0) -> Penalties | None:
        """The request's penalties, or None where it has none (and no ban)."""
        if not banned:
            min_output = 0
        if not params.penalized and not min_output:
            return None
        return cls(params, prompt_length, tuple(sorted(set(banned))), min_output)

    def apply(
        self, logits: torch.Tensor, tokens: Sequence[int], drafted: Drafted = None
    ) -> torch.Tensor:
        """``logits`` [n, vocab] penalized, as a new float32 tensor (the input is not changed):
        the last row for the sequence ``tokens`` (prompt, then output) followed by every token of
        ``drafted``, each row before it for one token fewer. A verify's γ+1 rows and its γ draft
        tokens, or a draft position's one row and the tokens drafted before it."""
        return penalize(logits, [PenalizedRows(self, tokens, drafted, 0, len(logits))])

    def _synced(self, tokens: Sequence[int], vocab: int, device: torch.device) -> _Counts:
        key = (device, vocab)
        counts = self._counts.get(key)
        if counts is not None and self.prompt_length + counts.counted > len(tokens):
            counts = None  # tokens were taken back (a failed step undone): count afresh
        if counts is None:
            prompt = torch.zeros(vocab, dtype=torch.bool, device=device)
            ids = _known(tokens[: self.prompt_length], vocab)
            if ids:
                prompt[to_device(ids, device)] = True
            counts = _Counts(prompt, torch.zeros(vocab, device=device))
            self._counts[key] = counts
        new = tokens[self.prompt_length + counts.counted :]
        if new:
            ids = _known(new, vocab)
            if ids:
                index = to_device(ids, device)
                counts.output.index_add_(0, index, torch.ones(len(ids), device=device))
            counts.counted += len(new)
        return counts


@dataclass(frozen=True)
class PenalizedRows:
    """One request's rows ``logits[start:stop]`` and what they follow: the sequence ``tokens``,
    then ``drafted`` (the last row all of it, each row before it one token fewer)."""

    penalties: Penalties
    tokens: Sequence[int]
    drafted: Drafted
    start: int
    stop: int


def penalize(logits: torch.Tensor, parts: Sequence[PenalizedRows]) -> torch.Tensor:
    """``logits`` [N, vocab] with each part's rows penalized (:class:`Penalties`), as a new
    float32 tensor; every other row as it was. The same few operations for any number of
    requests and rows (on a GPU a few kernels a forward, not a few per request): the host lists
    which rows, counts and drafted tokens go where, and the device gathers them and applies
    each row's own penalties, then bans the ending tokens where min_new_tokens says."""
    vocab = logits.shape[1]
    device = logits.device
    out = logits.float()
    out = out.clone() if out is logits else out
    chosen = _Chosen()
    banned_rows: list[int] = []
    banned_ids: list[int] = []
    for part in parts:
        size = part.stop - part.start
        before = _count(part.drafted) - (size - 1)  # the drafted tokens every row follows
        if before < 0:
            raise ValueError(f"{size} rows need at least {size - 1} drafted tokens")
        penalties = part.penalties
        if penalties.params.penalized:  # a ban alone needs only how many were drafted
            chosen.add(part, penalties._synced(part.tokens, vocab, device),
                       _on_device(part.drafted, device), before)
        # Output tokens before row j: those of ``tokens``, then before + j drafted ones.
        done = len(part.tokens) - penalties.prompt_length + before
        ids = _known(penalties.banned, vocab)
        for j in range(min(size, penalties.min_output - done)):
            banned_rows.extend([part.start + j] * len(ids))
            banned_ids.extend(ids)
    if chosen.rows:
        index = to_device(chosen.rows, device)
        out.index_copy_(0, index, chosen.penalized(logits.index_select(0, index).float()))
    if banned_rows:
        out[to_device(banned_rows, device), to_device(banned_ids, device)] = float("-inf")
    return out


@dataclass
class _Chosen:
    """The rows :func:`penalize` penalizes, gathered from every part: for each, its part's
    counts and penalties, and the drafted tokens it follows (as places among all the parts'
    drafted tokens, end to end)."""

    rows: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # each row's place in ``counts``
    counts: list[_Counts] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)  # each row's
    drafted: list[torch.Tensor] = field(default_factory=list)
    drafted_length: int = 0
    follows_row: list[int] = field(default_factory=list)  # row r follows drafted token t
    follows_token: list[int] = field(default_factory=list)

    def add(self, part: PenalizedRows, counts: _Counts, extra: torch.Tensor | None,
            before: int) -> None:
        owner = len(self.counts)
        self.counts.append(counts)
        for j in range(part.stop - part.start):
            self.follows_row.extend([len(self.rows)] * (before + j))
            self.follows_token.extend(range(self.drafted_length,
                                            self.drafted_length + before + j))
            self.rows.append(part.start + j)
            self.owner.append(owner)
            self.params.append(part.penalties.params)
        if extra is not None and len(extra):
            self.drafted.append(extra)
            self.drafted_length += len(extra)

    def penalized(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen rows' logits ``x`` [R, vocab] (float32, a copy) penalized."""
        vocab = x.shape[1]
        device = x.device
        owners = to_device(self.owner, device)
        output = torch.stack([c.output for c in self.counts]).index_select(0, owners)
        prompt = torch.stack([c.prompt for c in self.counts]).index_select(0, owners)
        if self.follows_row:
            # Each row's drafted tokens before it, counted in (ids outside this vocabulary
            # count for nothing).
            tokens = torch.cat(self.drafted)[to_device(self.follows_token, device)]
            output.index_put_((to_device(self.follows_row, device), tokens.clamp(max=vocab - 1)),
                              (tokens < vocab).float(), accumulate=True)
        present = output > 0

        def column(values: list[float]) -> torch.Tensor:
            return to_device(values, device, torch.float32)[:, None]

        biased = [(r, token, bias) for r, p in enumerate(self.params)
                  for token, bias in p.logit_bias if token < vocab]
        if biased:
            rows, ids, biases = zip(*biased, strict=True)
            x.index_put_((to_device(rows, device), to_device(ids, device)),
                         to_device(biases, device, torch.float32), accumulate=True)

        repetition = [p.repetition_penalty for p in self.params]
        if any(value != 1.0 for value in repetition):
            penalty = column(repetition)
            # transformers divides by a Python number, which CUDA does as a product with its
            # float32 reciprocal (and a CPU as a division): the same here, bit for bit.
            divided = x * (1.0 / penalty) if device.type == "cuda" else x / penalty
            scaled = torch.where(x > 0, divided, x * penalty)
            # A penalty near 0 sends positive logits past float32's range: inf, and softmax
            # then NaN. At the largest finite value they tie, as their limit does.
            largest = torch.finfo(torch.float32).max
            seen = (present | prompt) & (penalty != 1.0)  # not another row's
            x = torch.where(seen, scaled.clamp(-largest, largest), x)
        frequency = [p.frequency_penalty for p in self.params]
        if any(frequency):
            x = x - column(frequency) * output
        presence = [p.presence_penalty for p in self.params]
        if any(presence):
            x = x - column(presence) * present.float()
        return x


def _known(ids: Sequence[int], vocab: int) -> list[int]:
    """The ids a model of this vocabulary size has logits for."""
    return [i for i in ids if i < vocab]


def _count(drafted: Drafted) -> int:
    """How many tokens ``drafted`` holds (one per tensor where it is a list of them)."""
    if drafted is None:
        return 0
    return drafted.numel() if isinstance(drafted, torch.Tensor) else len(drafted)


def _on_device(drafted: Drafted, device: torch.device) -> torch.Tensor | None:
    if drafted is None:
        return None
    if isinstance(drafted, torch.Tensor):
        return drafted.reshape(-1).to(device)
    if not len(drafted):
        return None
    if isinstance(drafted[0], torch.Tensor):
        return torch.cat([t.reshape(-1) for t in drafted]).to(device)  # type: ignore[union-attr]
    return to_device(list(drafted), device)  # type: ignore[arg-type]
