"""The GPU benchmark: random-weight models of the real Qwen2.5 shapes, no download.

``python -m bench.gpu --out DIR`` (or ``bash bench/gpu.sh`` on the GPU machine). The machine it
is meant for has torch, transformers and grpcio, no network and room for only a small upload, so
the models are built here from their configurations with random weights, directly on the
device, in bfloat16: the draft is Qwen2.5-0.5B's shape and the targets Qwen2.5-1.5B's and
Qwen2.5-7B's (vocabulary 151,936; untied output heads for 1.5B and 7B as in the real weights).
What a forward pass costs does not depend on the weights' values; what random models do not
give is acceptance, so speculation runs with :class:`bench.drafters.ControlledProposer`, which
runs the real draft forward but proposes the target's known greedy tokens, each made wrong with
probability 1 - α.

Per target, at batch 1, greedy, on the same random prompts and lengths:

- copy bandwidth (one large device-to-device copy, read + write bytes over time) and the
  memory-bandwidth limit, tokens/s = bandwidth / the target's weight bytes;
- HF ``generate`` with the target alone, and HF assisted generation (``assistant_model``);
- Tandem with speculation off, and at controlled α in {0, 0.5, 0.7, 0.9} with adaptive γ
  (the γ it chose, the acceptance measured, the mean accepted length);
- the draft/target cost ratio c the engine measured (``engine.costs``), and Leviathan's
  expected speedup at the measured α and costs;
- each figure as a fraction of the bandwidth limit.

For one target (1.5B by default), right after its own figures, aggregate tokens/s at
concurrency 1, 2, 4, 8, 16: N requests submitted at once to that target's engine (no second
engine to build), speculation off and adaptive (controlled α).

Results go to ``gpu_results.json`` (rewritten after every section, so a run cut short keeps
what it measured) and PNGs in ``--out`` (default: ``$OUT``, else ``bench/out/gpu``); a short
table is printed last. ``--quick`` uses tiny shapes so the whole run takes seconds on a CPU
(the tests use it). A time budget (``--budget-s``) skips the sections that would start after
it, and says which.

Options can also come from the environment: ``BENCH_GPU_<OPTION>`` (for example
``BENCH_GPU_TARGETS=7b``, ``BENCH_GPU_BUDGET_S=300``, ``BENCH_GPU_QUICK=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from bench.drafters import ControlledProposer, GreedyOracle

if TYPE_CHECKING:
    from decoding.engine import Engine, RequestHandle
    from decoding.models import ModelPair

RESULTS_JSON = "gpu_results.json"
TOKENS_PNG = "gpu_tokens_vs_alpha.png"
SPEEDUP_PNG = "gpu_speedup_vs_alpha.png"
CONCURRENCY_PNG = "gpu_throughput_vs_concurrency.png"

T = TypeVar("T")


@dataclass(frozen=True)
class Shape:
    """A Qwen2 decoder's shape."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    tie_embeddings: bool


QWEN_VOCAB = 151_936
DRAFT_SHAPE = Shape("qwen2.5-0.5b", 24, 896, 14, 2, 4864, tie_embeddings=True)
TARGET_SHAPES = {
    "1.5b": Shape("qwen2.5-1.5b", 28, 1536, 12, 2, 8960, tie_embeddings=False),
    "7b": Shape("qwen2.5-7b", 28, 3584, 28, 4, 18944, tie_embeddings=False),
}

# --quick: the same structure at toy sizes (seconds on a CPU).
TINY_VOCAB = 512
TINY_DRAFT_SHAPE = Shape("tiny-draft", 2, 32, 4, 2, 64, tie_embeddings=True)
TINY_TARGET_SHAPES = {
    "tiny-s": Shape("tiny-s", 2, 48, 4, 2, 96, tie_embeddings=False),
    "tiny-l": Shape("tiny-l", 2, 64, 4, 2, 128, tie_embeddings=False),
}

CONTEXT_WINDOW = 32_768


@dataclass(frozen=True)
class GpuBenchConfig:
    out: Path
    quick: bool = False
    device: str = "auto"
    dtype: str = "auto"
    targets: tuple[str, ...] = ()  # () = every target of the chosen size
    alphas: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9)
    prompts: int = 3
    hf_prompts: int = 1  # prompts the (slow) HF baselines run; 0 = all
    prompt_len: int = 64
    max_new_tokens: int = 128
    max_gamma: int = 8
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    concurrency_target: str = ""  # "" = 1.5b (or the first target)
    concurrency_tokens: int = 32
    concurrency_alpha: float = 0.7
    skip: tuple[str, ...] = ()  # sections to leave out: hf_target, hf_assisted, concurrency
    budget_s: float = 330.0
    fixed_gamma: int = 0  # > 0: also run every α at this fixed γ
    copy_mib: int = 1024
    max_context: int = 0  # the engine's max_context (cache slot length); 0 = its default
    seed: int = 0
    compile: str = "auto"  # the engine's torch.compile of the fast path: auto (CUDA), on, off
    attention: str = "auto"  # the fast path's attention: auto (its default), matmul, sdpa, flex
    decode_steps: int = 0  # the engine's γ = 0 steps taken at once; 0: its default
    profile: bool = False  # profile a controlled-α run of the first target (torch.profiler)

    def sizes(self) -> tuple[Shape, dict[str, Shape], int]:
        if self.quick:
            return TINY_DRAFT_SHAPE, TINY_TARGET_SHAPES, TINY_VOCAB
        return DRAFT_SHAPE, TARGET_SHAPES, QWEN_VOCAB


# ---- building blocks ---------------------------------------------------------------------------


class BenchTokenizer:
    """BENCHMARK-ONLY stand-in for a tokenizer: random-weight models have no vocabulary text.

    The engine needs a tokenizer only to encode text prompts (the benchmark sends
    ``prompt_token_ids``) and to detokenize its output for stop strings and text deltas, which
    calls ``decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=...)``. Here a
    token's text is its id in decimal, space separated; ``encode`` reads that back.
    """

    pad_token_id: int | None = None
    eos_token_id: int | None = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
    ) -> str:
        return " ".join(str(int(i)) for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(word) for word in text.split()]


