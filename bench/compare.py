"""Compare the output token ids of two runs over the same prompts (Tandem vs a baseline, or
one speculation setting vs another): greedy decoding must give identical ids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OutputComparison:
    """Per-prompt equality of two lists of outputs; prompts missing on either side are skipped."""

    compared: int
    """Prompts with an output on both sides."""
    identical: bool | None
    """Every compared output is equal; ``None`` when nothing could be compared."""
    mismatched_prompts: list[int] = field(default_factory=list)
    first_divergence: list[int] = field(default_factory=list)
    """For each mismatched prompt, the index of the first output token that differs."""


def first_divergence(left: Sequence[int], right: Sequence[int]) -> int | None:
    """Index of the first differing token (a shorter output differs where it ends); ``None`` if
    the two are equal."""
    for i, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return i
    return None if len(left) == len(right) else min(len(left), len(right))


def compare_outputs(
    left: Sequence[Sequence[int] | None], right: Sequence[Sequence[int] | None]
) -> OutputComparison:
    if len(left) != len(right):
        raise ValueError(f"cannot compare {len(left)} outputs with {len(right)}")
    compared = 0
    mismatched: list[int] = []
    divergence: list[int] = []
    for index, (a, b) in enumerate(zip(left, right, strict=True)):
        if a is None or b is None:
            continue
        compared += 1
        where = first_divergence(a, b)
        if where is not None:
            mismatched.append(index)
            divergence.append(where)
    return OutputComparison(
        compared=compared,
        identical=None if compared == 0 else not mismatched,
        mismatched_prompts=mismatched,
        first_divergence=divergence,
    )
