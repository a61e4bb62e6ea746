"""``python -m bench.cpu_linear`` on a small weight: one line per row count, every timing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bench import cpu_linear
from decoding.fast.model import can_pack_weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prints_every_timing_by_rows(capsys: Any, dtype: str) -> None:
    if not can_pack_weights(torch.device("cpu"), getattr(torch, dtype)):
        pytest.skip(f"no oneDNN linear in {dtype} here")
    assert cpu_linear.main(
        ["--out-features", "64", "--in-features", "32", "--max-rows", "3", "--calls", "2",
         "--dtype", dtype]
    ) == 0
    lines = capsys.readouterr().out.splitlines()
    assert dtype in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    for row in rows:
        plain, packed, ratio, padded = map(float, row[1:])
        assert plain >= 0 and packed >= 0 and ratio > 0 and padded >= 0  # to 0.01 ms: tiny here
