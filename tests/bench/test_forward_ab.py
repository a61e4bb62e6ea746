"""bench.forward_ab on tiny shapes, on the CPU: its variants are what they say, and it writes
its JSON (timings need CUDA graphs, so here there are none)."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

from bench import forward_ab
from bench.gpu import TINY_TARGET_SHAPES, TINY_VOCAB, build_model
from decoding.fast import model as fast_model
from decoding.fast.model import FastDecoder


def test_a_quick_run_reads_the_cache_as_each_variant_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[bool] = []
    real = fast_model._direct_read
    monkeypatch.setattr(
        fast_model, "_direct_read", lambda *args: reads.append(real(*args)) or reads[-1]
    )
    args = ["--quick", "--models", "tiny-s", "--batches", "1,4", "--widths", "1,3",
            "--slots", "6", "--repeats", "1", "--out", str(tmp_path)]
    assert forward_ab.main(args) == 0
    # Shapes (1, 1), (4, 1), (1, 3), (4, 3); by default in place from 2 rows of 6 slots on.
    # default, gather, in-place, flex (as default), flex-in-place:
    assert reads == [False, True] * 2 + [False] * 4 + [True] * 4 + [False, True] * 2 + [True] * 4
    assert fast_model.DIRECT_READ_FACTOR == 3  # restored
    results = json.loads((tmp_path / forward_ab.RESULTS_JSON).read_text())
    section = results["models"]["tiny-s"]
    assert not section["compiled"] and not section["fused_store"]
    # Nothing to unfuse here, and the CPU's default is SDPA already.
    assert list(section["variants"]) == ["default", "gather", "in-place", "flex", "flex-in-place"]
    for rows in section["variants"].values():
        assert [(row["batch"], row["width"]) for row in rows] == [(1, 1), (4, 1), (1, 3), (4, 3)]
        assert all(row["ms"] is None and row["max_abs_diff"] <= 1e-5 for row in rows)


def test_store_apart_sdpa_and_flex_change_the_decoder_for_their_duration() -> None:
    model = build_model(TINY_TARGET_SHAPES["tiny-s"], TINY_VOCAB, torch.device("cpu"),
                        torch.float32, seed=0)
    decoder = FastDecoder(model)
    decoder.pointwise = fast_model._Pointwise.compiled(backend="eager")
    fused = decoder.pointwise
    assert fused.rotate_store is not None
    with forward_ab.variant_settings(decoder, "store-apart"):
        assert decoder.pointwise.rotate_store is None
        assert decoder.pointwise.split_rotate is fused.split_rotate
    assert decoder.pointwise is fused
    decoder.attention = "matmul"
    with forward_ab.variant_settings(decoder, "sdpa"):
        assert decoder.attention == "sdpa"
    assert decoder.attention == "matmul"
    with forward_ab.variant_settings(decoder, "flex"):
        assert decoder.attention == "flex" and fast_model.DIRECT_READ_FACTOR == 3
    with forward_ab.variant_settings(decoder, "flex-in-place"):
        assert decoder.attention == "flex" and fast_model.DIRECT_READ_FACTOR > 1 << 10
    assert decoder.attention == "matmul" and fast_model.DIRECT_READ_FACTOR == 3
    decoder.device, decoder.compiled = torch.device("cuda"), False  # as with --compile off
    with pytest.raises(ValueError, match="PyTorch's reference"), forward_ab.variant_settings(
        decoder, "flex"
    ):
        pass
    assert decoder.attention == "matmul"
    with pytest.raises(ValueError, match="unknown variant"), forward_ab.variant_settings(
        decoder, "other"
    ):
        pass


def test_a_variant_that_fails_is_recorded_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each variant's code runs on a card for the first time here: one that raises (a capture
    or compile failure) is written down with its error, not the end of the run."""
    real = forward_ab.time_variant
    saved: list[list[str]] = []

    def time_variant(decoder, cache, variant, *args):  # type: ignore[no-untyped-def]
        written = tmp_path / forward_ab.RESULTS_JSON  # what was saved before this variant
        saved.append(list(json.loads(written.read_text())["models"]["tiny-s"]["variants"])
                     if written.exists() else [])
        if variant == "gather":
            raise RuntimeError("stand-in capture failure")
        return real(decoder, cache, variant, *args)

    monkeypatch.setattr(forward_ab, "time_variant", time_variant)
    args = ["--quick", "--models", "tiny-s", "--batches", "1", "--widths", "1",
            "--slots", "2", "--repeats", "1", "--out", str(tmp_path)]
    assert forward_ab.main(args) == 0
    # The JSON was written after each variant, the failed one too.
    assert saved == [[], ["default"], ["default", "gather"], ["default", "gather", "in-place"],
                     ["default", "gather", "in-place", "flex"]]
    variants = json.loads((tmp_path / forward_ab.RESULTS_JSON).read_text())[
        "models"]["tiny-s"]["variants"]
    assert variants["gather"] == {"error": "RuntimeError('stand-in capture failure')"}
    assert [len(variants[v]) for v in ("default", "in-place", "flex", "flex-in-place")] == [1] * 4
    assert "gather                  failed: RuntimeError('stand-in" in capsys.readouterr().out


