"""The speculative step on tiny random models in float32: exactness, rollback, sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from decoding.params import SamplingParams
from decoding.runner import ModelRunner
from decoding.speculative import SequenceState, speculative_step

VOCAB = 96


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def target() -> Qwen2ForCausalLM:
    return tiny_model(0)


def reference_greedy(model: Qwen2ForCausalLM, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy tokens, by full forward passes with no cache at all."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


GREEDY = SamplingParams()


def run(target, draft, prompt, n, gamma, sampling=GREEDY, seed=0):
    target_runner, draft_runner = ModelRunner(target), ModelRunner(draft)
    state = SequenceState(
        tokens=list(prompt),
        target=target_runner.new_sequence(),
        draft=draft_runner.new_sequence(),
        sampling=sampling,
        generator=torch.Generator().manual_seed(seed),
    )
    state.target.forward(prompt[:-1])
    state.draft.forward(prompt[:-1])
    results = []
    while len(state.tokens) - len(prompt) < n:
        results.append(speculative_step(state, gamma))
        # The invariant the step promises: the target caches everything but the last token.
        assert state.target.length == len(state.tokens) - 1
        assert state.draft.length <= len(state.tokens) - 1
    return state.tokens[len(prompt):][:n], results, state


PROMPT = [5, 17, 42, 8, 77, 3]


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("same_draft", [True, False])
def test_greedy_equals_the_targets_own_greedy(target, gamma: int, same_draft: bool) -> None:
    draft = target if same_draft else tiny_model(1)
    expected = reference_greedy(target, PROMPT, 40)
    tokens, results, _ = run(target, draft, PROMPT, 40, gamma)
    assert tokens == expected
    accepted = sum(r.num_accepted for r in results)
    drafted = sum(r.num_drafted for r in results)
    if same_draft:
        assert accepted == drafted  # a copy of the target agrees with every token
        assert all(len(r.emitted) == gamma + 1 for r in results)
    else:
        assert accepted / drafted < 0.5


def test_gamma_zero_is_plain_decoding_and_the_draft_catches_up(target) -> None:
    tokens_a, results, state = run(target, target, PROMPT, 5, 0)
    assert all(len(r.emitted) == 1 for r in results)
    assert state.draft.length == len(PROMPT) - 1  # never fed while γ was 0
    result = speculative_step(state, 3)  # catches up over several tokens in one forward
    assert result.num_accepted == 3
    assert tokens_a + result.emitted == reference_greedy(target, PROMPT, 9)


def test_after_a_rejection_the_next_logits_match_a_cache_free_pass(target) -> None:
    draft = tiny_model(2)
    _, results, state = run(target, draft, PROMPT, 12, 4)
    assert any(r.num_accepted < r.num_drafted for r in results)
    cached = state.target.forward(state.tokens[state.target.length:])[-1]
    with torch.inference_mode():
        fresh = target(torch.tensor([state.tokens])).logits[0, -1]
    torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_per_seed(target) -> None:
    draft = tiny_model(3)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    a, _, _ = run(target, draft, PROMPT, 20, 3, params, seed=7)
    b, _, _ = run(target, draft, PROMPT, 20, 3, params, seed=7)
    c, _, _ = run(target, draft, PROMPT, 20, 3, params, seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, top_k=8), SamplingParams(temperature=0.2, min_p=0.25)],
    ids=["top_k", "min_p"],
)
def test_speculative_sampling_matches_the_targets_next_token_distribution(
    target, params: SamplingParams
) -> None:
    """First emitted token over many seeds vs the target's own distribution under
    transformers' warpers (chi-square)."""
    from scipy.stats import chisquare
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    draft = tiny_model(4)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    with torch.inference_mode():
        logits = target(torch.tensor([PROMPT])).logits[0, -1:]
    expected = torch.softmax(warpers(torch.tensor([PROMPT]), logits), -1)[0]
    assert 1 < int((expected > 0).sum()) < VOCAB  # the warper drops some tokens, not all
    counts = torch.zeros(VOCAB)
    target_runner, draft_runner = ModelRunner(target), ModelRunner(draft)
    prefix_t, prefix_d = target_runner.new_sequence(), draft_runner.new_sequence()
    n = 3000
    for seed in range(n):
        state = SequenceState(list(PROMPT), prefix_t, prefix_d, params,
                              torch.Generator().manual_seed(seed))
        prefix_t.rollback(0)
        prefix_d.rollback(0)
        prefix_t.forward(PROMPT[:-1])
        prefix_d.forward(PROMPT[:-1])
        counts[speculative_step(state, 2).emitted[0]] += 1
    support = expected > 0
    assert counts[~support].sum() == 0  # no dropped token is ever sampled
    _, p_value = chisquare(counts[support].numpy(), (expected[support] * n).numpy())
    assert p_value > 0.01
