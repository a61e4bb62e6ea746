"""CUDA graphs of :meth:`FastDecoder.forward` for fixed decode shapes.

A small model's decode step is bound by kernel launches, not by reading weights (see
ARCHITECTURE.md); replaying one captured graph per step removes the launches. Each graph is
captured for one (batch size, width, attended length): it attends over the first ``kv_len``
cache positions, a bucket at least as long as every row's sequence, so its shapes never
change; its inputs are static buffers refilled before each replay. A batch smaller than a
captured size is padded with rows that write into a reserved scratch slot. All graphs of one
cache share one memory pool: they are replayed one at a time, and since a graph's
intermediates may sit where another's output does, an output is valid only until the next
replay of any of them.

Only for CUDA: the CPU tests run this module's input, padding and output handling with
stand-in graphs that replay eagerly (tests/decoding/test_batched.py), not the capture.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decoding.fast.cache import StaticKVCache
from decoding.fast.model import FastDecoder, FlexFailed
from decoding.transfer import copy_into

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # [B*T + 2B] long: the three static inputs below, end to end
    tokens: torch.Tensor  # [B, T] long, static input (a view of inputs)
    slots: torch.Tensor  # [B] long, static input (a view of inputs)
    starts: torch.Tensor  # [B] long, static input (a view of inputs)
    logits: torch.Tensor  # [B, T or 1, vocab] float32, static output (overwritten by each replay)
    picks: torch.Tensor | None = None  # [B] long, static input: the one position of each row
    # whose logits a last-only graph computes (its logits then [B, 1, vocab]); None: every one's


def end_failed_capture(stream: torch.cuda.Stream, device_index: int, pool: Any) -> None:
    """After a capture raised: ``stream``, the one current before it, is current again, and the
    caching allocator no longer sends this device's allocations to the graphs' ``pool``.
    ``torch.cuda.graph`` does neither where ending the capture raises (a capture invalidated,
    say by the allocator freeing cached blocks to retry an allocation that ran out of memory,
    pytorch/pytorch#159594): PyTorch without the fix of pytorch/pytorch#180395 (backported to
    2.12) then believes a capture still runs, and every later ``torch.cuda.empty_cache()``,
    the first thing the next capture does, fails. Where the capture did end, the allocator has
    stopped already and says so by raising, which is ignored."""
    torch.cuda.set_stream(stream)
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None)  # its name before torch 2.8
    if end is None:
        log.warning("this torch has no binding to end a failed capture's pool allocation")
        return
    with contextlib.suppress(RuntimeError, TypeError):  # ended already; an older signature
        end(device_index, pool)


LAST_ONLY_TOKENS = 1024
"""Last-only graphs (see :class:`DecodeGraphs`) are captured for batch sizes and widths of at
most this many tokens together."""


class DecodeGraphs:
    """One CUDA graph per (batch size, width, attended length); :meth:`run` replays the
    smallest that fits. Also *last-only* graphs, which compute the logits of one position per
    row, for forwards that need no more (a prompt's prefill, a catch-up): at wide widths the
    logits of every position would be most of a graph's memory. :meth:`run_last` replays the
    smallest of those that fits."""

    def __init__(
        self,
        decoder: FastDecoder,
        cache: StaticKVCache,
        batch_sizes: Sequence[int],
        widths: Sequence[int],
        kv_lengths: Sequence[int] = (),
        single_widths: Sequence[int] = (),
        last_only_widths: Sequence[int] = (),
    ) -> None:
        """``kv_lengths``: the attended-length buckets (each capped at the cache's max_len,
        which is always one of them). ``single_widths``: more widths, captured at batch 1
        only (one sequence catching up on several tokens). ``last_only_widths``: the widths of
        last-only graphs, for each batch size where batch x width <= :data:`LAST_ONLY_TOKENS`:
        at batch 1 for every attended length that holds the width, at larger batches for the
        shortest (rows that start at 0, a prefill's first chunk, fit it)."""
        if cache.keys.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and its cache on a CUDA device")
        self._pool = torch.cuda.graph_pool_handle()
        self._build(decoder, cache, batch_sizes, widths, kv_lengths, single_widths,
                    last_only_widths)

    def _build(
        self,
        decoder: FastDecoder,
        cache: StaticKVCache,
        batch_sizes: Sequence[int],
        widths: Sequence[int],
        kv_lengths: Sequence[int],
        single_widths: Sequence[int],
        last_only_widths: Sequence[int] = (),
    ) -> None:
        """Take the scratch slot and capture every shape (the decoder building graphs: see
        :meth:`FastDecoder.building_graphs`)."""
        self.decoder = decoder
        self.cache = cache
        # Capture and replay use the *current* device's stream, which for a model on cuda:1
        # is not its own unless this thread's current device is switched to it (-1: no switch,
        # for stand-ins that run elsewhere than on CUDA).
        device = cache.keys.device
        self._device_index = (
            -1 if device.type != "cuda"
            else device.index if device.index is not None else torch.cuda.current_device()
        )
        self.scratch_slot = cache.allocate()  # padding rows write here, never a sequence's slot
        self.kv_lengths = sorted({min(n, cache.max_len) for n in (*kv_lengths, cache.max_len)})
        self.batch_sizes = sorted(set(batch_sizes))
        self.widths = {batch: sorted(set(widths)) for batch in self.batch_sizes}
        if single_widths:
            self.widths[1] = sorted({*self.widths.get(1, []), *single_widths})
            self.batch_sizes = sorted({1, *self.batch_sizes})
        self._graphs: dict[tuple[int, int, int], _Captured] = {}
        try:
            with (torch.inference_mode(), torch.cuda.device(self._device_index),
                  decoder.building_graphs()):
                for kv_len in self.kv_lengths:
                    for batch, batch_widths in self.widths.items():
                        for width in batch_widths:
                            self._graphs[batch, width, kv_len] = self._capture(
                                batch, width, kv_len)
        except BaseException:
            cache.free(self.scratch_slot)  # the caller may try again, or run without graphs
            raise
        # Only widths wider than the other graphs for that batch: narrower forwards take those.
        self.last_only_widths = {
            batch: sorted(w for w in set(last_only_widths) if batch * w <= LAST_ONLY_TOKENS
                          and self.widest(batch) < w <= self.kv_lengths[-1])
            for batch in sorted({*batch_sizes, *([1] if last_only_widths else [])})
        }
        self._last_only: dict[tuple[int, int, int], _Captured] = {}
        self.last_only_failure: str | None = None
        """Why capturing the last-only graphs failed, where it did (the others are kept)."""
        try:
            with (torch.inference_mode(), torch.cuda.device(self._device_index),
                  decoder.building_graphs()):
                for batch, batch_widths in self.last_only_widths.items():
                    for width in batch_widths:
                        fitting = [n for n in self.kv_lengths if n >= width]
                        for kv_len in fitting if batch == 1 else fitting[:1]:
                            self._last_only[batch, width, kv_len] = self._capture(
                                batch, width, kv_len, last_only=True)
        except FlexFailed:  # the runner builds every graph again, without FlexAttention
            cache.free(self.scratch_slot)
            raise
        except Exception as exc:  # out of memory, a compile error: without them, as before
            self._last_only.clear()
            self.last_only_widths = {}
            self.last_only_failure = repr(exc)
        except BaseException:
            cache.free(self.scratch_slot)
            raise

    def widest(self, batch: int) -> int:
        """The widest graph for ``batch`` rows (0 if there is none)."""
        size = next((n for n in self.batch_sizes if n >= batch), None)
        return self.widths[size][-1] if size is not None else 0

    def _static_inputs(
        self, batch: int, width: int, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One graph's inputs: one buffer [B*T + 2B, or + 3B last-only] long, so that
        :meth:`run` refills them all with one copy, and its views tokens [B, T], slots [B]
        (the scratch slot until refilled), starts [B] and, last-only, picks [B]."""
        rows = 3 + int(last_only)
        inputs = torch.zeros(batch * (width + rows - 1), dtype=torch.long,
                             device=self.cache.keys.device)
        flat_tokens, slots, starts, *picks = inputs.split(
            [batch * width, *[batch] * (rows - 1)])
        slots.fill_(self.scratch_slot)
        return inputs, flat_tokens.view(batch, width), slots, starts, (
            picks[0] if picks else None)

    def _step(
        self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
        picks: torch.Tensor | None, kv_len: int,
    ) -> Callable[[], torch.Tensor]:
        """The forward a graph captures: logits [B, T, vocab], or last-only [B, 1, vocab]."""
        if picks is None:
            width = tokens.shape[1]
            return lambda: self.decoder.forward(
                tokens, slots, starts, self.cache, num_logits=width, kv_len=kv_len)

        def last_only() -> torch.Tensor:
            hidden = self.decoder.hidden_states(tokens, slots, starts, self.cache, kv_len)
            return self.decoder.logits(
                hidden.gather(1, picks[:, None, None].expand(-1, 1, hidden.shape[-1])))

        return last_only

    def _capture(self, batch: int, width: int, kv_len: int, last_only: bool = False
                 ) -> _Captured:
        device = self.cache.keys.device
        inputs, tokens, slots, starts, picks = self._static_inputs(batch, width, last_only)
        step = self._step(tokens, slots, starts, picks, kv_len)

        # Warm up on a side stream (lazy initialisation must not be captured), as the PyTorch
        # CUDA graphs documentation does.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream(device)
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                logits = step()
        except BaseException:
            try:
                end_failed_capture(stream, self._device_index, self._pool)
            except Exception:  # the capture's own error is the one to report
                log.warning("cleaning up after a failed capture failed", exc_info=True)
            raise
        return _Captured(graph, inputs, tokens, slots, starts, logits, picks)

    def run(
        self,
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        slots: Sequence[int],
        starts: Sequence[int],
    ) -> torch.Tensor | None:
        """Replay the graph for this batch: the smallest captured batch size and width that
        hold it, rows padded at the end (their padding's K/V land past each row's length).
        ``tokens``: host lists, or one [B, T] long tensor on the device. Returns logits
        [B, W, vocab] for the graph's width W >= the longest row, or None when no captured
        shape fits (the caller runs eagerly). The logits are a view of the graph's static
        output, valid until the next replay of any graph here: copy them to keep them.
        Nothing here waits for the device (see :mod:`decoding.transfer`)."""
        return self._replay(self._graphs, self.batch_sizes, self.widths, tokens, slots, starts)

    def run_last(
        self,
        tokens: Sequence[Sequence[int]],
        slots: Sequence[int],
        starts: Sequence[int],
    ) -> torch.Tensor | None:
        """:meth:`run` in the smallest last-only graph that holds the batch: the logits of
        each row's last token, [B, 1, vocab], or None where none fits."""
        picks = [len(row) - 1 for row in tokens]
        return self._replay(self._last_only, self._last_only_sizes(), self.last_only_widths,
                            tokens, slots, starts, picks)

    def last_only_fits(self, batch: int, width: int, start: int) -> bool:
        """Whether :meth:`run_last` has a graph for ``batch`` rows of up to ``width`` tokens
        from positions up to ``start``."""
        return self._find(self._last_only, self._last_only_sizes(), self.last_only_widths,
                          batch, width, start) is not None

    def _last_only_sizes(self) -> list[int]:
        """The batch sizes that have last-only graphs."""
        return [n for n, widths in self.last_only_widths.items() if widths]

    def _find(
        self,
        graphs: dict[tuple[int, int, int], _Captured],
        sizes: Sequence[int],
        widths: dict[int, list[int]],
        batch: int,
        width: int,
        start: int,
    ) -> tuple[_Captured, int, int] | None:
        """The smallest of ``graphs`` for this batch, its batch size and its width."""
        size = next((n for n in sizes if n >= batch), None)
        if size is None:
            return None
        span = next((w for w in widths[size] if w >= width), None)
        if span is None:
            return None
        needed = start + span  # every row's queries attend to positions below this
        kv_len = next((n for n in self.kv_lengths if n >= needed), None)
        captured = graphs.get((size, span, kv_len))  # type: ignore[arg-type]
        return None if captured is None else (captured, size, span)

    def _replay(
        self,
        graphs: dict[tuple[int, int, int], _Captured],
        sizes: Sequence[int],
        widths: dict[int, list[int]],
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        slots: Sequence[int],
        starts: Sequence[int],
        picks: Sequence[int] = (),
    ) -> torch.Tensor | None:
        batch, width = (tokens.shape if isinstance(tokens, torch.Tensor)
                        else (len(tokens), max(len(row) for row in tokens)))
        found = self._find(graphs, sizes, widths, batch, width, max(starts))
        if found is None:
            return None
        captured, size, span = found
        padding = size - batch
        # Padding rows feed a token at position 0 into the scratch slot (and pick it).
        places = [*slots, *[self.scratch_slot] * padding, *starts, *[0] * padding]
        if captured.picks is not None:
            places += [*picks, *[0] * padding]
        if isinstance(tokens, torch.Tensor):
            # Positions past the given tokens keep the ids of earlier fills, all valid.
            captured.tokens[:batch, :width].copy_(tokens)
            copy_into(captured.inputs[captured.tokens.numel() :], places)
        else:  # one copy for all the inputs, from one flat host list
            flat: list[int] = []
            for row in tokens:
                flat.extend(row)
                flat.extend([0] * (span - len(row)))
            flat.extend([0] * (padding * span))
            flat.extend(places)
            copy_into(captured.inputs, flat)
        with torch.cuda.device(self._device_index):
            captured.graph.replay()
        return captured.logits[:batch]
