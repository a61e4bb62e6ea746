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
    """K and V buffers ``[num_layers, num_slots, num_kv_heads, max_len, head_dim]``."""

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
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
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
