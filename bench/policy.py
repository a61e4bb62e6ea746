"""Adaptive γ's decisions on a card's measured costs, run on the CPU: ``python -m bench.policy``.

The engine itself runs (its worker, its Stepper: γ per request, the cap on a batch, probes,
draft prefill and catch-ups, groups of plain steps, the step-cost correction) on tiny
random-weight models, with :class:`bench.drafters.ControlledProposer` proposing at a chosen
acceptance α. But every forward pass is charged to a virtual clock at what a
:class:`~decoding.adaptive.CostModel` says a forward of that many tokens costs, by default the
costs the engine measured for the 7B target in run 5 on an H200
(``bench/results/gpu-h200-run5-kv-buckets/gpu_results.json``), and the stepper times its steps
by that clock. Throughput is tokens over virtual seconds: forward time on that card alone, with
no host work. So it shows what the γ decisions are worth there, not what the engine's host code
costs, and it is no substitute for running on the card.

For each number of requests arriving together it runs speculation off, fixed γs, and adaptive
γ from a given server acceptance estimate (the prior of new requests; 0 stands for a server
whose estimate had collapsed), each from a fresh estimate, probe schedule and step-cost
correction, and prints each as a multiple of speculation off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.drafters import ControlledProposer, GreedyOracle
from bench.gpu import (
    TINY_DRAFT_SHAPE,
    TINY_TARGET_SHAPES,
    TINY_VOCAB,
    build_model,
    hf_greedy,
    make_pair,
    random_prompts,
)
from decoding.adaptive import AcceptanceEstimate, CostModel, ProbeSchedule, StepCosts
from decoding.engine import Engine, EngineConfig
from decoding.params import GenerationRequest, SpeculationParams

RUN5 = Path(__file__).parent / "results" / "gpu-h200-run5-kv-buckets" / "gpu_results.json"


def load_costs(path: Path, target: str) -> CostModel:
    """The costs a GPU benchmark's engine measured for ``target`` (``bench.gpu``'s JSON)."""
    costs = json.loads(path.read_text())["targets"][target]["costs"]
    return CostModel(
        {int(k): v / 1e3 for k, v in costs["draft_ms_by_tokens"].items()},
        {int(k): v / 1e3 for k, v in costs["target_ms_by_tokens"].items()},
    )


class VirtualClock:
    """Seconds charged by the forwards so far."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def now(self) -> float:
        return self.seconds


class CostedSequence:
    """A runner's sequence whose forwards are charged to the clock."""

    def __init__(self, inner: Any, runner: CostedRunner) -> None:
        self.inner = inner
        self._runner = runner

    @property
    def length(self) -> int:
        return int(self.inner.length)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, tokens: Any, num_logits: int | None = None) -> torch.Tensor:
        self._runner.charge(len(tokens))
        return self.inner.forward(tokens, num_logits)

    def rollback(self, length: int) -> None:
        self.inner.rollback(length)

    def release(self) -> None:
        self.inner.release()


class CostedRunner:
    """A batching runner whose forwards cost ``cost(tokens)`` on the clock: a batch is
    charged as one forward over its rows padded to the widest, as the cost model takes it."""

    def __init__(self, inner: Any, clock: VirtualClock, cost: Callable[[int], float]) -> None:
        self.inner = inner
        self.clock = clock
        self._cost = cost

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def max_len(self) -> int:
        return int(self.inner.max_len)

    def charge(self, tokens: int) -> None:
        self.clock.seconds += self._cost(tokens)

    def new_sequence(self) -> CostedSequence:
        return CostedSequence(self.inner.new_sequence(), self)

    def forward_packed(
        self,
        sequences: Sequence[CostedSequence],
        tokens: Any,
        num_logits: Sequence[int],
        *,
        lengths: Sequence[int] | None = None,
        transient: bool = False,
    ) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            width = int(tokens.shape[1])
        else:
            width = max(len(row) for row in tokens)
        self.charge(len(sequences) * width)
        return self.inner.forward_packed(
            [s.inner for s in sequences], tokens, num_logits, lengths=lengths,
            transient=transient,
        )


@dataclass
class Setup:
    engine: Engine
    clock: VirtualClock
    oracle: GreedyOracle
    prompts: list[list[int]]
    costs: CostModel
    vocab: int


def build(costs: CostModel, max_concurrent: int, prompt_len: int, max_new: int,
          decode_steps: int, max_gamma: int, seed: int = 0) -> Setup:
    """An engine on tiny random models, its runners charged at ``costs``."""
    device, dtype = torch.device("cpu"), torch.float32
    target = build_model(TINY_TARGET_SHAPES["tiny-s"], TINY_VOCAB, device, dtype, seed)
    draft = build_model(TINY_DRAFT_SHAPE, TINY_VOCAB, device, dtype, seed + 1)
    pair = make_pair(target, draft, ("tiny-s", "tiny-draft"), TINY_VOCAB)
    config = EngineConfig(
        fast_path="on", max_concurrent_requests=max_concurrent, decode_steps=decode_steps,
        max_speculative_tokens=max_gamma, max_context=prompt_len + max_new + 64,
    )
    engine = Engine(pair, config, costs=costs)
    clock = VirtualClock()
    stepper = engine.stepper
    stepper.target = CostedRunner(engine.target, clock, costs.target)
    stepper.draft = CostedRunner(engine.draft, clock, costs.draft)
    stepper.clock = clock.now
    prompts = random_prompts(max_concurrent, prompt_len, TINY_VOCAB, seed)
    oracle = GreedyOracle(lambda ids, n: hf_greedy(target, ids, n), refill_tokens=32)
    for ids in prompts:
        oracle.add(ids, hf_greedy(target, ids, max_new))
    return Setup(engine, clock, oracle, prompts, costs, TINY_VOCAB)


