"""The batched speculative step and the fast runner's packed and graphed paths, on the CPU.

A batched step must give every request what it gets alone: greedy rows the target's own
tokens, sampled rows the same draws from their own generators, whatever the other rows'
settings and γ. The CUDA-graph path of :class:`StaticRunner` is exercised with "graphs" that
replay the decoder eagerly, so everything but the capture itself runs here.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from collections.abc import Callable

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from decoding.batched import plain_steps_batch, speculative_step_batch
from decoding.fast.cache import StaticKVCache
from decoding.fast.graphs import DecodeGraphs, _Captured, end_failed_capture
from decoding.fast.model import FastDecoder, FlexFailed, _rotate_store
from decoding.fast.runner import StaticRunner
from decoding.params import SamplingParams
from decoding.speculative import SequenceState, plain_steps, speculative_step

VOCAB = 300
ATOL = 1e-5
SETTINGS = [  # mixed on purpose: greedy rows, repeated settings apart, top-k, top-p, and
    # rows that differ in temperature alone (sampled rows are grouped by their settings)
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=1.0),
    SamplingParams(),
    SamplingParams(temperature=0.5, top_k=50, top_p=0.8),
    SamplingParams(temperature=0.3),
]


def qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    return qwen2(0), qwen2(1)


class _EagerGraph:
    """Stands in for a captured CUDA graph: replay runs the step and fills the static output.

    Graphs captured into one memory pool reuse each other's freed intermediates, so a replay
    may overwrite any other graph's output: every output of the pool (``outputs``) is valid
    only until the next replay. Here a replay fills the others with NaN, so that a caller
    reading an output after a later replay gets wrong tokens, as it would on a GPU."""

    def __init__(self, step: Callable[[], torch.Tensor], output: torch.Tensor,
                 outputs: list[torch.Tensor]) -> None:
        self.step, self.output, self.outputs = step, output, outputs
        outputs.append(output)

    def replay(self) -> None:
        for other in self.outputs:
            if other is not self.output:
                other.fill_(float("nan"))
        self.output.copy_(self.step())


class EagerGraphs(DecodeGraphs):
    """:class:`DecodeGraphs` on the CPU: the same static inputs, padding and output handling,
    with each graph's replay run eagerly (and the shared pool's overwriting, see
    :class:`_EagerGraph`)."""

    def __init__(self, decoder: FastDecoder, cache: StaticKVCache, batch_sizes: tuple[int, ...],
                 widths: tuple[int, ...], kv_lengths: tuple[int, ...],
                 single_widths: tuple[int, ...] = (),
                 last_only_widths: tuple[int, ...] = ()) -> None:
        self.replays = 0
        self.last_only_replays = 0
        self.outputs: list[torch.Tensor] = []
        self._build(decoder, cache, batch_sizes, widths, kv_lengths, single_widths,
                    last_only_widths)

    def _capture(self, batch: int, width: int, kv_len: int, last_only: bool = False
                 ) -> _Captured:
        inputs, tokens, slots, starts, picks = self._static_inputs(batch, width, last_only)
        forward = self._step(tokens, slots, starts, picks, kv_len)

        def step() -> torch.Tensor:
            self.replays += 1
            self.last_only_replays += int(last_only)
            return forward()

        output = torch.zeros(batch, 1 if last_only else width, VOCAB)
        graph: torch.cuda.CUDAGraph = _EagerGraph(  # type: ignore[assignment]
            step, output, self.outputs)
        return _Captured(graph, inputs, tokens, slots, starts, output, picks)


def graphed_runner(
    model: Qwen2ForCausalLM, num_slots: int, max_len: int, catch_up: tuple[int, ...] = (),
    last_only: tuple[int, ...] = (), attention: str | None = None,
) -> StaticRunner:
    runner = StaticRunner(model, num_slots=num_slots + 1, max_len=max_len, attention=attention)
    runner.graphs = EagerGraphs(runner.decoder, runner.cache, (1, 2, 4), (1, 3), (16, 64),
                                catch_up, last_only)
    runner.catch_up_in_graphs = bool(catch_up)
    return runner


@pytest.mark.parametrize("attention", [None, "flex"])
def test_graphed_forwards_equal_eager_ones(pair, attention: str | None) -> None:
    """Padded batch sizes, each width and keep, ragged and narrower rows padded into a wider
    graph, widths beyond every graph, tokens given as a tensor, and the transient view; with
    the CPU's attention and with FlexAttention (over a graph's attended length, its padding
    rows in the scratch slot)."""
    model = pair[0]
    eager = StaticRunner(model, num_slots=3, max_len=64, attention=attention)
    graphed = graphed_runner(model, 3, 64, attention=attention)
    assert graphed.decoder.attention == eager.decoder.attention == (attention or "sdpa")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (4, 9, 6)]
    calls = [
        (prompts, [1, 2, 1]),  # ragged, 9 wide: no graph, eager
        ([[5], [6], [7]], [1, 1, 1]),  # batch 3 in the graph of 4
        ([[8, 9, 10], [11, 12, 13], [14, 15, 16]], [3, 3, 3]),
        ([[17, 18, 19], [20, 21, 22], [23, 24, 25]], [1, 3, 2]),  # a gathered subset
        ([[26, 27], [28, 29], [30, 31]], [2, 1, 2]),  # width 2: padded into the graph of 3
        ([[32], [33, 34, 35], [36, 37]], [1, 2, 1]),  # ragged in the graph of width 3
        ([[38, 39], [40], [41, 42, 43]], [2, 1, 3]),  # and again, after the padding's K/V
        (torch.tensor([[44], [45], [46]]), [1, 1, 1]),  # tokens already on the device
        (torch.tensor([[47, 48], [49, 50], [51, 52]]), [1, 2, 1]),  # padded into 3 as well
    ]
    sequences = {runner: [runner.new_sequence() for _ in range(3)] for runner in (eager, graphed)}
    for tokens, keep in calls:
        listed = tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens
        expected = eager.forward_batch(sequences[eager], listed, keep)
        got = graphed.forward_batch(sequences[graphed], tokens, keep)
        for mine, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)
    assert graphed.graphs is not None and graphed.graphs.replays == 8
    # Rows 0 and 2 only (a batch of 2): transient logits are the static output itself.
    two = [sequences[graphed][0], sequences[graphed][2]]
    kept = graphed.forward_packed(two, [[1], [2]], [1, 1])
    view = graphed.forward_packed(two, [[3], [4]], [1, 1], transient=True)
    outputs = {captured.logits.data_ptr() for captured in graphed.graphs._graphs.values()}
    assert view.data_ptr() in outputs and kept.data_ptr() not in outputs
    with pytest.raises(ValueError, match="lengths"):  # no row as long as the tokens given
        graphed.forward_packed(two, torch.tensor([[1, 2], [3, 4]]), [1, 1], lengths=[1, 1])


class _FailingGraphs(EagerGraphs):
    """Stand-in graphs whose capture fails, as a compile error at a real shape would, while
    ``fails(decoder)`` says so; ``error``: what it raises."""

    def __init__(self, fails: Callable[[FastDecoder], bool], *args,
                 error: Callable[[str], Exception] = RuntimeError, **kwargs) -> None:
        self._fails = fails
        self._error = error
        super().__init__(*args, **kwargs)

    def _capture(self, batch: int, width: int, kv_len: int, last_only: bool = False
                 ) -> _Captured:
        if self._fails(self.decoder):
            raise self._error("BackendCompilerFailed (stand-in)")
        return super()._capture(batch, width, kv_len, last_only)


def test_a_capture_that_fails_compiled_is_retried_uncompiled(pair) -> None:
    """Capturing runs the compiled functions at the real shapes for the first time; where it
    fails the decoder runs uncompiled from then on (an eager forward would call the same
    compiled functions) and capturing is tried again; the failed try's scratch slot is
    given back. Where it fails uncompiled too, the runner has no graphs and says why."""
    runner = StaticRunner(pair[0], num_slots=3, max_len=64)
    free = runner.cache.free_slots
    decoder = runner.decoder
    decoder.compiled = True  # as torch.compile leaves it (not compiled here: CPU time)
    marker = decoder.pointwise

    tries: list[weakref.ref[_FailingGraphs]] = []

    def capture(fails: Callable[[FastDecoder], bool]) -> Callable[[], DecodeGraphs]:
        def build() -> DecodeGraphs:
            gc.collect()  # a failed try's graphs (their device memory, on a GPU) are gone
            assert all(done() is None for done in tries)
            graphs = object.__new__(_FailingGraphs)
            tries.append(weakref.ref(graphs))
            graphs.__init__(fails, decoder, runner.cache, (1, 2), (1,), (64,))
            return graphs
        return build

    graphs = runner._capture_graphs(capture(lambda d: d.compiled))
    assert len(tries) == 2 and graphs is not None
    assert not decoder.compiled and decoder.pointwise is not marker
    assert runner.graph_failure is not None and runner.graph_failure.startswith("compiled:")
    assert runner.cache.free_slots == free - 1  # one scratch slot, the second try's
    runner.graphs = graphs
    sequence = runner.new_sequence()
    logits = runner.forward_batch([sequence], [[5, 6, 7]], [1])[0]
    expected = pair[0](torch.tensor([[5, 6, 7]])).logits[0, -1:]
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    sequence.release()

    other = StaticRunner(pair[1], num_slots=3, max_len=64)
    other.decoder.compiled = True
    free = other.cache.free_slots
    # Not only RuntimeErrors: torch.compile's recompile limit, under fullgraph, raises this.
    never = other._capture_graphs(lambda: _FailingGraphs(
        lambda d: True, other.decoder, other.cache, (1,), (1,), (64,),
        error=torch._dynamo.exc.FailOnRecompileLimitHit))
    assert never is None and other.cache.free_slots == free
    assert other.graph_failure is not None and "; uncompiled: " in other.graph_failure
    assert "FailOnRecompileLimitHit" in other.graph_failure


def test_a_capture_that_fails_with_the_fused_store_is_retried_with_it_apart(pair) -> None:
    """Where capturing fails while K/V are stored by the compiled rotation, the decoder stores
    them apart, still compiled, and capturing is tried again; where that fails too, it goes on
    uncompiled, as above. (The fused store here is :func:`_rotate_store` uncompiled.)"""
    runner = StaticRunner(pair[0], num_slots=3, max_len=64)
    decoder = runner.decoder
    decoder.compiled = True  # as torch.compile leaves it (not compiled here: CPU time)
    decoder.pointwise = dataclasses.replace(decoder.pointwise, rotate_store=_rotate_store)
    split = decoder.pointwise.split_rotate
    graphs = runner._capture_graphs(lambda: _FailingGraphs(
        lambda d: d.pointwise.rotate_store is not None, decoder, runner.cache, (1, 2), (1,),
        (64,)))
    assert graphs is not None and decoder.compiled
    assert decoder.pointwise.rotate_store is None and decoder.pointwise.split_rotate is split
    assert runner.graph_failure is not None and runner.graph_failure.startswith("fused store:")
    runner.graphs = graphs
    sequence = runner.new_sequence()
    logits = runner.forward_batch([sequence], [[5, 6, 7]], [1])[0]
    expected = pair[0](torch.tensor([[5, 6, 7]])).logits[0, -1:]
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)

    other = StaticRunner(pair[1], num_slots=3, max_len=64)
    other.decoder.compiled = True
    other.decoder.pointwise = dataclasses.replace(other.decoder.pointwise,
                                                  rotate_store=_rotate_store)
    assert other._capture_graphs(lambda: _FailingGraphs(
        lambda d: d.compiled, other.decoder, other.cache, (1,), (1,), (64,))) is not None
    assert not other.decoder.compiled and other.decoder.pointwise.rotate_store is None
    assert other.graph_failure is not None
    assert other.graph_failure.startswith("fused store: ") and "; compiled: " in other.graph_failure


@pytest.mark.parametrize("error", [FlexFailed, RuntimeError])
def test_a_capture_that_fails_with_flex_attention_is_retried_without_it(pair, error) -> None:
    """Where capturing fails while attention is FlexAttention, the decoder gives it up (for the
    device's default, here SDPA; on CUDA the two matrix products) and capturing is tried again:
    first of all where FlexAttention's own functions raised (the fused store and "compiled"
    kept); where something else raised, after the fused store (which is then apart too) and
    before compiling (kept)."""
    runner = StaticRunner(pair[0], num_slots=3, max_len=64, attention="flex")
    decoder = runner.decoder
    decoder.compiled = True  # as torch.compile leaves it (not compiled here: CPU time)
    decoder.pointwise = dataclasses.replace(decoder.pointwise, rotate_store=_rotate_store)
    graphs = runner._capture_graphs(lambda: _FailingGraphs(
        lambda d: d.attention == "flex", decoder, runner.cache, (1, 2), (1,), (64,),
        error=error))
    assert graphs is not None and decoder.attention == "sdpa" and decoder.compiled
    assert decoder.flex_failure == (
        f"a CUDA graph capture failed with it: {error.__name__}('BackendCompilerFailed "
        "(stand-in)')")
    assert runner.graph_failure is not None
    if error is FlexFailed:
        assert decoder.pointwise.rotate_store is _rotate_store
        assert runner.graph_failure.startswith("flex attention:") and "; " not in (
            runner.graph_failure)
    else:
        assert decoder.pointwise.rotate_store is None
        assert runner.graph_failure.startswith("fused store:")
        assert "; flex attention: " in runner.graph_failure
    runner.graphs = graphs
    sequence = runner.new_sequence()
    logits = runner.forward_batch([sequence], [[5, 6, 7]], [1])[0]
    expected = pair[0](torch.tensor([[5, 6, 7]])).logits[0, -1:]
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)


class WarmedGraphs(EagerGraphs):
    """Stand-ins that run each graph's forward once as they are built, as the real ones are
    warmed up before their capture."""

    def _capture(self, batch: int, width: int, kv_len: int, last_only: bool = False
                 ) -> _Captured:
        captured = super()._capture(batch, width, kv_len, last_only)
        captured.graph.replay()
        return captured


@pytest.mark.parametrize("last_only", [False, True])
def test_flex_attention_failing_while_graphs_are_built_builds_them_all_again_without_it(
    pair, last_only: bool
) -> None:
    """FlexAttention that fails in a graph's warm-up (in a main graph, or in a last-only one)
    is not given up there, forward by forward (the graphs built before would keep it): the
    build fails, its scratch slot is given back, and the runner gives FlexAttention up and
    builds every graph again with the default attention."""
    runner = StaticRunner(pair[0], num_slots=3, max_len=64, attention="flex")
    decoder = runner.decoder
    free = runner.cache.free_slots
    eager = decoder.pointwise.flex_attention
    calls: list[bool] = []

    def flex(*args, constant_batch=False):  # type: ignore[no-untyped-def]
        calls.append(constant_batch)
        if last_only and args[0].shape[2] < 2 * 8:  # the main graphs' (widths 1 and 3)
            return eager(*args)
        raise RuntimeError("no kernel for this shape")

    decoder.pointwise = dataclasses.replace(decoder.pointwise, flex_attention=flex)
    graphs = runner._capture_graphs(lambda: WarmedGraphs(
        decoder, runner.cache, (1, 2), (1, 3), (64,), last_only_widths=(8,)))
    assert graphs is not None and decoder.attention == "sdpa" and graphs.last_only_failure is None
    assert runner.graph_failure is not None and runner.graph_failure.startswith("flex attention:")
    assert "no kernel for this shape" in runner.graph_failure
    assert decoder.flex_failure is not None and decoder.flex_failure.startswith(
        "a CUDA graph capture failed with it: FlexFailed(")
    assert calls and all(calls)  # every call while building: the batch a constant
    assert runner.cache.free_slots == free - 1  # the second build's scratch slot only
    runner.graphs = graphs
    sequence = runner.new_sequence()
    logits = runner.forward_batch([sequence], [[5, 6, 7]], [1])[0]
    expected = pair[0](torch.tensor([[5, 6, 7]])).logits[0, -1:]
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)


def test_a_catch_up_runs_as_graph_replays_of_the_widest(pair) -> None:
    """One sequence fed up to MAX_CATCH_UP_REPLAYS x the widest catch-up graph runs as that
    many replays (the last chunk padded into a graph); beyond that, or for more logits, or
    with no catch-up graphs, eagerly. Logits and the cache after it are the eager ones."""
    model = pair[0]
    eager = StaticRunner(model, num_slots=1, max_len=64)
    graphed = graphed_runner(model, 1, 64, catch_up=(4,))
    plain = graphed_runner(model, 1, 64)
    generator = torch.Generator().manual_seed(1)
    feeds = [  # (tokens, num_logits, replays they take)
        (10, 1, 3),  # 4 + 4 + 2 (in the graph of 3)
        (1, 1, 1),
        (16, 1, 4),  # 4 x 4
        (17, 1, 0),  # more than 4 replays: eager
        (6, 2, 0),  # two logits: eager
        (3, 1, 1),
    ]
    sequences = {runner: runner.new_sequence() for runner in (eager, graphed, plain)}
    for count, keep, replays in feeds:
        tokens = torch.randint(3, VOCAB, (count,), generator=generator).tolist()
        expected = sequences[eager].forward(tokens, num_logits=keep)
        for runner in (graphed, plain):
            assert runner.graphs is not None
            before = runner.graphs.replays  # type: ignore[attr-defined]
            got = sequences[runner].forward(tokens, num_logits=keep)
            torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
            taken = runner.graphs.replays - before  # type: ignore[attr-defined]
            # Without catch-up graphs only what fits the graph of 3 replays.
            assert taken == (replays if runner is graphed else int(count <= 3 and keep == 1))
    assert {sequence.length for sequence in sequences.values()} == {53}


def test_prefills_and_catch_ups_run_in_last_only_graphs(pair) -> None:
    """A forward that wants only each row's last logits and is wider than every other graph
    (a prefill, a catch-up) replays the smallest last-only graph that holds it: at batch 1 from
    any position that fits an attended length, at larger batches where the rows fit the
    shortest. One sequence's catch-up takes one such replay, not several. Anything else, as
    before. Logits, and the cache after (the padding's K/V land past each row), are the eager
    ones."""
    model = pair[0]
    eager = StaticRunner(model, num_slots=3, max_len=64)
    graphed = graphed_runner(model, 3, 64, catch_up=(4,), last_only=(8, 16))
    graphs = graphed.graphs
    assert isinstance(graphs, EagerGraphs)
    assert graphs.last_only_widths == {1: [8, 16], 2: [8, 16], 4: [8, 16]}
    generator = torch.Generator().manual_seed(2)
    sequences = {runner: [runner.new_sequence() for _ in range(3)] for runner in (eager, graphed)}
    calls = [  # (rows: tokens per sequence, 0 = not in the batch; num_logits; last-only replays)
        ([5, 0, 0], 1, 1),  # a prompt, 5 > 3 wide: the batch-1 graph of 8
        ([0, 7, 12], 1, 1),  # two prompts: the batch-2 graph of 16
        ([1, 1, 1], 1, 0),  # a decode step: the graph of width 3, batch 4
        ([10, 0, 0], 1, 1),  # a catch-up from 6: one replay of 16 (attending 64), not three
        ([0, 6, 6], 1, 0),  # two rows from 8 and 13: no batch-2 graph attends past 16, eager
        ([3, 0, 0], 1, 0),  # as wide as a catch-up graph: that graph
        ([0, 0, 9], 2, 0),  # two logits: eager
        ([17, 0, 0], 1, 0),  # wider than every graph: eager
        ([0, 36, 20], 1, 0),  # wider too (to lengths 50 and 48)
        ([0, 0, 9], 1, 1),  # from 48 padded to 16: up to the slot's end (64), a replay
        ([0, 9, 0], 1, 0),  # from 50 padded to 16 there is no room: eager
    ]
    kept = []  # each forward's logits, compared after all of them: none is a graph's output
    for rows, keep, last_only in calls:
        batch = [b for b, count in enumerate(rows) if count]
        tokens = [torch.randint(3, VOCAB, (rows[b],), generator=generator).tolist() for b in batch]
        expected = eager.forward_batch([sequences[eager][b] for b in batch], tokens,
                                       [keep] * len(batch))
        before = graphs.last_only_replays
        got = graphed.forward_batch([sequences[graphed][b] for b in batch], tokens,
                                    [keep] * len(batch))
        assert graphs.last_only_replays - before == last_only, rows
        kept += zip(got, expected, strict=True)
    for mine, theirs in kept:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL)
    lengths = [[sequence.length for sequence in sequences[runner]] for runner in (eager, graphed)]
    assert lengths[0] == lengths[1] == [36, 59, 57]


def test_a_failed_capture_gives_back_the_stream_and_the_pool(monkeypatch) -> None:
    """After a capture raised, the stream current before it is current again and the allocator
    stops sending allocations to the graphs' pool (torch.cuda.graph skips both where ending
    the capture raises); where the capture had ended, the allocator's refusal is no error.
    Only the calls are checked here: there is no CUDA device."""
    calls: list[tuple[object, ...]] = []

    def end(device: int, pool: object) -> None:
        calls.append(("end", device, pool))
        if pool == "ended":
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: calls.append(("set", stream)))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end)
    end_failed_capture("before", 1, "pool")  # type: ignore[arg-type]
    end_failed_capture("before", 1, "ended")  # type: ignore[arg-type]
    assert calls == [("set", "before"), ("end", 1, "pool"), ("set", "before"), ("end", 1, "ended")]
    # Before torch 2.8 the binding had another name.
    calls.clear()
    monkeypatch.delattr(torch._C, "_cuda_endAllocateToPool")
    monkeypatch.setattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", end, raising=False)
    end_failed_capture("before", 0, "pool")  # type: ignore[arg-type]
    assert calls == [("set", "before"), ("end", 0, "pool")]


def test_a_capture_that_raises_gives_back_the_stream_before_it_and_keeps_its_error(
    pair, monkeypatch
) -> None:
    """DecodeGraphs._capture, its CUDA calls stood in for: where the capture raises, the
    stream current before it, the device and the pool go to end_failed_capture, and the
    capture's own error is raised even where that cleanup fails too."""
    import contextlib

    from decoding.fast import graphs as graphs_module

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    before = Stream()

    class FailingCapture:
        def __init__(self, graph: object, pool: object) -> None:
            pass

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: object) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: before)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    ended: list[tuple[object, ...]] = []

    def end(stream: object, device: int, pool: object) -> None:
        ended.append((stream, device, pool))
        raise RuntimeError("the cleanup's own failure")

    monkeypatch.setattr(graphs_module, "end_failed_capture", end)
    runner = StaticRunner(pair[0], num_slots=2, max_len=64)
    graphs = object.__new__(DecodeGraphs)  # no CUDA here: only what _capture needs
    graphs.decoder, graphs.cache, graphs.scratch_slot = runner.decoder, runner.cache, 0
    graphs._device_index, graphs._pool = 3, ("pool", 1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="stream is capturing"):
        graphs._capture(1, 1, 64)
    assert ended == [(before, 3, ("pool", 1))]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError,
                                   torch._dynamo.exc.FailOnRecompileLimitHit])