def resolve(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(
    shape: Shape, vocab: int, device: torch.device, dtype: torch.dtype, seed: int
) -> Any:
    """A random-weight ``Qwen2ForCausalLM`` of ``shape``, created on ``device`` in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.mlp,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=CONTEXT_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    # No end-of-sequence token: every generation runs to its full length.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model: Any) -> int:
    """What one batch-1 decode step reads of the weights: every parameter (a tied embedding
    counted once, since the output head reads it whole), except an untied input embedding,
    of which a step gathers one row per token. (Until 2026-11-27 this counted every
    parameter, as issue 8's table does: a lower limit, and shares of it 7% (7B) to 15% (1.5B)
    higher than this one gives.)"""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    return total


def make_pair(target: Any, draft: Any, names: tuple[str, str], vocab: int) -> ModelPair:
    """A tokenizer-free ModelPair (see :class:`BenchTokenizer`) and no eos ids."""
    from decoding.models import LoadedModel, ModelPair

    return ModelPair(
        target=LoadedModel(names[0], target, vocab, CONTEXT_WINDOW),
        draft=LoadedModel(names[1], draft, vocab, CONTEXT_WINDOW),
        tokenizer=cast(Any, BenchTokenizer(vocab)),
        device=target.device,
        dtype=target.dtype,
        draft_dtype=draft.dtype,
        eos_token_ids=(),
    )


def copy_bandwidth(device: torch.device, mib: int, repeats: int = 10) -> dict[str, float]:
    """Device memory bandwidth from copying a ``mib`` MiB buffer: (read + write) bytes / time."""
    nbytes = mib * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        samples.append(time.perf_counter() - start)
    del src, dst
    samples.sort()
    return {
        "buffer_bytes": float(nbytes),
        "best_gb_s": 2 * nbytes / samples[0] / 1e9,
        "median_gb_s": 2 * nbytes / samples[len(samples) // 2] / 1e9,
    }


def hf_greedy(model: Any, ids: Sequence[int], n: int, assistant: Any = None) -> list[int]:
    """HF ``generate``, greedy, batch 1: the ``n`` new token ids after ``ids``."""
    inputs = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    options: dict[str, Any] = {
        "max_new_tokens": n, "do_sample": False, "num_beams": 1, "pad_token_id": 0,
    }
    if assistant is not None:
        options["assistant_model"] = assistant
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
    return [int(t) for t in out[0, inputs.shape[1] :].tolist()]


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


# ---- timed runs --------------------------------------------------------------------------------


def time_hf(
    pair: ModelPair, prompts: Sequence[Sequence[int]], n: int, *, assisted: bool
) -> dict[str, Any]:
    model = pair.target.model
    assistant = pair.draft.model if assisted else None
    hf_greedy(model, prompts[0], 4, assistant)  # warm-up, untimed
    outputs, seconds = [], 0.0
    for ids in prompts:
        synchronize(pair.device)
        start = time.perf_counter()
        outputs.append(hf_greedy(model, ids, n, assistant))
        synchronize(pair.device)
        seconds += time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {
        "method": "hf_assisted" if assisted else "hf_target",
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "tokens": tokens,
        "seconds": seconds,
        "outputs": outputs,
    }


def _request(ids: Sequence[int], n: int, gamma: int | None, rid: str) -> Any:
    from decoding.params import GenerationRequest, SpeculationParams

    return GenerationRequest(
        request_id=rid, prompt_token_ids=tuple(ids), max_new_tokens=n,
        speculation=SpeculationParams(gamma),
    )


async def _drain(handle: RequestHandle) -> list[int]:
    return [t async for chunk in handle for t in chunk.token_ids]


async def _sequential(
    engine: Engine, prompts: Sequence[Sequence[int]], n: int, gamma: int | None
) -> tuple[list[list[int]], list[RequestHandle], float]:
    outputs, handles, seconds = [], [], 0.0
    for i, ids in enumerate(prompts):
        synchronize(engine.pair.device)
        start = time.perf_counter()
        handle = engine.submit(_request(ids, n, gamma, f"seq-{i}"))
        outputs.append(await _drain(handle))
        synchronize(engine.pair.device)
        seconds += time.perf_counter() - start
        handles.append(handle)
    return outputs, handles, seconds


async def _concurrent(
    engine: Engine, prompts: Sequence[Sequence[int]], n: int, gamma: int | None
) -> tuple[list[list[int]], list[RequestHandle], float]:
    synchronize(engine.pair.device)
    start = time.perf_counter()
    handles = [engine.submit(_request(ids, n, gamma, f"con-{i}")) for i, ids in enumerate(prompts)]
    outputs = await asyncio.gather(*(_drain(h) for h in handles))
    synchronize(engine.pair.device)
    return list(outputs), handles, time.perf_counter() - start


def per_forward_ms(records: Sequence[Any], refill_s: float) -> tuple[float, float]:
    """Drafting and verifying, ms per target forward, from the requests' step records, the
    oracle's refills (``refill_s``, inside drafting) left out. The rows of a batched step share
    its record time and its draft and verify times: each step counts once (so does a refill
    inside it), its forwards as its busiest row's (a group of plain steps: one per token)."""
    by_step: dict[int, tuple[float, float, int]] = {}
    for step in records:
        forwards = step.emitted if step.gamma == 0 else 1
        seen = by_step.get(step.start_ns)
        by_step[step.start_ns] = (step.draft_s, step.verify_s,
                                  max(forwards, seen[2] if seen else 0))
    forwards_run = max(sum(f for _, _, f in by_step.values()), 1)
    drafting = max(0.0, sum(d for d, _, _ in by_step.values()) - refill_s)
    return (drafting * 1e3 / forwards_run,
            sum(v for _, v, _ in by_step.values()) * 1e3 / forwards_run)


def run_engine(
    engine: Engine,
    prompts: Sequence[Sequence[int]],
    n: int,
    gamma: int | None,
    *,
    concurrent: bool = False,
    oracle: GreedyOracle | None = None,
    warmup_tokens: int = 4,
) -> dict[str, Any]:
    """One untimed warm-up request (all the prompts at once, when they run at once: in run 8,
    warmed up by one prompt, the mode that ran first at 2-8 streams took about 26 ms more per
    request to prefill than the one after it), then the prompts one after another (or all at
    once). Time the oracle spent refilling a diverged path is left out of the seconds."""
    warmup = prompts if concurrent else prompts[:1]
    asyncio.run((_concurrent if concurrent else _sequential)(
        engine, warmup, min(warmup_tokens, n), gamma))  # untimed
    refill_before = oracle.stats.refill_seconds if oracle else 0.0
    runner = _concurrent if concurrent else _sequential
    outputs, handles, wall = asyncio.run(runner(engine, prompts, n, gamma))
    refill = (oracle.stats.refill_seconds if oracle else 0.0) - refill_before
    seconds = max(wall - refill, 1e-9)
    usages = [h.usage for h in handles]
    drafted = sum(u.draft_tokens for u in usages)
    accepted = sum(u.accepted_draft_tokens for u in usages)
    passes = sum(u.target_forward_passes for u in usages)
    tokens = sum(len(o) for o in outputs)
    records = [step for h in handles for step in h.timeline.steps]
    gammas = Counter(step.gamma for step in records)
    steps = sum(gammas.values())
    # Where the time goes: drafting (a benchmark proposer's own work included, but not the
    # oracle's refills, which happen inside drafting and are left out as from the wall time),
    # verifying (+ accepting), and the rest of the engine's loop (scheduling, detokenizing,
    # handing chunks to asyncio), in ms per target forward: a speculative step is one, a group
    # of plain steps taken at once (the engine's decode_steps) one per token.
    draft_ms, verify_ms = per_forward_ms(records, refill)
    # Per-token acceptance (Leviathan's α, what ControlledProposer sets): accepted draft tokens
    # over the draft tokens the target actually judged (the accepted ones, plus the first
    # rejected one of each step that rejected). accepted/drafted also counts the tokens after
    # a rejection, which are never judged, so it is lower than α whenever γ > 1.
    rejected = sum(1 for step in records if step.accepted < step.gamma)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens": tokens,
        "seconds": seconds,
        "oracle_refill_seconds": refill,
        "measured_alpha": accepted / (accepted + rejected) if drafted else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "mean_accepted_length": tokens / passes if passes else None,
        # Per target forward: a group of plain steps (one record) is that many forwards at γ 0.
        "gamma_mean": sum(g * k for g, k in gammas.items()) / passes if passes else None,
        "gamma_mode": gammas.most_common(1)[0][0] if gammas else None,
        "gamma_hist": {str(g): k for g, k in sorted(gammas.items())},
        "steps": steps,
        "step_ms": seconds * 1e3 / max(passes, 1) if not concurrent else None,
        "step_draft_ms": draft_ms,
        "step_verify_ms": verify_ms,
        # Per request, in ms: the prefill (its target and draft forwards, from the first
        # chunk's start to the last one's end, other work between chunks included), the wait
        # from submission to the first step, and the span from submission to the last step.
        "prefill_ms": _mean_ms(_span(h.timeline.target_prefill_ns) +
                               _span(h.timeline.draft_prefill_ns) for h in handles),
        "first_step_ms": _mean_ms(
            (h.timeline.steps[0].start_ns - h.timeline.submitted_ns if h.timeline.steps else 0)
            for h in handles),
        "last_step_ms": _mean_ms(
            (h.timeline.steps[-1].start_ns - h.timeline.submitted_ns if h.timeline.steps else 0)
            for h in handles),
        "outputs": outputs,
    }


