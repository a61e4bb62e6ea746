"""``bench.policy``: the engine's γ decisions on a card's costs, on a virtual clock."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from bench import policy
from decoding.adaptive import CostModel

# Run 5's 7B costs, as the engine measured them on an H200.
COSTS = policy.load_costs(policy.RUN5, "7b")


@pytest.fixture(scope="module")
def setup() -> Iterator[policy.Setup]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = policy.build(COSTS, max_concurrent=2, prompt_len=16, max_new=96, decode_steps=4,
                         max_gamma=8)
    yield built
    built.engine.close()
    torch.set_num_threads(threads)


def test_forwards_are_charged_at_the_cost_models_price(setup: policy.Setup) -> None:
    """A plain request is charged its prefill (one forward over the prompt but its last
    token) and one one-token target forward per token after the first."""
    run = policy.run_cell(setup, 1, 0, alpha=0.0, prior=0.7, rounds=1, max_new=96)
    expected = COSTS.target(15) + 96 * COSTS.target(1)
    assert run["tokens"] == 96
    assert run["seconds"] == pytest.approx(expected)


def test_costed_runner_charges_a_batch_padded_to_its_widest_row() -> None:
    class Inner:
        device = torch.device("cpu")

        def forward_packed(self, sequences, tokens, num_logits, *, lengths=None,
                           transient=False):
            return torch.zeros(sum(num_logits), 4)

    clock = policy.VirtualClock()
    costs = CostModel({1: 0.001}, {1: 0.01, 2: 0.02, 6: 0.05})
    runner = policy.CostedRunner(Inner(), clock, costs.target)
    seqs = [policy.CostedSequence(object(), runner) for _ in range(3)]
    runner.forward_packed(seqs, [[1, 2], [3], [4]], [2, 1, 1])
    assert clock.now() == pytest.approx(costs.target(6))  # 3 rows of 2, padded


def test_adaptive_gamma_recovers_in_a_batch_and_costs_little_where_nothing_is_accepted(
    setup: policy.Setup,
) -> None:
    """Two requests together, from a server estimate of 0: where the draft agrees (α 0.9)
    adaptive γ finds it out and beats speculation off; where it never does, it stays within
    5% of off (issue 8's 0.95x)."""
    def rate(gamma: int | None, alpha: float) -> float:
        run = policy.run_cell(setup, 2, gamma, alpha, prior=0.0, rounds=2, max_new=96)
        return float(run["tokens_per_s"])

    off = rate(0, 0.0)
    assert rate(None, 0.9) > 1.1 * off
    assert rate(None, 0.0) > 0.95 * off


def test_seeds_run_each_speculating_cell_per_seed_and_print_the_spread(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "policy.json"
    policy.main(["--requests", "1", "--alphas", "0.9", "--priors", "0.7", "--fixed", "2",
                 "--seeds", "3", "--rounds", "1", "--max-new-tokens", "24",
                 "--prompt-len", "8", "--out", str(out)])
    cells = json.loads(out.read_text())["cells"]
    by_kind: dict[str, list[int]] = {}
    for cell in cells:
        by_kind.setdefault(str(cell["gamma"]), []).append(cell["seed"])
    assert by_kind == {"0": [0], "2": [0, 1, 2], "adaptive": [0, 1, 2]}
    rates = {cell["tokens_per_s"] for cell in cells if cell["gamma"] == 2}
    assert len(rates) > 1  # the seeds draw differently
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.count("(") == 2 and row.split()[:2] == ["1", "0.90"]


def test_seeds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        policy.main(["--seeds", "0"])
    assert exit_info.value.code == 2  # argparse's usage error, before any cell runs
    assert "--seeds must be at least 1" in capsys.readouterr().err
