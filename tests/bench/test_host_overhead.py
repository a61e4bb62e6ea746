"""The host-overhead benchmark runs and reports every case (a smoke test: no timing asserted)."""

from __future__ import annotations

import pytest

from bench import host_overhead


def test_every_case_is_timed(capsys: pytest.CaptureFixture[str]) -> None:
    assert host_overhead.main(["--batch-sizes", "1", "2", "--calls", "2", "--warmup", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0] if not line.strip().startswith("1 alone") else "1 alone": line
            for line in lines[3:]}
    assert set(rows) == {"1", "2", "1 alone"}
    for line in rows.values():
        assert line.count("%)") == 5  # greedy forward, spec g=0/4; sampled spec g=0/4


def test_one_case_is_profiled(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--profile", "sampled,2,spec g=4", "--calls", "2", "--warmup", "1"]
    assert host_overhead.main(args) == 0
    assert "function calls" in capsys.readouterr().out



def _runners() -> tuple[host_overhead.StaticRunner, host_overhead.StaticRunner]:
    """A target and a draft runner of two slots on tiny models of a 300-token vocabulary."""
    shape = {"layers": 1, "hidden": 32, "vocab": 300}
    target, draft = (host_overhead.StaticRunner(host_overhead.tiny_qwen2(seed, **shape),
                                                num_slots=2, max_len=64) for seed in (0, 1))
    return target, draft


def test_top_logprobs_makes_every_step_score_its_tokens() -> None:
    target, draft = _runners()
    for top, scored in ((None, False), (2, True)):
        setup = host_overhead.Setup(target, draft, 2, 300, 0.0, top)
        results = host_overhead.cases(setup)["spec g=4"]()
        assert all((result.logprobs is not None) == scored for result in results)
        assert all(len(r.logprobs[0].top) == 2 for r in results if r.logprobs)
        setup.release()


def test_penalties_give_every_request_its_penalties() -> None:
    target, draft = _runners()
    for penalized in (False, True):
        setup = host_overhead.Setup(target, draft, 2, 300, 1.0, None, penalized)
        assert all((s.penalties is not None) == penalized for s in setup.states)
        assert all(s.sampling.penalized == penalized for s in setup.states)
        host_overhead.cases(setup)["spec g=4"]()
        setup.release()