def test_last_only_graphs_that_fail_to_capture_leave_the_others(pair, error) -> None:
    """Where capturing a last-only graph fails (out of memory, or torch.compile's recompile
    limit, which is no RuntimeError), the other graphs are kept and those forwards run as
    before; the runner says why."""

    class LastOnlyFails(EagerGraphs):
        def _capture(self, batch: int, width: int, kv_len: int, last_only: bool = False
                     ) -> _Captured:
            if last_only and width == 16:
                raise error("stand-in")
            return super()._capture(batch, width, kv_len, last_only)

    runner = StaticRunner(pair[0], num_slots=2, max_len=64)
    free = runner.cache.free_slots
    runner.graphs = runner._capture_graphs(lambda: LastOnlyFails(
        runner.decoder, runner.cache, (1, 2), (1, 3), (16, 64), (), (8, 16)))
    runner._note_last_only_failure()
    graphs = runner.graphs
    assert isinstance(graphs, LastOnlyFails) and graphs.last_only_widths == {}
    assert runner.cache.free_slots == free - 1  # the scratch slot only
    assert runner.graph_failure == f"last-only: {error.__name__}('stand-in')"
    sequence = runner.new_sequence()
    eager = StaticRunner(pair[0], num_slots=1, max_len=64).new_sequence()
    for tokens in ([5, 6, 7, 8, 9], [10], [11, 12]):  # eager, then the graphs of 1 and 3
        torch.testing.assert_close(sequence.forward(tokens, num_logits=1),
                                   eager.forward(tokens, num_logits=1), rtol=0, atol=ATOL)
    assert graphs.replays == 2 and graphs.last_only_replays == 0


