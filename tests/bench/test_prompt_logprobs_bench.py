"""bench.prompt_logprobs runs end to end on the tiny test pair and writes what it printed."""

from __future__ import annotations

import json

from bench import prompt_logprobs


def test_the_bench_runs_on_a_tiny_pair(tiny_dirs, tmp_path) -> None:
    target, draft = tiny_dirs["different"]
    out = tmp_path / "p.json"
    assert prompt_logprobs.main(["--target", str(target), "--draft", str(draft),
                                 "--lengths", "5", "17", "--top", "2", "--repeats", "2",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompt_tokens"], r["prompt_logprobs"]) for r in rows] == [
        (5, None), (5, 0), (5, 2), (17, None), (17, 0), (17, 2)]
    assert all(len(r["all_s"]) == 2 and r["median_s"] > 0 for r in rows)
    assert all(r["added_s"] == 0 for r in rows if r["prompt_logprobs"] is None)
