"""The target's log-probabilities of the output tokens (a request's ``logprobs`` and
``top_logprobs``).

Every emitted token has a row of target logits already: the verify forward (or the plain step)
that chose it scored its position. So the log-probabilities cost a log-softmax over those rows
and one read-back, never a forward. They are the target's raw distribution, before the
penalties, temperature, top-k, top-p and min-p (vLLM's default), and they do not depend on
the draft: an emitted token's row is the target's own forward over the same prefix, whatever
was proposed after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decoding.params import TokenLogprob


def logprob_rows(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """For logits [R, vocab] and the token chosen at each row [R] (on their device): each
    row's log-probability of its token, then its ``top`` largest log-probabilities and their
    token ids, [R, 1 + 2 * top] float64 (exact for any id below 2**53), still on the device."""
    logs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logs.gather(-1, tokens.view(-1, 1).to(logs.device))
    if top == 0:
        return chosen.double()
    values, ids = logs.topk(top, dim=-1)
    return torch.cat([chosen.double(), values.double(), ids.double()], dim=-1)


def unpack(
    rows: Sequence[Sequence[float]], tokens: Sequence[int], top: int, packed_top: int | None = None
) -> list[TokenLogprob]:
    """:func:`logprob_rows`' rows, read back, as one :class:`TokenLogprob` per token with its
    first ``top`` alternatives (of the ``packed_top`` computed; default ``top``)."""
    width = top if packed_top is None else packed_top
    result = []
    for row, token in zip(rows, tokens, strict=True):
        values, ids = row[1 : 1 + top], row[1 + width : 1 + width + top]
        result.append(TokenLogprob(
            token, float(row[0]),
            tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True)),
        ))
    return result
