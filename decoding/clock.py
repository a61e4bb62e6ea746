"""Where a step's time went (drafting, verifying), without making the host wait to find out.

On a GPU the host queues a step's work and waits only once, at its end, so the host's clock
at the point between drafting and verifying says when the drafting was queued, not when it
ran. There the marks are CUDA events recorded in the stream and read after the step's last
host sync (reading them then waits for nothing). Elsewhere work is done when its call
returns, and the host's clock is the measure.
"""

from __future__ import annotations

import time
from itertools import pairwise

import torch


class StepClock:
    """``mark()`` at each boundary (construction marks the start); ``gaps()`` gives the
    seconds between consecutive marks, once the work before the last mark has been waited
    for (on CUDA it waits for it if not)."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._events: list[torch.cuda.Event] = []
        self._times: list[float] = []
        self.mark()

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            # on the model's device's stream (the current device may be another one)
            event.record(torch.cuda.current_stream(self._device))
            self._events.append(event)
        else:
            self._times.append(time.perf_counter())

    def gaps(self) -> list[float]:
        if self._cuda:
            self._events[-1].synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in pairwise(self._events)]
        return [end - start for start, end in pairwise(self._times)]
