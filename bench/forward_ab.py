"""The fast path's forward under its variants, timed against each other in one process.

``python -m bench.forward_ab --out DIR`` builds random-weight models of the real Qwen2.5 shapes
(as :mod:`bench.gpu` does: the 0.5B draft and the 1.5B target by default) and times one
forward of :class:`~decoding.fast.model.FastDecoder` per (batch size, width), every row
attending ``--kv-len`` positions of a cache of ``--slots`` slots (default 17: bench.gpu's
concurrency runs, 16 requests and the graphs' scratch slot; the engine's own default is 8
requests, 9 slots), under each variant:

- ``default``: as the engine runs it. Attention reads the cache in place where the batch has
  at least 1/``DIRECT_READ_FACTOR`` of the slots, else a gathered copy of its rows; compiled,
  each layer's K/V are stored by the rotation's kernel.
- ``gather``: attention always over the gathered copy.
- ``in-place``: attention always over every slot in place (at most ``DIRECT_READ_MAX_WIDTH``
  tokens a row).
- ``store-apart``: compiled without the fused store (the rotation compiled, the store an
  indexing kernel of its own).
- ``sdpa``: attention as one ``scaled_dot_product_attention`` call (the CPU default) instead of
  two matrix products around a masked softmax. Run 3 (H200) had cuDNN's SDPA over the whole
  4k-position cache at 49% of device time; that was before the attended-length buckets, and
  the two have not been compared since.
- ``flex``: attention as one FlexAttention call over a block mask of the rows' key tiles
  (compiled: one generated kernel in place of the two products and the softmax; never timed on
  a GPU yet), reading the cache as ``default`` does.
- ``flex-in-place``: FlexAttention over every slot in place (idle slots read no tiles), so
  with no gathered copy at any batch size (at most ``DIRECT_READ_MAX_WIDTH`` tokens a row).

On CUDA each shape is a captured CUDA graph (:class:`~decoding.fast.graphs.DecodeGraphs`),
replayed ``--repeats`` times (each with the copy of its inputs, as the engine replays it)
between two CUDA events: milliseconds per forward. Elsewhere (the tests, ``--quick``) the
forwards run eagerly, which checks the plumbing and says nothing about speed. Every variant's
logits are compared with the first variant's (``default``, unless left out; the largest
difference is reported; in bfloat16 different kernels round differently). A variant that
raises (a capture or compile failure: these are the first runs of its code on a card) is
recorded with its error, and the others go on; the JSON is rewritten after each variant.

On CUDA, compiled with the fused store, it also records what one call of the fused store takes
in device memory beyond its inputs, against one layer's cache buffer (``fused_store_memory``):
near the buffer's size where the compiled kernel copies the buffer instead of writing into it.
With ``--profile 1x1,...`` (batch x width) each variant's forwards of those shapes are
replayed again under ``torch.profiler``: per forward, how many kernels (and copies) the device
ran, the time they ran, and the time from the first one's start to the last one's end, which
exceeds the first where the device waits between kernels (a step made of many small kernels
is bound by their latency, not by its bytes); and the kernels by device time, to
``profile_<model>_<variant>_b<batch>w<width>.txt``.

Results: ``forward_ab.json`` in ``--out`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.gpu import (
    DRAFT_SHAPE,
    QWEN_VOCAB,
    TARGET_SHAPES,
    TINY_DRAFT_SHAPE,
    TINY_TARGET_SHAPES,
    TINY_VOCAB,
    Shape,
    build_model,
    machine_info,
    profile_tables,
    profiling,
    resolve,
    synchronize,
)
from decoding.fast import model as fast_model
from decoding.fast.model import FastDecoder

RESULTS_JSON = "forward_ab.json"
VARIANTS = ("default", "gather", "in-place", "store-apart", "sdpa", "flex", "flex-in-place")
PROFILED_FORWARDS = 100

Profiles = dict[tuple[int, int], tuple[dict[str, Any], list[str]]]
"""(batch, width) -> (:func:`device_summary`, the profiler's tables)."""


@contextlib.contextmanager
def variant_settings(decoder: FastDecoder, variant: str) -> Iterator[None]:
    """``decoder`` set up as ``variant`` for the duration (see the module's docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")
    if variant.startswith("flex") and decoder.device.type == "cuda" and not decoder.compiled:
        raise ValueError("uncompiled, FlexAttention is PyTorch's reference, which computes every "
                         "score: FastDecoder does not use it on CUDA")
    factor, pointwise, attention, flex_failure = (
        fast_model.DIRECT_READ_FACTOR, decoder.pointwise, decoder.attention, decoder.flex_failure)
    try:
        if variant in ("sdpa", "flex", "flex-in-place"):
            decoder.attention = variant.removesuffix("-in-place")
        if variant == "gather":
            fast_model.DIRECT_READ_FACTOR = 0
        elif variant in ("in-place", "flex-in-place"):
            fast_model.DIRECT_READ_FACTOR = 1 << 20
        elif variant == "store-apart":
            decoder.pointwise = dataclasses.replace(pointwise, rotate_store=None)
        yield
    finally:
        fast_model.DIRECT_READ_FACTOR, decoder.pointwise = factor, pointwise
        decoder.attention, decoder.flex_failure = attention, flex_failure


def inputs(batch: int, width: int, slots: Sequence[int], kv_len: int, vocab: int,
           seed: int) -> tuple[list[list[int]], list[int], list[int]]:
    """Tokens, slots and starts of one batch: every row ends at ``kv_len``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (batch, width), generator=generator).tolist()
    return tokens, list(slots[:batch]), [kv_len - width] * batch


