"""A short benchmark against a real grpc.aio server on tiny models, through the CLI.

The server runs in the test's event loop; ``bench.cli.main`` runs in a worker thread with its
own loop, as it would in its own process.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.cli import main
from bench.plots import ACCEPTANCE_PNG, LATENCY_PNG, SPEEDUP_PNG, THROUGHPUT_PNG
from decoding.models import load_pair
from service.server import start_server
from service.settings import Settings
from tests.conftest import make_engine
from tests.tiny_models import make_tiny_pair

NUM_PROMPTS = 3
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["same", "different"])
def tiny_pair_dirs(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # The chat prompts take up to ~200 tiny-tokenizer tokens: a wider window than the default.
    root = tmp_path_factory.mktemp(f"bench-{request.param}")
    return make_tiny_pair(root, same=request.param == "same", ctx=512)


@pytest.fixture
async def address(tiny_pair_dirs: tuple[Path, Path]) -> AsyncIterator[str]:
    target, draft = tiny_pair_dirs
    pair = load_pair(str(target), str(draft), device="cpu", dtype="float32", progress=False)
    engine = make_engine(pair, max_new_tokens_limit=64, default_max_new_tokens=16)
    running = await start_server(Settings(port=0, metrics_port=0, tracing="none"), engine)
    yield f"127.0.0.1:{running.port}"
    await running.shutdown(grace=0)


async def test_all_writes_sane_results_and_plots(
    address: str, tiny_pair_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    target, draft = tiny_pair_dirs
    out = tmp_path / "out"
    argv = [
        "all", "--address", address, "--workload", "chat",
        "--num-prompts", str(NUM_PROMPTS), "--max-new-tokens", str(MAX_NEW_TOKENS),
        "--concurrency", "1,2", "--speculation", "adaptive,off,2",
        "--target", str(target), "--draft", str(draft), "--dtype", "float32",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0

    results = json.loads((out / "results.json").read_text())
    runs = results["serving"]["runs"]
    assert [(r["speculation"], r["concurrency"]) for r in runs] == [
        ("adaptive", 1), ("adaptive", 2), ("off", 1), ("off", 2), ("gamma=2", 1), ("gamma=2", 2),
    ]  # fmt: skip
    assert results["serving"]["model_info"]["dtype"] == "float32"
    for run in runs:
        metrics = run["metrics"]
        assert (metrics["completed"], metrics["failed"]) == (NUM_PROMPTS, 0)
        assert metrics["failures_by_code"] == {}
        assert 0 < metrics["total_output_tokens"] <= NUM_PROMPTS * MAX_NEW_TOKENS
        assert metrics["output_throughput"] > 0 and metrics["request_throughput"] > 0
        assert metrics["goodput"] == pytest.approx(metrics["request_throughput"])  # no SLO
        for key in ("ttft_ms", "e2e_ms"):
            stats = metrics[key]
            assert stats["count"] == NUM_PROMPTS
            assert 0 < stats["median"] <= stats["p90"] <= stats["p99"]
        assert metrics["ttft_ms"]["median"] <= metrics["e2e_ms"]["median"]
        assert metrics["e2e_ms"]["p99"] <= metrics["duration_s"] * 1000
        spec = metrics["speculation"]
        assert spec["completion_tokens"] == metrics["total_output_tokens"]
        assert spec["mean_accepted_length"] >= 1.0
        assert run["greedy_matches_reference"] is True  # lossless: same ids as speculation off
        assert all(ids is not None for ids in run["output_token_ids"])
    off = [r for r in runs if r["speculation"] == "off"]
    assert all(r["metrics"]["speculation"]["draft_tokens"] == 0 for r in off)
    gamma2 = [r for r in runs if r["speculation"] == "gamma=2"]
    assert all(len(r["metrics"]["speculation"]["drafted_by_position"]) <= 2 for r in gamma2)
    if "same" in str(target):  # the draft is a copy of the target: everything is accepted
        assert all(r["metrics"]["speculation"]["acceptance_rate"] == 1.0 for r in gamma2)

    baselines = results["baselines"]
    assert [r["method"] for r in baselines["runs"]] == ["hf_target", "hf_assisted"]
    assert baselines["assisted_vs_target"]["identical"] is True
    assert all(r["tokens_per_s"] > 0 for r in baselines["runs"])
    # The server's greedy output is the target's own, token for token (float32, CPU).
    assert len(results["comparison"]) == len(runs)
    for row in results["comparison"]:
        assert row["same_dtype"] and row["same_draft_dtype"] and row["prompt_tokens_match"], row
        assert row["identical"] is True and row["compared"] == NUM_PROMPTS, row

    for name in (THROUGHPUT_PNG, LATENCY_PNG, ACCEPTANCE_PNG, SPEEDUP_PNG):
        assert (out / name).stat().st_size > 1000


async def test_unary_serving_with_an_slo(address: str, tmp_path: Path) -> None:
    argv = [
        "serving", "--address", address, "--workload", "chat", "--num-prompts", "2",
        "--max-new-tokens", "4", "--concurrency", "2", "--speculation", "off", "--unary",
        "--slo-e2e-ms", "0.001", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["serving"]["runs"]
    metrics = run["metrics"]
    assert run["stream"] is False
    assert metrics["completed"] == 2
    assert metrics["good_requests"] == 0 and metrics["goodput"] == 0.0  # nobody meets 1 µs
    assert metrics["itl_ms"]["count"] == 0  # a unary response is one arrival


async def test_a_server_that_is_not_there_counts_failures(tmp_path: Path) -> None:
    argv = [
        "serving", "--address", "127.0.0.1:1", "--workload", "chat", "--num-prompts", "2",
        "--concurrency", "1", "--speculation", "off", "--warmup", "0",
        "--request-timeout-s", "5", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 1  # nothing completed
    (run,) = json.loads((tmp_path / "results.json").read_text())["serving"]["runs"]
    assert run["metrics"]["failures_by_code"] == {"UNAVAILABLE": 2}
    assert run["metrics"]["ttft_ms"]["mean"] is None