def test_a_flex_variant_whose_forwards_fell_back_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward that fails with FlexAttention runs again without it (FastDecoder.hidden_states):
    a flex variant would then time the default attention, so it is recorded as failed, with
    why, and the variants after it run with FlexAttention again."""
    def fail(*args: object) -> torch.Tensor:
        raise RuntimeError("stand-in compile failure")

    monkeypatch.setattr(fast_model, "_flex_attention", fail)  # what the decoder is built with
    args = ["--quick", "--models", "tiny-s", "--batches", "1", "--widths", "1",
            "--slots", "2", "--repeats", "1", "--variants", "default,flex,flex-in-place",
            "--out", str(tmp_path)]
    assert forward_ab.main(args) == 0
    variants = json.loads((tmp_path / forward_ab.RESULTS_JSON).read_text())[
        "models"]["tiny-s"]["variants"]
    assert len(variants["default"]) == 1
    for name in ("flex", "flex-in-place"):
        assert variants[name] == {"error": repr(RuntimeError(
            "FlexAttention was given up: a forward of (1, 1) tokens failed: "
            "RuntimeError('stand-in compile failure')"))}


def test_the_fused_store_memory_check_calls_the_store_as_the_model_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its arithmetic and its call of the store at a model's shapes (the memory figures are
    CUDA's: given here)."""
    model = build_model(TINY_TARGET_SHAPES["tiny-s"], TINY_VOCAB, torch.device("cpu"),
                        torch.float32, seed=0)
    decoder = FastDecoder(model)
    decoder.pointwise = fast_model._Pointwise.compiled(backend="eager")
    cache = decoder.new_cache(2, 16)
    calls: list[int] = []
    store = decoder.pointwise.rotate_store
    assert store is not None

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(args[4].item())  # the slot
        return store(*args)

    decoder.pointwise = dataclasses.replace(decoder.pointwise, rotate_store=counted)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 1064)
    free = cache.free_slots
    assert forward_ab.fused_store_memory(decoder, cache) == {
        "peak_extra_bytes": 64, "layer_buffer_bytes": cache.kv[0].nbytes}
    assert len(calls) == 2 and cache.free_slots == free


