"""Baselines outside the server, on the same prompts, dtype and lengths as a serving run.

- ``hf_target``: Hugging Face ``generate`` with the target alone, greedy (``do_sample=False``).
- ``hf_assisted``: HF assisted generation (``assistant_model=draft``), greedy, with HF's own
  defaults for how many tokens the assistant drafts.

Both use the models :func:`decoding.models.load_pair` loads, one prompt at a time (batch 1),
and tokenize prompts the way the server does (raw text without special tokens; chat messages
through the target's chat template with the generation prompt). Sampling-related settings a
model's ``generation_config`` may carry (repetition penalty and so on) are overridden so both
are plain greedy decoding, the same rule the server's greedy path follows. The output ids are
kept so they can be compared with the server's: in float32 greedy, assisted generation and
Tandem must both reproduce the target's tokens exactly.

torch and transformers are imported only when baselines run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bench.compare import OutputComparison, compare_outputs
from bench.workloads import Prompt, Workload
from decoding.validation import encode_prompt

if TYPE_CHECKING:
    from decoding.models import ModelPair

Method = Literal["hf_target", "hf_assisted"]
METHODS: tuple[Method, ...] = ("hf_target", "hf_assisted")


@dataclass(frozen=True)
class BaselineConfig:
    target: str = "default"
    draft: str = "default"
    device: str = "cpu"
    dtype: str = "float32"
    draft_dtype: str | None = None
    methods: tuple[Method, ...] = METHODS
    warmup_tokens: int = 4
    """A short untimed generation per method before timing, so first-call costs stay out."""


@dataclass(frozen=True)
class BaselineOutput:
    prompt_id: str
    prompt_tokens: int
    output_token_ids: list[int]
    seconds: float
    tokens_per_s: float


@dataclass(frozen=True)
class BaselineRun:
    method: Method
    outputs: list[BaselineOutput]
    total_output_tokens: int
    total_seconds: float
    tokens_per_s: float
    """All output tokens over all generation time (prompts run one after another)."""


@dataclass(frozen=True)
class BaselineResults:
    target: str
    draft: str
    device: str
    dtype: str
    draft_dtype: str
    max_new_tokens: int
    workload: dict[str, Any]
    runs: list[BaselineRun]
    assisted_vs_target: OutputComparison | None = None
    """Per prompt, whether HF assisted generation reproduced the target's greedy ids."""
    assisted_speedup: float | None = None
    """hf_assisted tokens/s over hf_target tokens/s."""


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, as the server computes them."""
    if prompt.text is not None:
        return encode_prompt(tokenizer, prompt.text)
    assert prompt.messages is not None
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in prompt.messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def greedy_generate(
    pair: ModelPair, input_ids: Sequence[int], max_new_tokens: int, *, assisted: bool
) -> list[int]:
    """One greedy HF ``generate`` call (batch 1); returns the new token ids only."""
    import torch

    inputs = torch.tensor([list(input_ids)], dtype=torch.long, device=pair.device)
    pad = pair.tokenizer.pad_token_id
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "eos_token_id": list(pair.eos_token_ids),
        "pad_token_id": pad if pad is not None else pair.eos_token_ids[0],
    }
    if assisted:
        options["assistant_model"] = pair.draft.model
    model: Any = pair.target.model  # typed as a Module, whose attributes mypy reads as Tensors
    with torch.inference_mode():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
    return [int(t) for t in output[0, inputs.shape[1] :].tolist()]


def run_method(
    pair: ModelPair,
    method: Method,
    prompts: Sequence[Prompt],
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    warmup_tokens: int = 4,
) -> BaselineRun:
    assisted = method == "hf_assisted"
    if warmup_tokens > 0 and prompt_ids:
        greedy_generate(pair, prompt_ids[0], warmup_tokens, assisted=assisted)
    outputs = []
    for prompt, ids in zip(prompts, prompt_ids, strict=True):
        started = time.perf_counter()
        new_ids = greedy_generate(pair, ids, max_new_tokens, assisted=assisted)
        seconds = time.perf_counter() - started
        outputs.append(
            BaselineOutput(
                prompt_id=prompt.id,
                prompt_tokens=len(ids),
                output_token_ids=new_ids,
                seconds=seconds,
                tokens_per_s=len(new_ids) / seconds if seconds > 0 else 0.0,
            )
        )
    tokens = sum(len(o.output_token_ids) for o in outputs)
    seconds = sum(o.seconds for o in outputs)
    return BaselineRun(
        method=method,
        outputs=outputs,
        total_output_tokens=tokens,
        total_seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
    )


def run_baselines(config: BaselineConfig, workload: Workload) -> BaselineResults:
    """Load the pair once and run every method on every prompt of ``workload`` (greedy)."""
    from decoding.models import load_pair

    if workload.temperature != 0:
        raise ValueError("baselines are greedy; use a workload with temperature 0")
    pair = load_pair(
        config.target,
        config.draft,
        device=config.device,
        dtype=config.dtype,
        draft_dtype=config.draft_dtype,
    )
    prompt_ids = [prompt_token_ids(pair.tokenizer, p) for p in workload.prompts]
    runs = [
        run_method(
            pair,
            method,
            workload.prompts,
            prompt_ids,
            workload.max_new_tokens,
            warmup_tokens=config.warmup_tokens,
        )
        for method in config.methods
    ]
    by_method = {run.method: run for run in runs}
    comparison = speedup = None
    if "hf_target" in by_method and "hf_assisted" in by_method:
        target, assisted = by_method["hf_target"], by_method["hf_assisted"]
        comparison = compare_outputs(
            [o.output_token_ids for o in assisted.outputs],
            [o.output_token_ids for o in target.outputs],
        )
        if target.tokens_per_s > 0:
            speedup = assisted.tokens_per_s / target.tokens_per_s
    return BaselineResults(
        target=pair.target.name,
        draft=pair.draft.name,
        device=str(pair.device),
        dtype=str(pair.dtype).removeprefix("torch."),
        draft_dtype=str(pair.draft_dtype).removeprefix("torch."),
        max_new_tokens=workload.max_new_tokens,
        workload=workload.describe(),
        runs=runs,
        assisted_vs_target=comparison,
        assisted_speedup=speedup,
    )