def time_variant(
    decoder: FastDecoder, cache: Any, variant: str, shapes: Sequence[tuple[int, int]],
    kv_len: int, vocab: int, repeats: int, seed: int,
    profile: Sequence[tuple[int, int]] = (), profiles: Profiles | None = None,
) -> dict[tuple[int, int], tuple[float | None, torch.Tensor]]:
    """(batch, width) -> (ms per forward on CUDA, else None; the logits of its last call).
    The shapes in ``profile`` are also profiled (:func:`profile_forwards`) into ``profiles``."""
    device = cache.kv.device
    profiles = {} if profiles is None else profiles
    results: dict[tuple[int, int], tuple[float | None, torch.Tensor]] = {}
    with variant_settings(decoder, variant), torch.inference_mode():
        cache.kv.zero_()  # every variant reads the same cache: zeros below its rows' tokens
        slots: list[int] = []
        try:
            slots += (cache.allocate() for _ in range(max(batch for batch, _ in shapes)))
            if device.type == "cuda":
                results = _time_graphs(decoder, cache, shapes, slots, kv_len, vocab, repeats,
                                       seed, profile, profiles)
            else:
                for batch, width in shapes:
                    tokens, rows, starts = inputs(batch, width, slots, kv_len, vocab, seed)
                    forward = functools.partial(
                        decoder.forward, torch.tensor(tokens, device=device),
                        torch.tensor(rows, device=device), torch.tensor(starts, device=device),
                        cache, num_logits=width, kv_len=kv_len,
                    )
                    results[batch, width] = (None, forward().float().cpu())
                    if (batch, width) in profile:
                        profiles[batch, width] = profile_forwards(forward, device)
            if variant.startswith("flex") and decoder.attention != "flex":  # its forwards fell
                # back (FastDecoder.hidden_states): what was timed is not FlexAttention
                raise RuntimeError(f"FlexAttention was given up: {decoder.flex_failure}")
        finally:
            for slot in slots:
                cache.free(slot)
    return results


