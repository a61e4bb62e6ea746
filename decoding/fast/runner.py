"""A runner over :class:`FastDecoder` and one :class:`StaticKVCache`, interchangeable with
:class:`decoding.runner.ModelRunner`.

Each :class:`StaticSequence` owns one cache slot and a length. ``rollback`` only moves the
length; the speculative step runs on these sequences unchanged. :meth:`StaticRunner.forward_batch`
runs several sequences in one padded forward pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from decoding.fast.model import FastDecoder, FlexFailed
from decoding.transfer import to_device

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

GRAPH_LAST_ONLY_WIDTHS = (16, 32, 64, 128, 256, 512)
"""Widths of the last-only graphs the engine captures (see
:class:`~decoding.fast.graphs.DecodeGraphs`): one sequence's prefill chunk of up to 512 tokens
or catch-up, from any position an attended-length bucket holds, in one replay; several rows of
up to 1,024 tokens together where they fit the shortest bucket that holds their width (a
prompt's first chunk, mostly). Eagerly, one 64-token prefill of the 1.5B target took 25-44 ms
on the H200 (run 8), a forward bound by its kernel launches. Powers of two: a row pads to at
most twice its tokens. Not yet run on a GPU."""

MAX_CATCH_UP_REPLAYS = 4
"""How many graph replays one sequence's catch-up may take (see ``graph_catch_up_widths``)
where no last-only graph holds it in one; longer feeds run in a last-only graph if one holds
them, else as one eager forward, which for many tokens costs its arithmetic more than its
launches."""

log = logging.getLogger(__name__)


class StaticRunner:
    """Owns one model's fast decoder and a cache of ``num_slots`` sequences of ``max_len`` tokens.

    ``cuda_graphs=True`` (CUDA only) captures one graph per (batch size, width, attended length)
    in ``graph_batch_sizes`` x ``graph_widths`` x :data:`GRAPH_KV_LENGTHS` and replays it for
    batches that fit (padded up to the next captured batch size and width); anything else runs
    eagerly (and everything does if capture fails). See :mod:`decoding.fast.graphs`.
    ``graph_catch_up_widths``: more widths, captured for one sequence only; with them, one
    sequence's forward of up to :data:`MAX_CATCH_UP_REPLAYS` times the widest runs as that
    many replays (for a small model, whose eager forward costs its launches: a draft catching
    up on the tokens it did not see). ``graph_last_only_widths``: widths of graphs that give
    only each row's last logits (see :class:`~decoding.fast.graphs.DecodeGraphs`), which take
    forwards that want no more and are wider than every other graph (prefills, catch-ups),
    where they would otherwise run eagerly or as several replays.
    ``pack_weights``, ``compile`` and ``attention`` go to
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
        graph_catch_up_widths: Sequence[int] = (),
        graph_last_only_widths: Sequence[int] = (),
        pack_weights: bool | None = None,
        compile: bool = False,
        attention: str | None = None,
    ) -> None:
        self.model = model
        self.decoder = FastDecoder(model, pack_weights, compile=compile, attention=attention)
        self.device = self.decoder.device
        # One extra slot for the padding rows of graphed batches.
        self.cache = self.decoder.new_cache(num_slots + int(cuda_graphs), max_len)
        self.max_len = max_len
        self._lock = threading.Lock()
        self._live = 0
        self._pick_cache: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        self.graphs: DecodeGraphs | None = None
        self.catch_up_in_graphs = bool(graph_catch_up_widths)
        # Why capturing graphs failed, once, where it did (see _capture_graphs).
        self.graph_failure: str | None = None
        if cuda_graphs:
            from decoding.fast.graphs import DecodeGraphs

            self.graphs = self._capture_graphs(lambda: DecodeGraphs(
                self.decoder, self.cache, graph_batch_sizes, graph_widths, GRAPH_KV_LENGTHS,
                graph_catch_up_widths, graph_last_only_widths,
            ))
            self._note_last_only_failure()

    def _note_last_only_failure(self) -> None:
        """Say so where the graphs came without their last-only ones."""
        failure = None if self.graphs is None else self.graphs.last_only_failure
        if failure is not None:
            log.warning("capturing the last-only CUDA graphs failed, so prefills and long "
                        "catch-ups run as before: %s", failure)
            self._add_failure(f"last-only: {failure}")

    def _add_failure(self, text: str) -> None:
        """Append ``text`` to :attr:`graph_failure`, after what failed before it."""
        self.graph_failure = f"{self.graph_failure}; {text}" if self.graph_failure else text

    def _capture_graphs(self, capture: Callable[[], DecodeGraphs]) -> DecodeGraphs | None:
        """``capture()``'s graphs; where it fails, without them. Capturing is the first call
        of the compiled functions at the real shapes, so a failure may be theirs, and an eager
        forward would call them too. So, where it fails, one thing that could have failed is
        given up and capturing is tried again, one at a time: FlexAttention first where its own
        functions raised (:class:`~decoding.fast.model.FlexFailed`); then the K/V store compiled
        into the rotation (the one compiled function that writes into the cache); then
        FlexAttention whatever raised (a capture's failure need not surface inside the call
        that caused it); then compiling at all. What failed is kept in ``graph_failure``."""
        decoder = self.decoder
        failure, flex_failed = "", False

        def give_up_flex() -> None:
            decoder.give_up_flex(f"a CUDA graph capture failed with it: {failure}")

        flex_on = "with FlexAttention, so it is given up"
        fallbacks = (
            (lambda: decoder.attention == "flex" and flex_failed, give_up_flex,
             "flex attention", flex_on),
            (lambda: decoder.pointwise.rotate_store is not None, decoder.store_apart,
             "fused store", "with the K/V store compiled into the rotation, so K and V are "
             "stored apart from now on"),
            (lambda: decoder.attention == "flex", give_up_flex, "flex attention", flex_on),
            (lambda: decoder.compiled, decoder.run_eagerly, "compiled",
             "with the compiled functions, so they run uncompiled from now on"),
        )
        # Only the failure's text is kept: the exception's traceback would keep the failed
        # try's graphs, and the device memory they hold, alive through the next try.
        try:
            return capture()
        except Exception as exc:  # out of memory, compile errors, a recompile limit hit
            failure, flex_failed = repr(exc), isinstance(exc, FlexFailed)
        for applies, give_up, label, what in fallbacks:
            if not applies():
                continue
            log.warning("CUDA graph capture failed %s; capturing again: %s", what, failure)
            self._add_failure(f"{label}: {failure}")
            give_up()
            try:
                return capture()
            except Exception as exc:
                failure, flex_failed = repr(exc), isinstance(exc, FlexFailed)
        log.warning("CUDA graph capture failed, so every forward runs eagerly: %s", failure)
        self._add_failure(f"uncompiled: {failure}" if self.graph_failure else failure)
        return None

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
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        num_logits: Sequence[int],
    ) -> list[torch.Tensor]:
        """Append ``tokens[b]`` to ``sequences[b]`` for every b in one forward pass; return
        row b's logits for its last ``num_logits[b]`` tokens: [num_logits[b], vocab] float32.

        Rows are padded at the end to the longest; every sequence needs room for that width
        (length + longest row <= max_len), since its padding is written past its length.
        ``tokens`` may also be one [B, T] long tensor on this runner's device (rows of one
        width): it is read on the device, so a caller can feed the tokens a previous forward
        chose without waiting for them to reach the host.
        """
        packed = self.forward_packed(sequences, tokens, num_logits)
        return list(packed.split_with_sizes(list(num_logits)))

    @torch.inference_mode()
    def forward_packed(
        self,
        sequences: Sequence[StaticSequence],
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        num_logits: Sequence[int],
        *,
        lengths: Sequence[int] | None = None,
        transient: bool = False,
    ) -> torch.Tensor:
        """:meth:`forward_batch` with the rows' logits end to end in one tensor,
        [sum(num_logits), vocab] float32 (row b's start at sum(num_logits[:b])), so a caller
        can work on all rows with one operation.

        ``lengths``, with ``tokens`` a [B, T] tensor: row b's real tokens are its first
        ``lengths[b]`` (the rest padding, one of them T long); None means all T.

        ``transient=True``: the result may be a view of a CUDA graph's static output, valid
        only until this runner's next forward; for a caller that reads it (enqueues every
        operation on it) before then, which saves a copy of the logits per replay.
        """
        if not sequences or not len(sequences) == len(tokens) == len(num_logits):
            raise ValueError("forward_batch needs one token list and one num_logits per sequence")
        slots = [sequence._live_slot(self) for sequence in sequences]
        if len(set(slots)) != len(slots):
            raise ValueError("a sequence appears twice in one batch")
        if isinstance(tokens, torch.Tensor):
            counts = [tokens.shape[1]] * len(sequences) if lengths is None else list(lengths)
            if len(counts) != len(sequences) or max(counts) != tokens.shape[1]:
                raise ValueError("lengths must give every row, the longest as long as tokens")
        else:
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
        if self._in_replays(sequences, tokens, num_logits, width):
            return self._replayed(sequences[0], tokens[0], transient)  # type: ignore[arg-type]
        starts = [sequence.length for sequence in sequences]
        logits = self._run(tokens, slots, starts, counts, num_logits, width, transient)
        for sequence, count in zip(sequences, counts, strict=True):
            sequence.length += count
        return logits

    def _in_replays(
        self,
        sequences: Sequence[StaticSequence],
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        num_logits: Sequence[int],
        width: int,
    ) -> bool:
        """Whether this forward is one sequence's catch-up to run as several graph replays."""
        if self.graphs is None or not self.catch_up_in_graphs or len(sequences) != 1:
            return False
        widest = self.graphs.widest(1)
        return (
            not isinstance(tokens, torch.Tensor)
            and num_logits[0] == 1
            and widest < width <= MAX_CATCH_UP_REPLAYS * widest
            and not self.graphs.last_only_fits(1, width, sequences[0].length)  # one replay
        )

    def _replayed(self, sequence: StaticSequence, row: Sequence[int], transient: bool
                  ) -> torch.Tensor:
        """``row`` fed in chunks of the widest graph's width, the last one shorter (padded
        into a graph of its own width or more); the last token's logits [1, vocab]."""
        assert self.graphs is not None
        widest = self.graphs.widest(1)
        for begin in range(0, len(row) - widest, widest):  # all chunks but the last
            self.forward_packed([sequence], [list(row[begin : begin + widest])], [1],
                                transient=True)
        last = (len(row) - 1) // widest * widest
        return self.forward_packed([sequence], [list(row[last:])], [1], transient=transient)

    def _run(
        self,
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        slots: list[int],
        starts: list[int],
        counts: list[int],
        num_logits: Sequence[int],
        width: int,
        transient: bool,
    ) -> torch.Tensor:
        batch = len(tokens)
        uniform = all(count == width for count in counts)
        if self.graphs is not None:
            if (not isinstance(tokens, torch.Tensor) and width > self.graphs.widest(batch)
                    and all(keep == 1 for keep in num_logits)):
                last = self.graphs.run_last(tokens, slots, starts)  # [B, 1, vocab]
                if last is not None:
                    flat = last.reshape(batch, -1)
                    return flat if transient else flat.clone()
            # Rows shorter than the graph's width are padded at the end, as eagerly: the
            # padding's K/V land past each row's length, and its logits are not picked.
            graphed = self.graphs.run(tokens, slots, starts)  # [B, span >= width, vocab]
            if graphed is not None:
                span = graphed.shape[1]
                flat = graphed.reshape(batch * span, -1)  # a view of the static output
                if span == width and uniform and all(keep == width for keep in num_logits):
                    return flat if transient else flat.clone()
                return flat[self._picks(counts, num_logits, span)]  # a gathered copy
        # One host list and one tensor (one host-to-device copy): the padded tokens (unless
        # they are on the device already), the slots, the starts.
        flat_inputs: list[int] = []
        if not isinstance(tokens, torch.Tensor):
            for row in tokens:
                flat_inputs.extend(row if len(row) == width else _padded(row, width))
        flat_inputs.extend(slots)
        flat_inputs.extend(starts)
        inputs = to_device(flat_inputs, self.device)
        listed, slot_ids, start_ids = inputs.split_with_sizes(
            [len(flat_inputs) - 2 * batch, batch, batch]
        )
        token_ids = tokens if isinstance(tokens, torch.Tensor) else listed
        kv_len = max(starts) + width
        host_row = (slots[0], starts[0]) if batch == 1 else None
        hidden = self.decoder.hidden_states(
            token_ids.view(batch, width), slot_ids, start_ids, self.cache, kv_len,
            host_row=host_row,
        )
        if uniform and all(keep == num_logits[0] for keep in num_logits):
            keep = num_logits[0]  # one slice for all rows: their last ``keep`` positions
            return self.decoder.logits(hidden[:, width - keep :]).reshape(batch * keep, -1)
        # Ragged: gather each row's last real positions, then one pass through the head.
        flat = hidden.reshape(batch * width, -1)[self._picks(counts, num_logits, width)]
        return self.decoder.logits(flat)

    def _picks(self, counts: list[int], num_logits: Sequence[int], width: int) -> torch.Tensor:
        """Indices into the B*width positions of each row's last ``num_logits[b]`` real ones."""
        key = (width, tuple(counts), tuple(num_logits))
        picks = self._pick_cache.get(key)
        if picks is None:
            if len(self._pick_cache) >= 256:
                self._pick_cache.clear()
            indices = [
                b * width + position
                for b, (count, keep) in enumerate(zip(counts, num_logits, strict=True))
                for position in range(count - keep, count)
            ]
            picks = to_device(indices, self.device)
            self._pick_cache[key] = picks
        return picks


def _padded(row: Sequence[int], width: int) -> list[int]:
    """``row`` with :data:`PAD_TOKEN` after it up to ``width`` tokens."""
    return [*row, *[PAD_TOKEN] * (width - len(row))]


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

    def forward(
        self, tokens: list[int] | torch.Tensor, num_logits: int | None = None
    ) -> torch.Tensor:
        """Append ``tokens`` (host ids, or a 1-D long tensor of ids on this device) at
        positions [length, length+n); return the logits of the last ``num_logits`` of them
        (all when None): [num_logits, vocab] float32."""
        if not len(tokens):
            raise ValueError("forward needs at least one token")
        keep = len(tokens) if num_logits is None else num_logits
        rows = tokens.view(1, -1) if isinstance(tokens, torch.Tensor) else [tokens]
        return self._runner.forward_batch([self], rows, [keep])[0]

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