def _states(target: StaticRunner, draft: StaticRunner, seed: int) -> list[SequenceState]:
    generator = torch.Generator().manual_seed(seed)
    states = []
    for row, params in enumerate(SETTINGS):
        prompt = torch.randint(3, VOCAB, (4 + row,), generator=generator).tolist()
        state = SequenceState(
            tokens=list(prompt),
            target=target.new_sequence(),  # type: ignore[arg-type]
            draft=draft.new_sequence(),  # type: ignore[arg-type]
            sampling=params,
            generator=torch.Generator().manual_seed(100 + row),
        )
        state.target.forward(prompt[:-1])
        state.draft.forward(prompt[:-1])
        states.append(state)
    return states


def _runners(
    pair: tuple[Qwen2ForCausalLM, Qwen2ForCausalLM], graphs: bool
) -> tuple[StaticRunner, StaticRunner]:
    """A target and a draft runner with a slot per setting, with stand-in graphs or without."""
    size = len(SETTINGS)
    if graphs:
        return graphed_runner(pair[0], size, 128), graphed_runner(pair[1], size, 128)
    return (StaticRunner(pair[0], num_slots=size, max_len=128),
            StaticRunner(pair[1], num_slots=size, max_len=128))


@pytest.mark.parametrize("graphs", [False, True])
def test_a_batched_step_gives_each_request_what_it_gets_alone(pair, graphs: bool) -> None:
    """Mixed settings and γ (0 included) in one batch, step after step: every request's
    tokens and acceptances equal those of the same request stepped alone."""
    size = len(SETTINGS)
    target, draft = _runners(pair, graphs)
    batched = _states(target, draft, seed=3)
    alone = _states(*_runners(pair, graphs=False), seed=3)
    for step in range(12):
        gammas = [4] * size if step % 3 == 0 else [(step + row) % 5 for row in range(size)]
        results = speculative_step_batch(batched, gammas, draft, target)
        for state, gamma, result in zip(alone, gammas, results, strict=True):
            single = speculative_step(state, gamma)
            assert (result.emitted, result.num_accepted) == (single.emitted, single.num_accepted)
    assert [state.tokens for state in batched] == [state.tokens for state in alone]