def _time_graphs(
    decoder: FastDecoder, cache: Any, shapes: Sequence[tuple[int, int]], slots: Sequence[int],
    kv_len: int, vocab: int, repeats: int, seed: int,
    profile: Sequence[tuple[int, int]], profiles: Profiles,
) -> dict[tuple[int, int], tuple[float | None, torch.Tensor]]:
    from decoding.fast.graphs import DecodeGraphs

    batches = sorted({batch for batch, _ in shapes})
    widths = sorted({width for _, width in shapes})
    graphs = DecodeGraphs(decoder, cache, batches, widths, kv_lengths=(kv_len,))
    results: dict[tuple[int, int], tuple[float | None, torch.Tensor]] = {}
    try:
        for batch, width in shapes:
            tokens, rows, starts = inputs(batch, width, slots, kv_len, vocab, seed)
            graphs.run(tokens, rows, starts)  # the first replay of this shape
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(cache.kv.device)
            start.record()
            for _ in range(repeats):  # each: one copy of the inputs, one replay; no waits
                logits = graphs.run(tokens, rows, starts)
            end.record()
            synchronize(cache.kv.device)
            assert logits is not None, f"no graph for batch {batch}, width {width}"
            results[batch, width] = (start.elapsed_time(end) / repeats, logits.float().cpu())
            if (batch, width) in profile:
                profiles[batch, width] = profile_forwards(
                    functools.partial(graphs.run, tokens, rows, starts), cache.kv.device)
    finally:
        cache.free(graphs.scratch_slot)
        del graphs
    return results


def profile_forwards(
    forward: Callable[[], Any], device: torch.device, forwards: int = PROFILED_FORWARDS
) -> tuple[dict[str, Any], list[str]]:
    """``forward()`` ``forwards`` times in a row, no waits between, under ``torch.profiler``:
    :func:`device_summary` and the profiler's tables."""

    def work() -> None:
        for _ in range(forwards):
            forward()
        synchronize(device)

    _, prof = profiling(work)
    return device_summary(prof.events(), forwards), profile_tables(prof, rows=40)


