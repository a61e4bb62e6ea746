"""A Llama/Qwen2 decoder forward written for :class:`StaticKVCache`, on a loaded HF model's weights.

The model's own parameter tensors are referenced, never copied, except that on a CPU in float32
the linear weights are also kept prepacked for oneDNN (one more copy of them; see
:class:`Linear`). Build it once the model is on its device and in its dtype: the device, the
dtype and the rotary frequencies are fixed then. The structure follows gpt-fast's ``model.py``: K/V
written into a preallocated buffer by position, one ``scaled_dot_product_attention`` call with
a mask built from positions. Every operation mirrors transformers' Qwen2/Llama modules in the
same order and dtypes, so float32 logits agree with theirs to rounding.

Rows of one batch may start at different positions (ragged). Rows with fewer real tokens than
the batch width are padded at the end by the caller: their padding writes K/V at positions
past the row's real length, which the caller ignores by keeping its own lengths (the next
forward of that row overwrites them before any query can attend to them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from decoding.fast.cache import StaticKVCache

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

    On a CPU in float32 the weight can be *prepacked* for oneDNN (the blocked layout that
    PyTorch's own inductor uses when it freezes a CPU model): MKL's matrix-matrix path, which
    ``F.linear`` takes for more than one row, repacks the whole weight on every call and so
    costs 2-3x the one-row (matrix-vector) path, which is what makes a verify forward of a few
    tokens expensive on a CPU; the prepacked kernel reads the weight once at any small width.
    The packed copy is extra memory (one more copy of the weight); the HF module keeps its own.
    """

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, module: torch.nn.Module, pack: bool) -> None:
        self.weight: torch.Tensor = module.weight  # type: ignore[assignment]
        self.bias: torch.Tensor | None = module.bias  # type: ignore[assignment]
        self.packed: torch.Tensor | None = _pack(self.weight) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def can_pack_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN-prepacked linear weights are available for this device and dtype (CPU,
    float32, a PyTorch built with oneDNN, and the result equal to ``F.linear``'s to rounding)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 32, generator=generator)
        bias = torch.randn(64, generator=generator)
        x = torch.randn(3, 2, 32, generator=generator)
        packed = _pack(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, weight, bias), rtol=1e-4, atol=1e-4))
    except (RuntimeError, AttributeError):  # an op missing or refusing in this build
        return False


@dataclass(frozen=True)
class _Layer:
    """References to one decoder layer's parameters (biases are None where absent)."""

    input_norm: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: torch.Tensor
    gate: Linear
    up: Linear
    down: Linear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the model's dtype.
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class _Placement:
    """Where a batch's K/V go in the cache."""

    slots: torch.Tensor  # [B] long
    positions: torch.Tensor  # [B, T] long
    host_row: tuple[int, int] | None  # (slot, start) of a one-row batch, known on the host

    def store(self, buffer: torch.Tensor, new: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Write ``new`` [B, T, Hkv, D] into ``buffer`` [slots, Hkv, max_len, D]; return each
        row's first ``kv_len`` positions, [B, Hkv, kv_len, D]."""
        if self.host_row is not None:  # views of the one slot: no index kernels, no gather
            slot, start = self.host_row
            buffer[slot, :, start : start + new.shape[1]] = new[0].transpose(0, 1)
            return buffer[slot : slot + 1, :, :kv_len]
        buffer[self.slots[:, None], :, self.positions] = new  # indexed by (slot b, position b, t)
        return buffer[self.slots, :, :kv_len]  # a gathered copy


class FastDecoder:
    """``forward(tokens, slots, starts, cache, num_logits)`` over a loaded HF model's weights."""

    def __init__(self, model: PreTrainedModel, pack_weights: bool | None = None) -> None:
        """``pack_weights``: prepack the linear weights for oneDNN (see :class:`Linear`); None
        means wherever :func:`can_pack_weights` says it works (CPU, float32)."""
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
        if pack_weights is None:
            pack_weights = can_pack_weights(self.device, self.dtype)
        self.packed_weights = pack_weights

        def _linear(module: torch.nn.Module) -> Linear:
            return Linear(module, pack_weights)

        base: Any = model.model
        self.embed: torch.Tensor = base.embed_tokens.weight
        self.norm: torch.Tensor = base.norm.weight
        head: Any = model.lm_head  # type: ignore[attr-defined]
        self.lm_head = _linear(head)  # the embedding itself when the weights are tied
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                q=_linear(layer.self_attn.q_proj),
                k=_linear(layer.self_attn.k_proj),
                v=_linear(layer.self_attn.v_proj),
                o=_linear(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight,
                gate=_linear(layer.mlp.gate_proj),
                up=_linear(layer.mlp.up_proj),
                down=_linear(layer.mlp.down_proj),
            )
            for layer in base.layers
        ]
        dim = self.head_dim
        # Computed on the CPU as transformers does, then moved: the same float32 values.
        inv_freq = 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.inv_freq = inv_freq.to(self.device)

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
        """The final-normed hidden states of every position: [B, T, hidden]."""
        width = tokens.shape[1]
        kv_len = cache.max_len if kv_len is None else kv_len
        steps = torch.arange(width, device=tokens.device)
        positions = starts[:, None] + steps  # [B, T]
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        rotary = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))  # cos, sin

        # GQA without repeating K/V: the G query heads that share a KV head are stacked along
        # the query axis ([B, Hkv, G*T, D]), so each row attends with mask[b] for its position.
        group = self.num_heads // self.num_kv_heads
        query_positions = positions.repeat(1, group)  # [B, G*T], g-major like the stacked q
        key_positions = torch.arange(kv_len, device=tokens.device)
        mask = key_positions <= query_positions[:, None, :, None]  # [B, 1, G*T, kv_len]

        place = _Placement(slots, positions, host_row)
        x = F.embedding(tokens, self.embed)  # [B, T, hidden]
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(x, layer.input_norm, self.eps)
            x = x + self._attention(index, layer, normed, rotary, place, mask, cache)
            normed = _rms_norm(x, layer.post_norm, self.eps)
            gated = F.silu(layer.gate(normed)) * layer.up(normed)
            x = x + layer.down(gated)
        return _rms_norm(x, self.norm, self.eps)

    def _attention(
        self,
        index: int,
        layer: _Layer,
        x: torch.Tensor,  # [B, T, hidden], normed
        rotary: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [B, 1, T, D]
        place: _Placement,
        mask: torch.Tensor,  # [B, 1, G*T, kv_len] bool, True = attend
        cache: StaticKVCache,
    ) -> torch.Tensor:
        batch, width, _ = x.shape
        kv_len = mask.shape[-1]
        cos, sin = rotary
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        query = layer.q(x).view(batch, width, heads, dim).transpose(1, 2)
        key = layer.k(x).view(batch, width, kv_heads, dim).transpose(1, 2)
        value = layer.v(x).view(batch, width, kv_heads, dim)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)  # [B, H(kv), T, D]

        row_keys = place.store(cache.keys[index], key.transpose(1, 2), kv_len)
        row_values = place.store(cache.values[index], value, kv_len)

        # Head h = kv * G + g (transformers' repeat_kv order), so [B, H, T, D] regroups to
        # [B, Hkv, G*T, D] and back without moving any head to another KV head.
        stacked = query.reshape(batch, kv_heads, heads // kv_heads * width, dim)
        out = F.scaled_dot_product_attention(stacked, row_keys, row_values, attn_mask=mask)
        out = out.reshape(batch, heads, width, dim).transpose(1, 2)  # [B, T, H, D]
        out = out.reshape(batch, width, heads * dim)
        return layer.o(out)
