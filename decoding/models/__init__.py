"""Load the target and the draft model: local folders, ``.gguf`` files, hub ids, the default pair.

- :mod:`decoding.models.devices`: device and dtype names to torch objects;
- :mod:`decoding.models.fetch`: the default pair's chunked wheels, GGUF conversion, the cache;
- :mod:`decoding.models.loading`: :func:`load_pair` and the objects it returns.

transformers is imported only when a model is actually fetched or loaded.
"""

from decoding.models.devices import resolve_device, resolve_draft_dtype, resolve_dtype
from decoding.models.fetch import (
    COMPLETE_MARKER,
    DEFAULT_DRAFT_SPEC,
    DEFAULT_TARGET_SPEC,
    ChunkedModelSpec,
    convert_gguf,
    convert_local_gguf,
    converted_from,
    default_cache_dir,
    fetch_chunked_model,
    is_complete,
)
from decoding.models.loading import (
    DEFAULT_SOURCE,
    LoadedModel,
    ModelPair,
    ResolvedSource,
    eos_token_ids,
    load_model_source,
    load_pair,
    load_resolved_model,
    load_tokenizer,
    resolve_source,
)

__all__ = [
    "COMPLETE_MARKER",
    "DEFAULT_DRAFT_SPEC",
    "DEFAULT_SOURCE",
    "DEFAULT_TARGET_SPEC",
    "ChunkedModelSpec",
    "LoadedModel",
    "ModelPair",
    "ResolvedSource",
    "convert_gguf",
    "convert_local_gguf",
    "converted_from",
    "default_cache_dir",
    "eos_token_ids",
    "fetch_chunked_model",
    "is_complete",
    "load_model_source",
    "load_pair",
    "load_resolved_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_draft_dtype",
    "resolve_dtype",
    "resolve_source",
]