def device_summary(events: Iterable[Any], forwards: int) -> dict[str, Any]:
    """Per forward, from the profiler's events of ``forwards`` forwards run back to back: the
    device's events (kernels and copies: ``device_events``), the time the device ran them
    (``busy_ms``, overlaps counted once), and the time from the first one's start to the last
    one's end (``span_ms``). A span longer than the busy time is the device waiting between
    kernels. All None without device events (a CPU run).

    Each replay begins with the copy of its inputs to the device (``Memcpy HtoD``), so the
    events are split into forwards there, and each figure is the median over the second half
    of the forwards seen (``forwards_seen``): CUPTI from CUDA 12.6 Update 2 to 13.0 can drop
    the first records of a profiling session (pytorch/pytorch#192021) or stamp a record 0,
    and such records are left out (as are records before the first copy, which belong to no
    forward seen). Without those copies, the totals over ``forwards``."""
    spans = sorted(
        (event.time_range.start, event.time_range.end, str(event.name)) for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA
        and 0 < event.time_range.start <= event.time_range.end
    )
    if not spans:
        return {"forwards": forwards, "forwards_seen": None, "device_events": None,
                "busy_ms": None, "span_ms": None}
    starts = [i for i, (_, _, name) in enumerate(spans) if name.startswith("Memcpy HtoD")]
    if not starts:
        count, busy, span = _busy(spans)
        return {"forwards": forwards, "forwards_seen": None, "device_events": count / forwards,
                "busy_ms": busy / 1000 / forwards, "span_ms": span / 1000 / forwards}
    groups = [spans[a:b] for a, b in zip(starts, [*starts[1:], len(spans)], strict=True)]
    kept = [_busy(group) for group in groups[len(groups) // 2:]]
    return {
        "forwards": forwards,
        "forwards_seen": len(groups),
        "device_events": statistics.median(count for count, _, _ in kept),
        "busy_ms": statistics.median(busy for _, busy, _ in kept) / 1000,
        "span_ms": statistics.median(span for _, _, span in kept) / 1000,
    }


def _busy(spans: Sequence[tuple[float, float, str]]) -> tuple[int, float, float]:
    """Events, busy time and span (µs) of time-sorted device events."""
    busy, reach = 0.0, spans[0][0]  # reach: how far the device has been busy
    for start, end, _ in spans:
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return len(spans), busy, reach - spans[0][0]


def bench_model(
    name: str, shape: Shape, vocab: int, device: torch.device, dtype: torch.dtype, *,
    batches: Sequence[int], widths: Sequence[int], kv_len: int, slots: int, repeats: int,
    variants: Sequence[str], compile: bool, seed: int, log: Callable[[str], None],
    section: dict[str, Any] | None = None, save: Callable[[], None] = lambda: None,
    profile: Sequence[tuple[int, int]] = (), profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Time every variant of one model into ``section`` (a new dict if None), calling
    ``save`` after each; profile the shapes in ``profile`` (into ``profile_dir``'s
    ``profile_<name>_<variant>_b<batch>w<width>.txt``, where given)."""
    started = time.perf_counter()
    model = build_model(shape, vocab, device, dtype, seed)
    decoder = FastDecoder(model, compile=compile)
    cache = decoder.new_cache(slots, kv_len)
    shapes = [(batch, width) for width in widths for batch in batches]
    log(f"{name}: built in {time.perf_counter() - started:.1f} s (compiled: {decoder.compiled}, "
        f"fused store: {decoder.pointwise.rotate_store is not None})")
    section = {} if section is None else section
    section.update({
        "shape": dataclasses.asdict(shape), "compiled": decoder.compiled,
        "fused_store": decoder.pointwise.rotate_store is not None, "variants": {},
    })
    if device.type == "cuda" and decoder.pointwise.rotate_store is not None:
        try:
            section["fused_store_memory"] = fused_store_memory(decoder, cache)
        except Exception as exc:  # recorded; the timings may still work
            section["fused_store_memory"] = {"error": repr(exc)}
        log(f"{name} fused store memory: {section['fused_store_memory']}")
        save()
    reference: dict[tuple[int, int], torch.Tensor] = {}
    for variant in variants:
        if ((variant == "store-apart" and decoder.pointwise.rotate_store is None)
                or (variant == "sdpa" and decoder.attention == "sdpa")):
            continue  # the same as the default here
        started = time.perf_counter()
        profiles: Profiles = {}
        try:
            timed = time_variant(decoder, cache, variant, shapes, kv_len, vocab, repeats, seed,
                                 profile, profiles)
        except Exception as exc:  # recorded, and the other variants go on
            section["variants"][variant] = {"error": repr(exc)}
            log(f"{name} {variant} failed after {time.perf_counter() - started:.1f} s: {exc!r}")
            save()
            continue
        rows = []
        for (batch, width), (ms, logits) in timed.items():
            reference.setdefault((batch, width), logits)
            diff = (logits - reference[batch, width]).abs().max().item()
            row: dict[str, Any] = {"batch": batch, "width": width, "ms": ms,
                                   "max_abs_diff": diff}
            if (batch, width) in profiles:
                summary, tables = profiles[batch, width]
                row["profile"] = summary
                if profile_dir is not None:
                    path = profile_dir / f"profile_{name}_{variant}_b{batch}w{width}.txt"
                    path.write_text("\n\n".join(
                        [f"{name} {variant}, batch {batch}, width {width}: {summary}",
                         *tables]) + "\n")
                    summary["file"] = path.name
            rows.append(row)
        section["variants"][variant] = rows
        log(f"{name} {variant}: {time.perf_counter() - started:.1f} s")
        save()
    del cache, decoder, model
    return section


def fused_store_memory(decoder: FastDecoder, cache: Any) -> dict[str, int]:
    """CUDA only: the device memory one call of the compiled fused store (rotation and K/V
    store, :func:`~decoding.fast.model._rotate_store`) of one row and one token takes at its
    peak beyond what was allocated before it, and one layer's cache buffer's bytes. Where the
    kernel writes into the buffer the first is a few KB (the queries it returns, and the
    allocator's rounding); where it works on a copy of the buffer, about the second. Called
    twice, the first compiling; the second is measured."""
    store = decoder.pointwise.rotate_store
    assert store is not None
    device, dtype = cache.kv.device, decoder.dtype
    heads, kv_heads, dim = decoder.num_heads, decoder.num_kv_heads, decoder.head_dim
    buffer = cache.kv[0]
    slot = cache.allocate()
    try:
        with torch.inference_mode():
            qkv = torch.zeros(1, 1, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype)
            angles = torch.zeros(1, 1, 1, dim, device=device, dtype=dtype)
            slots = torch.tensor([slot], device=device)
            positions = torch.zeros(1, 1, dtype=torch.long, device=device)
            peak = 0
            for _ in range(2):
                synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                store(qkv, angles, angles, buffer, slots, positions, heads, kv_heads, dim)
                synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - before
    finally:
        cache.free(slot)
    return {"peak_extra_bytes": int(peak), "layer_buffer_bytes": buffer.nbytes}


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for name, section in results["models"].items():
        variants = section["variants"]
        timed = [rows for rows in variants.values() if isinstance(rows, list)]
        if not variants:
            continue
        shapes = [(row["batch"], row["width"]) for row in timed[0]] if timed else []
        header = f"{name} (ms per forward)".ljust(26) + "".join(
            f"b{batch} w{width}".rjust(10) for batch, width in shapes)
        lines += [header, "-" * len(header)]
        for variant, rows in variants.items():
            if not isinstance(rows, list):
                lines.append(f"  {variant:<24}failed: {rows['error']}")
                continue
            cells = "".join(
                ("-" if row["ms"] is None else f"{row['ms']:.3f}").rjust(10) for row in rows)
            worst = max(row["max_abs_diff"] for row in rows)
            lines.append(f"  {variant:<24}{cells}   (logits vs default: {worst:.2g})")
        for variant, rows in variants.items():
            for row in rows if isinstance(rows, list) else []:
                if row.get("profile", {}).get("device_events") is not None:
                    summary = row["profile"]
                    lines.append(
                        f"  profiled {variant} b{row['batch']} w{row['width']}: "
                        f"{summary['device_events']:.0f} device events, busy "
                        f"{summary['busy_ms']:.3f} ms, span {summary['span_ms']:.3f} ms "
                        f"per forward ({summary.get('forwards_seen')} of "
                        f"{summary['forwards']} forwards seen)")
        lines.append("")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.forward_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/out/forward_ab")
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--models", default="draft,1.5b",
                   help="draft, and targets of bench.gpu (1.5b, 7b; with --quick tiny-s, tiny-l)")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--widths", default="1,4")
    p.add_argument("--kv-len", type=int, default=256)
    p.add_argument("--slots", type=int, default=17)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the decoder's elementwise parts (auto: on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="",
                   help="shapes to profile, as BATCHxWIDTH,... (e.g. 1x1,1x4); none by default")
    return p


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x1,16x4"`` -> [(1, 1), (16, 4)]."""
    shapes = []
    for item in filter(None, text.split(",")):
        batch, sep, width = item.partition("x")
        if not (sep and batch.isdigit() and width.isdigit()):
            raise SystemExit(f"--profile: {item!r} is not BATCHxWIDTH")
        shapes.append((int(batch), int(width)))
    return shapes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device, dtype = resolve(args.device, args.dtype)
    draft, targets, vocab = (
        (TINY_DRAFT_SHAPE, TINY_TARGET_SHAPES, TINY_VOCAB) if args.quick
        else (DRAFT_SHAPE, TARGET_SHAPES, QWEN_VOCAB)
    )
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name != "draft" and name not in targets]
    if unknown:
        raise SystemExit(f"unknown models {unknown}: draft or one of {sorted(targets)}")
    profile = parse_shapes(args.profile)
    variants = [variant for variant in args.variants.split(",") if variant]
    if any(variant not in VARIANTS for variant in variants):
        raise SystemExit(f"variants are among {', '.join(VARIANTS)}")
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine_info(device), "dtype": str(dtype), "kv_len": args.kv_len,
        "slots": args.slots, "repeats": args.repeats,
        "direct_read_factor": fast_model.DIRECT_READ_FACTOR, "models": {},
    }

    def save() -> None:
        (out / RESULTS_JSON).write_text(json.dumps(results, indent=1))

    for name in names:
        shape = draft if name == "draft" else targets[name]
        section: dict[str, Any] = {}
        results["models"][name] = section
        bench_model(
            name, shape, vocab, device, dtype,
            batches=[int(b) for b in args.batches.split(",")],
            widths=[int(w) for w in args.widths.split(",")], kv_len=args.kv_len,
            slots=args.slots, repeats=args.repeats, variants=variants, compile=compile,
            seed=args.seed, log=lambda message: print(message, flush=True), section=section,
            save=save, profile=profile, profile_dir=out,
        )
        save()
        if device.type == "cuda":
            # After a failed capture an older PyTorch's allocator may refuse (see
            # decoding.fast.graphs.end_failed_capture): the next model is built anyway.
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
