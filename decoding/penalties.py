"""Penalties on tokens already in a sequence, applied to the logits before anything else.

- **repetition** (Keskar et al. 2019, "CTRL", arXiv 1909.05858; Hugging Face's
  ``RepetitionPenaltyLogitsProcessor``, vLLM): the logit of a token that is in the prompt or
  the output is divided by the penalty where it is positive, else multiplied by it;
- **frequency** and **presence** (OpenAI's API, vLLM): the logit of a token is lowered by the
  frequency penalty once for every time it is in the output, and by the presence penalty once
  if it is there at all.

Before ``min_new_tokens`` output tokens, a request's ending tokens (EOS, stop_token_ids) get
no probability at all (their logits -inf).

Repetition first, then the other two, then temperature, top-k and top-p
(:func:`decoding.sampling.processed_probs`), as vLLM orders them; greedy decoding takes the
argmax of the penalized logits, as Hugging Face's ``generate`` does.

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
    _banned: dict[tuple[torch.device, int], torch.Tensor] = field(default_factory=dict)

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
        rows, vocab = logits.shape
        device = logits.device
        extra = _on_device(drafted, device)
        before = (0 if extra is None else len(extra)) - (rows - 1)  # what every row follows
        if before < 0:
            raise ValueError(f"{rows} rows need at least {rows - 1} drafted tokens")
        out = logits.float()
        if self.params.penalized:
            out = self._penalized(out, tokens, extra, before)
        # Output tokens before row j: those of ``tokens``, then before + j drafted ones.
        held = min(rows, self.min_output - (len(tokens) - self.prompt_length + before))
        if held > 0:
            out = out.clone() if out is logits else out
            out[:held, self._banned_ids(vocab, device)] = float("-inf")
        return out if out is not logits else out.clone()

    def _penalized(self, out: torch.Tensor, tokens: Sequence[int], extra: torch.Tensor | None,
                   before: int) -> torch.Tensor:
        rows, vocab = out.shape
        counts = self._synced(tokens, vocab, out.device)
        output = counts.output.expand(rows, vocab)
        if extra is not None and len(extra):
            # One-hot of each drafted token (ids outside this vocabulary count for nothing),
            # summed up to each row: row j follows the first before + j of them.
            hot = torch.zeros(len(extra), vocab, device=out.device)
            hot.scatter_(1, extra.clamp(max=vocab - 1)[:, None],
                         (extra < vocab).float()[:, None])
            running = torch.cat([hot.new_zeros(1, vocab), hot.cumsum(0)])
            output = output + running[before:]
        p = self.params
        present = output > 0
        if p.repetition_penalty != 1.0:
            seen = present | counts.prompt
            scaled = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            # A penalty near 0 sends positive logits past float32's range: inf, and softmax
            # then NaN. At the largest finite value they tie, as their limit does.
            largest = torch.finfo(torch.float32).max
            out = torch.where(seen, scaled.clamp(-largest, largest), out)
        if p.frequency_penalty != 0.0:
            out = out - p.frequency_penalty * output
        if p.presence_penalty != 0.0:
            out = out - p.presence_penalty * present.float()
        return out

    def _banned_ids(self, vocab: int, device: torch.device) -> torch.Tensor:
        key = (device, vocab)
        if key not in self._banned:
            self._banned[key] = to_device(_known(self.banned, vocab), device)
        return self._banned[key]

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


def _known(ids: Sequence[int], vocab: int) -> list[int]:
    """The ids a model of this vocabulary size has logits for."""
    return [i for i in ids if i < vocab]


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
