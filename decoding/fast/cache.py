"""A KV cache allocated once: one slot per live sequence, written by position.

Rolling back a sequence is setting its length: the rejected positions stay in the buffer and
are overwritten by the next forward, and attention never reads past a query's own position
(gpt-fast's ``KVCache`` works the same way). The cache itself keeps no lengths; the runner
does, per sequence.
"""

from __future__ import annotations

import threading

import torch

from decoding.errors import OverloadedError


class CacheFullError(OverloadedError):
    """Every slot is taken; retry once a sequence has been released."""


class StaticKVCache:
    """K and V in one buffer, ``kv``: ``[num_layers, num_slots, num_kv_heads, 2, max_len,
    head_dim]`` (index 0 of the fourth axis is K, 1 is V), so that each layer writes a step's K
    and V with one indexed store and gathers a batch's rows with one copy, where separate
    buffers took two of each (on a GPU each is a kernel launch per layer, and a small model's
    step is bound by launches). ``keys`` and ``values`` are views of it,
    ``[num_layers, num_slots, num_kv_heads, max_len, head_dim]``: for one KV head, K and V sit
    next to each other, so a batch of rows of either still merges its batch and head axes
    into one stride (a batched matrix product reads it without a copy).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"need num_slots >= 1 and max_len >= 1, got {num_slots}, {max_len}")
        shape = (num_layers, num_slots, num_kv_heads, 2, max_len, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)
        """0 .. max_len-1 on the cache's device; a forward takes its widths and attended lengths
        as views of it (see :func:`decoding.fast.model._placement`)."""
        self.keys = self.kv[:, :, :, 0]
        self.values = self.kv[:, :, :, 1]
        self.num_slots = num_slots
        self.max_len = max_len
        self._lock = threading.Lock()
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._taken: set[int] = set()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot; raise :class:`CacheFullError` when there is none."""
        with self._lock:
            if not self._free:
                raise CacheFullError(f"all {self.num_slots} KV cache slots are in use")
            slot = self._free.pop()
            self._taken.add(slot)
            return slot

    def free(self, slot: int) -> None:
        """Give ``slot`` back. Its contents are left as they are; the next owner overwrites
        them before it can attend to them."""
        with self._lock:
            if slot not in self._taken:
                raise ValueError(f"KV cache slot {slot} is not allocated")
            self._taken.remove(slot)
            self._free.append(slot)