def _span(interval: tuple[int, int]) -> int:
    start, end = interval
    return end - start if start and end else 0


def _mean_ms(values_ns: Any) -> float | None:
    values = list(values_ns)
    return sum(values) / len(values) / 1e6 if values else None


# ---- the benchmark -----------------------------------------------------------------------------


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.perf_counter)
    skipped: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, section: str) -> bool:
        if self.elapsed() < self.seconds:
            return True
        self.skipped.append(section)
        log(f"skipped {section}: the time budget of {self.seconds:.0f} s is spent")
        return False


_STARTED = time.perf_counter()


def log(message: str) -> None:
    elapsed = time.perf_counter() - _STARTED
    print(f"[bench.gpu {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


def engine_config(cfg: GpuBenchConfig) -> Any:
    from decoding.engine import EngineConfig

    options: dict[str, Any] = {
        "max_speculative_tokens": cfg.max_gamma,
        "max_new_tokens_limit": max(2048, cfg.max_new_tokens),
        "max_concurrent_requests": max((16, *cfg.concurrency)),
        "max_queue": 64,
    }
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    if cfg.max_context and "max_context" in names:
        options["max_context"] = cfg.max_context
    if "compile" in names:
        options["compile"] = {"auto": None, "on": True, "off": False}[cfg.compile]
    if cfg.attention != "auto":
        options["attention"] = cfg.attention
    if cfg.decode_steps and "decode_steps" in names:
        options["decode_steps"] = cfg.decode_steps
    return EngineConfig(**options)


def describe_costs(costs: Any) -> dict[str, Any]:
    """The engine's measured costs; c is one draft step over one target step (batch 1)."""
    described: dict[str, Any] = {
        "draft_step_ms": costs.draft_step_s * 1e3,
        "target_forward_ms": [t * 1e3 for t in costs.target_forward_s],
        "c": costs.draft_step_s / costs.target_forward_s[0],
        "verify_ratio": [t / costs.target_forward_s[0] for t in costs.target_forward_s],
    }
    for name in ("draft_s", "target_s"):  # batched costs by tokens per forward, where measured
        table = getattr(costs, name, None)
        if isinstance(table, dict):
            described[f"{name.removesuffix('_s')}_ms_by_tokens"] = {
                str(k): v * 1e3 for k, v in sorted(table.items())
            }
    return described


def describe_fast_path(engine: Any) -> dict[str, Any]:
    """Whether each model runs in CUDA graphs, compiled and with the K/V store fused into the
    rotation, why capture failed where it did, how many plain steps go at once, and from what
    share of the slots a batch reads the cache in place: a run that fell back to a slower path
    says so in its results, not only in a log line."""
    described: dict[str, Any] = {
        "decode_steps": getattr(getattr(engine, "stepper", None), "decode_steps", None)}
    for name in ("target", "draft"):
        runner = getattr(engine, name, None)
        decoder = getattr(runner, "decoder", None)
        described[name] = None if decoder is None else {
            "graphs": getattr(runner, "graphs", None) is not None,
            "compiled": bool(decoder.compiled),
            "fused_store": getattr(decoder.pointwise, "rotate_store", None) is not None,
            "attention": getattr(decoder, "attention", None),
            "flex_failure": getattr(decoder, "flex_failure", None),
            "graph_failure": getattr(runner, "graph_failure", None),
        }
    from decoding.fast import model as fast_model

    described["direct_read_factor"] = fast_model.DIRECT_READ_FACTOR
    return described


def step_clock(oracle: GreedyOracle) -> Callable[[], float]:
    """A clock for the engine's step timings that stops while ``oracle`` refills a path."""
    return lambda: time.perf_counter() - oracle.stats.refill_seconds


def describe_policy(engine: Any) -> dict[str, Any] | None:
    """What adaptive γ has learned on this engine so far: the server's acceptance (the prior of
    new requests), the shared probe schedule's wait and pooled acceptance, and the step-cost
    correction's measured-over-predicted ratios per (batch bucket, speculative) with their
    sample counts and the overhead they give. The engine is reused across runs, so each run
    starts from what the runs before it taught."""
    stepper = getattr(engine, "stepper", None)
    if stepper is None:
        return None
    probes = stepper.probes
    return {
        "server_alpha": stepper.acceptance.alpha,
        "probe_every": None if probes is None else probes.wait,
        "probe_alpha": None if probes is None else probes.acceptance.alpha,
        "step_costs": stepper.step_costs.describe(),
    }


def _fast_path_line(detail: dict[str, Any] | None) -> str | None:
    """One line of :func:`describe_fast_path` for the table; None where there is nothing."""
    if not detail:
        return None
    parts = []
    for name in ("target", "draft"):
        model = detail.get(name)
        parts.append(f"{name} " + ("not on the fast path" if model is None else
                                   f"graphs {_yes(model['graphs'])}, compiled "
                                   f"{_yes(model['compiled'])}, fused K/V store "
                                   f"{_yes(model.get('fused_store'))}, attention "
                                   f"{model.get('attention') or '-'}"))
    line = "  fast path: " + "; ".join(parts) + f"; decode steps {detail.get('decode_steps')}"
    failures = [f"graph capture failed, {name}: {detail[name][key][:300]}"
                if key == "graph_failure" else
                f"FlexAttention given up, {name}: {detail[name][key][:300]}"
                for key in ("graph_failure", "flex_failure") for name in ("target", "draft")
                if detail.get(name) and detail[name].get(key)]  # whole in the JSON
    return line + "".join(f"\n  {f}" for f in failures)


def _equal(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]] | None) -> Any:
    """Whether the outputs equal the reference's, over the prompts the reference covers."""
    if reference is None:
        return None
    return all(list(a) == list(b) for a, b in zip(outputs, reference, strict=False))


