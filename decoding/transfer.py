"""Host lists of ids to device tensors, without making the host wait for the device.

A plain ``tensor.copy_(host)`` or ``torch.tensor(values, device="cuda")`` from ordinary
(pageable) host memory returns only once the device's stream has caught up with everything
queued before it: every forward's small input copy would then be a full synchronisation, and
the host could never queue a step's next forward while the device runs the last one. From
pinned memory the copy is queued like a kernel. PyTorch's caching host allocator hands out the
pinned block and keeps it from reuse until the copy that reads it has run, so the host list
may go out of scope at once. Elsewhere than CUDA these are ordinary copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _host(values: Sequence[float], device: torch.device,
          dtype: torch.dtype = torch.long) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" and len(values) else host


def to_device(values: Sequence[float], device: torch.device,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device`` (long unless ``dtype`` says otherwise); on CUDA an
    asynchronous copy."""
    host = _host(values, device, dtype)
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def copy_into(destination: torch.Tensor, values: Sequence[int]) -> None:
    """Fill the long tensor ``destination`` (as many elements as ``values``) with ``values``;
    on CUDA an asynchronous copy."""
    destination.copy_(_host(values, destination.device).view(destination.shape),
                      non_blocking=True)
