"""PNG plots of a results file (the JSON ``bench`` writes), drawn with matplotlib's Agg canvas.

Plots read the JSON form, so ``python -m bench plot results.json`` redraws them later. Figures
are built with ``matplotlib.figure.Figure`` rather than pyplot: no global backend or state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

THROUGHPUT_PNG = "throughput_vs_concurrency.png"
LATENCY_PNG = "latency_vs_concurrency.png"
ACCEPTANCE_PNG = "acceptance_by_position.png"
SPEEDUP_PNG = "speedup_vs_gamma.png"


def write_plots(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write every plot the results have data for; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = (results.get("serving") or {}).get("runs") or []
    baselines = results.get("baselines")
    written = []
    if runs:
        written.append(_save(throughput_figure(runs, baselines), out_dir / THROUGHPUT_PNG))
        written.append(_save(latency_figure(runs), out_dir / LATENCY_PNG))
        written.append(_save(acceptance_figure(runs), out_dir / ACCEPTANCE_PNG))
        written.append(_save(speedup_figure(runs, baselines), out_dir / SPEEDUP_PNG))
    return written


def by_setting(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Runs grouped by speculation setting, each group sorted by concurrency."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[run["speculation"]].append(run)
    return {k: sorted(v, key=lambda r: r["concurrency"]) for k, v in groups.items()}


def throughput_figure(
    runs: Sequence[Mapping[str, Any]], baselines: Mapping[str, Any] | None = None
) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for label, group in by_setting(runs).items():
        xs = [r["concurrency"] for r in group]
        axes.plot(xs, [r["metrics"]["output_throughput"] for r in group], marker="o", label=label)
    for run in (baselines or {}).get("runs") or []:
        axes.axhline(run["tokens_per_s"], linestyle=":", color="gray")
        axes.annotate(
            f"{run['method']} (batch 1)",
            (0.01, run["tokens_per_s"]),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color="gray",
        )
    _concurrency_axis(axes, runs)
    axes.set_ylabel("output tokens/s")
    axes.set_title("Throughput vs concurrency, by speculation setting")
    axes.legend()
    return figure


def latency_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    figure = Figure(figsize=(13, 4.5))
    panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency"))
    groups = by_setting(runs)
    for position, (key, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        for label, group in groups.items():
            xs = [r["concurrency"] for r in group]
            line = axes.plot(
                xs, [r["metrics"][key]["median"] for r in group], marker="o", label=f"{label} p50"
            )[0]
            axes.plot(
                xs,
                [r["metrics"][key]["p99"] for r in group],
                linestyle="--",
                color=line.get_color(),
                label=f"{label} p99",
            )
        _concurrency_axis(axes, runs)
        axes.set_ylabel("ms")
        axes.set_title(title)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def pooled_acceptance(group: Sequence[Mapping[str, Any]]) -> list[float | None]:
    """Acceptance by draft position, counts summed over the runs of one setting."""
    accepted: list[int] = []
    drafted: list[int] = []
    for run in group:
        stats = run["metrics"]["speculation"]
        for total, counts in (
            (accepted, stats["accepted_by_position"]),
            (drafted, stats["drafted_by_position"]),
        ):
            total.extend([0] * (len(counts) - len(total)))
            for i, count in enumerate(counts):
                total[i] += count
    accepted.extend([0] * (len(drafted) - len(accepted)))
    return [a / d if d else None for a, d in zip(accepted, drafted, strict=False)]


def acceptance_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    plotted = False
    for label, group in by_setting(runs).items():
        rates = pooled_acceptance(group)
        points = [(i + 1, r) for i, r in enumerate(rates) if r is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=label)
            plotted = True
    axes.set_xlabel("draft position (1 = first drafted token)")
    axes.set_ylabel("accepted / drafted at this position")
    axes.set_ylim(0, 1.05)
    axes.set_title("Acceptance by draft position (all concurrencies pooled)")
    if plotted:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "nothing was drafted", ha="center", transform=axes.transAxes)
    return figure


def speedup_figure(
    runs: Sequence[Mapping[str, Any]], baselines: Mapping[str, Any] | None = None
) -> Figure:
    """Output tokens/s of each fixed γ over speculation off, at each concurrency."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    off = {r["concurrency"]: r for r in runs if r["num_speculative_tokens"] == 0}
    plotted = False
    for concurrency, reference in sorted(off.items()):
        base = reference["metrics"]["output_throughput"]
        if base <= 0:
            continue
        plotted = True
        fixed = sorted(
            (r["num_speculative_tokens"], r["metrics"]["output_throughput"] / base)
            for r in runs
            if r["concurrency"] == concurrency and r["num_speculative_tokens"] is not None
        )
        line = axes.plot(*zip(*fixed, strict=True), marker="o", label=f"c={concurrency}")[0]
        for r in runs:
            if r["concurrency"] == concurrency and r["num_speculative_tokens"] is None:
                axes.axhline(
                    r["metrics"]["output_throughput"] / base,
                    linestyle="--",
                    color=line.get_color(),
                    label=f"adaptive c={concurrency}",
                )
    speedup = (baselines or {}).get("assisted_speedup")
    if speedup:
        axes.axhline(speedup, linestyle=":", color="gray", label="HF assisted / HF target")
    axes.axhline(1.0, color="black", linewidth=0.6)
    gammas = sorted({r["num_speculative_tokens"] for r in runs} - {None})
    if gammas:
        axes.set_xticks(gammas)
    axes.set_xlabel("γ (num_speculative_tokens; 0 = off)")
    axes.set_ylabel("speedup over speculation off")
    axes.set_title("Speedup vs γ")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    if not plotted:
        axes.text(0.5, 0.5, "no output with speculation off", ha="center", transform=axes.transAxes)
    return figure


def _concurrency_axis(axes: Any, runs: Sequence[Mapping[str, Any]]) -> None:
    levels = sorted({r["concurrency"] for r in runs})
    if len(levels) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(levels, [str(c) for c in levels])
    axes.set_xticks([], minor=True)
    axes.set_xlabel("concurrency (requests in flight)")


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
