"""A model and its KV caches: forward a few tokens at the end of a sequence, roll back.

The speculative step sees only :class:`KVSequence`: ``forward(tokens) -> logits`` and
``rollback(length)``. This implementation keeps one transformers ``DynamicCache`` per sequence
(rollback crops it); a static, preallocated cache where rollback only moves a length can
replace it without touching the step.
"""

from __future__ import annotations

import inspect
import threading
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from decoding.transfer import to_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class ModelRunner:
    """Owns one model and counts the KV sequences alive on it (tests check they return to 0)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        # transformers 5.x renamed the cache argument; accept both spellings.
        params = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in params else "past_key_values"
        self._lock = threading.Lock()
        self._live = 0

    @property
    def live_sequences(self) -> int:
        return self._live

    def new_sequence(self) -> KVSequence:
        with self._lock:
            self._live += 1
        return KVSequence(self)

    def _released(self) -> None:
        with self._lock:
            self._live -= 1


class KVSequence:
    """One request's cache on one model. ``length`` tokens are cached."""

    def __init__(self, runner: ModelRunner) -> None:
        self._runner = runner
        self._cache: DynamicCache | None = DynamicCache(config=runner.model.config)
        # A sliding-window layer keeps only its window, and once full cannot be cropped unless
        # it records the past: then it keeps what it is given until the next crop, which
        # drops the rejected tokens and trims it back to the window (see rollback).
        self._sliding: list[Any] = [
            layer for layer in self._cache.layers
            if getattr(layer, "is_sliding", False) and hasattr(layer, "activate_past_recording")
        ]
        for layer in self._sliding:
            layer.activate_past_recording()
        self.length = 0

    @property
    def device(self) -> torch.device:
        return self._runner.device

    @torch.inference_mode()
    def forward(
        self, tokens: list[int] | torch.Tensor, num_logits: int | None = None
    ) -> torch.Tensor:
        """Append ``tokens`` (host ids, or a 1-D long tensor of ids on this device) at
        positions [length, length+n); return the logits of the last ``num_logits`` of them
        (all when None): [num_logits, vocab].

        Asking only for the logits needed skips most of the output head, which for these
        vocabularies (~152k ids) is a large share of a small model's weights.
        """
        if self._cache is None:
            raise RuntimeError("forward on a released KV sequence")
        if isinstance(tokens, torch.Tensor):
            input_ids = tokens.view(1, -1)
        else:
            input_ids = to_device(tokens, self._runner.device).view(1, -1)
        cache = {self._runner.cache_argument: self._cache}
        keep = len(tokens) if num_logits is None else num_logits
        out = self._runner.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=keep, **cache
        )
        self.length += len(tokens)
        return out.logits[0, -keep:].float()

    def rollback(self, length: int) -> None:
        """Forget every cached token at position ``length`` and beyond."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} tokens cached")
        if length < self.length and self._cache is not None:
            self._cache.crop(length - self.length)  # negative: tokens to drop
        elif self._cache is not None:
            for layer in self._sliding:  # nothing to drop: back to the window
                if getattr(layer, "is_initialized", True):  # fed (a draft never fed is not)
                    layer.crop(0)
        self.length = length

    def release(self) -> None:
        """Free the cache's memory. Idempotent."""
        if self._cache is not None:
            self._cache = None
            self._runner._released()