@pytest.mark.parametrize("graphs", [False, True])
def test_plain_steps_at_once_are_the_steps_one_by_one(pair, graphs: bool) -> None:
    """k γ = 0 steps in one call, batched or alone (greedy and sampled rows, each with its own
    generator), emit what k single γ = 0 steps emit, leave the generators where those do, and
    the caches ready for a speculative step after them."""
    size = len(SETTINGS)
    target, draft = _runners(pair, graphs)
    batched = _states(target, draft, seed=5)
    grouped = _states(*_runners(pair, graphs=False), seed=5)
    alone = _states(*_runners(pair, graphs=False), seed=5)
    for steps in (3, 1, 4):
        results = plain_steps_batch(batched, steps, target)
        for state, group_state, result in zip(alone, grouped, results, strict=True):
            singles = [speculative_step(state, 0).emitted for _ in range(steps)]
            assert result.emitted == [token for emitted in singles for token in emitted]
            assert (result.num_drafted, result.num_forwards) == (0, steps)
            assert plain_steps(group_state, steps).emitted == result.emitted
    for states in (batched, grouped, alone):  # then a speculative step each, as usual
        for state in states:
            assert state.target.length == len(state.tokens) - 1
        runners = states[0].draft._runner, states[0].target._runner  # type: ignore[attr-defined]
        speculative_step_batch(states, [2] * size, *runners)
    assert [s.tokens for s in batched] == [s.tokens for s in alone] == [s.tokens for s in grouped]
    assert [s.generator.get_state().tolist() for s in batched] == [
        s.generator.get_state().tolist() for s in alone
    ]


