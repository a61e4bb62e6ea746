"""Tandem's engine against HF on one model load: ``python -m bench compare``.

Loads the pair once, then runs on the same prompts, dtype and lengths, one prompt at a time
(batch 1): HF ``generate`` with the target alone, HF assisted generation, and Tandem's engine
in-process with adaptive γ, speculation off and fixed γ values. Reports tokens/s, the speedup
over HF assisted generation, acceptance, mean accepted length, and whether each output equals
the target's own greedy output.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.baselines import BaselineRun, prompt_token_ids, run_method
from bench.compare import compare_outputs
from bench.workloads import Workload

if TYPE_CHECKING:
    from decoding.engine import Engine


@dataclass(frozen=True)
class EngineRun:
    method: str  # "tandem_adaptive", "tandem_off", "tandem_g4", ...
    tokens_per_s: float
    total_output_tokens: int
    total_seconds: float
    acceptance_rate: float
    mean_accepted_length: float
    accepted_by_position: list[int]
    drafted_by_position: list[int]
    outputs: list[list[int]] = field(repr=False)


def speculation_label(gamma: int | None) -> str:
    if gamma is None:
        return "tandem_adaptive"
    return "tandem_off" if gamma == 0 else f"tandem_g{gamma}"


async def _generate(engine: Engine, ids: Sequence[int], max_new: int, gamma: int | None) -> Any:
    from decoding.params import GenerationRequest, SpeculationParams

    handle = engine.submit(GenerationRequest(
        request_id="bench", prompt_token_ids=tuple(ids), max_new_tokens=max_new,
        speculation=SpeculationParams(gamma)))
    tokens = [t async for chunk in handle for t in chunk.token_ids]
    return tokens, handle.usage


def run_engine(
    engine: Engine, prompt_ids: Sequence[Sequence[int]], max_new: int, gamma: int | None
) -> EngineRun:
    asyncio.run(_generate(engine, prompt_ids[0], 4, gamma))  # warm-up, untimed
    outputs, seconds, drafted, accepted, passes = [], 0.0, 0, 0, 0
    by_pos_acc: list[int] = []
    by_pos_draft: list[int] = []
    for ids in prompt_ids:
        start = time.perf_counter()
        tokens, usage = asyncio.run(_generate(engine, ids, max_new, gamma))
        seconds += time.perf_counter() - start
        outputs.append(tokens)
        drafted += usage.draft_tokens
        accepted += usage.accepted_draft_tokens
        passes += usage.target_forward_passes
        pairs = zip(usage.accepted_by_position, usage.drafted_by_position, strict=True)
        for i, (a, d) in enumerate(pairs):
            if i >= len(by_pos_acc):
                by_pos_acc.append(0)
                by_pos_draft.append(0)
            by_pos_acc[i] += a
            by_pos_draft[i] += d
    total = sum(len(o) for o in outputs)
    return EngineRun(
        method=speculation_label(gamma),
        tokens_per_s=total / seconds if seconds else 0.0,
        total_output_tokens=total,
        total_seconds=seconds,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_accepted_length=total / passes if passes else 0.0,
        accepted_by_position=by_pos_acc,
        drafted_by_position=by_pos_draft,
        outputs=outputs,
    )


def run_compare(
    workload: Workload,
    *,
    target: str,
    draft: str,
    device: str,
    dtype: str,
    draft_dtype: str | None,
    gammas: Sequence[int | None],
    fast_path: str = "auto",
) -> dict[str, Any]:
    from decoding.engine import Engine, EngineConfig
    from decoding.models import load_pair

    pair = load_pair(target, draft, device=device, dtype=dtype, draft_dtype=draft_dtype)
    prompt_ids = [prompt_token_ids(pair.tokenizer, p) for p in workload.prompts]
    max_new = workload.max_new_tokens
    hf: dict[str, BaselineRun] = {
        method: run_method(pair, method, workload.prompts, prompt_ids, max_new)
        for method in ("hf_target", "hf_assisted")
    }
    reference = [o.output_token_ids for o in hf["hf_target"].outputs]
    started = time.perf_counter()
    engine = Engine(
        pair, EngineConfig(max_new_tokens_limit=max(2048, max_new), fast_path=fast_path)
    )
    cost_seconds = time.perf_counter() - started
    try:
        runs = [run_engine(engine, prompt_ids, max_new, gamma) for gamma in gammas]
    finally:
        engine.close()
    assisted_tps = hf["hf_assisted"].tokens_per_s
    rows = []
    for name, run in hf.items():
        rows.append({
            "method": name, "tokens_per_s": run.tokens_per_s,
            "vs_hf_assisted": run.tokens_per_s / assisted_tps if assisted_tps else None,
            "equals_target": compare_outputs(
                [o.output_token_ids for o in run.outputs], reference).identical,
            "acceptance_rate": None, "mean_accepted_length": None,
        })
    for tandem in runs:
        rows.append({
            "method": tandem.method, "tokens_per_s": tandem.tokens_per_s,
            "vs_hf_assisted": tandem.tokens_per_s / assisted_tps if assisted_tps else None,
            "equals_target": compare_outputs(tandem.outputs, reference).identical,
            "acceptance_rate": tandem.acceptance_rate,
            "mean_accepted_length": tandem.mean_accepted_length,
            "accepted_by_position": tandem.accepted_by_position,
            "drafted_by_position": tandem.drafted_by_position,
        })
    return {
        "target": pair.target.name, "draft": pair.draft.name, "device": str(pair.device),
        "dtype": str(pair.dtype).removeprefix("torch."),
        "draft_dtype": str(pair.draft_dtype).removeprefix("torch."),
        "fast_path": engine.batched,
        "workload": workload.describe(),
        "cost_model": {"measure_seconds": cost_seconds,
                       "draft_s": engine.costs.draft_s, "target_s": engine.costs.target_s},
        "rows": rows,
    }


def format_compare(result: dict[str, Any]) -> str:
    lines = [
        f"{result['target']} + {result['draft']} on {result['device']}, "
        f"{result['dtype']} (draft {result['draft_dtype']}), fast path "
        f"{'on' if result['fast_path'] else 'off'}, "
        f"{result['workload'].get('num_prompts')} prompts x "
        f"{result['workload'].get('max_new_tokens')} new tokens, greedy, batch 1",
        f"{'method':<18}{'tok/s':>8}{'vs HF assisted':>16}{'= target':>10}{'α':>7}{'MAL':>7}",
    ]
    for row in result["rows"]:
        alpha = row["acceptance_rate"]
        mal = row["mean_accepted_length"]
        lines.append(
            f"{row['method']:<18}{row['tokens_per_s']:>8.2f}"
            f"{row['vs_hf_assisted']:>15.2f}x{'yes' if row['equals_target'] else 'NO':>10}"
            f"{'' if alpha is None else f'{alpha:.2f}':>7}{'' if mal is None else f'{mal:.2f}':>7}"
        )
    return "\n".join(lines)


async def _concurrent(
    engine: Engine, prompt_ids: Sequence[Sequence[int]], max_new: int, gamma: int | None
) -> list[list[int]]:
    results = await asyncio.gather(*(_generate(engine, ids, max_new, gamma) for ids in prompt_ids))
    return [tokens for tokens, _ in results]


def run_batching(
    workload: Workload,
    *,
    target: str,
    draft: str,
    device: str,
    dtype: str,
    gammas: Sequence[int | None],
    decode_steps: int | None = None,
    draft_dtype: str | None = None,
) -> dict[str, Any]:
    """The same N requests one after another, then all at once (batched steps on the fast
    path): aggregate tokens/s of each, and whether the outputs are the same.
    ``decode_steps``: the engine's (None: its default); ``draft_dtype``: as ``load_pair``'s
    (None: the target's)."""
    from decoding.engine import Engine, EngineConfig
    from decoding.models import load_pair

    pair = load_pair(target, draft, device=device, dtype=dtype, draft_dtype=draft_dtype)
    prompt_ids = [prompt_token_ids(pair.tokenizer, p) for p in workload.prompts]
    max_new = workload.max_new_tokens
    engine = Engine(pair, EngineConfig(
        max_concurrent_requests=max(len(prompt_ids), 1), fast_path="on",
        max_new_tokens_limit=max(2048, max_new), decode_steps=decode_steps))
    rows = []
    try:
        asyncio.run(_generate(engine, prompt_ids[0], 4, None))  # warm-up
        for gamma in gammas:
            start = time.perf_counter()
            alone = [asyncio.run(_generate(engine, ids, max_new, gamma))[0] for ids in prompt_ids]
            sequential_s = time.perf_counter() - start
            start = time.perf_counter()
            together = asyncio.run(_concurrent(engine, prompt_ids, max_new, gamma))
            concurrent_s = time.perf_counter() - start
            tokens = sum(len(t) for t in together)
            rows.append({
                "speculation": speculation_label(gamma),
                "requests": len(prompt_ids),
                "sequential_tokens_per_s": sum(len(t) for t in alone) / sequential_s,
                "concurrent_tokens_per_s": tokens / concurrent_s,
                "same_outputs": alone == together,
            })
    finally:
        engine.close()
    return {"target": pair.target.name, "draft": pair.draft.name, "device": str(pair.device),
            "dtype": str(pair.dtype).removeprefix("torch."),
            "draft_dtype": str(pair.draft_dtype).removeprefix("torch."),
            "workload": workload.describe(),
            "decode_steps": engine.stepper.decode_steps, "rows": rows}


def format_batching(result: dict[str, Any]) -> str:
    lines = [f"{result['target']} + {result['draft']} on {result['device']}, {result['dtype']}"
             f" (draft {result.get('draft_dtype', result['dtype'])})",
             f"{'speculation':<18}{'requests':>9}{'one by one':>12}{'together':>10}{'gain':>7}"
             f"{'same':>6}"]
    for row in result["rows"]:
        gain = row["concurrent_tokens_per_s"] / row["sequential_tokens_per_s"]
        lines.append(f"{row['speculation']:<18}{row['requests']:>9}"
                     f"{row['sequential_tokens_per_s']:>12.2f}{row['concurrent_tokens_per_s']:>10.2f}"
                     f"{gain:>6.2f}x{'yes' if row['same_outputs'] else 'NO':>6}")
    return "\n".join(lines)