def test_profiled_shapes_are_written_for_each_variant_and_only_those(tmp_path: Path) -> None:
    args = ["--quick", "--models", "tiny-s", "--batches", "1,4", "--widths", "1",
            "--slots", "6", "--repeats", "1", "--out", str(tmp_path), "--profile", "4x1"]
    assert forward_ab.main(args) == 0
    variants = json.loads((tmp_path / forward_ab.RESULTS_JSON).read_text())[
        "models"]["tiny-s"]["variants"]
    for variant, rows in variants.items():
        one, four = rows
        assert "profile" not in one
        name = f"profile_tiny-s_{variant}_b4w1.txt"
        # No device here: the summary says so, and the tables are the host's operators.
        assert four["profile"] == {"forwards": forward_ab.PROFILED_FORWARDS,
                                   "forwards_seen": None, "device_events": None,
                                   "busy_ms": None, "span_ms": None, "file": name}
        text = (tmp_path / name).read_text()
        assert text.startswith(f"tiny-s {variant}, batch 4, width 1: ")
        assert "aten::" in text
    assert sorted(p.name for p in tmp_path.glob("profile_*")) == sorted(
        f"profile_tiny-s_{variant}_b4w1.txt" for variant in variants)


def device_event(start: float, end: float, name: str = "kernel",
                 device: torch.autograd.DeviceType = torch.autograd.DeviceType.CUDA) -> object:
    return types.SimpleNamespace(device_type=device, name=name,
                                 time_range=types.SimpleNamespace(start=start, end=end))


def test_the_device_summary_counts_each_device_event_and_idle_time_between() -> None:
    """Without input copies to split at: per forward, over the totals, device events, the
    time the device ran one (overlaps once) and the time from the first start to the last
    end; the host's events and records stamped 0 or ending before they start are left out."""
    cpu = torch.autograd.DeviceType.CPU
    events = [device_event(100.0, 110.0), device_event(0.0, 1000.0, device=cpu),
              device_event(105.0, 120.0), device_event(150.0, 160.0),
              device_event(152.0, 155.0), device_event(0.0, 5.0), device_event(170.0, 90.0)]
    # Busy 100-120 and 150-160 (30 µs), span 100-160 (60 µs), over 2 forwards.
    assert forward_ab.device_summary(events, 2) == {
        "forwards": 2, "forwards_seen": None, "device_events": 2.0, "busy_ms": 0.015,
        "span_ms": 0.03}
    assert forward_ab.device_summary(events[1:2], 2)["device_events"] is None


def test_the_device_summary_splits_forwards_at_their_input_copies() -> None:
    """Each replay starts with its input copy: the figures are medians over the second half of
    the forwards seen, so records dropped at a session's start (CUPTI) do not skew them."""
    def forward(at: float, kernels: int, gap: float) -> list[object]:
        out = [device_event(at, at + 1.0, "Memcpy HtoD (Pinned -> Device)")]
        for k in range(kernels):
            begin = at + 1.0 + k * (2.0 + gap)
            out.append(device_event(begin, begin + 2.0))
        return out

    events = [e for i in range(10) for e in forward(1000.0 * (i + 1), 10, 0.5)]
    whole = forward_ab.device_summary(events, 10)
    # 11 events a forward, busy 1 + 10 x 2 µs, span from the copy to the last kernel's end.
    assert whole == {"forwards": 10, "forwards_seen": 10, "device_events": 11,
                     "busy_ms": 0.021, "span_ms": 0.0255}
    # The session's first 25 records lost: two forwards and the third's copy are missing (the
    # rest of the third belongs to no forward seen), and the kept half is whole. A late forward
    # slower than the others moves a median, not a mean.
    slow = [e for i in range(10) for e in forward(1000.0 * (i + 1), 10, 5.0 if i == 9 else 0.5)]
    assert forward_ab.device_summary(events[25:], 10) == {**whole, "forwards_seen": 7}
    assert forward_ab.device_summary(slow, 10)["span_ms"] == 0.0255


def test_profile_shapes_are_batch_x_width() -> None:
    assert forward_ab.parse_shapes("1x1,16x4,") == [(1, 1), (16, 4)]
    with pytest.raises(SystemExit, match="'1-4' is not BATCHxWIDTH"):
        forward_ab.parse_shapes("1-4")
