"""Log-probabilities of the output tokens: the target's own, whatever the draft proposed, on
every step path (one request or a batch, speculative or plain steps, grouped or not)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from decoding.logprobs import logprob_rows, unpack
from decoding.params import FinishReason, SamplingParams, SpeculationParams
from tests.conftest import make_engine
from tests.decoding.test_engine import PROMPT_IDS, collect, ids_of, reference_greedy

ATOL = 1e-4


def reference_logprobs(pair, prompt, output) -> torch.Tensor:
    """The target's log-softmax at each output position, from one cache-free forward over
    the prompt and the output: [len(output), vocab]."""
    with torch.inference_mode():
        logits = pair.target.model(torch.tensor([[*prompt, *output]])).logits[0].float()
    start = len(prompt) - 1
    return torch.log_softmax(logits, dim=-1)[start : start + len(output)]


def assert_targets_own(pair, prompt, chunks, top: int) -> None:
    """Every chunk has one log-probability per token, and each is the target's own."""
    for chunk in chunks:
        assert chunk.logprobs is not None
        assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
    output = ids_of(chunks)
    reference = reference_logprobs(pair, prompt, output)
    logprobs = [lp for chunk in chunks for lp in chunk.logprobs]
    assert len(logprobs) == len(output) > 0
    for k, (given, token) in enumerate(zip(logprobs, output, strict=True)):
        assert given.logprob == pytest.approx(reference[k, token].item(), abs=ATOL)
        values, ids = reference[k].topk(top)
        assert [i for i, _ in given.top] == ids.tolist()
        assert [v for _, v in given.top] == pytest.approx(values.tolist(), abs=ATOL)


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("gamma", [None, 0, 3])
@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_logprobs_are_the_targets_own(request, pair_name: str, gamma, fast_path) -> None:
    pair = dataclasses.replace(request.getfixturevalue(pair_name), eos_token_ids=())
    # γ = 0 with decode_steps 4: plain steps in groups, scored one forward at a time.
    engine = make_engine(pair, fast_path=fast_path, decode_steps=4 if gamma == 0 else 1)
    try:
        chunks = await collect(
            engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=30,
            speculation=SpeculationParams(gamma), logprobs=True, top_logprobs=3,
        )
        plain = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=30,
                              speculation=SpeculationParams(gamma))
    finally:
        engine.close()
    assert ids_of(chunks) == ids_of(plain) == reference_greedy(pair, PROMPT_IDS, 30)
    assert all(chunk.logprobs is None for chunk in plain)
    assert_targets_own(pair, PROMPT_IDS, chunks, top=3)
    if gamma == 0 or (gamma and pair_name == "same_pair"):  # groups of plain steps, or runs
        assert max(len(chunk.token_ids) for chunk in chunks) > 1
    for logprob in (lp for chunk in chunks for lp in chunk.logprobs):
        assert logprob.top[0] == (logprob.token_id, logprob.logprob)  # greedy: the argmax


async def test_logprobs_in_a_mixed_batch_change_no_token(different_pair) -> None:
    """Greedy and seeded sampled requests, with and without log-probabilities, different
    numbers of alternatives and γ, stepping together: each gets its own target's numbers,
    and asking for them changes no token (no random number is drawn for them)."""
    pair = dataclasses.replace(different_pair, eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=6, decode_steps=4)
    assert engine.batched
    sampled = SamplingParams(temperature=0.9, top_k=40, seed=11)
    requests = [
        dict(prompt_token_ids=PROMPT_IDS, speculation=SpeculationParams(2)),
        dict(prompt_token_ids=(7, 8, 9), speculation=SpeculationParams(0)),
        dict(prompt_token_ids=tuple(range(20, 41)), sampling=sampled,
             speculation=SpeculationParams(3)),
        dict(prompt_token_ids=(300, 12, 5), sampling=sampled, speculation=SpeculationParams(0)),
        dict(prompt_token_ids=(50, 60), speculation=SpeculationParams(None)),
    ]
    tops = [2, 0, 5, 1, 4]

    async def run_all(with_logprobs: bool):
        async def one(i: int):
            extra = dict(logprobs=True, top_logprobs=tops[i]) if with_logprobs else {}
            return await collect(engine, max_new_tokens=20 + i, **requests[i], **extra)
        return await asyncio.gather(*(one(i) for i in range(len(requests))))

    try:
        scored = await run_all(True)
        unscored = await run_all(False)
    finally:
        engine.close()
    for i, (chunks, plain) in enumerate(zip(scored, unscored, strict=True)):
        assert ids_of(chunks) == ids_of(plain)
        assert_targets_own(pair, requests[i]["prompt_token_ids"], chunks, top=tops[i])
        assert all(chunk.logprobs is None for chunk in plain)


async def test_logprobs_end_where_the_output_does(same_pair) -> None:
    """EOS inside an accepted run: the tokens after it are cut, and so are their numbers."""
    free_run = reference_greedy(dataclasses.replace(same_pair, eos_token_ids=()), PROMPT_IDS, 20)
    pair = dataclasses.replace(same_pair, eos_token_ids=(free_run[4],))
    engine = make_engine(pair, fast_path="on")
    try:
        chunks = await collect(engine, prompt_token_ids=PROMPT_IDS, max_new_tokens=20,
                               speculation=SpeculationParams(6), logprobs=True)
    finally:
        engine.close()
    assert chunks[-1].finish_reason == FinishReason.EOS
    assert ids_of(chunks) == free_run[: free_run.index(free_run[4]) + 1]
    assert_targets_own(pair, PROMPT_IDS, chunks, top=0)


def test_logprob_rows_pack_and_unpack() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    rows = logprob_rows(logits, torch.tensor([1, 0]), top=2).tolist()
    expected = torch.log_softmax(logits, dim=-1)
    first, second = unpack(rows, [1, 0], top=1, packed_top=2)
    assert first.token_id == 1 and first.logprob == pytest.approx(expected[0, 1].item())
    assert first.top == ((3, pytest.approx(expected[0, 3].item())),)
    assert second.top == ((0, pytest.approx(expected[1, 0].item())),)
    assert unpack(logprob_rows(logits, torch.tensor([2, 2]), 0).tolist(), [2, 2], 0)[1].top == ()
