"""Turn the device and dtype names of the settings into torch objects."""

from __future__ import annotations

import re

import torch

from decoding.errors import ModelLoadError

_CUDA_INDEX = re.compile(r"cuda:(\d+)")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available, else the CPU).

    A CUDA device is refused when CUDA is not available or the index is out of range, so a
    misconfigured deployment fails at start-up and not on its first request.
    """
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or _CUDA_INDEX.fullmatch(key):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r} was asked for but CUDA is not available")
        device = torch.device(key)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ModelLoadError(
                f"device {name!r} does not exist: this machine has {count} CUDA device(s)"
            )
        return device
    raise ModelLoadError(f"device {name!r} is not one of 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (bfloat16 on CUDA, else float32).

    The short spellings ``fp32``, ``bf16`` and ``fp16`` are accepted too.
    """
    key = name.strip().lower()
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[key]
    except KeyError:
        raise ModelLoadError(
            f"dtype {name!r} is not one of 'auto', 'float32', 'bfloat16' or 'float16'"
        ) from None


def resolve_draft_dtype(
    name: str | None, device: torch.device, target_dtype: torch.dtype
) -> torch.dtype:
    """The draft's dtype: ``name`` as :func:`resolve_dtype` reads it, except that None (or
    empty) means the target's, and ``"auto"`` means bfloat16 wherever it runs natively: a
    CUDA device that supports it (Ampere or newer), or a CPU whose oneDNN runs bfloat16 linear
    layers (the fast path prepacks them; see :func:`decoding.fast.model.can_pack_weights`);
    elsewhere the target's. The draft only proposes tokens, so its precision changes speed,
    never the output."""
    if name is None or not name.strip():
        return target_dtype
    if name.strip().lower() != "auto":
        return resolve_dtype(name, device)
    if device.type == "cuda":  # the current device's answer: one node's GPUs are alike
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else target_dtype
    if device.type == "cpu":
        from decoding.fast.model import can_pack_weights

        if can_pack_weights(device, torch.bfloat16):
            return torch.bfloat16
    return target_dtype
