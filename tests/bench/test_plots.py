"""Plots and the ``plot`` subcommand, on a synthetic results file."""

from __future__ import annotations

import json
from pathlib import Path

from bench.cli import main
from bench.metrics import Arrival, RequestRecord, UsageRecord, summarize, to_jsonable
from bench.plots import ACCEPTANCE_PNG, LATENCY_PNG, SPEEDUP_PNG, THROUGHPUT_PNG
from bench.serving import ServingRun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(gamma: int | None, concurrency: int, tokens_per_message: int) -> ServingRun:
    drafted = [] if gamma == 0 else [4] * (gamma or 3)
    usage = UsageRecord(
        prompt_tokens=5,
        completion_tokens=8,
        draft_tokens=sum(drafted),
        accepted_draft_tokens=sum(drafted) // 2,
        target_forward_passes=8 // tokens_per_message,
        accepted_by_position=tuple(max(0, 3 - i) for i in range(len(drafted))),
        drafted_by_position=tuple(drafted),
    )
    arrivals = tuple(
        Arrival(0.1 * (i + 1), tokens_per_message) for i in range(8 // tokens_per_message)
    )
    record = RequestRecord(0, 0.0, arrivals[-1].time, arrivals, usage=usage)
    label = {None: "adaptive", 0: "off"}.get(gamma, f"gamma={gamma}")
    return ServingRun(label, gamma, concurrency, True, summarize([record]), [[1] * 8], [5])


def test_plot_command_redraws_every_png(tmp_path: Path) -> None:
    runs = [
        synthetic_run(gamma, concurrency, 1 if gamma == 0 else 2)
        for gamma in (None, 0, 2, 4)
        for concurrency in (1, 2, 4)
    ]
    results = {
        "serving": {"runs": to_jsonable(runs)},
        "baselines": {
            "runs": [{"method": "hf_target", "tokens_per_s": 3.0}],
            "assisted_speedup": 1.4,
        },
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert main(["plot", str(path), "--out", str(tmp_path / "png")]) == 0
    for name in (THROUGHPUT_PNG, LATENCY_PNG, ACCEPTANCE_PNG, SPEEDUP_PNG):
        assert (tmp_path / "png" / name).read_bytes().startswith(PNG_MAGIC)
