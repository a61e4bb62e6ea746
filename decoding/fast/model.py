"""A Llama/Qwen2 decoder forward written for :class:`StaticKVCache`, on a loaded HF model's weights.

The model's own parameter tensors are referenced, never copied, except that on a CPU (float32, or
bfloat16 where oneDNN supports it) the linear weights are also kept prepacked for oneDNN (one
more copy of them; see :class:`Linear`). Build it once the model is on its device and in its
dtype: the device, the dtype and the rotary frequencies are fixed then. The structure follows
gpt-fast's ``model.py``: K/V written into a preallocated buffer by position, attention with a
mask built from positions (one ``scaled_dot_product_attention`` call, or on CUDA two matrix
products around a masked softmax, or on request FlexAttention over a block mask). Every
operation mirrors transformers' Qwen2/Llama modules in the same order and dtypes, so float32
logits agree with theirs to rounding.

Rows of one batch may start at different positions (ragged). Rows with fewer real tokens than
the batch width are padded at the end by the caller: their padding writes K/V at positions
past the row's real length, which the caller ignores by keeping its own lengths (the next
forward of that row overwrites them before any query can attend to them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F

from decoding.fast.cache import StaticKVCache

log = logging.getLogger(__name__)

T = TypeVar("T")

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def rope_theta(config: Any) -> float:
    """The rotary base of a default-type RoPE; NotImplementedError for scaled variants."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # configs written before transformers 5
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
        params.update(getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or "rope_theta" not in params:
        raise NotImplementedError(f"the fast decoder supports default RoPE only, not {rope_type!r}")
    return float(params["rope_theta"])


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the fast decoder cannot run ``model``, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    try:
        rope_theta(config)
    except NotImplementedError as error:
        return str(error)
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return "sliding-window attention is in use"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    return None


def supports(model: PreTrainedModel) -> bool:
    """Whether :class:`FastDecoder` can run ``model`` (Llama/Qwen2, default RoPE, no sliding
    window)."""
    return unsupported_reason(model) is None


class Linear:
    """A linear layer's weight and bias (None where it has none), applied as ``F.linear`` does.

    On a CPU the weight can be *prepacked* for oneDNN (the blocked layout that PyTorch's own
    inductor uses when it freezes a CPU model). In float32, MKL's matrix-matrix path, which
    ``F.linear`` takes for more than one row, repacks the whole weight on every call and so
    costs 2-3x the one-row (matrix-vector) path, which is what makes a verify forward of a few
    tokens expensive on a CPU; the prepacked kernel reads the weight once at any small width.
    In bfloat16 the packed kernel also beats ``F.linear`` at every width (by 1.4-1.7x on the
    1.5B model's MLP weight, 1-5 rows; bench/RESULTS.md).
    The packed copy is extra memory (one more copy of the weight); the HF module keeps its own.

    ``pad_to``: fewer rows than this are padded with zero rows to this many, and the extra
    outputs dropped. oneDNN picks its kernel by the row count, and on this project's CPU its
    kernel for one or two rows was the slower one: the 1.5B model's MLP weight took 4.4 ms for
    one row and 3.5 for four, and a whole forward of the 1.5B model over one token 231 ms
    unpadded, 178 padded (:data:`PAD_ROWS_TO`). Each row's output depends on that row alone,
    so it equals the unpadded one to rounding.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, keep: bool = True
    ) -> None:
        """``keep=False`` (with ``pack``): hold only the packed copy, not ``weight``."""
        self.packed: torch.Tensor | None = _pack(weight) if pack else None
        self.weight: torch.Tensor | None = weight if keep or not pack else None
        self.bias = bias
        self.pad_to = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            features = x.shape[-1]
            rows = x.numel() // features if features else 0
            if 0 < rows < self.pad_to:
                flat = x.reshape(rows, features)
                zeros = flat.new_zeros(self.pad_to - rows, features)
                out = self._run_packed(torch.cat([flat, zeros]))
                return out[:rows].reshape(*x.shape[:-1], out.shape[-1])
            return self._run_packed(x)
        assert self.weight is not None
        return F.linear(x, self.weight, self.bias)

    def _run_packed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


PAD_ROWS_TO = 4
"""What :class:`FastDecoder` pads fewer rows to, for a packed weight of at least
:data:`PAD_ROWS_MIN_WEIGHT` elements (see :class:`Linear`). Measured on this project's CPU
(AVX-512, oneDNN 3.12, 2 threads, in one process alternating, medians of 6): the default pair's
1.5B target over 1, 2, 3 tokens 231, 273, 202 ms unpadded and 178, 196, 183 padded to 4, its
0.5B draft (bfloat16) over 1 and 2 tokens 41 and 50 ms unpadded, 38 and 39 padded. Also tried
in that run: padding each weight to the row count (of 1-8) it ran fastest at alone, timed at
start-up: 198, 184, 184 ms for the target, slower at one token and faster at two; not kept, as
this rule is simpler and needs no timing at start-up."""

PAD_ROWS_MIN_WEIGHT = 1 << 20
"""Smaller weights are not padded: the tiny test models' weights all stay unpadded, and of the
default pair's only the draft's q/k/v and o projections (about 1.0 and 0.8 million elements)
are below it. The threshold was not tuned."""


@torch.no_grad()
def _concatenated(
    modules: Sequence[torch.nn.Module],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    weights: list[torch.Tensor] = [module.weight for module in modules]  # type: ignore[misc]
    return torch.cat(weights), _concatenated_bias(modules, weights)


def _concatenated_bias(
    modules: Sequence[torch.nn.Module], weights: Sequence[torch.Tensor]
) -> torch.Tensor | None:
    """The modules' biases end to end (zeros for a module without one); None if none has one."""
    biases: list[torch.Tensor | None] = [module.bias for module in modules]  # type: ignore[misc]
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [
            bias.detach() if bias is not None else weight.new_zeros(weight.shape[0])
            for bias, weight in zip(biases, weights, strict=True)
        ]
    )