def test_lagging_drafts_catch_up_in_one_forward(pair) -> None:
    """Rows whose drafts fell behind by different amounts (after plain steps, which do not
    feed the draft) are fed what they lag by in one draft forward, padded to the longest,
    before drafting; each request's step is still what it is alone, and each draft ends at
    the same length as alone. A row without room for the padding is fed alone."""
    size = len(SETTINGS)
    target, draft = _runners(pair, graphs=False)
    batched = _states(target, draft, seed=7)
    alone = _states(*_runners(pair, graphs=False), seed=7)
    for states in (batched, alone):
        for k, state in enumerate(states):  # rows 3..3+size-1 tokens behind
            plain_steps(state, 3 + k)
    widths: list[list[int]] = []
    forward_packed = draft.forward_packed

    def counting(sequences, tokens, num_logits, **kwargs):
        widths.append([len(row) for row in tokens] if isinstance(tokens, list) else [])
        return forward_packed(sequences, tokens, num_logits, **kwargs)

    draft.forward_packed = counting  # type: ignore[method-assign]
    results = speculative_step_batch(batched, [3] * size, draft, target)
    singles = [speculative_step(state, 3) for state in alone]
    assert [(r.emitted, r.num_accepted) for r in results] == [
        (s.emitted, s.num_accepted) for s in singles]
    assert widths[0] == [3 + k for k in range(size)]  # every lagging row, in one forward
    assert [s.draft.length for s in batched] == [s.draft.length for s in alone]