def _row(method: str, run: dict[str, Any], limit: float, reference: Any) -> dict[str, Any]:
    row = {k: v for k, v in run.items() if k not in ("outputs", "method")}
    row["method"] = method
    row["fraction_of_limit"] = run["tokens_per_s"] / limit if limit else None
    row["equals_hf_target"] = _equal(run["outputs"], reference)
    return row


def bench_target(
    key: str,
    pair: ModelPair,
    prompts: list[list[int]],
    cfg: GpuBenchConfig,
    bandwidth: float,
    budget: Budget,
    save: Callable[[], None],
    section: dict[str, Any],
    profile: bool = False,
    then: Callable[[Engine, GreedyOracle], None] | None = None,
) -> tuple[GreedyOracle, Any]:
    """Fill ``section`` for one target; return its oracle (the target's greedy paths) and the
    engine's measured costs (None when the Tandem runs were skipped). ``profile``: also run
    :func:`profile_run` after speculation off. ``then``: called with the engine and the oracle
    after the controlled runs, before the engine is closed (the concurrency section, which so
    needs no engine of its own: building one captures every graph again)."""
    from decoding.engine import Engine

    n = cfg.max_new_tokens
    target_bytes = weight_bytes(pair.target.model)
    limit = bandwidth / target_bytes
    section.update(
        weight_bytes=target_bytes, bandwidth_limit_tok_s=limit, rows=[], costs=None,
    )
    rows: list[dict[str, Any]] = section["rows"]

    def oracle_generate(tokens: Sequence[int], count: int) -> list[int]:
        return hf_greedy(pair.target.model, tokens, count)

    oracle = GreedyOracle(oracle_generate, refill_tokens=32)
    hf_prompts = prompts[: cfg.hf_prompts] if cfg.hf_prompts > 0 else prompts
    reference: list[list[int]] | None = None
    if "hf_target" not in cfg.skip and budget.allows(f"{key}/hf_target"):
        log(f"{key}: HF generate, target alone")
        run = time_hf(pair, hf_prompts, n, assisted=False)
        reference = run["outputs"]
        rows.append(_row("hf_target", run, limit, reference))
        for ids, continuation in zip(hf_prompts, reference, strict=True):
            oracle.add(ids, continuation)
        save()

    if "hf_assisted" not in cfg.skip and budget.allows(f"{key}/hf_assisted"):
        log(f"{key}: HF assisted generation")
        rows.append(_row("hf_assisted", time_hf(pair, hf_prompts, n, assisted=True), limit,
                         reference))
        save()

    if not budget.allows(f"{key}/tandem"):
        return oracle, None
    log(f"{key}: Tandem, measuring costs and speculation off")
    started = time.perf_counter()
    engine = Engine(pair, engine_config(cfg))
    costs = engine.costs
    section["costs"] = {"measure_seconds": time.perf_counter() - started, **describe_costs(costs)}
    log(f"{key}: engine built (graphs captured, costs measured) in "
        f"{section['costs']['measure_seconds']:.1f} s")
    stepper = getattr(engine, "stepper", None)
    if stepper is not None:
        # The engine times its steps to correct adaptive γ (StepCosts). The oracle's refills
        # (HF generate, 1-3 s each on the H200) happen inside drafting and are this benchmark's
        # work, not the engine's, as in tokens/s: its clock leaves them out. (In run 7 single
        # steps with a refill took the engine's decayed mean to 22.9x and 66.4x.)
        stepper.clock = step_clock(oracle)
    section["fast_path"] = getattr(engine, "batched", None)
    section["fast_path_detail"] = describe_fast_path(engine)
    log(f"{key}: " + (_fast_path_line(section["fast_path_detail"]) or "").strip())
    try:
        off = run_engine(engine, prompts, n, 0)
        rows.append(_row("tandem_off", off, limit, reference))
        # The engine's own greedy paths, preferred: in bfloat16 its forward rounds differently
        # from HF's, and the two greedy continuations part at near ties.
        for ids, continuation in zip(prompts, off["outputs"], strict=True):
            oracle.add(ids, continuation, first=True)
        save()
        # What taking plain steps several at once gives: the same engine one step at a time.
        grouped = getattr(getattr(engine, "stepper", None), "decode_steps", 1)
        if grouped > 1 and budget.allows(f"{key}/tandem_off_steps1"):
            engine.stepper.decode_steps = 1
            try:
                one = run_engine(engine, prompts, n, 0)
            finally:
                engine.stepper.decode_steps = grouped
            row = _row("tandem_off_steps1", one, limit, reference)
            row["equals_tandem_off"] = _equal(one["outputs"], off["outputs"])
            rows.append(row)
            save()
        if profile:
            section["profile"] = profile_run(engine, key, prompts, cfg, oracle)
            save()
        for alpha in cfg.alphas:
            if not budget.allows(f"{key}/tandem_alpha_{alpha:g}"):
                break
            for gamma in (None, cfg.fixed_gamma) if cfg.fixed_gamma else (None,):
                rows.append(controlled_run(engine, key, prompts, cfg, oracle, alpha, gamma, off,
                                           limit, reference))
                save()
        if then is not None:
            then(engine, oracle)
    finally:
        # Again at the end: what a forward gave up during the runs (FlexAttention) shows.
        detail = describe_fast_path(engine)
        if detail != section["fast_path_detail"]:
            section["fast_path_detail"] = detail
            log(f"{key}, after its runs: " + (_fast_path_line(detail) or "").strip())
        engine.close()
    return oracle, costs


