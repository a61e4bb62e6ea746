"""The prompt's log-probabilities (``prompt_logprobs``): the target's own at every prompt
position after the first, whatever the prefill's chunks, forwards and batch, on the first chunk
only, and asking for them changes no output token."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

import decoding.stepper as stepper_module
from decoding.params import SamplingParams, SpeculationParams
from tests.conftest import make_engine
from tests.decoding.test_engine import collect, ids_of, reference_greedy

ATOL = 1e-4
LONG_PROMPT = tuple((7 * k + 3) % 311 + 5 for k in range(23))


def assert_prompts_own(pair, prompt, chunks, top: int) -> None:
    """The first chunk has one entry per prompt token after the first, each the target's
    log-softmax at the position before it (one cache-free forward), with its ``top`` most
    likely tokens; no other chunk has any."""
    with torch.inference_mode():
        logits = pair.target.model(torch.tensor([list(prompt)])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    given = chunks[0].prompt_logprobs
    assert given is not None
    assert [entry.token_id for entry in given] == list(prompt[1:])
    for k, entry in enumerate(given):
        assert entry.logprob == pytest.approx(reference[k, prompt[k + 1]].item(), abs=ATOL)
        values, ids = reference[k].topk(top)
        assert [i for i, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=ATOL)
    assert all(chunk.prompt_logprobs is None for chunk in chunks[1:])


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize(("prefill_chunk", "span"), [(0, 256), (5, 256), (0, 4), (6, 4)])
async def test_prompt_logprobs_are_the_targets_own(
    different_pair, monkeypatch, fast_path: str, prefill_chunk: int, span: int
) -> None:
    """The prompt prefilled at once or in chunks of 5 or 6, each scored in one forward or in
    forwards of 4 positions: the same numbers, and the output is the target's greedy one."""
    monkeypatch.setattr(stepper_module, "PROMPT_LOGPROBS_SPAN", span)
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, prefill_chunk=prefill_chunk)
    try:
        chunks = await collect(engine, prompt_token_ids=LONG_PROMPT, max_new_tokens=12,
                               speculation=SpeculationParams(3), prompt_logprobs=3)
    finally:
        engine.close()
    assert ids_of(chunks) == reference_greedy(pair, LONG_PROMPT, 12)
    assert_prompts_own(pair, LONG_PROMPT, chunks, top=3)
    assert all(chunk.logprobs is None for chunk in chunks)  # the output's were not asked for


async def test_a_one_token_prompt_has_no_prompt_logprobs(same_pair) -> None:
    engine = make_engine(same_pair, fast_path="on")
    try:
        chunks = await collect(engine, prompt_token_ids=(42,), max_new_tokens=3,
                               prompt_logprobs=0)
        plain = await collect(engine, prompt_token_ids=(42,), max_new_tokens=3)
    finally:
        engine.close()
    assert chunks[0].prompt_logprobs == ()
    assert all(chunk.prompt_logprobs is None for chunk in [*chunks[1:], *plain])


async def test_prompt_logprobs_in_a_batch_change_no_token(different_pair) -> None:
    """Requests with and without them, greedy and seeded sampled, prefilled in one round on
    a batching engine (those without in batched forwards): each gets its own prompt's
    numbers, and the outputs are those of the same requests without them."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=6, prefill_chunk=8)
    assert engine.batched
    sampled = SamplingParams(temperature=0.9, top_k=40, seed=5)
    requests = [
        dict(prompt_token_ids=LONG_PROMPT, speculation=SpeculationParams(2)),
        dict(prompt_token_ids=tuple(range(30, 44)), sampling=sampled),
        dict(prompt_token_ids=(9, 8, 7, 6, 5, 4, 3, 2, 1, 11), speculation=SpeculationParams(0)),
        dict(prompt_token_ids=tuple(range(60, 81)), sampling=sampled),
        dict(prompt_token_ids=(100, 5, 77, 31)),
    ]
    tops: list[int | None] = [2, None, 0, 4, None]

    async def run_all(scored: bool):
        async def one(i: int):
            extra = {} if not scored or tops[i] is None else {"prompt_logprobs": tops[i]}
            return await collect(engine, max_new_tokens=10 + i, **requests[i], **extra)
        return await asyncio.gather(*(one(i) for i in range(len(requests))))

    try:
        scored = await run_all(True)
        plain = await run_all(False)
    finally:
        engine.close()
    for i, (chunks, unscored) in enumerate(zip(scored, plain, strict=True)):
        assert ids_of(chunks) == ids_of(unscored), i
        assert all(chunk.prompt_logprobs is None for chunk in unscored)
        top = tops[i]
        if top is None:
            assert all(chunk.prompt_logprobs is None for chunk in chunks)
        else:
            assert_prompts_own(pair, requests[i]["prompt_token_ids"], chunks, top=top)