def test_a_draft_without_room_for_the_padding_catches_up_alone() -> None:
    """Rows pad to the longest catch-up; a row whose slot cannot hold that many more tokens
    is fed alone (a lone lagging row too), the others together, and a row within
    CATCH_UP_IN_BATCH of its sequence is not fed at all."""
    from types import SimpleNamespace

    from decoding.batched import _catch_up

    calls: list[tuple[str, list[int]]] = []

    class Draft:
        def __init__(self, length: int) -> None:
            self.length = length

        def forward(self, tokens, num_logits=None):
            calls.append(("alone", [len(tokens)]))
            self.length += len(tokens)

    class Runner:
        max_len = 128

        def forward_packed(self, sequences, tokens, num_logits, **kwargs):
            calls.append(("together", [len(row) for row in tokens]))
            for sequence, row in zip(sequences, tokens, strict=True):
                sequence.length += len(row)

    def state(tokens: int, draft: int) -> SimpleNamespace:
        return SimpleNamespace(tokens=[0] * tokens, draft=Draft(draft))

    near_end, far_behind, behind, level = state(110, 100), state(64, 3), state(20, 10), state(9, 8)
    _catch_up([near_end, far_behind, behind, level], Runner())  # type: ignore[list-item]
    assert calls == [("together", [60, 9]), ("alone", [9])]
    assert [s.draft.length for s in (near_end, far_behind, behind, level)] == [109, 63, 19, 8]
    calls.clear()
    _catch_up([state(30, 10)], Runner())  # type: ignore[list-item]
    assert calls == [("alone", [19])]
    # With CUDA graphs a few rows replay their own graphs; from GRAPHED_CATCH_UP_ROWS on,
    # one uncaptured forward.
    from decoding.batched import GRAPHED_CATCH_UP_ROWS

    graphed = Runner()
    graphed.graphs = SimpleNamespace(widest=lambda batch: 8)  # type: ignore[attr-defined]
    graphed.catch_up_in_graphs = True  # type: ignore[attr-defined]
    graphed.max_len = 1024
    calls.clear()
    _catch_up([state(30, 10) for _ in range(GRAPHED_CATCH_UP_ROWS - 1)], graphed)  # type: ignore[misc]
    assert [kind for kind, _ in calls] == ["alone"] * (GRAPHED_CATCH_UP_ROWS - 1)
    calls.clear()
    _catch_up([state(30, 10) for _ in range(GRAPHED_CATCH_UP_ROWS)], graphed)  # type: ignore[misc]
    assert calls == [("together", [19] * GRAPHED_CATCH_UP_ROWS)]
    # Longer than the graphs cover (4 replays of 8 here), a row alone runs uncaptured too.
    calls.clear()
    _catch_up([state(50, 10) for _ in range(2)], graphed)  # type: ignore[misc]
    assert calls == [("together", [39, 39])]