def profiled(work: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """``work()`` under ``torch.profiler`` (the engine's worker thread included): its result,
    and the operators and kernels by device time and by host time, as tables."""
    result, prof = profiling(work)
    return result, profile_tables(prof)


def profiling(work: Callable[[], T]) -> tuple[T, Any]:
    """``work()`` under ``torch.profiler``, every thread seen where this torch can: its result
    and the finished profiler (``events()``, ``key_averages()``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    options: dict[str, Any] = {}
    try:  # the steps run on the engine's worker thread, which plain profiling does not see
        from torch._C._profiler import _ExperimentalConfig

        options["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # an older torch: device kernels only
        pass
    with profile(activities=activities, **options) as prof:
        result = work()
    return result, prof


def profile_tables(prof: Any, rows: int = 30) -> list[str]:
    """The operators and kernels of a finished profiler by device time and by host time."""
    averages = prof.key_averages()
    tables = []
    for sort in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            tables.append(f"sorted by {sort}\n" + averages.table(sort_by=sort, row_limit=rows))
        except (KeyError, AttributeError, RuntimeError) as exc:  # no CUDA events on a CPU
            tables.append(f"sorted by {sort}: unavailable ({exc})")
    return tables


def profile_run(
    engine: Engine, key: str, prompts: list[list[int]], cfg: GpuBenchConfig, oracle: GreedyOracle
) -> str:
    """One prompt, 32 tokens, adaptive γ at controlled α = 0.7, under ``torch.profiler``: the
    operators and kernels by device time and by host time, to ``profile_<key>.txt``."""
    log(f"{key}: profiling a controlled run (α = 0.7)")
    engine.proposer = ControlledProposer(
        oracle, 0.7, engine.pair.target.vocab_size, seed=cfg.seed + 2
    )
    run, tables = profiled(lambda: run_engine(engine, prompts[:1], 32, None, oracle=oracle,
                                              warmup_tokens=4))
    sections = [f"{key}: {run['steps']} steps, {run['tokens_per_s']:.1f} tok/s, step "
                f"{run['step_ms']:.2f} ms (draft {run['step_draft_ms']:.2f}, verify "
                f"{run['step_verify_ms']:.2f})", *tables]
    text = "\n\n".join(sections)
    path = cfg.out / f"profile_{key}.txt"
    path.write_text(text + "\n")
    log(f"profile written to {path}: {sections[0]}")
    return path.name


def controlled_run(
    engine: Engine,
    key: str,
    prompts: list[list[int]],
    cfg: GpuBenchConfig,
    oracle: GreedyOracle,
    alpha: float,
    gamma: int | None,
    off: dict[str, Any],
    limit: float,
    reference: Any,
) -> dict[str, Any]:
    """Tandem with the controlled-acceptance proposer at ``alpha``, adaptive γ (None) or fixed."""
    label = "adaptive γ" if gamma is None else f"γ = {gamma}"
    log(f"{key}: Tandem, {label}, controlled α = {alpha:g}")
    # The engine is reused: only the proposer of new requests changes. A longer warm-up lets
    # the server's acceptance estimate (the prior of new requests' γ) learn the new α.
    proposer = ControlledProposer(oracle, alpha, engine.pair.target.vocab_size, seed=cfg.seed + 1)
    engine.proposer = proposer
    refills = oracle.stats.refills
    policy_before = describe_policy(engine)
    run = run_engine(engine, prompts, cfg.max_new_tokens, gamma, oracle=oracle, warmup_tokens=32)
    name = f"tandem_alpha_{alpha:g}" + ("" if gamma is None else f"_g{gamma}")
    row = _row(name, run, limit, reference)
    costs = engine.costs
    measured = run["measured_alpha"]
    # The formula's own best (γ 0 unless some γ beats plain decoding), not the engine's
    # threshold for drafting at all (MIN_SPEEDUP), under which this used to read 1.0.
    best = (costs.best_gamma(measured, cfg.max_gamma, min_speedup=1.0)
            if measured is not None else 0)
    row.update(
        alpha=alpha,
        gamma="adaptive" if gamma is None else gamma,
        speedup_vs_off=run["tokens_per_s"] / off["tokens_per_s"],
        equals_tandem_off=_equal(run["outputs"], off["outputs"]),
        # Leviathan's expected speedup at the measured α and the measured costs, best γ
        predicted_best_gamma=best,
        predicted_speedup=costs.expected_speedup(measured, best) if measured is not None else None,
        oracle_refills=oracle.stats.refills - refills,
        unknown_proposals=proposer.stats.unknown,
        policy_before=policy_before,
        policy_after=describe_policy(engine),
    )
    log(f"{key}: α = {alpha:g}: {row['tokens_per_s']:.1f} tok/s, γ mean "
        f"{_fmt(row['gamma_mean'], '.2f')}, drafted {run['drafted']}; policy after "
        f"{row['policy_after']}")
    return row


def bench_concurrency(
    engine: Engine,
    prompts: list[list[int]],
    oracle: GreedyOracle,
    cfg: GpuBenchConfig,
    budget: Budget,
    save: Callable[[], None],
    section: dict[str, Any],
) -> None:
    """N requests at once on the target's own engine (its graphs and measured costs)."""
    n = cfg.concurrency_tokens
    section.update(alpha=cfg.concurrency_alpha, max_new_tokens=n, runs=[])
    runs: list[dict[str, Any]] = section["runs"]
    proposer = ControlledProposer(oracle, cfg.concurrency_alpha, engine.pair.target.vocab_size,
                                  seed=cfg.seed + 2)
    engine.proposer = proposer
    for mode, gamma in (("off", 0), ("adaptive", None)):
        for level in cfg.concurrency:
            if not budget.allows(f"concurrency/{mode}/{level}"):
                break
            log(f"concurrency {level}, speculation {mode}")
            batch = [prompts[i % len(prompts)] for i in range(level)]
            run = run_engine(engine, batch, n, gamma, concurrent=True, oracle=oracle)
            entry = {k: v for k, v in run.items() if k != "outputs"}
            entry.update(mode=mode, concurrency=level, policy_after=describe_policy(engine))
            single = [r for r in runs if r["mode"] == mode and r["concurrency"] == 1]
            entry["vs_one_stream"] = (
                run["tokens_per_s"] / single[0]["tokens_per_s"] if single else None
            )
            runs.append(entry)
            log(f"concurrency {level}, speculation {mode}: {run['tokens_per_s']:.1f} tok/s in "
                f"{run['seconds']:.3f} s; per request prefill {_fmt(run['prefill_ms'], '.2f')} "
                f"ms, first step after {_fmt(run['first_step_ms'], '.2f')} ms, last after "
                f"{_fmt(run['last_step_ms'], '.2f')} ms")
            save()
            if cfg.profile and mode == "off" and level == max(cfg.concurrency):
                section["profile"] = profile_concurrency(engine, batch, n, oracle, cfg)
                save()
    # Steps drafted alone (a request with no other ready beside it); in batched steps the
    # proposer picks each position's token inside the batched drafting loop (``choose``).
    section["proposer_steps"] = proposer.stats.steps


def profile_concurrency(engine: Engine, batch: list[list[int]], n: int, oracle: GreedyOracle,
                        cfg: GpuBenchConfig) -> str:
    """The widest concurrency run with speculation off again, under ``torch.profiler``, to
    ``profile_concurrency.txt``: where many streams' time goes."""
    log(f"profiling concurrency {len(batch)}, speculation off")
    run, tables = profiled(lambda: run_engine(engine, batch, n, 0, concurrent=True,
                                              oracle=oracle))
    head = (f"concurrency {len(batch)}, speculation off, {n} new tokens each: "
            f"{run['tokens_per_s']:.1f} tok/s in {run['seconds']:.3f} s, {run['steps']} step "
            f"records; per request prefill {_fmt(run['prefill_ms'], '.2f')} ms, first step after "
            f"{_fmt(run['first_step_ms'], '.2f')} ms")
    path = cfg.out / "profile_concurrency.txt"
    path.write_text("\n\n".join([head, *tables]) + "\n")
    log(f"profile written to {path}: {head}")
    return path.name


def concurrency_section(engine: Engine, oracle: GreedyOracle, *, key: str,
                        prompts: list[list[int]], cfg: GpuBenchConfig, budget: Budget,
                        save: Callable[[], None], results: dict[str, Any]) -> None:
    """:func:`bench_concurrency` into ``results["concurrency"]``, a failure kept there (the
    target's figures stand)."""
    section = results["concurrency"] = {"target": key}
    try:
        bench_concurrency(engine, prompts, oracle, cfg, budget, save, section)
    except Exception as exc:
        log(f"concurrency failed: {exc!r}\n{traceback.format_exc()}")
        section["error"] = repr(exc)
        save()


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.gpu", *sys.argv[1:]]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
        )
    return info