async def _round(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    async def drain(handle: Any) -> list[int]:
        return [t for chunk in [c async for c in handle] for t in chunk.token_ids]

    with engine._cond:  # admitted together, in the worker's next round (deterministic)
        handles = [engine.submit(request) for request in requests]
    return list(await asyncio.gather(*(drain(h) for h in handles)))


def run_cell(setup: Setup, requests: int, gamma: int | None, alpha: float, prior: float,
             rounds: int, max_new: int, seed: int = 0) -> dict[str, Any]:
    """``rounds`` times ``requests`` requests arriving together (γ None: adaptive), from a
    fresh server estimate at ``prior``; tokens per virtual second."""
    engine, stepper = setup.engine, setup.engine.stepper
    stepper.acceptance = AcceptanceEstimate(prior_alpha=prior, prior_weight=4.0, decay=0.99)
    stepper.step_costs = StepCosts(setup.costs)
    stepper._asks_first = 0  # which request a batched step asks first (see Stepper.step_batch)
    if stepper.probes is not None:
        stepper.probes = ProbeSchedule()
    engine.proposer = ControlledProposer(setup.oracle, alpha, setup.vocab, seed=seed)
    speculation = SpeculationParams(num_speculative_tokens=gamma)
    tokens = 0
    start = setup.clock.now()
    for r in range(rounds):
        batch = [GenerationRequest(request_id=f"p{r}-{i}", prompt_token_ids=tuple(ids),
                                   max_new_tokens=max_new, speculation=speculation)
                 for i, ids in enumerate(setup.prompts[:requests])]
        outputs = asyncio.run(_round(engine, batch))
        for ids, out in zip(setup.prompts, outputs, strict=False):
            expected = setup.oracle(ids, max_new)
            if expected is not None and list(expected) != out[: len(expected)]:
                raise AssertionError("an output is not the target's own greedy output")
        tokens += sum(len(o) for o in outputs)
    seconds = setup.clock.now() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__)
    parser.add_argument("--costs", type=Path, default=RUN5, help="a bench.gpu results JSON")
    parser.add_argument("--target", default="7b", help="whose costs in it (default 7b)")
    parser.add_argument("--requests", default="1,2,4,8,16")
    parser.add_argument("--alphas", default="0,0.5,0.7,0.8,0.9")
    parser.add_argument("--priors", default="0.7,0", help="server acceptance estimates")
    parser.add_argument("--fixed", default="1,2,4", help="fixed γs to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=4, help="as with CUDA graphs")
    parser.add_argument("--max-gamma", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run each speculating cell with this many proposer seeds (the "
                             "acceptance draws) and print the mean, with min-max when more "
                             "than one")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    levels = [int(x) for x in args.requests.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    priors = [float(x) for x in args.priors.split(",")]
    fixed = [int(x) for x in args.fixed.split(",") if x]
    costs = load_costs(args.costs, args.target)
    torch.set_num_threads(1)
    setup = build(costs, max(levels), args.prompt_len, args.max_new_tokens, args.decode_steps,
                  args.max_gamma)
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []

    def cell(n: int, gamma: int | None, alpha: float, prior: float, seed: int = 0) -> float:
        result = run_cell(setup, n, gamma, alpha, prior, args.rounds, args.max_new_tokens,
                          seed=seed)
        result.update(requests=n, gamma="adaptive" if gamma is None else gamma, alpha=alpha,
                      prior=prior, seed=seed)
        cells.append(result)
        return float(result["tokens_per_s"])

    def over_seeds(n: int, gamma: int | None, alpha: float, prior: float, off: float) -> str:
        """Throughput over speculation off: the mean over the seeds, then min-max."""
        ratios = [cell(n, gamma, alpha, prior, seed) / off for seed in range(args.seeds)]
        text = f"{sum(ratios) / len(ratios):.3f}"
        if len(ratios) > 1:
            text += f" ({min(ratios):.3f}-{max(ratios):.3f})"
        return text

    width = 6 if args.seeds == 1 else 20

    print(f"{args.costs.name} [{args.target}], forward time only; x speculation off", flush=True)
    print(f"{'n':>3} {'alpha':>5} " + " ".join(f"{f'g={g}':>{width}}" for g in fixed)
          + " " + " ".join(f"{f'prior {p:g}':>{max(width, 10)}}" for p in priors), flush=True)
    try:
        for n in levels:
            off = cell(n, 0, 0.0, 0.7)  # no draws: one seed
            for alpha in alphas:
                row = [over_seeds(n, g, alpha, 0.7, off) for g in fixed]
                adaptive = [over_seeds(n, None, alpha, p, off) for p in priors]
                print(f"{n:3d} {alpha:5.2f} " + " ".join(f"{x:>{width}}" for x in row) + " "
                      + " ".join(f"{x:>{max(width, 10)}}" for x in adaptive), flush=True)
    finally:
        setup.engine.close()
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps({"costs": str(args.costs), "target": args.target,
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "cells": cells}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
