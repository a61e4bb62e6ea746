"""What a request's ``prompt_logprobs`` cost: the time to its first chunk with and without them.

``python -m bench.prompt_logprobs`` loads a model pair (default: the real default pair, on the
CPU in float32) into one :class:`~decoding.engine.Engine` and, for each prompt length, submits
one request at a time with ``max_new_tokens`` 1, so the time to its first (and only) chunk is
the prefill and one step. Each case runs ``--repeats`` times, alternating between asking for
the prompt's log-probabilities (``prompt_logprobs`` 0 and ``--top``) and not, and the medians
are printed and written as JSON. The difference is the target's output head over every prompt
position (a vocabulary-wide row each), the log-softmax and the top-k over them, and their
read-back; the prompt tokens are random ids, the same for every case of one length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from decoding.engine import Engine, EngineConfig
from decoding.params import GenerationRequest, SpeculationParams


async def first_chunk_seconds(engine: Engine, ids: tuple[int, ...], top: int | None) -> float:
    """Seconds from submitting one request to its last chunk (it has only one token)."""
    start = time.perf_counter()
    handle = engine.submit(GenerationRequest(
        request_id="p", prompt_token_ids=ids, max_new_tokens=1,
        speculation=SpeculationParams(0), prompt_logprobs=top))
    chunks = [chunk async for chunk in handle]
    elapsed = time.perf_counter() - start
    expected = None if top is None else len(ids) - 1
    got = None if chunks[0].prompt_logprobs is None else len(chunks[0].prompt_logprobs)
    assert got == expected, (got, expected)
    return elapsed


async def measure(engine: Engine, lengths: list[int], tops: list[int | None], repeats: int,
                  vocab: int) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        ids = tuple(random.Random(length).randrange(vocab) for _ in range(length))
        await first_chunk_seconds(engine, ids, None)  # warm-up
        times: dict[int | None, list[float]] = {top: [] for top in tops}
        for _ in range(repeats):
            for top in tops:
                times[top].append(await first_chunk_seconds(engine, ids, top))
        base = statistics.median(times[None])
        for top in tops:
            median = statistics.median(times[top])
            rows.append({"prompt_tokens": length, "prompt_logprobs": top,
                         "median_s": round(median, 4), "added_s": round(median - base, 4),
                         "ratio": round(median / base, 4),
                         "all_s": [round(t, 4) for t in times[top]]})
            print(f"prompt {length:5d}  prompt_logprobs {top!s:>4}  "
                  f"median {median:8.3f} s  added {median - base:+7.3f} s  "
                  f"x{median / base:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="default")
    parser.add_argument("--draft", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out/prompt_logprobs.json"))
    args = parser.parse_args(argv)

    from decoding.models import load_pair

    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype)
    engine = Engine(pair, EngineConfig(default_max_new_tokens=1, max_new_tokens_limit=1))
    try:
        rows = asyncio.run(measure(engine, args.lengths, [None, 0, args.top], args.repeats,
                                   engine.info.vocab_size))
    finally:
        engine.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "target": engine.info.target_model, "draft": engine.info.draft_model,
        "device": args.device, "dtype": args.dtype, "machine": platform.machine(),
        "repeats": args.repeats, "rows": rows,
    }, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