def run(cfg: GpuBenchConfig) -> dict[str, Any]:
    """The whole benchmark; writes the JSON (after every section) and the PNGs into cfg.out."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    budget = Budget(cfg.budget_s)
    device, dtype = resolve(cfg.device, cfg.dtype)
    draft_shape, target_shapes, vocab = cfg.sizes()
    keys = list(cfg.targets or target_shapes)
    unknown = [k for k in keys if k not in target_shapes]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {sorted(target_shapes)}")
    concurrency_key = cfg.concurrency_target or ("1.5b" if "1.5b" in keys else keys[0])
    cfg.out.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    results: dict[str, Any] = {
        "machine": machine_info(device),
        "config": config,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": vocab,
        "bandwidth": None,
        "draft": {"shape": asdict(draft_shape)},
        "targets": {},
        "concurrency": None,
        "skipped": budget.skipped,
        "plots": [],
        "complete": False,  # True once every section has run (a stopped run keeps False)
    }

    def save() -> None:
        results["elapsed_s"] = budget.elapsed()
        path = cfg.out / RESULTS_JSON
        # Whole or not at all: a stop while writing must not leave half a file.
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
        os.replace(partial, path)

    log(f"{results['machine'].get('gpu', device)}, {dtype}, targets {keys}")
    bandwidth = copy_bandwidth(device, cfg.copy_mib)
    results["bandwidth"] = bandwidth
    bytes_per_s = bandwidth["best_gb_s"] * 1e9
    log(f"copy bandwidth {bandwidth['best_gb_s']:.1f} GB/s")
    draft = build_model(draft_shape, vocab, device, dtype, seed=cfg.seed + 100)
    draft_bytes = weight_bytes(draft)
    results["draft"].update(
        weight_bytes=draft_bytes, bandwidth_limit_tok_s=bytes_per_s / draft_bytes
    )
    prompts = random_prompts(cfg.prompts, cfg.prompt_len, vocab, cfg.seed)
    save()

    for index, key in enumerate(keys):
        if not budget.allows(key):
            continue
        shape = target_shapes[key]
        log(f"building the {shape.name} target")
        target = build_model(shape, vocab, device, dtype, seed=cfg.seed + 200 + index)
        pair = make_pair(target, draft, (shape.name, draft_shape.name), vocab)
        section: dict[str, Any] = {"shape": asdict(shape)}
        results["targets"][key] = section
        # Right after its target's runs, on its engine, before the next target's sections can
        # spend the budget (in run 5 on 2026-11-26 it came last and was never reached).
        then = None
        if key == concurrency_key and "concurrency" not in cfg.skip and cfg.concurrency:
            then = functools.partial(concurrency_section, key=key, prompts=prompts, cfg=cfg,
                                     budget=budget, save=save, results=results)
        try:
            profile = cfg.profile and not any("profile" in s for s in results["targets"].values())
            bench_target(
                key, pair, prompts, cfg, bytes_per_s, budget, save, section, profile, then
            )
            if section.get("costs") and "draft_step_ms" not in results["draft"]:
                results["draft"]["draft_step_ms"] = section["costs"]["draft_step_ms"]
        except Exception as exc:  # one target's failure must not lose the others' figures
            log(f"{key} failed: {exc!r}\n{traceback.format_exc()}")
            section["error"] = repr(exc)
        finally:
            save()
            del pair, target
            if device.type == "cuda":
                # A closed engine is freed only by the cycle collector (its stepper's
                # callbacks refer back to it): collect before handing its cache and graphs
                # back, after a failure too (the next target needs the memory).
                gc.collect()
                try:
                    torch.cuda.empty_cache()
                except RuntimeError as exc:  # an older PyTorch after a failed capture
                    log(f"empty_cache after {key} failed: {exc!r}")
    results["plots"] = [str(p.name) for p in write_plots(results, cfg.out)]
    results["complete"] = True
    save()
    return results


# ---- output ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _alpha_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The adaptive-γ rows of the α sweep."""
    return [r for r in section.get("rows", []) if r.get("gamma") == "adaptive"]


