"""bench.forward_ab on tiny shapes, on the CPU: its variants are what they say, and it writes
its JSON (timings need CUDA graphs, so here there are none)."""

from __future__ import annotations

import json
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
    assert reads == [False, True] * 2 + [False] * 4 + [True] * 4
    assert fast_model.DIRECT_READ_FACTOR == 3  # restored
    results = json.loads((tmp_path / forward_ab.RESULTS_JSON).read_text())
    section = results["models"]["tiny-s"]
    assert not section["compiled"] and not section["fused_store"]
    # Nothing to unfuse here, and the CPU's default is SDPA already.
    assert list(section["variants"]) == ["default", "gather", "in-place"]
    for rows in section["variants"].values():
        assert [(row["batch"], row["width"]) for row in rows] == [(1, 1), (4, 1), (1, 3), (4, 3)]
        assert all(row["ms"] is None and row["max_abs_diff"] <= 1e-5 for row in rows)


def test_store_apart_and_sdpa_change_the_decoder_for_their_duration() -> None:
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
    decoder.matmul_attention = True
    with forward_ab.variant_settings(decoder, "sdpa"):
        assert not decoder.matmul_attention
    assert decoder.matmul_attention
    with pytest.raises(ValueError, match="unknown variant"), forward_ab.variant_settings(
        decoder, "other"
    ):
        pass
