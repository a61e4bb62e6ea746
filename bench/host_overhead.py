"""The host (Python) overhead of the fast path per forward and per speculative step.

``python -m bench.host_overhead`` builds two tiny random Qwen2 models (target and draft; a
forward of one is little arithmetic and mostly per-operation dispatch), wraps each in a
:class:`~decoding.fast.runner.StaticRunner` (CPU, eager, no CUDA graphs) and times, per batch
size:

- ``forward``: :meth:`StaticRunner.forward_batch` of one token per row;
- ``spec g=0`` / ``spec g=4``: :func:`decoding.batched.speculative_step_batch` with γ = 0 and
  γ = 4, greedy, and sampled at temperature 1 with a seeded generator per request;
- and the row ``1 alone``: one request through the one-sequence path
  (``StaticSequence.forward``, :func:`decoding.speculative.speculative_step`), which is what
  the engine runs for a request that steps alone.

For each it prints microseconds per call (median of the timed calls) and the share of that
spent *outside* the model's own forward (:meth:`FastDecoder.hidden_states` and
:meth:`FastDecoder.logits`, timed by wrapping them): building tensors from lists, per-row loops,
syncs, copies, sampling and acceptance (sampled rows include real work there too: each draw
fills one exponential variate per vocabulary entry from the request's generator). On a GPU
with CUDA graphs the forward of a small model costs well under a millisecond, so this outside
share is what bounds tokens/s there.

``--top-logprobs N`` makes every request ask for its tokens' log-probabilities with N
alternatives (the API's ``logprobs`` / ``top_logprobs``), to show what that adds to a step.
``--penalties`` gives every request a repetition, a frequency and a presence penalty
(:data:`PENALTIES`), to show what penalizing every draft and verify position adds (each call
then also counts the prompt afresh, since every call starts from it).

Every step starts from the same state (each sequence is rolled back to its prompt after it),
so all calls of one case do the same work. ``--profile`` prints cProfile's top functions for
one case instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from decoding.batched import speculative_step_batch
from decoding.fast.runner import StaticRunner, StaticSequence
from decoding.params import SamplingParams
from decoding.penalties import Penalties
from decoding.speculative import SequenceState, speculative_step

PROMPT_LEN = 16
PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5}


def tiny_qwen2(seed: int, *, layers: int, hidden: int, vocab: int) -> Qwen2ForCausalLM:
    """A random Qwen2 model (4 heads, 2 KV heads, float32), the same for the same arguments."""
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.random.set_rng_state(state)
    return model


class ForwardClock:
    """Adds up the time spent in a runner's model forward (hidden states and output head)."""

    def __init__(self, runners: list[StaticRunner]) -> None:
        self.seconds = 0.0
        for runner in runners:
            decoder: Any = runner.decoder
            decoder.hidden_states = self._timed(decoder.hidden_states)
            decoder.logits = self._timed(decoder.logits)

    def _timed(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


@dataclass(frozen=True)
class Timing:
    micros: float  # median microseconds per call
    outside: float  # median share of a call spent outside the model's forward, 0..1


def measure(call: Callable[[], object], reset: Callable[[], None], clock: ForwardClock,
            calls: int, warmup: int) -> Timing:
    totals: list[float] = []
    outsides: list[float] = []
    for index in range(warmup + calls):
        reset()
        clock.seconds = 0.0
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
        if index >= warmup:
            totals.append(total)
            outsides.append((total - clock.seconds) / total)
    return Timing(statistics.median(totals) * 1e6, statistics.median(outsides))


class Setup:
    """B requests on a target and a draft runner, prefilled with a prompt each."""

    def __init__(self, target: StaticRunner, draft: StaticRunner, batch: int, vocab: int,
                 temperature: float, top_logprobs: int | None = None,
                 penalties: bool = False) -> None:
        self.target, self.draft = target, draft
        generator = torch.Generator().manual_seed(1234)
        self.prompts = [
            torch.randint(3, vocab, (PROMPT_LEN,), generator=generator).tolist()
            for _ in range(batch)
        ]
        penalized: dict[str, Any] = dict(PENALTIES) if penalties else {}
        self.states = [
            SequenceState(
                tokens=list(prompt),
                target=target.new_sequence(),  # type: ignore[arg-type]
                draft=draft.new_sequence(),  # type: ignore[arg-type]
                sampling=SamplingParams(temperature=temperature, seed=row, **penalized),
                generator=torch.Generator().manual_seed(row),
                top_logprobs=top_logprobs,
            )
            for row, prompt in enumerate(self.prompts)
        ]
        for state in self.states:
            state.penalties = Penalties.of(state.sampling, PROMPT_LEN)
        for runner, sequences in ((target, self.targets), (draft, self.drafts)):
            runner.forward_batch(sequences, [p[:-1] for p in self.prompts], [1] * batch)

    @property
    def targets(self) -> list[StaticSequence]:
        return [state.target for state in self.states]  # type: ignore[misc]

    @property
    def drafts(self) -> list[StaticSequence]:
        return [state.draft for state in self.states]  # type: ignore[misc]

    def reset(self) -> None:
        """Back to the prompt: the target holds all but its last token, the draft the same."""
        for state, prompt in zip(self.states, self.prompts, strict=True):
            state.tokens = list(prompt)
            state.target.rollback(PROMPT_LEN - 1)
            state.draft.rollback(min(state.draft.length, PROMPT_LEN - 1))

    def release(self) -> None:
        for state in self.states:
            state.target.release()
            state.draft.release()


CASES = ("forward", "spec g=0", "spec g=4")


def cases(setup: Setup, alone: bool = False) -> dict[str, Callable[[], object]]:
    """The timed calls; ``alone`` (batch 1): through the one-sequence path instead,
    ``StaticSequence.forward`` and :func:`speculative_step`, which the engine takes for a
    request that steps alone."""
    batch = len(setup.states)
    last = [[prompt[-1]] for prompt in setup.prompts]
    if alone:
        state = setup.states[0]
        return {
            "forward": lambda: state.target.forward(last[0], num_logits=1),
            "spec g=0": lambda: speculative_step(state, 0),
            "spec g=4": lambda: speculative_step(state, 4),
        }
    return {
        "forward": lambda: setup.target.forward_batch(setup.targets, last, [1] * batch),
        "spec g=0": lambda: speculative_step_batch(
            setup.states, [0] * batch, setup.draft, setup.target
        ),
        "spec g=4": lambda: speculative_step_batch(
            setup.states, [4] * batch, setup.draft, setup.target
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.host_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of both models")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (multiple of 8)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--pack-weights", action="store_true",
        help="prepack the linear weights for oneDNN as the engine does on a CPU (at these sizes "
        "each prepacked call costs more than the plain one, which only adds to the forward)",
    )
    parser.add_argument(
        "--top-logprobs", type=int, default=None, metavar="N",
        help="every request asks for log-probabilities with N alternatives (default: none)",
    )
    parser.add_argument(
        "--penalties", action="store_true",
        help=f"every request has penalties ({', '.join(f'{k} {v}' for k, v in PENALTIES.items())})",
    )
    parser.add_argument(
        "--profile", metavar="CASE", default=None,
        help="cProfile one case instead, e.g. 'sampled,8,spec g=4'",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab}
    most = max(args.batch_sizes)
    # Distinct weights: the draft's tokens are mostly rejected, as from an unrelated model.
    runner_options = {"num_slots": most, "max_len": 64, "pack_weights": args.pack_weights}
    target = StaticRunner(tiny_qwen2(0, **shape), **runner_options)
    draft = StaticRunner(tiny_qwen2(1, **shape), **runner_options)
    clock = ForwardClock([target, draft])

    if args.profile is not None:
        mode, batch_text, case = args.profile.split(",", 2)
        setup = Setup(target, draft, int(batch_text), args.vocab,
                      1.0 if mode == "sampled" else 0.0, args.top_logprobs, args.penalties)
        call = cases(setup)[case]
        measure(call, setup.reset, clock, calls=args.warmup, warmup=0)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            setup.reset()
            call()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, float32; "
          f"target and draft: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"median of {args.calls} calls; prepacked weights: {args.pack_weights}; "
          f"top_logprobs: {args.top_logprobs}; penalties: {args.penalties}")
    print("us per call (share outside the model's forward)")
    columns = [(mode, name) for mode in ("greedy", "sampled") for name in CASES
               if not (mode == "sampled" and name == "forward")]
    print(f"{'batch':>7} " + " ".join(f"{mode[:7] + ' ' + name:>20}" for mode, name in columns))
    runs = [(batch, False) for batch in args.batch_sizes]
    runs += [(1, True)] if 1 in args.batch_sizes else []
    for batch, alone in runs:
        row = []
        for mode, name in columns:
            setup = Setup(target, draft, batch, args.vocab, 1.0 if mode == "sampled" else 0.0,
                          args.top_logprobs, args.penalties)
            call = cases(setup, alone)[name]
            timing = measure(call, setup.reset, clock, args.calls, args.warmup)
            setup.release()
            row.append(f"{timing.micros:>11.0f} ({timing.outside:>4.0%})")
        label = "1 alone" if alone else str(batch)
        print(f"{label:>7} " + " ".join(f"{cell:>20}" for cell in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
