"""The fast path (static KV cache, FastDecoder, StaticRunner) against transformers, CPU float32."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from decoding.errors import OverloadedError
from decoding.fast import CacheFullError, FastDecoder, StaticKVCache, StaticRunner, supports
from decoding.fast import model as fast_model
from decoding.fast.model import (
    PAD_ROWS_TO,
    Linear,
    _rms_norm,
    can_pack_weights,
    fuse_linears,
    rope_theta,
)
from decoding.params import SamplingParams
from decoding.speculative import SequenceState, speculative_step
from tests.tiny_models import make_tiny_model

VOCAB = 96
ATOL = 1e-5


def qwen2(seed: int, *, tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    return Qwen2ForCausalLM(config).eval()


def llama(seed: int) -> LlamaForCausalLM:
    # One KV head for four query heads, and head_dim * heads (64) != hidden (48).
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def saved_qwen2(folder: Path) -> Qwen2ForCausalLM:
    """The tests' tiny model as the engine loads it, from disk."""
    make_tiny_model(folder, vocab=320)
    return Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["qwen2", "qwen2-tied", "llama-tied", "saved-qwen2"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    if name == "saved-qwen2":
        return saved_qwen2(tmp_path_factory.mktemp("saved"))
    return {"qwen2": lambda: qwen2(0), "qwen2-tied": lambda: qwen2(0, tied=True),
            "llama-tied": lambda: llama(0)}[name]()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from threads, and on a shared 2-core machine OpenMP
    threads waiting for each other made every forward ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_logits(model: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """Cache-free transformers logits of every position: [len(tokens), vocab]."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].float()


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_weights_are_referenced_not_copied(model) -> None:
    decoder = FastDecoder(model, pack_weights=False)
    assert decoder.embed is model.model.embed_tokens.weight
    assert decoder.lm_head.weight is model.lm_head.weight
    assert decoder.layers[0].o.weight is model.model.layers[0].self_attn.o_proj.weight
    assert decoder.layers[0].o.packed is None
    if model.config.tie_word_embeddings:
        assert decoder.lm_head.weight.data_ptr() == decoder.embed.data_ptr()
    # q, k, v (and gate, up) are one fused weight whose rows the modules' own weights now are.
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = decoder.layers[1].qkv.weight, decoder.layers[1].gate_up.weight
    assert attention.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attention.v_proj.weight.data_ptr() == qkv[-attention.v_proj.weight.shape[0]].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == gate_up[mlp.gate_proj.weight.shape[0]].data_ptr()
    assert FastDecoder(model, pack_weights=False).layers[1].qkv.weight is qkv  # not fused twice


def test_fusing_keeps_the_modules_outputs() -> None:
    torch.manual_seed(0)
    modules = [torch.nn.Linear(8, 5), torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(8, 4)]
    x = torch.randn(2, 8)
    before = [module(x) for module in modules]
    weight, bias = fuse_linears(modules)
    assert weight.shape == (12, 8) and bias is not None and bias.shape == (12,)
    torch.testing.assert_close(bias[5:8], torch.zeros(3))  # the layer without a bias adds 0
    for module, expected in zip(modules, before, strict=True):
        torch.testing.assert_close(module(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(F.linear(x, weight, bias), torch.cat(before, dim=-1))


def test_weights_are_prepacked_where_onednn_can() -> None:
    assert FastDecoder(qwen2(0)).packed_weights == can_pack_weights(
        torch.device("cpu"), torch.float32
    )
    assert FastDecoder(qwen2(0).to(torch.bfloat16)).packed_weights == can_pack_weights(
        torch.device("cpu"), torch.bfloat16
    )
    assert not can_pack_weights(torch.device("cpu"), torch.float16)
    assert not can_pack_weights(torch.device("meta"), torch.float32)


@pytest.mark.skipif(
    not can_pack_weights(torch.device("cpu"), torch.bfloat16),
    reason="oneDNN has no bfloat16 on this CPU",
)
def test_bfloat16_prepacked_decoder_matches_transformers_in_bfloat16() -> None:
    """A bfloat16 model (a draft run in lower precision): prepacked or not, the fast path's
    logits are transformers' bfloat16 logits to bfloat16 rounding, and so is a batch."""
    model = qwen2(0).to(torch.bfloat16)
    tokens = random_tokens(12, seed=5)
    other = random_tokens(7, seed=6)
    expected = reference_logits(model, tokens)
    for pack in (True, False):
        runner = StaticRunner(model, num_slots=2, max_len=32, pack_weights=pack)
        assert runner.decoder.packed_weights == pack
        sequence, neighbour = runner.new_sequence(), runner.new_sequence()
        steps = [sequence.forward(tokens[:5]), sequence.forward(tokens[5:9])]
        neighbour.forward(other[:4])
        mine, theirs = runner.forward_batch([sequence, neighbour], [tokens[9:], other[4:]], [3, 3])
        torch.testing.assert_close(
            torch.cat([*steps, mine]), expected, rtol=0.02, atol=0.01
        )
        torch.testing.assert_close(
            theirs, reference_logits(model, other)[4:], rtol=0.02, atol=0.01
        )


@pytest.mark.skipif(
    not can_pack_weights(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch"
)
@pytest.mark.parametrize("rows", [(1, 1), (1, 4), (3, 2), (2, 9)])
def test_prepacked_linear_equals_f_linear(rows: tuple[int, int]) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(48, 80, bias=True)
    x = torch.randn(*rows, 48)
    packed = Linear(module.weight, module.bias, pack=True)
    plain = Linear(module.weight, module.bias, pack=False)
    assert packed.packed is not None and plain.packed is None
    torch.testing.assert_close(packed(x), F.linear(x, module.weight, module.bias))
    torch.testing.assert_close(plain(x), F.linear(x, module.weight, module.bias), rtol=0, atol=0)


@pytest.mark.skipif(
    not can_pack_weights(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch"
)
@pytest.mark.parametrize("rows", [(1, 1), (1, 2), (3, 1), (1, 3), (1, 1, 1), (2, 3), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_linear_gives_each_row_its_own_output(
    rows: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Fewer rows than ``pad_to`` run padded with zero rows; the output keeps the input's
    shape and each row is the unpadded row's output (to rounding: oneDNN may pick another
    kernel for more rows), in float32 and in bfloat16 (the draft's dtype on a CPU)."""
    if not can_pack_weights(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN linear in {dtype} here")
    torch.manual_seed(0)
    module = torch.nn.Linear(48, 80, bias=True).to(dtype)
    x = torch.randn(*rows, 48).to(dtype)
    padded = Linear(module.weight, module.bias, pack=True)
    padded.pad_to = PAD_ROWS_TO
    calls: list[int] = []
    inner = padded._run_packed
    padded._run_packed = (  # type: ignore[method-assign]
        lambda given: calls.append(given.numel() // 48) or inner(given))
    out = padded(x)
    assert out.shape == (*rows[:-1], rows[-1], 80) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), F.linear(x, module.weight, module.bias).float(),
                               rtol=tolerance, atol=tolerance)
    count = x.numel() // 48
    assert calls == [max(count, PAD_ROWS_TO)]  # rows the kernel ran


def test_a_padded_linear_takes_the_last_position_of_each_row() -> None:
    """The head is applied to ``hidden[:, -num_logits:]``, a non-contiguous view: padded, each
    row's output is still its own."""
    if not can_pack_weights(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this torch")
    torch.manual_seed(0)
    module = torch.nn.Linear(48, 80, bias=False)
    hidden = torch.randn(2, 5, 48)
    last = hidden[:, -1:]
    assert not last.is_contiguous()
    padded = Linear(module.weight, None, pack=True)
    padded.pad_to = PAD_ROWS_TO
    torch.testing.assert_close(padded(last), F.linear(last, module.weight), rtol=1e-5, atol=1e-5)


def test_only_large_packed_weights_are_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    def pads(decoder: FastDecoder) -> set[int]:
        return {weight.pad_to for weight in (decoder.lm_head, *(w for layer in decoder.layers
                for w in (layer.qkv, layer.o, layer.gate_up, layer.down)))}

    assert pads(FastDecoder(qwen2(0))) == {0}  # the tiny model's weights are all small
    # gate_up 128 x 32 and the head 96 x 32 (exactly the threshold) reach it; qkv 64 x 32,
    # down 32 x 64 and o do not.
    monkeypatch.setattr(fast_model, "PAD_ROWS_MIN_WEIGHT", 96 * 32)
    decoder = FastDecoder(qwen2(0))
    if not decoder.packed_weights:
        pytest.skip("no oneDNN in this torch")
    assert {(layer.gate_up.pad_to, layer.qkv.pad_to, layer.down.pad_to, layer.o.pad_to)
            for layer in decoder.layers} == {(PAD_ROWS_TO, 0, 0, 0)}
    assert decoder.lm_head.pad_to == PAD_ROWS_TO
    assert pads(FastDecoder(qwen2(0), pad_rows=False)) == {0}
    assert pads(FastDecoder(qwen2(0), pack_weights=False)) == {0}


@pytest.mark.parametrize(
    ("pack", "attention", "padded"),
    [(False, "sdpa", False), (True, "sdpa", False), (False, "matmul", False),
     (True, "matmul", False), (True, "sdpa", True), (False, "flex", False)],
)
def test_prefill_decode_and_a_ragged_batch_by_variant(
    model, pack: bool, attention: str, padded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prepacked weights or not, SDPA, the matmul attention (the CUDA default) or FlexAttention
    (uncompiled: PyTorch's reference), every packed weight padded to PAD_ROWS_TO rows or not:
    the same logits as transformers, alone and in a ragged batch of two."""
    if pack and not can_pack_weights(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN in this torch")
    monkeypatch.setattr(fast_model, "PAD_ROWS_MIN_WEIGHT", 0 if padded else 1 << 62)
    tokens = random_tokens(12, seed=11)
    runner = StaticRunner(
        model, num_slots=2, max_len=32, pack_weights=pack, attention=attention
    )
    assert runner.decoder.packed_weights == pack
    assert runner.decoder.attention == attention
    assert runner.decoder.layers[0].o.pad_to == (PAD_ROWS_TO if padded else 0)
    sequence = runner.new_sequence()
    steps = [sequence.forward(tokens[:5], num_logits=5), sequence.forward(tokens[5:8], 3)]
    steps += [sequence.forward(tokens[8:10], 2)]  # and one token at a time:
    steps += [sequence.forward(tokens[k : k + 1], num_logits=1) for k in (10, 11)]
    torch.testing.assert_close(torch.cat(steps), reference_logits(model, tokens), rtol=0, atol=ATOL)
    other = random_tokens(9, seed=12)
    neighbour = runner.new_sequence()
    neighbour.forward(other[:6])
    sequence.rollback(10)
    mine, theirs = runner.forward_batch([sequence, neighbour], [tokens[10:], other[6:]], [2, 3])
    torch.testing.assert_close(mine, reference_logits(model, tokens)[10:], rtol=0, atol=ATOL)
    torch.testing.assert_close(theirs, reference_logits(model, other)[6:], rtol=0, atol=ATOL)


def three_to_a_kv_head(seed: int) -> Qwen2ForCausalLM:
    """Three query heads to a KV head, as Qwen2.5's 7 and 6 are not a power of two."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    return Qwen2ForCausalLM(config).eval()


def test_flex_attention_over_several_tiles_and_idle_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """FlexAttention (uncompiled: PyTorch's reference, which masks by the mask function alone)
    where the layout matters: a 150-token prefill (450 stacked queries in 4 query tiles, 2 key
    tiles), decode past position 256 into a third key tile, a ragged batch of two in a cache of
    four slots read in place (two idle slots attend nothing) and gathered: the same logits as
    transformers."""
    model = three_to_a_kv_head(5)
    runner = StaticRunner(model, num_slots=4, max_len=320, pack_weights=False, attention="flex")
    tokens = random_tokens(262, seed=13)
    sequence = runner.new_sequence()
    logits = [sequence.forward(tokens[:150], num_logits=150)]
    logits += [sequence.forward(tokens[150:255], num_logits=105)]
    logits += [sequence.forward(tokens[k : k + 1]) for k in (255, 256, 257)]
    expected = reference_logits(model, tokens)
    torch.testing.assert_close(torch.cat(logits), expected[:258], rtol=0, atol=ATOL)
    other = random_tokens(140, seed=14)
    neighbour = runner.new_sequence()
    neighbour.forward(other[:130])
    for factor in (fast_model.DIRECT_READ_FACTOR, 0):  # in place (3 * 2 >= 4), then gathered
        monkeypatch.setattr(fast_model, "DIRECT_READ_FACTOR", factor)
        sequence.rollback(258)
        neighbour.rollback(130)
        mine, theirs = runner.forward_batch(
            [sequence, neighbour], [tokens[258:262], other[130:133]], [4, 3])
        torch.testing.assert_close(mine, expected[258:262], rtol=0, atol=ATOL)
        torch.testing.assert_close(
            theirs, reference_logits(model, other[:133])[130:], rtol=0, atol=ATOL)


@pytest.mark.parametrize("group", [1, 2, 3, 7])
def test_flex_blocks_cover_each_query_tile_up_to_its_latest_position(group: int) -> None:
    """The stacked queries' positions (g-major: query r is token r % T); each tile of 128 of
    them reads the key tiles up to the one holding the latest position any of its queries
    attends, no more; a row of -1 reads none."""
    generator = torch.Generator().manual_seed(group)
    for width in (1, 2, 5, 17, 40, 128, 131, 300):
        kv_len = 700
        starts = torch.randint(0, kv_len - width + 1, (3,), generator=generator)
        positions = starts[:, None] + torch.arange(width)
        positions[1] = -1  # an idle slot
        stacked, tiles, indices = fast_model._flex_blocks(
            positions, torch.arange(kv_len), group)
        assert torch.equal(stacked, positions[:, torch.arange(group * width) % width])
        q_tiles = -(-group * width // 128)
        assert tiles.shape == (3, 1, q_tiles) and tiles.dtype == torch.int32
        assert indices.shape == (3, 1, q_tiles, 6) and indices.dtype == torch.int32
        assert torch.equal(indices, torch.arange(6, dtype=torch.int32).expand(3, 1, q_tiles, 6))
        for row in range(3):
            for tile in range(q_tiles):
                queries = range(tile * 128, min((tile + 1) * 128, group * width))
                latest = max(int(positions[row, query % width]) for query in queries)
                expected = 0 if latest < 0 else latest // 128 + 1
                assert int(tiles[row, 0, tile]) == expected, (width, row, tile)


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on a CPU generates C++ and needs a C++ compiler; none is installed",
)
def test_compiled_flex_attention_reads_the_listed_key_tiles() -> None:
    """Compiled (inductor's C++ here), FlexAttention reads only the key tiles the block mask
    lists, so unlike the reference these must be right: against the masked softmax, for two
    and three rows (one idle), one to 150 tokens a row (up to 4 query tiles) and up to 3 key
    tiles, with no compile per width or attended length beyond the first few."""
    torch._dynamo.reset()
    ops = fast_model._Pointwise.compiled()
    generator = torch.Generator().manual_seed(3)
    group, kv_heads, dim = 3, 2, 8
    cache = torch.randn(3, kv_heads, 2, 320, dim, generator=generator)
    for batch, width, kv_len in ((2, 1, 130), (2, 5, 262), (3, 150, 300), (3, 1, 320),
                                 (2, 3, 129)):
        starts = torch.randint(0, kv_len - width + 1, (batch,), generator=generator)
        starts[0] = kv_len - width  # the longest row ends at kv_len
        positions = starts[:, None] + torch.arange(width)
        if batch == 3:
            positions[1] = -1  # an idle slot
        query = torch.randn(batch, kv_heads, group * width, dim, generator=generator)
        keys, values = cache[:batch, :, 0, :kv_len], cache[:batch, :, 1, :kv_len]
        with torch.inference_mode():
            blocks = ops.flex_blocks(positions, torch.arange(kv_len), group)
            out = ops.flex_attention(query, keys, values, *blocks)
        mask = torch.arange(kv_len) <= positions.repeat(1, group)[:, None, :, None]
        expected = fast_model._masked_softmax(
            query @ keys.transpose(-1, -2), mask, dim ** -0.5) @ values
        live = positions[:, 0] >= 0
        torch.testing.assert_close(out[live], expected[live], rtol=0, atol=ATOL)
        assert not out[~live].any()
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Another width and attended length: nothing new to compile (made outside inference
    # mode, as the others were: an inference tensor is another compiled entry).
    positions = torch.arange(200, 204).repeat(2, 1)
    query = torch.ones(2, kv_heads, group * 4, dim)
    with torch.inference_mode():
        blocks = ops.flex_blocks(positions, torch.arange(204), group)
        ops.flex_attention(query, cache[:2, :, 0, :204], cache[:2, :, 1, :204], *blocks)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled


def test_flex_attention_is_given_up_where_it_does_not_compile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Compiled FlexAttention that fails its start-up run (as on this CPU for one row; here made
    to fail): a warning, the reason kept, and the device's default attention (here SDPA), the
    rest still compiled. Its start-up run is at the model's head counts and head size."""
    calls: list[tuple[object, ...]] = []

    def fail(self: object, *args: object) -> None:
        calls.append(args[2:])
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(fast_model._Pointwise, "smoke_test_flex", fail)
    # Compiling the rest is not what this is about: "compiled" here is eager under other names.
    monkeypatch.setattr(fast_model._Pointwise, "compiled", classmethod(
        lambda cls, **kwargs: dataclasses.replace(
            cls.eager(), rms_norm=lambda *args: _rms_norm(*args))))
    with caplog.at_level("WARNING"):
        decoder = FastDecoder(three_to_a_kv_head(0), pack_weights=False, compile=True,
                              attention="flex")
    assert calls == [(2, 3, 8)]  # KV heads, query heads to one, head size
    assert decoder.compiled and decoder.attention == "sdpa"
    assert decoder.flex_failure is not None and "no kernel for you" in decoder.flex_failure
    assert "FlexAttention given up" in caplog.text and "no kernel for you" in caplog.text
    uncompiled = FastDecoder(qwen2(0), attention="flex")
    assert uncompiled.attention == "flex" and uncompiled.flex_failure is None  # CPU: kept
    # A PyTorch without what it needs gives it up the same way.
    monkeypatch.setattr(fast_model, "flex_available", lambda: "no FlexAttention in this torch")
    old = FastDecoder(qwen2(0), attention="flex")
    assert old.attention == "sdpa" and old.flex_failure == "no FlexAttention in this torch"


def test_the_flex_start_up_run_covers_both_kernels_at_the_models_sizes() -> None:
    """One row and two; one token a row, two, and enough for 128 stacked queries (FlexAttention's
    general kernel, below it its decoding one); the given head counts and head size (a GPU's
    kernels take none under 16), over 256 positions. Run through PyTorch's reference here."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    eager = fast_model._Pointwise.eager()

    def recorded(query, keys, values, *blocks, constant_batch=False):  # type: ignore[no-untyped-def]
        # K and V as a forward gives them: views of one buffer, not one tensor twice
        assert keys is not values and keys.untyped_storage() is values.untyped_storage()
        shapes.append((tuple(query.shape), tuple(keys.shape), constant_batch))
        return eager.flex_attention(query, keys, values, *blocks)

    ops = dataclasses.replace(eager, flex_attention=recorded)
    ops.smoke_test_flex(torch.device("cpu"), torch.float32, kv_heads=2, group=7, dim=64)
    assert shapes == [((batch, 2, 7 * width, 64), (batch, 2, 256, 64), width < 19)
                      for batch in (1, 2) for width in (1, 2, 19)]
    assert 7 * 19 >= 128 > 7 * 2


def test_graph_building_compiles_flex_attention_with_the_batch_a_constant() -> None:
    """While graphs are built the decoding kernel's inputs have a constant batch, even where a
    version with the batch varying (an eager forward's) was compiled before, which torch.compile
    would otherwise take; eager forwards let it vary. Recorded by a backend that runs what it is
    given eagerly."""
    torch._dynamo.reset()
    batches: list[object] = []

    def record(graph_module: torch.fx.GraphModule, example_inputs: list[object]):
        for node in graph_module.graph.nodes:
            if node.op == "placeholder" and node.name == "l_query_":
                batches.append(node.meta["example_value"].shape[0])
        return graph_module.forward

    ops = fast_model._Pointwise.compiled(backend=record)
    positions = torch.arange(64)

    def call(batch: int, constant_batch: bool) -> None:
        rows = torch.ones(batch, 2, 2, 64, 16)
        blocks = fast_model._flex_blocks(positions[63:].repeat(batch, 1), positions, 3)
        with torch.inference_mode():
            ops.flex_attention(torch.ones(batch, 2, 3, 16), rows[:, :, 0], rows[:, :, 1],
                               *blocks, constant_batch=constant_batch)

    call(2, False)
    call(3, False)  # the same version: the batch varies
    call(4, True)  # a new one, for 4 rows only
    call(4, True)
    call(5, False)  # the varying one again
    assert len(batches) == 2
    assert not isinstance(batches[0], int) and batches[1] == 4


def test_a_flex_forward_that_fails_gives_it_up_and_runs_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outside a graph capture, a forward whose FlexAttention raises (a shape first compiled
    mid-run, a recompile limit) runs again with the default attention, the same logits, and
    FlexAttention stays given up."""
    model = three_to_a_kv_head(2)
    runner = StaticRunner(model, num_slots=2, max_len=32, pack_weights=False, attention="flex")
    failures: list[int] = []

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        failures.append(1)
        raise RuntimeError("recompile limit")

    decoder = runner.decoder
    decoder.pointwise = dataclasses.replace(decoder.pointwise, flex_attention=fail)
    tokens = random_tokens(9, seed=4)
    sequence = runner.new_sequence()
    logits = sequence.forward(tokens, num_logits=9)
    torch.testing.assert_close(logits, reference_logits(model, tokens), rtol=0, atol=ATOL)
    assert failures == [1] and decoder.attention == "sdpa"
    assert decoder.flex_failure is not None and "recompile limit" in decoder.flex_failure
    sequence.forward(random_tokens(1, seed=5))
    assert failures == [1]


@pytest.mark.parametrize("where", ["flex, out of memory", "silu_mul"])
def test_a_forward_failing_for_other_reasons_keeps_flex_attention(where: str) -> None:
    """Out of device memory in FlexAttention, or any failure elsewhere in the forward, is not
    FlexAttention's: it is raised, once, and FlexAttention stays."""
    runner = StaticRunner(three_to_a_kv_head(2), num_slots=2, max_len=32, pack_weights=False,
                          attention="flex")
    decoder = runner.decoder
    calls: list[int] = []

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if where == "silu_mul":
            raise ValueError("not attention's")
        raise torch.OutOfMemoryError("out of memory")

    name = "flex_attention" if where.startswith("flex") else "silu_mul"
    decoder.pointwise = dataclasses.replace(decoder.pointwise, **{name: fail})
    with pytest.raises(torch.OutOfMemoryError if name == "flex_attention" else ValueError):
        runner.new_sequence().forward(random_tokens(5, seed=6))
    assert calls == [1] and decoder.attention == "flex" and decoder.flex_failure is None


def test_prefill(model) -> None:
    tokens = random_tokens(17, seed=1)
    sequence = StaticRunner(model, num_slots=2, max_len=64).new_sequence()
    logits = sequence.forward(tokens)
    assert logits.shape == (17, model.config.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference_logits(model, tokens), rtol=0, atol=ATOL)
    assert sequence.length == 17


def test_the_decoder_refuses_a_count_of_logits_outside_its_tokens() -> None:
    decoder = FastDecoder(qwen2(seed=0))
    cache = decoder.new_cache(num_slots=1, max_len=8)
    tokens, slots, starts = torch.tensor([[1, 2, 3]]), torch.tensor([0]), torch.tensor([0])
    assert decoder.forward(tokens, slots, starts, cache, num_logits=3).shape[1] == 3
    for count in (0, 4):  # 0 once sliced [:, -0:], every position
        with pytest.raises(ValueError, match=f"num_logits must be in \\[1, 3\\], got {count}"):
            decoder.forward(tokens, slots, starts, cache, num_logits=count)


def test_decode_token_by_token(model) -> None:
    tokens = random_tokens(20, seed=2)
    runner = StaticRunner(model, num_slots=3, max_len=32)
    runner.new_sequence()  # another slot in use: the sequence under test is not slot 0
    sequence = runner.new_sequence()
    steps = [sequence.forward(tokens[:3], num_logits=1)]
    steps += [sequence.forward([token]) for token in tokens[3:]]
    torch.testing.assert_close(
        torch.cat(steps), reference_logits(model, tokens)[2:], rtol=0, atol=ATOL
    )


def test_rollbacks_equal_a_cache_free_forward(model) -> None:
    runner = StaticRunner(model, num_slots=1, max_len=32)
    sequence = runner.new_sequence()
    tokens = random_tokens(10, seed=3)
    sequence.forward(tokens)
    sequence.rollback(4)  # positions 4..9 now hold stale K/V that must never be read
    tokens = tokens[:4] + random_tokens(1, seed=4)
    torch.testing.assert_close(
        sequence.forward(tokens[4:]), reference_logits(model, tokens)[4:], rtol=0, atol=ATOL
    )
    tokens += random_tokens(6, seed=5)
    sequence.forward(tokens[5:], num_logits=2)
    sequence.rollback(8)
    tokens = tokens[:8] + random_tokens(3, seed=6)
    last = sequence.forward(tokens[8:], num_logits=2)
    torch.testing.assert_close(last, reference_logits(model, tokens)[-2:], rtol=0, atol=ATOL)
    assert sequence.length == len(tokens) == 11
    with pytest.raises(ValueError, match="roll back"):
        sequence.rollback(12)


def test_ragged_batch_equals_each_sequence_alone(model) -> None:
    runner = StaticRunner(model, num_slots=4, max_len=48)
    prompts = [random_tokens(n, seed=10 + n) for n in (3, 9, 14)]
    sequences = [runner.new_sequence() for _ in prompts]
    # A ragged prefill (rows padded to 14), then a ragged step from different lengths.
    prefill = runner.forward_batch(sequences, prompts, [1, 2, 3])
    steps = [random_tokens(n, seed=20 + n) for n in (1, 5, 2)]
    logits = runner.forward_batch(sequences, steps, [1, 5, 2])
    # And a step of one token each: the padding written past each length must not be read.
    singles = [random_tokens(1, seed=30 + b) for b in range(3)]
    last = runner.forward_batch(sequences, singles, [1, 1, 1])
    for b in range(3):
        full = prompts[b] + steps[b] + singles[b]
        expected = reference_logits(model, full)
        n, k = len(prompts[b]), len(steps[b])
        torch.testing.assert_close(prefill[b], expected[n - 1 - b : n], rtol=0, atol=ATOL)
        torch.testing.assert_close(logits[b], expected[n : n + k], rtol=0, atol=ATOL)
        torch.testing.assert_close(last[b], expected[-1:], rtol=0, atol=ATOL)
        assert sequences[b].length == len(full)
        alone = StaticRunner(model, num_slots=1, max_len=48).new_sequence()
        alone.forward(prompts[b] + steps[b])
        torch.testing.assert_close(last[b], alone.forward(singles[b]), rtol=0, atol=ATOL)


def test_a_batch_reads_in_place_from_a_third_of_the_slots_and_16_tokens_a_row() -> None:
    read = fast_model._direct_read
    assert fast_model.DIRECT_READ_FACTOR == 3 and fast_model.DIRECT_READ_MAX_WIDTH == 16
    assert read(3, 1, 9, None) and read(6, 16, 17, None) and read(16, 9, 17, None)
    assert not read(2, 1, 9, None) and not read(5, 1, 17, None)  # 15 < 17
    assert not read(6, 17, 17, None)  # a prefill's width
    assert not read(1, 1, 1, (0, 5))  # one row known on the host reads its slot's view


@pytest.mark.parametrize("direct", [False, True])
def test_a_batch_reads_the_cache_in_place_or_gathered_alike(
    model, direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention over a gathered copy of the batch's rows, or over every slot in place (the
    batch's queries scattered to their slots): the same logits, for rows in any slot order,
    beside a slot in use that is not in the batch (whose K/V must be left as they were) and a
    free one."""
    monkeypatch.setattr(fast_model, "DIRECT_READ_FACTOR", 1 << 20 if direct else 0)
    calls: list[bool] = []
    real = fast_model._direct_read
    monkeypatch.setattr(
        fast_model, "_direct_read", lambda *args: calls.append(real(*args)) or calls[-1]
    )
    runner = StaticRunner(model, num_slots=5, max_len=48)
    bystander = runner.new_sequence()
    aside = random_tokens(7, seed=40)
    bystander.forward(aside[:6])
    sequences = [runner.new_sequence() for _ in range(3)]
    prompts = [random_tokens(n, seed=41 + n) for n in (4, 11, 8)]
    order = [2, 0, 1]  # slots 3, 1, 2: not in slot order
    calls.clear()  # the bystander's forward read its own slot's view
    batch = [sequences[b] for b in order]
    prefill = runner.forward_batch(batch, [prompts[b] for b in order], [2, 2, 2])
    steps = [random_tokens(n, seed=50 + n) for n in (3, 1, 2)]
    logits = runner.forward_batch(
        batch, [steps[b] for b in order], [len(steps[b]) for b in order]
    )
    assert set(calls) == {direct}
    for row, b in enumerate(order):
        expected = reference_logits(model, prompts[b] + steps[b])
        n = len(prompts[b])
        torch.testing.assert_close(prefill[row], expected[n - 2 : n], rtol=0, atol=ATOL)
        torch.testing.assert_close(logits[row], expected[n:], rtol=0, atol=ATOL)
    torch.testing.assert_close(  # the bystander's cache is as it left it
        bystander.forward(aside[6:]), reference_logits(model, aside)[-1:], rtol=0, atol=ATOL
    )


def reference_greedy(model: PreTrainedModel, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy tokens, by full forward passes with no cache at all."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


PROMPT = [5, 17, 42, 8, 77, 3]


@pytest.mark.parametrize("gamma", [1, 4])
@pytest.mark.parametrize("same_draft", [True, False])
def test_speculative_step_on_static_runners_is_the_targets_greedy(
    gamma: int, same_draft: bool
) -> None:
    target = qwen2(0)
    draft = qwen2(0) if same_draft else qwen2(1)
    target_runner = StaticRunner(target, num_slots=1, max_len=64)
    draft_runner = StaticRunner(draft, num_slots=1, max_len=64)
    state = SequenceState(
        tokens=list(PROMPT),
        target=target_runner.new_sequence(),  # type: ignore[arg-type]
        draft=draft_runner.new_sequence(),  # type: ignore[arg-type]
        sampling=SamplingParams(),
        generator=torch.Generator().manual_seed(0),
    )
    state.target.forward(PROMPT[:-1])
    state.draft.forward(PROMPT[:-1])
    drafted = accepted = 0
    while len(state.tokens) - len(PROMPT) < 30:
        result = speculative_step(state, gamma)
        drafted, accepted = drafted + result.num_drafted, accepted + result.num_accepted
        assert state.target.length == len(state.tokens) - 1
    assert state.tokens[len(PROMPT) :][:30] == reference_greedy(target, PROMPT, 30)
    if same_draft:
        assert accepted == drafted
    else:
        assert accepted < drafted
    state.target.release()
    state.draft.release()
    assert target_runner.live_sequences == draft_runner.live_sequences == 0


def test_slots_are_allocated_freed_and_reused() -> None:
    runner = StaticRunner(qwen2(0), num_slots=2, max_len=8)
    first, second = runner.new_sequence(), runner.new_sequence()
    assert {first.slot, second.slot} == {0, 1} and runner.live_sequences == 2
    with pytest.raises(CacheFullError, match="2 KV cache slots"):
        runner.new_sequence()
    assert issubclass(CacheFullError, OverloadedError)
    slot = first.slot
    first.release()
    first.release()  # idempotent
    assert runner.live_sequences == 1 and first.slot is None
    with pytest.raises(RuntimeError, match="released"):
        first.forward([1])
    third = runner.new_sequence()
    assert third.slot == slot
    with pytest.raises(ValueError, match="no room"):
        third.forward(list(range(9)))
    third.forward(list(range(8)))
    with pytest.raises(ValueError, match="appears twice"):
        runner.forward_batch([second, second], [[1], [2]], [1, 1])
    with pytest.raises(ValueError, match="num_logits"):
        runner.forward_batch([second], [[1, 2]], [3])
    with pytest.raises(ValueError, match="another runner"):
        StaticRunner(qwen2(0), num_slots=1, max_len=8).forward_batch([second], [[1]], [1])
    for sequence in (second, third):
        sequence.release()
    assert runner.live_sequences == 0 and runner.cache.free_slots == 2


def test_the_cache_refuses_unknown_slots_and_has_the_models_shape() -> None:
    model = qwen2(0)
    cache = FastDecoder(model).new_cache(num_slots=3, max_len=16)
    assert isinstance(cache, StaticKVCache)
    assert cache.keys.shape == (2, 3, 2, 16, 8) and cache.keys.dtype == model.dtype
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(0)


def test_compiled_functions_keep_the_models_sizes_constant() -> None:
    """What torch.compile is given to compile: only the sizes that vary between a model's calls
    (rows, batch, width, attended length) symbolic; the hidden and intermediate sizes, the
    head counts and the head size constants of the kernel, so that no kernel divides by a size
    it learns at run time. Recorded by a backend that runs what it is given eagerly; with
    ``dynamic=True`` every size here was symbolic, the head counts included."""
    torch._dynamo.reset()
    graphs: list[dict[str, object]] = []

    def record(graph_module: torch.fx.GraphModule, example_inputs: list[object]):
        graphs.append({
            node.name: node.meta.get("example_value")
            for node in graph_module.graph.nodes if node.op == "placeholder"
        })
        return graph_module.forward

    model = qwen2(0)
    runner = StaticRunner(model, num_slots=2, max_len=32, pack_weights=False,
                          attention="matmul")
    runner.decoder.pointwise = fast_model._Pointwise.compiled(backend=record)
    first, second = runner.new_sequence(), runner.new_sequence()
    tokens = random_tokens(14, seed=21)
    with torch.inference_mode():
        first.forward(tokens[:7], num_logits=7)
        first.forward(tokens[7:8])
        second.forward(tokens[:4])
        runner.forward_batch([first, second], [tokens[8:11], tokens[4:6]], [3, 2])
        runner.forward_batch([first, second], [tokens[11:12], tokens[6:7]], [1, 1])
    count = len(graphs)
    with torch.inference_mode():  # other widths, lengths and batches: nothing new to compile
        runner.forward_batch([first, second], [tokens[12:14], tokens[7:12]], [2, 5])
        first.forward(tokens[13:14])
    assert len(graphs) == count

    def size(value: object) -> object:
        return value if isinstance(value, int) else "symbolic"

    shapes: dict[str, set[tuple[object, ...]]] = {}
    for inputs in graphs:
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):  # a number passed in (l_width_, l_heads_)
                assert not name.startswith("l_"), f"{name} = {value} is not a constant"
                continue  # the symbol of a varying size, not an argument
            shapes.setdefault(name, set()).add(tuple(size(n) for n in value.shape))
    hidden, heads, kv_heads, dim, intermediate = 32, 4, 2, 8, 64
    constant = {  # input: {dimension: size}
        "l_x_": {1: hidden}, "l_delta_": {1: hidden}, "l_weight_": {0: hidden},
        "l_gate_up_": {1: 2 * intermediate},
        "l_qkv_": {2: (heads + 2 * kv_heads) * dim}, "l_cos_": {2: 1, 3: dim},
        "l_sin_": {2: 1, 3: dim}, "l_scores_": {1: kv_heads}, "l_mask_": {1: 1},
        "l_inv_freq_": {0: dim // 2}, "l_buffer_": {0: 2, 1: kv_heads, 2: 2, 3: 32, 4: dim},
    }
    assert set(constant) <= set(shapes)
    for name, dims in constant.items():
        for shape in shapes[name]:
            assert all(shape[dim_] == n for dim_, n in dims.items()), (name, shape)
    varying = {  # input: the dimensions that vary and were seen at more than 1
        "l_x_": [0], "l_gate_up_": [0], "l_qkv_": [0, 1], "l_scores_": [0, 2, 3],
        "l_starts_": [0], "l_offsets_": [0], "l_key_positions_": [0], "l_slots_": [0],
        "l_positions_": [0, 1],
    }
    for name, dims in varying.items():
        for dim_ in dims:
            assert any(shape[dim_] == "symbolic" for shape in shapes[name]), (name, dim_)


def test_a_store_that_does_not_compile_leaves_the_rest_compiled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the rotation with the fused K/V store fails its start-up compile, the other
    functions stay compiled and K/V are written by the eager store; where they all fail, the
    decoder runs eagerly. (Dynamo's eager backend here: the failures are made up.)"""
    real = fast_model._Pointwise.compiled.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(fast_model._Pointwise, "compiled", classmethod(
        lambda cls, fused_store=True: real(cls, backend="eager", fused_store=fused_store)))
    real_smoke = fast_model._Pointwise.smoke_test
    failing = {"store"}

    def smoke(self, device: torch.device, dtype: torch.dtype) -> None:
        if "all" in failing or self.rotate_store is not None:
            raise RuntimeError("made up")
        real_smoke(self, device, dtype)

    monkeypatch.setattr(fast_model._Pointwise, "smoke_test", smoke)
    model = qwen2(0)
    tokens = random_tokens(9, seed=23)
    runner = StaticRunner(model, num_slots=1, max_len=16, pack_weights=False, compile=True)
    assert runner.decoder.compiled and runner.decoder.pointwise.rotate_store is None
    assert "so K and V are stored by a kernel of their own" in caplog.text
    sequence = runner.new_sequence()
    with torch.inference_mode():
        logits = [sequence.forward(tokens[:8], num_logits=8), sequence.forward(tokens[8:])]
    torch.testing.assert_close(torch.cat(logits), reference_logits(model, tokens), rtol=0,
                               atol=ATOL)
    failing.add("all")
    assert not FastDecoder(model, compile=True).compiled
    assert "so the fast path runs eagerly" in caplog.text


def test_unsupported_models_are_refused_clearly() -> None:
    assert supports(qwen2(0)) and supports(llama(0))
    sliding = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        max_window_layers=1,
    ))
    assert not supports(sliding)
    with pytest.raises(NotImplementedError, match="sliding"):
        FastDecoder(sliding)
    scaled = LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(NotImplementedError, match="'linear'"):
        rope_theta(scaled)


@pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="torch.compile on a CPU generates C++ and needs a C++ compiler; none is installed",
)
def test_compiled_pointwise_equals_eager() -> None:
    """torch.compile (inductor; on this CPU it generates C++) of each layer's elementwise parts:
    one full graph each (fullgraph=True raises on a break), with the matmul attention (whose
    masked softmax is one of them), the same logits as transformers for
    prefill, decode, verify widths and a ragged batch, without a compile per shape."""
    torch._dynamo.reset()
    model = qwen2(0)
    runner = StaticRunner(
        model, num_slots=2, max_len=32, pack_weights=False, compile=True, attention="matmul"
    )
    assert runner.decoder.compiled and runner.decoder.pointwise.rms_norm is not _rms_norm
    first, second = runner.new_sequence(), runner.new_sequence()
    tokens = random_tokens(14, seed=21)
    logits = [first.forward(tokens[:7], num_logits=7), first.forward(tokens[7:8])]
    logits.append(first.forward(tokens[8:11], num_logits=3))
    torch.testing.assert_close(
        torch.cat(logits), reference_logits(model, tokens[:11]), rtol=0, atol=ATOL
    )
    other = random_tokens(6, seed=22)
    second.forward(other[:4])
    first_rows, second_rows = runner.forward_batch(
        [first, second], [tokens[11:14], other[4:6]], [3, 2]
    )
    torch.testing.assert_close(first_rows, reference_logits(model, tokens)[11:], rtol=0, atol=ATOL)
    torch.testing.assert_close(second_rows, reference_logits(model, other)[4:], rtol=0, atol=ATOL)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled >= 5  # the five functions, each at least once
    # New widths and batch sizes reuse what was compiled: sizes are symbolic.
    first.rollback(9)
    second.rollback(3)
    rows = runner.forward_batch([first, second], [tokens[9:14], other[3:6]], [5, 3])
    torch.testing.assert_close(rows[0], reference_logits(model, tokens)[9:], rtol=0, atol=ATOL)
    torch.testing.assert_close(rows[1], reference_logits(model, other)[3:], rtol=0, atol=ATOL)
    first.rollback(2)
    torch.testing.assert_close(
        first.forward(tokens[2:12], num_logits=10), reference_logits(model, tokens[:12])[2:],
        rtol=0, atol=ATOL,
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
