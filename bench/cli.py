"""``python -m bench`` (and ``tandem bench``): serving sweeps, HF baselines, results and plots.

Subcommands:

- ``serving --address HOST:PORT``: sweep a running server over concurrency and speculation;
- ``baselines``: HF ``generate`` (target alone) and HF assisted generation, outside the server;
- ``all``: both on the same prompts, and a check that the server's greedy outputs equal the
  target's own;
- ``compare``: Tandem's engine in-process against HF ``generate`` and HF assisted generation,
  on one model load (batch 1; the issue-2 CPU comparison);
- ``plot RESULTS``: redraw the PNGs of a results file.

Each writes ``results.json`` and its PNGs into ``--out`` (default ``bench/out/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from bench.metrics import SLO, to_jsonable
from bench.workloads import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_SEED,
    PROMPT_SETS,
    Arrival,
    Workload,
    build_workload,
)

DEFAULT_OUT = Path("bench/out")
RESULTS_FILE = "results.json"
DEFAULT_NUM_PROMPTS = 32


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "arrival", None) == "poisson" and not (args.rate and args.rate > 0):
        parser.error("--arrival poisson needs --rate > 0 (requests/s)")
    if getattr(args, "rate", None) is not None and args.arrival != "poisson":
        parser.error("--rate applies only to --arrival poisson")
    return int(args.handler(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench", description="Benchmarks for the Tandem speculative-decoding service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serving = commands.add_parser("serving", help="sweep a running server (gRPC only)")
    _workload_flags(serving)
    _serving_flags(serving)
    _out_flag(serving)
    serving.set_defaults(handler=_serving_command)

    baselines = commands.add_parser("baselines", help="HF generate and HF assisted generation")
    _workload_flags(baselines)
    _baseline_flags(baselines)
    _out_flag(baselines)
    baselines.set_defaults(handler=_baselines_command)

    both = commands.add_parser("all", help="serving and baselines on the same prompts")
    _workload_flags(both)
    _serving_flags(both)
    _baseline_flags(both)
    _out_flag(both)
    both.set_defaults(handler=_all_command)

    compare = commands.add_parser(
        "compare", help="Tandem's engine vs HF target alone and HF assisted, one model load"
    )
    _workload_flags(compare)
    _baseline_flags(compare)
    compare.add_argument(
        "--speculation", default="adaptive,off,3,5",
        help="comma list of adaptive, off or γ values (default %(default)s)",
    )
    compare.add_argument("--fast-path", choices=("auto", "on", "off"), default="auto")
    _out_flag(compare)
    compare.set_defaults(handler=_compare_command)

    batching = commands.add_parser(
        "batching", help="N requests one by one, then together on the fast path (aggregate tok/s)"
    )
    _workload_flags(batching)
    _baseline_flags(batching)
    batching.add_argument("--speculation", default="off,adaptive")
    batching.add_argument("--decode-steps", type=int, default=0,
                          help="the engine's γ = 0 steps taken at once (0: its default)")
    _out_flag(batching)
    batching.set_defaults(handler=_batching_command)

    plot = commands.add_parser("plot", help="redraw the PNGs of a results file")
    plot.add_argument("results", type=Path, help="a results.json written by bench")
    plot.add_argument("--out", type=Path, help="folder for the PNGs (default: beside RESULTS)")
    plot.set_defaults(handler=_plot_command)
    return parser


def _workload_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--workload", choices=PROMPT_SETS, default="humaneval")
    group.add_argument("--num-prompts", type=_positive_int, default=DEFAULT_NUM_PROMPTS)
    group.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS)
    group.add_argument("--seed", type=int, default=DEFAULT_SEED)


def _serving_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("serving")
    group.add_argument("--address", required=True, help="the server, HOST:PORT")
    group.add_argument(
        "--concurrency", type=_int_list, default=[1, 2, 4, 8, 16], help="e.g. 1,2,4,8,16"
    )
    group.add_argument(
        "--speculation",
        type=_speculation_list,
        default="adaptive,off,2,4",
        help="comma-separated: adaptive (unset), off (0) or a fixed γ (default %(default)s)",
    )
    group.add_argument("--unary", action="store_true", help="call Generate, not GenerateStream")
    group.add_argument("--arrival", choices=("burst", "poisson"), default="burst")
    group.add_argument("--rate", type=float, help="requests/s for --arrival poisson")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--slo-ttft-ms", type=float, help="goodput SLO on time to first token")
    group.add_argument("--slo-tpot-ms", type=float, help="goodput SLO on time per output token")
    group.add_argument("--slo-e2e-ms", type=float, help="goodput SLO on end-to-end latency")
    group.add_argument("--request-timeout-s", type=float, default=600.0)
    group.add_argument("--warmup", type=int, default=1, help="untimed requests before the sweep")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _baseline_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("baselines")
    group.add_argument("--target", default="default", help="folder, .gguf, hub id or default")
    group.add_argument("--draft", default="default", help="folder, .gguf, hub id or default")
    group.add_argument("--device", default="cpu")
    group.add_argument("--dtype", default="float32")
    group.add_argument(
        "--draft-dtype",
        help="the draft's dtype (default: --dtype; for `all`, the server's draft dtype)",
    )
    group.add_argument(
        "--methods", type=_methods, default="hf_target,hf_assisted", help="%(default)s"
    )


def _out_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default %(default)s")


def workload_from_args(args: argparse.Namespace) -> Workload:
    rate = getattr(args, "rate", None)
    arrival = Arrival(kind=getattr(args, "arrival", "burst"), rate=rate, seed=args.seed)
    return build_workload(
        args.workload,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        arrival=arrival,
        temperature=getattr(args, "temperature", 0.0),
        seed=args.seed,
    )


def _serving_command(args: argparse.Namespace) -> int:
    workload = workload_from_args(args)
    serving = _run_serving(args, workload)
    _finish(args.out, {"serving": serving})
    return 0 if any(run["metrics"]["completed"] for run in serving["runs"]) else 1


def _baselines_command(args: argparse.Namespace) -> int:
    workload = workload_from_args(args)
    baselines = _run_baselines(args, workload)
    if baselines is None:
        return 2
    _finish(args.out, {"baselines": baselines})
    return 0


def _all_command(args: argparse.Namespace) -> int:
    workload = workload_from_args(args)
    serving = _run_serving(args, workload)
    if workload.temperature != 0:
        print("bench: baselines are greedy; skipped at --temperature > 0", file=sys.stderr)
        baselines = None
    else:
        if args.draft_dtype is None:  # HF assisted gets the draft the server runs
            args.draft_dtype = serving["model_info"].get("draft_dtype") or None
        baselines = _run_baselines(args, workload)
    results: dict[str, Any] = {"serving": serving, "baselines": baselines}
    if baselines is not None:
        results["comparison"] = compare_with_target(serving, baselines)
    _finish(args.out, results)
    return 0 if any(run["metrics"]["completed"] for run in serving["runs"]) else 1


def _compare_command(args: argparse.Namespace) -> int:
    from bench.engine_compare import format_compare, run_compare

    gammas = _gamma_list(args.speculation)
    result = run_compare(
        workload_from_args(args), target=args.target, draft=args.draft, device=args.device,
        dtype=args.dtype, draft_dtype=args.draft_dtype, gammas=gammas, fast_path=args.fast_path,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    print(format_compare(result))
    return 0


def _gamma_list(text: str) -> list[int | None]:
    """adaptive -> None (adaptive γ), off -> 0, else a fixed γ."""
    return [None if s == "adaptive" else 0 if s == "off" else int(s) for s in text.split(",")]


def _batching_command(args: argparse.Namespace) -> int:
    from bench.engine_compare import format_batching, run_batching

    result = run_batching(
        workload_from_args(args), target=args.target, draft=args.draft, device=args.device,
        dtype=args.dtype, gammas=_gamma_list(args.speculation),
        decode_steps=args.decode_steps or None, draft_dtype=args.draft_dtype,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(result, indent=2))
    print(format_batching(result))
    return 0


def _plot_command(args: argparse.Namespace) -> int:
    from bench.plots import write_plots

    results = json.loads(args.results.read_text(encoding="utf-8"))
    for path in write_plots(results, args.out or args.results.parent):
        print(path)
    return 0


def _run_serving(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    from bench.serving import ServingConfig, run_sweep

    config = ServingConfig(
        address=args.address,
        concurrency=tuple(args.concurrency),
        speculation=tuple(args.speculation),
        stream=not args.unary,
        slo=SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, e2e_ms=args.slo_e2e_ms),
        request_timeout_s=args.request_timeout_s,
        warmup_requests=args.warmup,
        progress=not args.no_progress,
    )
    results: dict[str, Any] = to_jsonable(run_sweep(config, workload))
    return results


def _run_baselines(args: argparse.Namespace, workload: Workload) -> dict[str, Any] | None:
    """The baselines as JSON, or ``None`` (after saying why) when the models do not load."""
    from bench.baselines import BaselineConfig, run_baselines
    from decoding.errors import ModelLoadError

    config = BaselineConfig(
        target=args.target,
        draft=args.draft,
        device=args.device,
        dtype=args.dtype,
        draft_dtype=args.draft_dtype,
        methods=tuple(args.methods),
    )
    try:
        results: dict[str, Any] = to_jsonable(run_baselines(config, workload))
    except ModelLoadError as err:
        print(f"bench: baselines skipped: {err}", file=sys.stderr)
        return None
    return results


def compare_with_target(serving: dict[str, Any], baselines: dict[str, Any]) -> list[dict[str, Any]]:
    """Each serving run's outputs against HF ``generate`` with the target alone."""
    from bench.compare import compare_outputs

    target = next((r for r in baselines["runs"] if r["method"] == "hf_target"), None)
    if target is None:
        return []
    reference = [o["output_token_ids"] for o in target["outputs"]]
    reference_prompt_tokens = [o["prompt_tokens"] for o in target["outputs"]]
    server_dtype = serving["model_info"].get("dtype")
    rows = []
    for run in serving["runs"]:
        comparison = compare_outputs(run["output_token_ids"], reference)
        prompt_tokens_match = all(
            served is None or served == expected
            for served, expected in zip(run["prompt_tokens"], reference_prompt_tokens, strict=True)
        )
        rows.append(
            {
                "run": f"{run['speculation']} c={run['concurrency']}",
                "against": "hf_target",
                "same_dtype": server_dtype == baselines["dtype"],
                "same_draft_dtype": serving["model_info"].get("draft_dtype")
                == baselines.get("draft_dtype"),
                "prompt_tokens_match": prompt_tokens_match,
                **to_jsonable(comparison),
            }
        )
    return rows


