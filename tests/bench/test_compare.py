"""`bench compare` on tiny models: every method runs and Tandem's greedy output is the target's."""

from __future__ import annotations

from bench.engine_compare import format_compare, run_compare
from bench.workloads import Prompt, Workload


def test_compare_runs_every_method_and_checks_exactness(tiny_dirs) -> None:
    target, draft = tiny_dirs["different"]
    workload = Workload(
        name="tiny",
        prompts=(Prompt(id="a", text="def add(a, b):"), Prompt(id="b", text="for i in range")),
        max_new_tokens=12,
    )
    result = run_compare(workload, target=str(target), draft=str(draft), device="cpu",
                         dtype="float32", draft_dtype=None, gammas=[None, 0, 3])
    methods = [row["method"] for row in result["rows"]]
    assert methods == ["hf_target", "hf_assisted", "tandem_adaptive", "tandem_off", "tandem_g3"]
    assert all(row["equals_target"] for row in result["rows"])
    assert all(row["tokens_per_s"] > 0 for row in result["rows"])
    g3 = result["rows"][-1]
    assert 0 <= g3["acceptance_rate"] < 0.5  # a differently seeded draft rarely agrees
    assert sum(g3["drafted_by_position"]) > 0
    assert "tandem_g3" in format_compare(result)


def test_batching_runs_requests_alone_and_together(tiny_dirs) -> None:
    from bench.engine_compare import format_batching, run_batching

    target, draft = tiny_dirs["same"]
    workload = Workload(
        name="tiny",
        prompts=tuple(Prompt(id=str(i), text=t) for i, t in
                      enumerate(["def add(a, b):", "for i in range", "class Point:", "import os"])),
        max_new_tokens=10,
    )
    result = run_batching(workload, target=str(target), draft=str(draft), device="cpu",
                          dtype="float32", gammas=[0, None])
    assert [row["speculation"] for row in result["rows"]] == ["tandem_off", "tandem_adaptive"]
    assert all(row["same_outputs"] for row in result["rows"])
    assert all(row["concurrent_tokens_per_s"] > 0 for row in result["rows"])
    assert "together" in format_batching(result)


def test_batching_command_loads_the_draft_in_the_dtype_asked(tiny_dirs, tmp_path) -> None:
    """`bench batching --draft-dtype` used to be accepted and ignored (the draft ran in the
    target's dtype)."""
    import json

    from bench.cli import main
    from tests.tiny_models import make_tiny_pair

    target, draft = make_tiny_pair(tmp_path / "pair", ctx=1024)  # room for humaneval prompts
    assert main(["batching", "--workload", "humaneval", "--num-prompts", "2",
                 "--max-new-tokens", "3", "--target", str(target), "--draft", str(draft),
                 "--device", "cpu", "--dtype", "float32", "--draft-dtype", "bfloat16",
                 "--speculation", "off", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "batching.json").read_text())
    assert (result["dtype"], result["draft_dtype"]) == ("float32", "bfloat16")
