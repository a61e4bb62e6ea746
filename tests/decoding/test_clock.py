"""decoding.clock on the CPU (the host's clock) and decoding.transfer's copies."""

from __future__ import annotations

import time

import torch

from decoding.clock import StepClock
from decoding.transfer import copy_into, to_device


def test_gaps_are_the_times_between_marks() -> None:
    clock = StepClock(torch.device("cpu"))
    time.sleep(0.02)
    clock.mark()
    clock.mark()
    first, second = clock.gaps()
    assert 0.02 <= first < 1.0 and 0.0 <= second < 0.01


def test_host_ids_reach_the_device_unchanged() -> None:
    values = [5, 0, 2**40, 7]
    tensor = to_device(values, torch.device("cpu"))
    assert tensor.dtype == torch.long and tensor.tolist() == values
    destination = torch.zeros(2, 2, dtype=torch.long)
    copy_into(destination, values)
    assert destination.tolist() == [[5, 0], [2**40, 7]]
