"""The acceptance test at its boundary: a draft token is accepted iff u < p(x)/q(x) for
u ~ U[0, 1), i.e. rejected when u*q(x) == p(x) exactly. That makes P(accept) = p/q exactly and
never accepts a token the target gives no mass (u == 0, p == 0); '>' instead of '>=' does both
(at 2**-24 per draw). The uniform each call will draw is read from a copy of the generator, so
the tie is hit deterministically."""

from __future__ import annotations

import pytest
import torch

from decoding.sampling import accept_sampled, accept_sampled_rows

VOCAB = 5


def _tie(seed: int, gamma: int = 1):
    """A generator, and target/draft rows where the first draft token's u*q equals p."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.Generator()
    probe.set_state(generator.get_state())
    u0 = float(torch.rand(gamma, generator=probe)[0])
    draft = torch.zeros(gamma, VOCAB)
    draft[:, 1] = 1.0  # q(1) = 1: u*q == u exactly
    target = torch.zeros(gamma + 1, VOCAB)
    target[:, 0], target[:, 1] = 1.0 - u0, u0  # p(1) = u0
    target[gamma] = torch.full((VOCAB,), 1 / VOCAB)
    return generator, torch.ones(gamma, dtype=torch.long), draft, target


@pytest.mark.parametrize("seed", range(5))
def test_a_draft_token_whose_u_times_q_equals_p_is_rejected(seed: int) -> None:
    generator, tokens, draft, target = _tie(seed)
    result = accept_sampled(tokens, draft, target, generator)
    assert result.num_accepted == 0
    assert result.bonus_token == 0  # norm(max(p - q, 0)) is all on token 0

    generator, tokens, draft, target = _tie(seed)
    (rows,) = accept_sampled_rows(tokens, draft, target, [1], [generator])
    assert (rows.num_accepted, rows.bonus_token) == (0, 0)
