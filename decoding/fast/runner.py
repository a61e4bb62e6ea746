"""A runner over :class:`FastDecoder` and one :class:`StaticKVCache`, interchangeable with
:class:`decoding.runner.ModelRunner`.

Each :class:`StaticSequence` owns one cache slot and a length. ``rollback`` only moves the
length; the speculative step runs on these sequences unchanged. :meth:`StaticRunner.forward_batch`
runs several sequences in one padded forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from decoding.fast.model import FastDecoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from decoding.fast.graphs import DecodeGraphs

PAD_TOKEN = 0
"""Fed at the padded end of shorter rows. Any valid id does; its K/V land past the row's length."""

GRAPH_KV_LENGTHS = (256, 1024, 4096)
"""Attended-length buckets of the CUDA graphs (and the whole cache): a step attends over the
smallest bucket that holds its rows, not over every slot position (on an H200 at batch 1, one
matmul kernel, most likely attention's over all 4,106 positions, was a quarter of the device
time)."""

log = logging.getLogger(__name__)


class StaticRunner:
    """Owns one model's fast decoder and a cache of ``num_slots`` sequences of ``max_len`` tokens.

    ``cuda_graphs=True`` (CUDA only) captures one graph per (batch size, width, attended length)
    in ``graph_batch_sizes`` x ``graph_widths`` x :data:`GRAPH_KV_LENGTHS` and replays it for
    batches that fit (padded up to the next captured batch size); anything else runs eagerly
    (and everything does if capture fails). See :mod:`decoding.fast.graphs`.
    ``pack_weights``, ``compile`` and ``matmul_attention`` go to
    :class:`~decoding.fast.model.FastDecoder`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        num_slots: int,
        max_len: int,
        *,
        cuda_graphs: bool = False,
        graph_batch_sizes: Sequence[int] = (1, 2, 4, 8),
        graph_widths: Sequence[int] = (1,),
        pack_weights: bool | None = None,
        compile: bool = False,
        matmul_attention: bool | None = None,
    ) -> None:
        self.model = model
        self.decoder = FastDecoder(
            model, pack_weights, compile=compile, matmul_attention=matmul_attention
        )
        self.device = self.decoder.device
        # One extra slot for the padding rows of graphed batches.
        self.cache = self.decoder.new_cache(num_slots + int(cuda_graphs), max_len)
        self.max_len = max_len
        self._lock = threading.Lock()
        self._live = 0
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            from decoding.fast.graphs import DecodeGraphs

            try:
                self.graphs = DecodeGraphs(
                    self.decoder, self.cache, graph_batch_sizes, graph_widths, GRAPH_KV_LENGTHS
                )
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # capture refused: run eagerly
                log.warning("CUDA graph capture failed, so every forward runs eagerly: %r", exc)
                self.graphs = None

    @property
    def live_sequences(self) -> int:
        return self._live

    def new_sequence(self) -> StaticSequence:
        """A sequence in a free slot; :class:`~decoding.fast.cache.CacheFullError` if none."""
        slot = self.cache.allocate()
        with self._lock:
            self._live += 1
        return StaticSequence(self, slot)

    def _released(self, slot: int) -> None:
        self.cache.free(slot)
        with self._lock:
            self._live -= 1

    @torch.inference_mode()
    def forward_batch(
        self,
        sequences: Sequence[StaticSequence],
        tokens: Sequence[Sequence[int]],
        num_logits: Sequence[int],
    ) -> list[torch.Tensor]:
        """Append ``tokens[b]`` to ``sequences[b]`` for every b in one forward pass; return
        row b's logits for its last ``num_logits[b]`` tokens: [num_logits[b], vocab] float32.

        Rows are padded at the end to the longest; every sequence needs room for that width
        (length + longest row <= max_len), since its padding is written past its length.
        """
        if not sequences or not len(sequences) == len(tokens) == len(num_logits):
            raise ValueError("forward_batch needs one token list and one num_logits per sequence")
        slots = [sequence._live_slot(self) for sequence in sequences]
        if len(set(slots)) != len(slots):
            raise ValueError("a sequence appears twice in one batch")
        counts = [len(row) for row in tokens]
        width = max(counts)
        for sequence, count, keep in zip(sequences, counts, num_logits, strict=True):
            if not 1 <= keep <= count:
                raise ValueError(f"num_logits must be in [1, {count}], got {keep}")
            if sequence.length + width > self.max_len:
                raise ValueError(
                    f"a sequence of {sequence.length} tokens has no room for {width} more "
                    f"(max_len {self.max_len}, padding included)"
                )
        starts = [sequence.length for sequence in sequences]
        logits = self._run(tokens, slots, starts, counts, num_logits, width)
        for sequence, count in zip(sequences, counts, strict=True):
            sequence.length += count
        return logits

    def _run(
        self,
        tokens: Sequence[Sequence[int]],
        slots: list[int],
        starts: list[int],
        counts: list[int],
        num_logits: Sequence[int],
        width: int,
    ) -> list[torch.Tensor]:
        uniform = all(count == width for count in counts)
        if uniform and self.graphs is not None:
            graphed = self.graphs.run(tokens, slots, starts)  # [B, width, vocab] or None
            if graphed is not None:
                return [row[width - keep :] for row, keep in zip(graphed, num_logits, strict=True)]
        device = self.device
        padded = [list(row) + [PAD_TOKEN] * (width - len(row)) for row in tokens]
        token_ids = torch.tensor(padded, dtype=torch.long, device=device)  # [B, T]
        slot_ids = torch.tensor(slots, dtype=torch.long, device=device)  # [B]
        start_ids = torch.tensor(starts, dtype=torch.long, device=device)  # [B]
        kv_len = max(starts) + width
        host_row = (slots[0], starts[0]) if len(slots) == 1 else None
        hidden = self.decoder.hidden_states(
            token_ids, slot_ids, start_ids, self.cache, kv_len, host_row=host_row
        )
        if uniform:  # one slice for all rows: the last max(num_logits) positions
            most = max(num_logits)
            logits = self.decoder.logits(hidden[:, width - most :])  # [B, most, vocab]
            return [row[most - keep :] for row, keep in zip(logits, num_logits, strict=True)]
        # Ragged: gather each row's last real positions, then one pass through the head.
        picks = [
            b * width + position
            for b, (count, keep) in enumerate(zip(counts, num_logits, strict=True))
            for position in range(count - keep, count)
        ]
        flat = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(picks, device=device)]
        return list(self.decoder.logits(flat).split(list(num_logits)))


class StaticSequence:
    """One sequence in one cache slot; the same interface as :class:`decoding.runner.KVSequence`.
    ``length`` tokens are cached."""

    def __init__(self, runner: StaticRunner, slot: int) -> None:
        self._runner = runner
        self._slot: int | None = slot
        self.length = 0

    @property
    def device(self) -> torch.device:
        return self._runner.device

    @property
    def slot(self) -> int | None:
        """The cache slot, None once released."""
        return self._slot

    def _live_slot(self, runner: StaticRunner) -> int:
        if self._runner is not runner:
            raise ValueError("the sequence belongs to another runner")
        if self._slot is None:
            raise RuntimeError("forward on a released KV sequence")
        return self._slot

    def forward(self, tokens: list[int], num_logits: int | None = None) -> torch.Tensor:
        """Append ``tokens`` at positions [length, length+n); return the logits of the last
        ``num_logits`` of them (all when None): [num_logits, vocab] float32."""
        if not tokens:
            raise ValueError("forward needs at least one token")
        keep = len(tokens) if num_logits is None else num_logits
        return self._runner.forward_batch([self], [tokens], [keep])[0]

    def rollback(self, length: int) -> None:
        """Forget every cached token at position ``length`` and beyond: only the length moves."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} tokens cached")
        self.length = length

    def release(self) -> None:
        """Give the slot back. Idempotent."""
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._runner._released(slot)