def _finish(out: Path, sections: dict[str, Any]) -> None:
    from bench.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    results = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **sections,
    }
    path = out / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(format_summary(results))
    print(f"wrote {path}")
    for png in write_plots(results, out):
        print(f"wrote {png}")


def format_summary(results: dict[str, Any]) -> str:
    """A short plain-text table of the headline numbers."""
    lines = []
    serving = results.get("serving")
    if serving:
        lines.append(
            f"{'speculation':<12}{'conc':>5}{'ok':>5}{'fail':>5}{'tok/s':>9}{'req/s':>8}"
            f"{'TTFT p50':>10}{'TPOT p50':>10}{'E2E p50':>10}{'alpha':>7}{'MAL':>6}  same"
        )
        for run in serving["runs"]:
            m, spec = run["metrics"], run["metrics"]["speculation"]
            lines.append(
                f"{run['speculation']:<12}{run['concurrency']:>5}{m['completed']:>5}"
                f"{m['failed']:>5}{m['output_throughput']:>9.1f}{m['request_throughput']:>8.2f}"
                f"{_ms(m['ttft_ms']['median']):>10}{_ms(m['tpot_ms']['median']):>10}"
                f"{_ms(m['e2e_ms']['median']):>10}{_ratio(spec['acceptance_rate']):>7}"
                f"{_ratio(spec['mean_accepted_length']):>6}  {run['greedy_matches_reference']}"
            )
    baselines = results.get("baselines")
    if baselines:
        for run in baselines["runs"]:
            lines.append(f"{run['method']:<12} {run['tokens_per_s']:.2f} tok/s (batch 1)")
        same = (baselines.get("assisted_vs_target") or {}).get("identical")
        lines.append(f"hf_assisted output identical to hf_target: {same}")
    for row in results.get("comparison") or []:
        lines.append(f"{row['run']}: identical to hf_target: {row['identical']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from err


def _speculation_list(text: str) -> list[Any]:
    from bench.serving import SpeculationSetting

    try:
        return [SpeculationSetting.parse(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _methods(text: str) -> list[str]:
    from bench.baselines import METHODS

    methods = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"methods must be among {', '.join(METHODS)}")
    return methods
