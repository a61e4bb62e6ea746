"""The fast path: a preallocated KV cache, a Llama/Qwen2 forward written for it, and a runner
with :class:`decoding.runner.ModelRunner`'s interface plus a batched forward (issue 8)."""

from decoding.fast.cache import CacheFullError, StaticKVCache
from decoding.fast.model import FastDecoder, supports
from decoding.fast.runner import StaticRunner, StaticSequence

__all__ = [
    "CacheFullError",
    "FastDecoder",
    "StaticKVCache",
    "StaticRunner",
    "StaticSequence",
    "supports",
]