def _method(section: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in section.get("rows", []) if r["method"] == name), None)


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """tokens/s vs α per target, speedup vs α, throughput vs concurrency (skipped without
    matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log("matplotlib is not installed: no PNGs")
        return []
    written = []
    targets = {k: s for k, s in results["targets"].items() if _alpha_rows(s)}
    if targets:
        figure = Figure(figsize=(6 * len(targets), 4.5))
        for position, section in enumerate(targets.values(), start=1):
            axes = figure.add_subplot(1, len(targets), position)
            rows = _alpha_rows(section)
            axes.plot([r["alpha"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o",
                      label="Tandem, adaptive γ")
            for name, style in (("tandem_off", "--"), ("hf_target", ":"), ("hf_assisted", "-.")):
                row = _method(section, name)
                if row:
                    axes.axhline(row["tokens_per_s"], linestyle=style, color="gray", label=name)
            axes.set_xlabel("controlled acceptance α")
            axes.set_ylabel("tokens/s (batch 1)")
            axes.set_title(f"{section['shape']['name']} (bandwidth limit "
                           f"{section['bandwidth_limit_tok_s']:.0f} tok/s)")
            axes.legend(fontsize=8)
        written.append(_save(figure, out / TOKENS_PNG))

        figure = Figure(figsize=(7, 4.5))
        axes = figure.add_subplot()
        for key, section in targets.items():
            rows = _alpha_rows(section)
            line = axes.plot([r["alpha"] for r in rows], [r["speedup_vs_off"] for r in rows],
                             marker="o", label=f"{key} measured")[0]
            predicted = [(r["alpha"], r["predicted_speedup"]) for r in rows
                         if r.get("predicted_speedup") is not None]
            if predicted:
                axes.plot(*zip(*predicted, strict=True), linestyle="--", color=line.get_color(),
                          label=f"{key} Leviathan, measured c={section['costs']['c']:.2f}")
        axes.axhline(1.0, color="gray", linewidth=0.8)
        axes.set_xlabel("controlled acceptance α")
        axes.set_ylabel("speedup over Tandem speculation off")
        axes.set_title("Speculation speedup vs α (adaptive γ)")
        axes.legend(fontsize=8)
        written.append(_save(figure, out / SPEEDUP_PNG))

    runs = (results.get("concurrency") or {}).get("runs") or []
    if runs:
        figure = Figure(figsize=(7, 4.5))
        axes = figure.add_subplot()
        for mode in ("off", "adaptive"):
            group = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["concurrency"])
            if group:
                axes.plot([r["concurrency"] for r in group], [r["tokens_per_s"] for r in group],
                          marker="o", label=f"speculation {mode}")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent requests")
        axes.set_ylabel("aggregate tokens/s")
        axes.set_title(f"{results['concurrency']['target']}: throughput vs concurrency "
                       f"(controlled α = {results['concurrency']['alpha']})")
        axes.legend()
        written.append(_save(figure, out / CONCURRENCY_PNG))
    return written


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _yes(value: Any) -> str:
    return "-" if value is None else ("yes" if value else "no")


def format_table(results: dict[str, Any]) -> str:
    machine = results["machine"]
    bandwidth = results.get("bandwidth") or {}
    draft = results.get("draft") or {}
    lines = [
        f"{machine.get('gpu', machine['device'])}, {results['dtype']}, "
        f"copy bandwidth {_fmt(bandwidth.get('best_gb_s'))} GB/s, "
        f"draft {draft.get('shape', {}).get('name')} step {_fmt(draft.get('draft_step_ms'), '.2f')}"
        f" ms, {results['config']['max_new_tokens']} new tokens x {results['config']['prompts']}"
        f" prompts (HF: {results['config'].get('hf_prompts') or 'all'}), greedy, batch 1"
        + ("" if results.get("complete", True) else
           f"; run stopped after {_fmt(results.get('elapsed_s'))} s, machine date "
           f"{machine.get('date', '?')}"),
        "(α meas: per-token acceptance; MAL: tokens per target pass; =HF / =off: output equals"
        " HF's target-alone greedy / Tandem's speculation-off output; step ms: wall time per"
        " target forward (a step, or each plain step of a group), of it drafting + verifying)",
    ]
    for section in results["targets"].values():
        costs = section.get("costs") or {}
        target_ms = (costs.get("target_forward_ms") or [None])[0]
        lines.append(
            f"\n{section['shape']['name']}: limit {_fmt(section.get('bandwidth_limit_tok_s'))}"
            f" tok/s ({section.get('weight_bytes', 0) / 1e9:.2f} GB of weights),"
            f" c = {_fmt(costs.get('c'), '.2f')}, target step {_fmt(target_ms, '.2f')} ms"
        )
        fast_path = _fast_path_line(section.get("fast_path_detail"))
        if fast_path:
            lines.append(fast_path)
        lines.append(f"  {'method':<20}{'tok/s':>9}{'% limit':>9}{'x off':>7}{'α meas':>8}"
                     f"{'γ mean':>8}{'MAL':>6}{'=HF':>5}{'=off':>5}  step ms (draft+verify)")
        if section.get("error"):
            lines.append(f"  failed: {section['error']}")
        off = _method(section, "tandem_off")
        for row in section.get("rows", []):
            vs_off = row["tokens_per_s"] / off["tokens_per_s"] if off else None
            equal = row.get("equals_hf_target")
            share = row.get("fraction_of_limit")
            lines.append(
                f"  {row['method']:<20}{row['tokens_per_s']:>9.1f}"
                f"{_fmt(None if share is None else 100 * share):>9}"
                f"{_fmt(vs_off, '.2f'):>7}{_fmt(row.get('measured_alpha'), '.2f'):>8}"
                f"{_fmt(row.get('gamma_mean'), '.2f'):>8}"
                f"{_fmt(row.get('mean_accepted_length'), '.2f'):>6}"
                f"{_yes(equal):>5}{_yes(row.get('equals_tandem_off')):>5}"
                f"  {_fmt(row.get('step_ms'), '.2f')} ({_fmt(row.get('step_draft_ms'), '.2f')}"
                f"+{_fmt(row.get('step_verify_ms'), '.2f')})"
            )
    concurrency = results.get("concurrency") or {}
    if concurrency.get("runs"):
        lines.append(f"\n{concurrency['target']}: aggregate tok/s by concurrency "
                     f"({concurrency['max_new_tokens']} new tokens, α = {concurrency['alpha']})")
        levels = sorted({r["concurrency"] for r in concurrency["runs"]})
        lines.append(f"  {'speculation':<12}" + "".join(f"{n:>9}" for n in levels))
        for mode in ("off", "adaptive"):
            by_level = {r["concurrency"]: r for r in concurrency["runs"] if r["mode"] == mode}
            if by_level:
                lines.append(f"  {mode:<12}" + "".join(
                    f"{_fmt(by_level[n]['tokens_per_s'] if n in by_level else None):>9}"
                    for n in levels))
    if concurrency.get("error"):
        lines.append(f"  concurrency failed: {concurrency['error']}")
    if results.get("skipped"):
        lines.append(f"\nskipped (time budget): {', '.join(results['skipped'])}")
    lines.append(f"elapsed {results.get('elapsed_s', 0):.0f} s")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"BENCH_GPU_{name.upper()}", default)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    d = GpuBenchConfig(out=Path())
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description="Tandem on random-weight Qwen2.5-shaped models: HF baselines, speculation "
        "off, controlled acceptance, concurrency. Every option also reads BENCH_GPU_<OPTION>.",
    )
    p.add_argument("--out", default=_env("out", os.environ.get("OUT", "bench/out/gpu")),
                   help="results folder (default: $OUT, else bench/out/gpu)")
    p.add_argument("--quick", action="store_true",
                   default=_env("quick", "") not in ("", "0", "false"),
                   help="tiny shapes and lengths: seconds on a CPU")
    p.add_argument("--device", default=_env("device", d.device))
    p.add_argument("--dtype", default=_env("dtype", d.dtype),
                   help="auto: bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--targets", default=_env("targets", ""),
                   help="comma list of 1.5b,7b (tiny-s,tiny-l with --quick); default: all")
    p.add_argument("--alphas", default=_env("alphas", ",".join(map(str, d.alphas))))
    p.add_argument("--prompts", type=int, default=int(_env("prompts", d.prompts)))
    p.add_argument("--hf-prompts", type=int, default=int(_env("hf_prompts", d.hf_prompts)),
                   help="how many of the prompts the HF baselines run (0: all)")
    p.add_argument("--prompt-len", type=int, default=int(_env("prompt_len", d.prompt_len)))
    p.add_argument("--max-new-tokens", type=int,
                   default=int(_env("max_new_tokens", d.max_new_tokens)))
    p.add_argument("--max-gamma", type=int, default=int(_env("max_gamma", d.max_gamma)))
    p.add_argument("--concurrency", default=_env("concurrency", ",".join(map(str, d.concurrency))))
    p.add_argument("--concurrency-target", default=_env("concurrency_target", ""))
    p.add_argument("--concurrency-tokens", type=int,
                   default=int(_env("concurrency_tokens", d.concurrency_tokens)))
    p.add_argument("--concurrency-alpha", type=float,
                   default=float(_env("concurrency_alpha", d.concurrency_alpha)))
    p.add_argument("--skip", default=_env("skip", ""),
                   help="comma list of sections to leave out: hf_target,hf_assisted,concurrency")
    p.add_argument("--budget-s", type=float, default=float(_env("budget_s", d.budget_s)),
                   help="start no new section after this many seconds")
    p.add_argument("--copy-mib", type=int, default=int(_env("copy_mib", 0)),
                   help="bandwidth buffer size (default 1024, 16 with --quick)")
    p.add_argument("--fixed-gamma", type=int, default=int(_env("fixed_gamma", d.fixed_gamma)),
                   help="also run every α at this fixed γ (0: adaptive only)")
    p.add_argument("--max-context", type=int, default=int(_env("max_context", d.max_context)),
                   help="the engine's max_context (static cache slot length); 0: its default")
    p.add_argument("--seed", type=int, default=int(_env("seed", d.seed)))
    p.add_argument("--compile", choices=("auto", "on", "off"), default=_env("compile", d.compile),
                   help="torch.compile of the fast path's elementwise parts (auto: on CUDA)")
    p.add_argument("--attention", choices=("auto", "matmul", "sdpa", "flex"),
                   default=_env("attention", d.attention),
                   help="the fast path's attention (auto: its default, matmul on CUDA)")
    p.add_argument("--decode-steps", type=int,
                   default=int(_env("decode_steps", d.decode_steps)),
                   help="the engine's γ = 0 steps taken at once (0: its default, 4 on CUDA)")
    p.add_argument("--profile", action="store_true",
                   default=_env("profile", "") not in ("", "0", "false"),
                   help="profile a controlled run of the first target into profile_<key>.txt")
    return p


def config_from_args(args: argparse.Namespace) -> GpuBenchConfig:
    quick = bool(args.quick)
    return GpuBenchConfig(
        out=Path(args.out),
        quick=quick,
        device=args.device,
        dtype=args.dtype,
        targets=_names(args.targets),
        alphas=_floats(args.alphas),
        prompts=args.prompts,
        hf_prompts=args.hf_prompts,
        prompt_len=args.prompt_len if not quick else min(args.prompt_len, 16),
        max_new_tokens=args.max_new_tokens if not quick else min(args.max_new_tokens, 24),
        max_gamma=args.max_gamma,
        concurrency=_ints(args.concurrency),
        concurrency_target=args.concurrency_target,
        concurrency_tokens=(args.concurrency_tokens if not quick
                            else min(args.concurrency_tokens, 8)),
        concurrency_alpha=args.concurrency_alpha,
        skip=_names(args.skip),
        budget_s=args.budget_s,
        copy_mib=args.copy_mib or (16 if quick else 1024),
        max_context=args.max_context,
        fixed_gamma=args.fixed_gamma,
        seed=args.seed,
        compile=args.compile,
        attention=args.attention,
        decode_steps=args.decode_steps,
        profile=bool(args.profile),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    results = run(cfg)
    print(format_table(results))
    print(f"\nresults: {cfg.out / RESULTS_JSON}; plots: {', '.join(results['plots']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