@torch.no_grad()
def fuse_linears(modules: Sequence[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linear layers that read the same input: theirs, concatenated
    along the output dimension. Each module's own parameter becomes a view of its rows of the
    fused tensor, so the fusion costs no memory (beyond moving a memory-mapped checkpoint's
    pages into process memory) and the module computes what it did before.
    Calling it again on the same modules returns the same fused tensors."""
    weights: list[torch.Tensor] = [module.weight for module in modules]  # type: ignore[misc]
    fused_weight = _FUSED.get(modules[0])
    if fused_weight is None or not _rows_of(fused_weight, weights):
        fused_weight = torch.cat([weight.detach() for weight in weights])
        _rebind(modules, "weight", fused_weight)
        _FUSED[modules[0]] = fused_weight
    return fused_weight, _concatenated_bias(modules, weights)


_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
"""The fused weight made for a group of modules, by its first module: a second decoder on the
same model reuses it rather than fusing (and holding) a copy of its own."""


def _rows_of(fused: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether ``weights`` are still consecutive row blocks of ``fused``."""
    row = 0
    for weight in weights:
        if row >= fused.shape[0] or weight.data_ptr() != fused[row].data_ptr():
            return False
        row += weight.shape[0]
    return row == fused.shape[0]


def _rebind(modules: Sequence[torch.nn.Module], name: str, fused: torch.Tensor) -> None:
    rows = 0
    for module in modules:
        parameter = getattr(module, name)
        count = parameter.shape[0]
        parameter.data = fused[rows : rows + count]
        rows += count


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN-prepacked linear weights are available for this device and dtype: a CPU,
    a PyTorch built with oneDNN, float32, or bfloat16 where oneDNN supports it on this CPU, and
    the result equal to ``F.linear``'s to rounding."""
    if device.type != "cpu" or dtype not in PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 32, generator=generator).to(dtype)
        bias = torch.randn(64, generator=generator).to(dtype)
        x = torch.randn(3, 2, 32, generator=generator).to(dtype)
        packed = _pack(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        expected = F.linear(x.float(), weight.float(), bias.float())
        return bool(
            out.dtype == dtype
            and torch.allclose(out.float(), expected, rtol=tolerance, atol=tolerance)
        )
    except (RuntimeError, AttributeError):  # an op missing or refusing in this build
        return False


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's parameters: q, k and v as one fused linear, gate and up as another
    (see :func:`fuse_linears`)."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the model's dtype.
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual ``x + delta`` and its RMS norm."""
    x = x + delta
    return x, _rms_norm(x, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _split_rotate(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused projection [B, T, (H + 2 Hkv) D] split into the rotated queries (cos, sin:
    [B, T, 1, D]) stacked for attention, [B, Hkv, G*T, D] (see :meth:`FastDecoder._attention`),
    and k and v side by side as the cache holds them, [B, T, Hkv, 2, D] (k rotated). Written in
    those layouts here, where a compiled function fuses the copy into the rotation, rather
    than by a copy of its own."""
    batch, width = qkv.shape[:2]
    query, key, value = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    query = _rotate(query.reshape(batch, width, heads, dim), cos, sin)
    # Head h = kv * G + g (transformers' repeat_kv order): [B, T, Hkv, G, D] -> [B, Hkv, G, T, D].
    group = heads // kv_heads
    stacked = query.view(batch, width, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    key = _rotate(key.reshape(batch, width, kv_heads, dim), cos, sin)
    return (
        stacked.reshape(batch, kv_heads, group * width, dim),
        torch.stack((key, value.reshape(batch, width, kv_heads, dim)), dim=3),
    )


def _write_kv(
    buffer: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor
) -> None:
    """Write K and V [B, T, Hkv, 2, D] into one layer's ``buffer`` [slots, Hkv, 2, max_len, D]
    (see :class:`StaticKVCache`) at (slot b, position b, t): one store for K and V together."""
    buffer[slots[:, None], :, :, positions] = kv


def _rotate_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    buffer: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
) -> torch.Tensor:
    """:func:`_split_rotate`, its K and V written into the cache (:func:`_write_kv`) where they
    are computed, so that compiled the store can be part of the rotation's kernel rather than
    a kernel of its own (on this project's CPU inductor makes them one kernel, which updates
    the buffer in place, no copy; on a GPU not yet seen). The queries."""
    stacked, kv = _split_rotate(qkv, cos, sin, heads, kv_heads, dim)
    _write_kv(buffer, slots, positions, kv)
    return stacked


def _placement(
    starts: torch.Tensor,
    inv_freq: torch.Tensor,
    offsets: torch.Tensor,
    key_positions: torch.Tensor,
    group: int,
    dtype: torch.dtype,
    masked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What every layer of one forward shares, from each row's start [B], the offsets
    0 .. T-1 of a row's tokens [T] and the attended positions 0 .. kv_len-1 [kv_len] (the
    width and the attended length given as tensors' sizes, not as numbers, so that a compiled
    function treats them as sizes that vary, see :class:`_Pointwise`): the positions [B, T];
    the rotary cos and sin [B, T, 1, D] in ``dtype`` (computed in float32, as transformers
    does); and, unless not ``masked`` (FlexAttention masks by its own function), the
    attention mask [B, 1, G*T, kv_len], True where a query (stacked g-major like the queries,
    see :func:`_split_rotate`) may attend."""
    positions = starts[:, None] + offsets  # [B, T]
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, T, 1, D]
    mask = None
    if masked:
        query_positions = positions.repeat(1, group)  # [B, G*T]
        mask = key_positions <= query_positions[:, None, :, None]
    return positions, angles.cos().to(dtype), angles.sin().to(dtype), mask


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * scores) in float32 over the positions ``mask`` allows, in scores' dtype."""
    weights = (scores.float() * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(weights, dim=-1).to(scores.dtype)


def _matmul_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    masked_softmax: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Attention as two batched matrix products around a masked softmax. For decoding (a few
    query rows against a long cache) this parallelises over the cache positions, where the
    fused SDPA kernels give each (row, KV head) one thread block that walks the whole cache:
    on an H200 at batch 1 that was half of every step's device time."""
    scores = torch.matmul(query, keys.transpose(-1, -2))  # [B, Hkv, G*T, L]
    return torch.matmul(masked_softmax(scores, mask, query.shape[-1] ** -0.5), values)


ATTENTIONS = ("matmul", "sdpa", "flex")
"""How :class:`FastDecoder` attends: :func:`_matmul_attention`, one
``scaled_dot_product_attention`` call, or :func:`_flex_attention`."""


def default_attention(device: torch.device) -> str:
    """The attention :class:`FastDecoder` uses on ``device`` unless told otherwise, and where
    FlexAttention is given up."""
    return "matmul" if device.type == "cuda" else "sdpa"

FLEX_BLOCK = 128
"""FlexAttention's tile, for queries and keys alike (its default): the block mask gives each
tile of 128 stacked queries the tiles of key positions up to the last position one of them
attends, and the mask function masks within a tile."""


def _flex_blocks(
    positions: torch.Tensor, key_positions: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A FlexAttention block mask's parts, shared by every layer of one forward, from each
    row's positions [B, T] (a row of -1 attends nothing) and the attended positions
    ``key_positions`` [kv_len] (given as a size that varies, see :func:`_placement`): the
    position of each of the G*T stacked queries (g-major, as :func:`_split_rotate` stacks
    them), [B, G*T]; for each tile of 128 of them, how many key tiles it reads, [B, 1, Q]
    int32, and which, [B, 1, Q, K] int32: the first ones, up to the tile holding the latest
    position one of its queries attends."""
    batch, width = positions.shape
    rows = group * width
    q_tiles = -(-rows // FLEX_BLOCK)
    kv_tiles = -(-key_positions.shape[0] // FLEX_BLOCK)
    stacked = positions.repeat(1, group)
    latest = F.pad(stacked, (0, q_tiles * FLEX_BLOCK - rows), value=-1).view(
        batch, q_tiles, FLEX_BLOCK).amax(dim=-1)
    tiles = latest // FLEX_BLOCK + 1  # -1 reads none; positions are below kv_len
    indices = torch.arange(kv_tiles, device=positions.device, dtype=torch.int32)
    return (stacked, tiles[:, None].to(torch.int32),
            indices.expand(batch, 1, q_tiles, kv_tiles).contiguous())


def _flex_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    tiles: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """Attention as one FlexAttention call: the stacked queries [B, Hkv, G*T, D] at
    ``positions`` [B, G*T] (a row of -1 gives zeros) against K and V [B, Hkv, kv_len, D], the
    key tiles from :func:`_flex_blocks`. The G query heads of a KV head stay stacked along the
    query axis, not given as GQA heads: FlexAttention's decoding kernel, which splits a long
    cache among thread blocks, takes GQA only where G is a power of two (Qwen2.5's G are 6
    and 7), and otherwise runs its general kernel, one thread block per query head and tile.
    Uncompiled it is PyTorch's unfused reference; compiled, a generated kernel."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def attends(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> torch.Tensor:
        return k <= positions[b, q]

    block_mask = BlockMask.from_kv_blocks(
        tiles, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=attends,
        seq_lengths=(query.shape[2], keys.shape[2]), compute_q_blocks=False,
    )
    out = flex_attention(query, keys, values, block_mask=block_mask,
                         scale=query.shape[-1] ** -0.5)
    assert isinstance(out, torch.Tensor)  # without return_lse
    return out


def _flex_varying(constant_batch: bool, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`_flex_attention`'s inputs (query, keys, values, positions, tiles, indices) with
    the sizes that vary marked for torch.compile: the stacked queries, the attended length and
    the tiles, and the batch unless ``constant_batch`` and there are fewer than 128 stacked
    queries a row. There FlexAttention's decoding kernel runs, which needs the batch to be a
    constant: one compiled version per batch size, so only for the CUDA graphs' few batch
    sizes (``constant_batch`` while they are built; marked static, since a version compiled
    with the batch varying would otherwise be taken). At 128 or more (prefills, long catch-ups)
    its general kernel runs, and so it does for an eager forward at any batch size."""
    query, keys, values, positions, tiles, indices = args
    batch: tuple[int, ...] = (0,)
    if constant_batch and query.shape[2] < 128:
        batch = ()
        for tensor in args:
            torch._dynamo.mark_static(tensor, 0)
    return (_vary(query, *batch, 2), _vary(keys, *batch, 2), _vary(values, *batch, 2),
            _vary(positions, *batch, 1), _vary(tiles, *batch, 2), _vary(indices, *batch, 2, 3))


def flex_available() -> str | None:
    """Why this PyTorch cannot run :func:`_flex_attention`, or None where it can."""
    try:
        import inspect

        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as exc:
        return f"FlexAttention is missing: {exc}"
    if "compute_q_blocks" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
        return f"PyTorch {torch.__version__}'s BlockMask.from_kv_blocks lacks compute_q_blocks"
    return None


class FlexFailed(RuntimeError):
    """FlexAttention's own functions raised (compiling, a recompile limit, a kernel): what
    :meth:`FastDecoder.give_up_flex` answers. Running out of device memory, or an error of the
    device itself, is not one: it would fail the default attention too."""


def _flexibly(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, one of FlexAttention's functions; what it raises as :class:`FlexFailed`."""
    try:
        return fn(*args)
    except (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError)):
        raise
    except Exception as exc:
        raise FlexFailed(repr(exc)) from exc


def _vary(tensor: torch.Tensor, *dims: int) -> torch.Tensor:
    """Mark ``tensor``'s ``dims`` as sizes that vary from call to call, for torch.compile."""
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


@dataclass(frozen=True)
class _Pointwise:
    """The elementwise parts of a layer, which run as many small kernels each when eager; on a
    GPU ``torch.compile`` fuses each into one or two (the matrix products and attention stay
    as they are). Either way the same functions run."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    split_rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    masked_softmax: Callable[..., torch.Tensor]
    placement: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
    flex_blocks: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    flex_attention: Callable[..., torch.Tensor]
    rotate_store: Callable[..., torch.Tensor] | None = None
    """Compiled only: :func:`_rotate_store`. Eager, the K and V are written by
    :meth:`_Placement.write`, which writes a row known on the host through a view."""

    @classmethod
    def eager(cls) -> _Pointwise:
        return cls(
            _rms_norm, _add_rms_norm, _split_rotate, _silu_mul, _masked_softmax, _placement,
            _flex_blocks, lambda *args, constant_batch=False: _flex_attention(*args),
        )

    @classmethod
    def compiled(cls, backend: Any = "inductor", fused_store: bool = True) -> _Pointwise:
        """Each function compiled with only the sizes that vary between a model's calls
        symbolic: the batch, the width, the tokens of a batch (B*T) and the attended length,
        each marked as it comes in (a size of 1 still gets a kernel of its own). Everything
        else is a constant of the kernel: the hidden and intermediate sizes, the head counts
        and the head size (numbers passed in are specialised), so each function compiles once
        per model and size class. ``dynamic=True`` made them all symbolic, and a generated
        kernel's indices then divide by sizes it only learns at run time (as the C++ that
        inductor generates on a CPU shows). That is the suspected cause, not a measured one,
        of run 8's compiled silu-mul taking 16.7 µs a call for 16 rows on an H200, 4.9 times
        its time for one. ``backend``: for tests, which record what is compiled.
        ``fused_store``: compile :func:`_rotate_store` too."""
        # Leave room for a few models in one process: each compiles each function once for
        # each combination of its varying sizes being 1 or more (torch.compile's kernels for
        # a size of 1 are its own).
        # FlexAttention's decoding kernel adds one per batch size (see _flex_varying).
        config: Any = torch._dynamo.config
        for name, limit in (("recompile_limit", 128), ("cache_size_limit", 128),
                            ("accumulated_recompile_limit", 1024),
                            ("accumulated_cache_size_limit", 1024)):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), limit))

        def compile_(fn: Callable[..., Any]) -> Callable[..., Any]:
            return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

        (rms_norm, add_rms_norm, split_rotate, silu_mul, masked_softmax, placement, blocks,
         flex, store) = (
            compile_(fn) for fn in (
                _rms_norm, _add_rms_norm, _split_rotate, _silu_mul, _masked_softmax, _placement,
                _flex_blocks, _flex_attention, _rotate_store,
            )
        )
        return cls(
            rms_norm=lambda x, weight, eps: rms_norm(_vary(x, 0), weight, eps),
            add_rms_norm=lambda x, delta, weight, eps: add_rms_norm(
                _vary(x, 0), _vary(delta, 0), weight, eps),
            split_rotate=lambda qkv, cos, sin, heads, kv_heads, dim: split_rotate(
                _vary(qkv, 0, 1), _vary(cos, 0, 1), _vary(sin, 0, 1), heads, kv_heads, dim),
            silu_mul=lambda gate_up: silu_mul(_vary(gate_up, 0)),
            masked_softmax=lambda scores, mask, scale: masked_softmax(
                _vary(scores, 0, 2, 3), _vary(mask, 0, 2, 3), scale),
            placement=lambda starts, inv_freq, offsets, key_positions, group, dtype, masked=True:
            placement(_vary(starts, 0), inv_freq, _vary(offsets, 0), _vary(key_positions, 0),
                      group, dtype, masked),
            flex_blocks=lambda positions, key_positions, group: blocks(
                _vary(positions, 0, 1), _vary(key_positions, 0), group),
            flex_attention=lambda query, keys, values, positions, tiles, indices,
            constant_batch=False: flex(*_flex_varying(
                constant_batch, query, keys, values, positions, tiles, indices)),
            rotate_store=(
                lambda qkv, cos, sin, buffer, slots, positions, heads, kv_heads, dim: store(
                    _vary(qkv, 0, 1), _vary(cos, 0, 1), _vary(sin, 0, 1), buffer,
                    _vary(slots, 0), _vary(positions, 0, 1), heads, kv_heads, dim)
            ) if fused_store else None,
        )

    def smoke_test(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run each function once on small inputs (compiling them, when compiled): raises
        here, at start-up, if this machine cannot compile them. Not the FlexAttention ones
        (see :meth:`smoke_test_flex`)."""
        # Made as a cache's positions are, outside inference mode: the same compiled entry.
        positions = torch.arange(8, device=device)
        with torch.inference_mode():
            x = torch.ones(2, 8, device=device, dtype=dtype)
            weight = torch.ones(8, device=device, dtype=dtype)
            self.rms_norm(x, weight, 1e-6)
            self.add_rms_norm(x, x, weight, 1e-6)
            self.silu_mul(x)
            angles = torch.zeros(2, 1, 1, 4, device=device, dtype=dtype)
            qkv = torch.ones(2, 1, 16, device=device, dtype=dtype)
            self.split_rotate(qkv, angles, angles, 2, 1, 4)
            if self.rotate_store is not None:
                buffer = torch.zeros(2, 1, 2, 8, 4, device=device, dtype=dtype)
                slots = torch.arange(2, device=device)
                self.rotate_store(qkv, angles, angles, buffer, slots, slots[:, None], 2, 1, 4)
            mask = torch.ones(2, 1, 2, 8, device=device, dtype=torch.bool)
            self.masked_softmax(torch.ones(2, 2, 2, 8, device=device, dtype=dtype), mask, 0.5)
            starts = torch.zeros(2, dtype=torch.long, device=device)
            self.placement(starts, torch.ones(2, device=device), positions[:1], positions, 2,
                           dtype)

    def smoke_test_flex(self, device: torch.device, dtype: torch.dtype, kv_heads: int,
                        group: int, dim: int) -> None:
        """Run the FlexAttention functions at a model's head counts and head size (a GPU's
        kernels take no head size under 16), on one row and on two, for one and two tokens a
        row (the decoding kernel) and for a prefill's 128 stacked queries or more (the general
        one), reading 256 positions. On this project's CPU, torch 2.13's inductor generates C++
        for one row with a varying query length that does not compile."""
        kv_len = 256
        positions = torch.arange(kv_len, device=device)
        with torch.inference_mode():
            for batch in (1, 2):
                rows = torch.ones(batch, kv_heads, 2, kv_len, dim, device=device, dtype=dtype)
                for width in (1, 2, -(-128 // group)):
                    blocks = self.flex_blocks(
                        (positions[:width] + kv_len - width).repeat(batch, 1), positions, group)
                    query = torch.ones(batch, kv_heads, group * width, dim, device=device,
                                       dtype=dtype)
                    # K and V as the forward reads them: views of one gathered buffer; the
                    # decoding kernel's widths with the batch constant, as graphs have it
                    self.flex_attention(query, rows[:, :, 0], rows[:, :, 1], *blocks,
                                        constant_batch=width < 3)


DIRECT_READ_FACTOR = 3
"""A batch of B rows attends to the cache's slots in place, all S of them, where
``DIRECT_READ_FACTOR * B >= S``; otherwise to a gathered copy of its own rows. The copy reads
and writes B rows of K/V and attention reads them again, three passes over B rows against one
over S (the rows of slots not in the batch are read and their outputs dropped). In place
costs three small kernels a layer instead (queries in, outputs out). Run 8 (H200) measured
the copy, PyTorch's ``index_select``, at 19.6 µs per layer for 16 rows of the 1.5B model,
18.7% of the device time at 16 streams: attending 256 positions, that is 8.4 MB read and
written, a tenth of the card's measured copy bandwidth. Not measured on a GPU since."""


DIRECT_READ_MAX_WIDTH = 16
"""In place only for forwards of at most this many tokens per row (a decode or verify step):
attention over every slot computes the scores of every slot's queries, so at a prefill's width
the slots not in the batch would cost arithmetic and memory for their scores, where the copy
costs only its bytes."""


def _direct_read(
    batch: int, width: int, num_slots: int, host_row: tuple[int, int] | None
) -> bool:
    """Whether attention reads every slot in place (see :data:`DIRECT_READ_FACTOR`); never for
    a row whose slot is known on the host, which reads its own slot's view, nor for rows wider
    than :data:`DIRECT_READ_MAX_WIDTH`."""
    return (host_row is None and width <= DIRECT_READ_MAX_WIDTH
            and DIRECT_READ_FACTOR * batch >= num_slots)


@dataclass(frozen=True)
class _Placement:
    """Where a batch's K/V go in the cache, and how attention reads them."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long
    host_row: tuple[int, int] | None  # (slot, start) of a one-row batch, known on the host
    direct: bool = False  # attention reads every slot in place (see DIRECT_READ_FACTOR)

    def write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        """Write ``new`` K and V [B, T, Hkv, 2, D] into one layer's ``buffer``
        [slots, Hkv, 2, max_len, D] (see :class:`StaticKVCache`)."""
        if self.host_row is not None:  # a view of the one slot: no index kernels
            slot, start = self.host_row
            buffer[slot, :, :, start : start + new.shape[1]] = new[0].permute(1, 2, 0, 3)
        else:
            _write_kv(buffer, self.slots, self.positions, new)

    def read(self, buffer: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One layer's K and V for attention: each row's first ``kv_len`` positions,
        [B, Hkv, 2, kv_len, D], or with ``direct`` every slot's, in place:
        [slots, Hkv, 2, kv_len, D]."""
        if self.host_row is not None:  # a view of the one slot: no gather
            slot = self.host_row[0]
            return buffer[slot : slot + 1, :, :, :kv_len]
        # A gathered copy; index_select copies whole rows, where indexing ran a slower kernel.
        whole = buffer if kv_len == buffer.shape[3] else buffer[:, :, :, :kv_len]
        return whole if self.direct else whole.index_select(0, self.slots)


class FastDecoder:
    """``forward(tokens, slots, starts, cache, num_logits)`` over a loaded HF model's weights."""

    def __init__(
        self,
        model: PreTrainedModel,
        pack_weights: bool | None = None,
        compile: bool = False,
        attention: str | None = None,
        pad_rows: bool = True,
    ) -> None:
        """``pack_weights``: prepack the linear weights for oneDNN (see :class:`Linear`); None
        means wherever :func:`can_pack_weights` says it works (a CPU; float32, or bfloat16 where
        oneDNN supports it). ``pad_rows``: with packed weights, pad fewer than
        :data:`PAD_ROWS_TO` rows to that many for the large ones (see :class:`Linear`).
        ``compile``: fuse the elementwise parts of each layer with
        ``torch.compile`` (for GPUs; compiling happens at each new shape's first call, so warm
        up before timing or capturing graphs).
        ``attention``: one of :data:`ATTENTIONS`, "matmul" (:func:`_matmul_attention`), "sdpa"
        (one ``scaled_dot_product_attention`` call) or "flex" (:func:`_flex_attention`, meant
        compiled: uncompiled it is PyTorch's slow reference); None means "matmul" on CUDA and
        "sdpa" elsewhere."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise NotImplementedError(f"FastDecoder cannot run this model: {reason}")
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.num_heads: int = config.num_attention_heads
        self.num_kv_heads: int = config.num_key_value_heads or self.num_heads
        self.head_dim: int = getattr(config, "head_dim", None) or (
            config.hidden_size // self.num_heads
        )
        self.eps: float = config.rms_norm_eps
        self.device = model.device
        self.dtype = model.dtype
        if attention is None:
            attention = default_attention(self.device)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.attention = attention
        self._building_graphs = False
        self.flex_failure: str | None = None
        """Why FlexAttention was given up, where it was asked for and was (see give_up_flex)."""
        if attention == "flex" and (reason := flex_available()) is not None:
            self.give_up_flex(reason)
        if pack_weights is None:
            pack_weights = can_pack_weights(self.device, self.dtype)
        self.packed_weights = pack_weights
        self.pointwise = _Pointwise.eager()
        if compile:
            # The store fused into the rotation is the one compiled function that mutates an
            # input; where it cannot be compiled, the others still are.
            for fused_store in (True, False):
                try:
                    compiled = _Pointwise.compiled(fused_store=fused_store)
                    compiled.smoke_test(self.device, self.dtype)
                    self.pointwise = compiled
                    break
                except Exception as exc:  # any failure to compile
                    log.warning("torch.compile failed here%s: %r", (
                        ", so K and V are stored by a kernel of their own" if fused_store
                        else ", so the fast path runs eagerly"), exc)
        self.compiled = self.pointwise.rms_norm is not _rms_norm
        if self.attention == "flex" and self.compiled:
            try:
                self.pointwise.smoke_test_flex(
                    self.device, self.dtype, self.num_kv_heads,
                    self.num_heads // self.num_kv_heads, self.head_dim)
            except Exception as exc:  # any failure to compile
                self.give_up_flex(f"torch.compile failed for it here: {exc!r}")
        elif self.attention == "flex" and self.device.type == "cuda":
            self.give_up_flex("uncompiled, it is PyTorch's reference, which computes every score")

        def linear(*modules: torch.nn.Module) -> Linear:
            if len(modules) == 1:
                return Linear(modules[0].weight, modules[0].bias, pack_weights)  # type: ignore[arg-type]
            if pack_weights:  # one packed copy of the concatenation; the modules keep theirs,
                # which a memory-mapped checkpoint holds in the page cache, not in process memory
                weight, bias = _concatenated(modules)
                return Linear(weight, bias, pack=True, keep=False)
            return Linear(*fuse_linears(modules), pack=False)

        base: Any = model.model
        self.embed: torch.Tensor = base.embed_tokens.weight
        self.norm: torch.Tensor = base.norm.weight
        head: Any = model.lm_head  # type: ignore[attr-defined]
        self.lm_head = linear(head)  # the embedding itself when the weights are tied
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                qkv=linear(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                o=linear(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight,
                gate_up=linear(layer.mlp.gate_proj, layer.mlp.up_proj),
                down=linear(layer.mlp.down_proj),
            )
            for layer in base.layers
        ]
        if pack_weights and pad_rows:
            for weight in (self.lm_head, *(weight for layer in self.layers for weight in (
                    layer.qkv, layer.o, layer.gate_up, layer.down))):
                if weight.packed is not None and weight.packed.numel() >= PAD_ROWS_MIN_WEIGHT:
                    weight.pad_to = PAD_ROWS_TO
        dim = self.head_dim
        # Computed on the CPU as transformers does, then moved: the same float32 values.
        inv_freq = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.inv_freq = inv_freq.to(self.device)

    def store_apart(self) -> None:
        """Store each layer's K/V with a kernel of its own from now on, the rest still
        compiled (after a failure that may have been the fused store's)."""
        self.pointwise = dataclasses.replace(self.pointwise, rotate_store=None)

    def give_up_flex(self, reason: str) -> None:
        """Attend as this device does by default from now on, not by FlexAttention (after a
        failure that may have been FlexAttention's), and say why."""
        self.attention = default_attention(self.device)
        self.flex_failure = reason if self.flex_failure is None else (
            f"{self.flex_failure}; {reason}")
        log.warning("FlexAttention given up, attention is %s from now on: %s", self.attention,
                    reason)

    @contextlib.contextmanager
    def building_graphs(self) -> Iterator[None]:
        """While CUDA graphs are built (warm-ups and captures): FlexAttention's decoding kernel
        is compiled for each batch size, and a :class:`FlexFailed` is raised, for the runner to
        give FlexAttention up and build every graph again without it (see
        ``StaticRunner._capture_graphs``), not given up forward by forward (graphs built
        before it would keep it: a mix of the two)."""
        self._building_graphs = True
        try:
            yield
        finally:
            self._building_graphs = False

    def run_eagerly(self) -> None:
        """Run the elementwise functions uncompiled from now on (after a failure that may
        have been the compiled ones': the same functions, each op its own kernel)."""
        self.pointwise = _Pointwise.eager()
        self.compiled = False

    def new_cache(self, num_slots: int, max_len: int) -> StaticKVCache:
        """A cache shaped for this model, on its device and in its dtype."""
        return StaticKVCache(
            num_layers=self.num_layers,
            num_slots=num_slots,
            num_kv_heads=self.num_kv_heads,
            max_len=max_len,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] long
        slots: torch.Tensor,  # [B] long, distinct
        starts: torch.Tensor,  # [B] long: row b's tokens go at starts[b] .. starts[b]+T-1
        cache: StaticKVCache,
        num_logits: int = 1,
        kv_len: int | None = None,
        *,
        host_row: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Logits of the last ``num_logits`` of the T positions: [B, num_logits, vocab] float32.

        ``kv_len`` (at least max(starts) + T) bounds how much of the cache attention reads;
        None reads all ``max_len`` positions (fixed shapes, for CUDA graphs). Every row needs
        starts[b] + T <= max_len, padding included; the caller checks it (no device sync here).

        ``host_row`` = (slot, start) of a one-row batch, when the caller knows them on the host:
        that row's K/V are then written and read through views of its slot, with no index
        kernels and no gathered copy of its cache (not for CUDA graphs: they fix the slot).
        """
        if not 1 <= num_logits <= tokens.shape[1]:  # [:, -0:] would be every position
            raise ValueError(f"num_logits must be in [1, {tokens.shape[1]}], got {num_logits}")
        hidden = self.hidden_states(tokens, slots, starts, cache, kv_len, host_row=host_row)
        return self.logits(hidden[:, -num_logits:])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states [..., hidden]: [..., vocab] float32."""
        return self.lm_head(hidden).float()

    def hidden_states(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        cache: StaticKVCache,
        kv_len: int | None = None,
        *,
        host_row: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states of every position: [B, T, hidden]. With FlexAttention,
        a forward whose FlexAttention fails (:class:`FlexFailed`: a shape first compiled here, a
        recompile limit) outside the building of CUDA graphs gives it up
        (:meth:`give_up_flex`) and runs again: it writes the same K/V at the same positions."""
        if self.attention == "flex" and not self._building_graphs:
            try:
                return self._hidden_states(tokens, slots, starts, cache, kv_len, host_row)
            except FlexFailed as exc:
                self.give_up_flex(f"a forward of {tuple(tokens.shape)} tokens failed: {exc}")
        return self._hidden_states(tokens, slots, starts, cache, kv_len, host_row)

    def _hidden_states(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        cache: StaticKVCache,
        kv_len: int | None,
        host_row: tuple[int, int] | None,
    ) -> torch.Tensor:
        width = tokens.shape[1]
        kv_len = cache.max_len if kv_len is None else kv_len
        ops = self.pointwise
        # GQA without repeating K/V: the G query heads that share a KV head are stacked along
        # the query axis ([B, Hkv, G*T, D]), so each row attends with mask[b] for its position.
        flex = self.attention == "flex"
        positions, cos, sin, mask = ops.placement(
            starts, self.inv_freq, cache.positions[:width], cache.positions[:kv_len],
            self.num_heads // self.num_kv_heads, self.dtype, not flex,
        )
        rotary = (cos, sin)
        place = _Placement(
            slots, positions, host_row,
            _direct_read(len(slots), width, cache.num_slots, host_row),
        )
        attend: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        if flex:  # each row's positions and its key tiles
            rows = positions
            if place.direct:  # every slot's; -1 (nothing attended) where no row of the batch is
                rows = positions.new_full((cache.num_slots, width), -1).index_copy(
                    0, slots, positions)
            attend = _flexibly(ops.flex_blocks, rows, cache.positions[:kv_len],
                               self.num_heads // self.num_kv_heads)
        else:
            assert mask is not None
            attend = mask
            if place.direct:  # each slot's mask, where the batch's rows are; elsewhere position 0
                attend = (cache.positions[:kv_len] == 0).expand(
                    cache.num_slots, *mask.shape[1:]).index_copy(0, slots, mask)
        # The residual stream is [N = B*T, hidden]: the elementwise functions then see one
        # size that varies (1 or more), not two, which halves torch.compile's specialisations.
        x = F.embedding(tokens.reshape(-1), self.embed)  # [N, hidden]
        normed = ops.rms_norm(x, self.layers[0].input_norm, self.eps)
        for index, layer in enumerate(self.layers):
            attended = self._attention(index, layer, normed, rotary, place, attend, cache, kv_len)
            x, normed = ops.add_rms_norm(x, attended, layer.post_norm, self.eps)
            out = layer.down(ops.silu_mul(layer.gate_up(normed)))
            last = index + 1 == self.num_layers
            following = self.norm if last else self.layers[index + 1].input_norm
            x, normed = ops.add_rms_norm(x, out, following, self.eps)
        return normed.reshape(*tokens.shape, -1)  # reshape: a compiled output may have any strides

    def _attention(
        self,
        index: int,
        layer: _Layer,
        x: torch.Tensor,  # [N = B*T, hidden], normed
        rotary: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, T, 1, D]
        place: _Placement,
        # [B, or S if direct, 1, G*T, kv_len] bool, True = attend; for FlexAttention the
        # stacked queries' positions [B or S, G*T] and the key tiles (see _flex_blocks)
        attend: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        cache: StaticKVCache,
        kv_len: int,
    ) -> torch.Tensor:
        batch, width = place.positions.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        # GQA: the G query heads of one KV head are stacked along the query axis.
        qkv = layer.qkv(x).reshape(batch, width, -1)
        buffer = cache.kv[index]
        ops = self.pointwise
        if ops.rotate_store is not None:
            stacked = ops.rotate_store(
                qkv, *rotary, buffer, place.slots, place.positions, heads, kv_heads, dim
            )  # [B, Hkv, G*T, D]
        else:
            stacked, kv = ops.split_rotate(qkv, *rotary, heads, kv_heads, dim)
            place.write(buffer, kv)  # [B, T, Hkv, 2, D]
        rows = place.read(buffer, kv_len)
        row_keys, row_values = rows[:, :, 0], rows[:, :, 1]  # [B or S, Hkv, kv_len, D] each
        if place.direct:  # each row's queries where its slot is, zeros in the other slots
            stacked = stacked.new_zeros((cache.num_slots, *stacked.shape[1:])).index_copy_(
                0, place.slots, stacked)

        if isinstance(attend, tuple):
            out = _flexibly(functools.partial(
                ops.flex_attention, constant_batch=self._building_graphs),
                stacked, row_keys, row_values, *attend)
        elif self.attention == "matmul":
            out = _matmul_attention(stacked, row_keys, row_values, attend, ops.masked_softmax)
        else:
            out = F.scaled_dot_product_attention(stacked, row_keys, row_values, attn_mask=attend)
        if place.direct:
            out = out.index_select(0, place.slots)
        # [B, Hkv, G*T, D] is [B, H, T, D] with h = kv * G + g; back to [B, T, H, D].
        out = out.reshape(batch, heads, width, dim).transpose(1, 2)
        return layer.o(out.reshape(batch * width, heads * dim))
