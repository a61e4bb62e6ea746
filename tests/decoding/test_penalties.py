"""Repetition, frequency and presence penalties: the rule itself, greedy output against
transformers' and against a loop that penalizes token by token, and the sampled output's
distribution through speculative steps (one request and batched)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from decoding.batched import plain_steps_batch, speculative_step_batch
from decoding.errors import InvalidRequestError
from decoding.params import GenerationRequest, SamplingParams, SpeculationParams
from decoding.penalties import PenalizedRows, Penalties, penalize
from decoding.sampling import processed_probs, sample
from decoding.speculative import SequenceState, plain_steps, speculative_step
from tests.conftest import make_engine

PENALTIES = {
    "repetition": SamplingParams(repetition_penalty=1.8),
    "frequency": SamplingParams(frequency_penalty=0.9),
    "presence": SamplingParams(presence_penalty=1.1),
    "bias": SamplingParams(logit_bias=((1, 0.7), (4, -1.5), (8, 2.5))),
    "all": SamplingParams(repetition_penalty=1.3, frequency_penalty=0.6, presence_penalty=-0.4,
                          logit_bias=((2, 0.4), (7, -0.9), (12, 1.5))),
}


def penalized_by_loop(
    logits: list[float], history: list[int], prompt_length: int, params: SamplingParams
) -> list[float]:
    """One position's logits penalized token by token, as the rules are written: the bias,
    then repetition, frequency and presence."""
    out = list(logits)
    for token, bias in params.logit_bias:
        if token < len(out):
            out[token] += bias
    output = Counter(history[prompt_length:])
    seen = set(history)
    for token in range(len(out)):
        if token in seen and params.repetition_penalty != 1.0:
            rp = params.repetition_penalty
            out[token] = out[token] / rp if out[token] > 0 else out[token] * rp
        out[token] -= params.frequency_penalty * output[token]
        out[token] -= params.presence_penalty * (output[token] > 0)
    return out


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("form", ["host", "tensor", "tensors"])
def test_each_row_is_penalized_for_the_tokens_before_it(name: str, form: str) -> None:
    params = PENALTIES[name]
    vocab = 9
    tokens = [3, 1, 3, 7, 2, 2, 3]  # a prompt of 3, then 4 output tokens
    drafted = [5, 2, 4, 12]  # 12 is outside this vocabulary: it counts for nothing
    penalties = Penalties(params, prompt_length=3)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    given = {"host": drafted, "tensor": torch.tensor(drafted),
             "tensors": [torch.tensor([t]) for t in drafted]}[form]
    out = penalties.apply(logits, tokens, given)
    assert torch.equal(logits, before)  # the raw logits stay (log-probabilities read them)
    # 3 rows after 4 drafted tokens: the last follows all 4, the first 2 of them.
    for row in range(3):
        history = tokens + [t for t in drafted[: 2 + row] if t < vocab]
        expected = penalized_by_loop(logits[row].tolist(), history, 3, params)
        torch.testing.assert_close(out[row], torch.tensor(expected), rtol=0, atol=1e-6)


def test_each_part_of_a_batch_gets_its_own_penalties() -> None:
    """Several requests' rows in one ``penalize``, each with one kind of penalty (so that one
    read from the first request's settings for all shows), a ban without penalties, drafted
    tokens in each form, and a row of no request left as it was."""
    vocab = 9
    logits = torch.randn(11, vocab, generator=torch.Generator().manual_seed(2))
    kinds = [PENALTIES["bias"], SamplingParams(presence_penalty=1.1),
             SamplingParams(frequency_penalty=0.9), SamplingParams(repetition_penalty=1.8)]
    tokens = [[3, 1, 3, 7, 2], [5, 5, 1, 1, 1], [0, 4, 4, 6, 0], [8, 2, 1, 1, 4]]
    drafted: list = [[6], torch.tensor([1, 4]), [torch.tensor([0]), torch.tensor([6])], None]
    spans = [(0, 2), (2, 5), (5, 7), (8, 9)]  # row 7 and 9-10 belong to no one
    parts = [PenalizedRows(Penalties(params, 2), toks, given, *span)
             for params, toks, given, span in zip(kinds, tokens, drafted, spans, strict=True)]
    ban = Penalties(SamplingParams(), 2, banned=(3, 5), min_output=3)
    parts.append(PenalizedRows(ban, [1, 2, 7], [0, 6], 9, 11))  # 1 output token, 2 drafted
    out = penalize(logits, parts)
    for params, toks, given, (start, stop) in zip(kinds, tokens, drafted, spans, strict=True):
        history = [int(t) for t in (given if given is not None else [])]
        for j in range(stop - start):
            before = len(history) - (stop - start - 1) + j
            expected = penalized_by_loop(logits[start + j].tolist(), toks + history[:before],
                                         2, params)
            torch.testing.assert_close(out[start + j], torch.tensor(expected), rtol=0,
                                       atol=1e-6)
    assert torch.equal(out[7], logits[7])
    # 2 output tokens before row 9 (under min_output 3: banned), 3 before row 10 (free).
    assert out[9, [3, 5]].tolist() == [float("-inf")] * 2
    keep = [t for t in range(vocab) if t not in (3, 5)]
    assert torch.equal(out[9, keep], logits[9, keep])
    assert torch.equal(out[10], logits[10])


def test_counts_follow_the_tokens_as_they_grow() -> None:
    params = PENALTIES["all"]
    penalties = Penalties(params, prompt_length=2)
    tokens = [4, 4]
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    for token in [1, 6, 1, 4, 0]:
        out = penalties.apply(logits, tokens)
        expected = penalized_by_loop(logits[0].tolist(), tokens, 2, params)
        torch.testing.assert_close(out[0], torch.tensor(expected), rtol=0, atol=1e-6)
        tokens.append(token)
    del tokens[4:]  # a failed step's tokens taken back
    out = penalties.apply(logits, tokens)
    expected = penalized_by_loop(logits[0].tolist(), tokens, 2, params)
    torch.testing.assert_close(out[0], torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("penalty", [1e-40, 1e-50])
def test_a_repetition_penalty_near_zero_ties_the_seen_positive_logits(penalty: float) -> None:
    """Divided by a subnormal (or by a float32 0), positive logits overflowed to inf and the
    probabilities were NaN; their limit is a tie among them."""
    params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
    logits = torch.tensor([[0.5, 2.0, -1.0, 0.3, 1.0]])
    out = Penalties(params, 2).apply(logits, [1, 3, 2])  # 1 and 3 seen positive, 2 negative
    assert torch.isfinite(out).all()
    probs = processed_probs(out, params)
    assert probs[0].tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]


def test_rows_need_the_tokens_between_them() -> None:
    with pytest.raises(ValueError, match="3 rows need at least 2"):
        Penalties(PENALTIES["all"], 1).apply(torch.zeros(3, 4), [1, 2], [1])
    assert Penalties.of(SamplingParams(), 3) is None  # nothing to do: no state kept


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"repetition_penalty": 10.5}, "sampling.repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "sampling.repetition_penalty"),
        ({"frequency_penalty": -2.1}, "sampling.frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "sampling.frequency_penalty"),
        ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
        ({"repetition_penalty": None}, "sampling.repetition_penalty"),
        ({"frequency_penalty": "1"}, "sampling.frequency_penalty"),
        ({"presence_penalty": None}, "sampling.presence_penalty"),
        ({"logit_bias": ((3, 100.5),)}, "sampling.logit_bias[3]"),
        ({"logit_bias": ((3, float("nan")),)}, "sampling.logit_bias[3]"),
        ({"logit_bias": ((3, 1.0), (3, 2.0))}, "sampling.logit_bias[3]"),
        ({"logit_bias": ((-1, 1.0),)}, "sampling.logit_bias"),
        ({"logit_bias": tuple((i, 1.0) for i in range(1025))}, "sampling.logit_bias"),
    ],
)
def test_invalid_penalties_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    for edge in ({"repetition_penalty": 10.0}, {"frequency_penalty": -2.0},
                 {"presence_penalty": 2.0}, {"logit_bias": ((0, -100.0), (9, 100.0))},
                 {"logit_bias": tuple((i, 1.0) for i in range(1024))}):
        assert SamplingParams(**edge).penalized  # the bounds themselves are taken
    # From Python, a dict as well: kept as sorted pairs.
    assert SamplingParams(logit_bias={5: 1.0, 2: -3.0}).logit_bias == ((2, -3.0), (5, 1.0))


@pytest.mark.parametrize("mode", ["plain", "plain_batch", "speculative", "speculative_batch"])
def test_ending_tokens_are_banned_before_min_new_tokens(mode: str) -> None:
    """Token 0 (the argmax everywhere) banned for the first 3 output tokens, 1 already emitted:
    greedy then says 1, 1 and then 0 for good; γ = 4 with the target's copy as the draft keeps
    every draft token (the draft is banned alike, position by position)."""
    states = [_state(torch.Generator(), REPEATING, REPEATING, SamplingParams())
              for _ in range(2)]
    for state in states:
        state.tokens.append(1)  # one output token already
        state.target.length += 1
        state.draft.length += 1
        state.penalties = Penalties.of(state.sampling, len(PROMPT), banned=(0, 9),
                                       min_output=3)
    results = _step(mode, states, 4)
    assert results[0].emitted == [1, 1, 0, 0]
    for result in results:
        assert result.emitted == [1, 1, 0, 0][: len(result.emitted)]
        assert result.num_accepted == result.num_drafted


def test_a_ban_that_has_ended_leaves_the_logits_alone() -> None:
    """min_new_tokens 2 without penalties: needed for 0 and 1 output tokens, not after (every
    forward would otherwise copy and gather the logits for nothing)."""
    state = _state(torch.Generator(), REPEATING, REPEATING, SamplingParams())
    state.penalties = Penalties.of(SamplingParams(), len(PROMPT), banned=(0,), min_output=2)
    logits = REPEATING.clone()
    assert state.scored(logits)[0, 0] == float("-inf")
    state.tokens.append(1)
    assert state.scored(logits)[0, 0] == float("-inf")
    state.tokens.append(1)
    assert state.scored(logits) is logits


def test_rows_without_a_repetition_penalty_keep_their_infinities() -> None:
    """A row's logits do not depend on its batch mates: the clamp that a repetition penalty
    near 0 needs is for rows that have one."""
    logits = torch.tensor([[float("-inf"), 1.0, 2.0, float("inf")],
                           [float("-inf"), 1.0, 2.0, 0.5]])
    tokens = [0, 3, 1]
    parts = [PenalizedRows(Penalties(SamplingParams(frequency_penalty=0.5), 2), tokens, None,
                           0, 1),
             PenalizedRows(Penalties(SamplingParams(repetition_penalty=1.3), 2), tokens, None,
                           1, 2)]
    out = penalize(logits, parts)
    assert out[0].tolist() == [float("-inf"), 0.5, 2.0, float("inf")]


def test_no_ban_without_ending_tokens() -> None:
    assert Penalties.of(SamplingParams(), 3, banned=(), min_output=5) is None
    assert Penalties.of(SamplingParams(), 3, banned=(2,), min_output=0) is None


# ---- greedy on tiny models, through the engine ---------------------------------------------

PROMPT_IDS = (10, 57, 203, 99, 14, 250, 31, 57, 57)


def greedy_by_loop(pair, prompt: tuple[int, ...], n: int, params: SamplingParams) -> list[int]:
    """The target's own greedy tokens under ``params``' penalties: full forwards with no cache,
    each position penalized by :func:`penalized_by_loop`."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = pair.target.model(torch.tensor([tokens])).logits[0, -1].float()
            scores = penalized_by_loop(logits.tolist(), tokens, len(prompt), params)
            tokens.append(max(range(len(scores)), key=scores.__getitem__))
    return tokens[len(prompt):]


async def _generate(engine, prompt, n, sampling, gamma, request_id="r", usage=None):
    handle = engine.submit(GenerationRequest(
        request_id=request_id, prompt_token_ids=prompt, max_new_tokens=n, sampling=sampling,
        speculation=SpeculationParams(gamma)))
    tokens = [t async for chunk in handle for t in chunk.token_ids]
    if usage is not None:
        usage.append(handle.usage)
    return tokens


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("gamma", [0, 3])
@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_greedy_with_a_repetition_penalty_is_transformers_generate(
    request, pair_name: str, fast_path: str, gamma: int
) -> None:
    """Steps with γ = 0 go three at a time (plain steps, each fed the last one's token)."""
    pair = dataclasses.replace(request.getfixturevalue(pair_name), eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, decode_steps=3)
    usage: list = []
    try:
        output = await _generate(engine, PROMPT_IDS, 24, PENALTIES["repetition"], gamma,
                                 usage=usage)
    finally:
        engine.close()
    if pair_name == "same_pair" and gamma:
        # A copy of the target as the draft, penalized alike (for the tokens it drafted before
        # each position too), proposes exactly what the target keeps.
        assert usage[0].accepted_draft_tokens == usage[0].draft_tokens > 0
    with torch.inference_mode():
        expected = pair.target.model.generate(
            torch.tensor([PROMPT_IDS]), max_new_tokens=24, do_sample=False, eos_token_id=None,
            pad_token_id=0, repetition_penalty=1.8,
        )[0, len(PROMPT_IDS):].tolist()
    assert output == expected
    assert len(set(output)) > 6  # the penalty is felt: unpenalized, this model repeats


@pytest.mark.parametrize("fast_path", ["on", "off"])
async def test_a_logit_bias_steers_greedy_output(request, fast_path: str) -> None:
    """+100 on one token makes it every token; -100 on each of the target's own first two
    tokens takes them out (greedy, γ = 3, the target's copy drafting: biased alike, it keeps
    proposing what the target keeps)."""
    pair = dataclasses.replace(request.getfixturevalue("same_pair"), eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, max_concurrent_requests=2)
    plain = greedy_by_loop(pair, PROMPT_IDS, 10, SamplingParams())
    steer = SamplingParams(logit_bias=((57, 100.0),))
    avoid = SamplingParams(logit_bias=((plain[0], -100.0), (plain[1], -100.0)))
    usage: list = []
    try:
        outputs = await asyncio.gather(*(
            _generate(engine, PROMPT_IDS, 10, params, 3, f"r{k}", usage)
            for k, params in enumerate((steer, avoid))))
    finally:
        engine.close()
    assert outputs[0] == [57] * 10
    assert outputs[1] == greedy_by_loop(pair, PROMPT_IDS, 10, avoid)
    assert not {plain[0], plain[1]} & set(outputs[1])
    assert all(u.accepted_draft_tokens == u.draft_tokens > 0 for u in usage)


@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_a_mixed_batch_with_penalties_is_exact_for_every_request(
    request, pair_name: str
) -> None:
    """Rows with different penalties (and one with none) share batched steps, each row's
    tokens the target's own greedy tokens under its own penalties."""
    pair = dataclasses.replace(request.getfixturevalue(pair_name), eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=4)
    assert engine.batched
    settings = [PENALTIES["all"], SamplingParams(), PENALTIES["frequency"],
                PENALTIES["presence"]]
    prompts = [PROMPT_IDS, (7, 8, 9, 7), tuple(range(20, 41)), (300, 12, 5, 77, 41)]
    gammas = [2, 4, None, 0]

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.01 * i)
        return await _generate(engine, prompts[i], 20, settings[i], gammas[i], f"r{i}")

    try:
        outputs = await asyncio.gather(*(one(i) for i in range(4)))
    finally:
        engine.close()
    for prompt, params, output in zip(prompts, settings, outputs, strict=True):
        assert output == greedy_by_loop(pair, prompt, 20, params)


async def test_plain_steps_of_a_batch_with_penalties_are_exact(request) -> None:
    """γ = 0 for every row: groups of batched plain steps, each row penalized for the tokens
    the group chose before it."""
    pair = dataclasses.replace(request.getfixturevalue("different_pair"), eos_token_ids=())
    engine = make_engine(pair, fast_path="on", max_concurrent_requests=3, decode_steps=4)
    assert engine.batched
    settings = [PENALTIES["all"], PENALTIES["frequency"], PENALTIES["presence"]]
    prompts = [PROMPT_IDS, (7, 8, 9, 7), (300, 12, 5, 77, 41)]
    try:
        outputs = await asyncio.gather(*(
            _generate(engine, prompts[i], 17, settings[i], 0, f"r{i}") for i in range(3)))
    finally:
        engine.close()
    for prompt, params, output in zip(prompts, settings, outputs, strict=True):
        assert output == greedy_by_loop(pair, prompt, 17, params)


# ---- sampled: the distribution, on hand-made models -----------------------------------------

VOCAB = 5
PROMPT = [0, 3]
# Logits by position only (context-free models): the penalties alone make a position's
# distribution depend on the tokens before it.
TARGET_TABLE = torch.log(torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.10],
                                       [0.10, 0.35, 0.05, 0.30, 0.20],
                                       [0.20, 0.20, 0.20, 0.20, 0.20]]))
DRAFT_TABLE = torch.log(torch.tensor([[0.10, 0.40, 0.10, 0.20, 0.20],
                                      [0.30, 0.10, 0.30, 0.10, 0.20],
                                      [0.20, 0.20, 0.20, 0.20, 0.20]]))
SAMPLED = SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.7,
                         presence_penalty=0.4)


class _TableSequence:
    """A cache that holds only its length: the logits at position p are row p - len(PROMPT)
    + 1 of a table (clamped to its last row)."""

    device = torch.device("cpu")

    def __init__(self, table: torch.Tensor) -> None:
        self.table, self.length = table, len(PROMPT) - 1

    def forward(self, tokens, num_logits: int = 1) -> torch.Tensor:
        fed = len(tokens)
        rows = [min(p - len(PROMPT) + 1, len(self.table) - 1)
                for p in range(self.length, self.length + fed)]
        self.length += fed
        return self.table[rows[-num_logits:]]

    def rollback(self, length: int) -> None:
        self.length = length


class _TableRunner:
    """:class:`decoding.batched.BatchRunner` over table sequences."""

    def forward_packed(self, sequences, tokens, num_logits, *, lengths=None, transient=False):
        rows = []
        for k, sequence in enumerate(sequences):
            fed = tokens[k] if lengths is None else tokens[k, : lengths[k]]
            rows.append(sequence.forward(fed, num_logits[k]))
        return torch.cat(rows)


def _state(generator: torch.Generator, target: torch.Tensor = TARGET_TABLE,
           draft: torch.Tensor = DRAFT_TABLE, sampling: SamplingParams = SAMPLED
           ) -> SequenceState:
    return SequenceState(
        tokens=list(PROMPT), target=_TableSequence(target),  # type: ignore[arg-type]
        draft=_TableSequence(draft), sampling=sampling,  # type: ignore[arg-type]
        generator=generator, penalties=Penalties.of(sampling, len(PROMPT)),
    )


def _step(mode: str, states: list[SequenceState], tokens: int) -> list:
    """One step that emits ``tokens`` tokens for the first state (where every draft token is
    kept): plain steps or γ = tokens - 1, of the first state alone or of all of them batched
    (the others at half that γ)."""
    runner = _TableRunner()
    if mode == "plain":
        return [plain_steps(states[0], tokens)]
    if mode == "plain_batch":
        return plain_steps_batch(states, tokens, runner)  # type: ignore[arg-type]
    if mode == "speculative":
        return [speculative_step(states[0], tokens - 1)]
    gammas = [tokens - 1] + [(tokens - 1) // 2] * (len(states) - 1)
    return speculative_step_batch(states, gammas, runner, runner)  # type: ignore[arg-type]


# The same logits at every position: greedy, a model that would say token 0 for ever.
REPEATING = torch.tensor([[2.0, 1.7, 1.1, 0.6, 0.2]])
FREQUENCY = SamplingParams(frequency_penalty=0.8)


@pytest.mark.parametrize("mode", ["plain", "plain_batch", "speculative", "speculative_batch"])
def test_each_token_of_a_step_is_penalized_for_the_ones_before_it(mode: str) -> None:
    """Greedy, five tokens in one step: plain steps (each fed the last one's token), or γ = 4
    with the target's copy as the draft (which then proposes all five, drafting each token
    penalized for the drafts before it). Batched beside a row with another prompt and other
    penalties, so that one row's history read for another's shows."""
    other = SamplingParams(repetition_penalty=3.0, frequency_penalty=0.8)
    states = [_state(torch.Generator(), REPEATING, REPEATING, params)
              for params in (FREQUENCY, other)]
    states[1].tokens[:] = [0, 1]
    for state in states:
        state.top_logprobs = 1  # returned from the raw logits, not the penalized ones
    results = _step(mode, states, 5)
    expected = []
    for prompt, params in (([0, 3], FREQUENCY), ([0, 1], other)):
        tokens = list(prompt)
        for _ in range(5):
            scores = penalized_by_loop(REPEATING[0].tolist(), tokens, len(prompt), params)
            tokens.append(max(range(VOCAB), key=scores.__getitem__))
        expected.append(tokens[len(prompt):])
    assert expected == [[0, 1, 0, 2, 1], [2, 0, 3, 1, 4]]
    assert len(results[0].emitted) == 5
    for result, tokens in zip(results, expected, strict=False):
        assert result.emitted == tokens[: len(result.emitted)]
        assert result.num_accepted == result.num_drafted  # every draft token kept
        raw = torch.log_softmax(REPEATING[0], -1)
        assert result.logprobs is not None
        for token, logprob in zip(result.emitted, result.logprobs, strict=True):
            assert logprob.logprob == pytest.approx(raw[token].item(), abs=1e-6)
            assert logprob.top[0] == (0, pytest.approx(raw[0].item(), abs=1e-6))


MIXED = [SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=1.2,
                        presence_penalty=0.5),
         FREQUENCY,
         SamplingParams(temperature=0.7, presence_penalty=1.5)]


def _drawn_by_loop(params: SamplingParams, seed: int, n: int) -> list[int]:
    """``n`` tokens chosen one by one from the penalized ``REPEATING`` logits, sampled ones
    drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = list(PROMPT)
    for _ in range(n):
        scores = torch.tensor([penalized_by_loop(REPEATING[0].tolist(), tokens, len(PROMPT),
                                                 params)])
        chosen = scores.argmax() if params.greedy else sample(
            processed_probs(scores, params), generator)[0]
        tokens.append(int(chosen))
    return tokens[len(PROMPT):]


@pytest.mark.parametrize("mode", ["plain", "plain_batch", "step"])
def test_steps_without_drafts_choose_from_the_penalized_logits(mode: str) -> None:
    """γ = 0, sampled and greedy rows mixed: each row's tokens are exactly those drawn one by
    one from its penalized distribution with its own generator (plain steps alone or batched,
    or single steps of γ = 0)."""
    for seed in range(8):
        states = [_state(torch.Generator().manual_seed(seed + k), REPEATING, REPEATING, params)
                  for k, params in enumerate(MIXED)]
        if mode == "plain_batch":
            outputs = [r.emitted for r in plain_steps_batch(states, 6, _TableRunner())]  # type: ignore[arg-type]
        elif mode == "plain":
            outputs = [plain_steps(state, 6).emitted for state in states]
        else:
            for state in states:
                while len(state.tokens) < len(PROMPT) + 6:
                    speculative_step(state, 0)
            outputs = [state.tokens[len(PROMPT):] for state in states]
        assert outputs == [_drawn_by_loop(params, seed + k, 6)
                           for k, params in enumerate(MIXED)], seed


def _expected_pairs() -> torch.Tensor:
    """P(first two output tokens = a, b), from the target's penalized distributions."""
    def probs(row: int, history: list[int]) -> torch.Tensor:
        scores = penalized_by_loop(TARGET_TABLE[row].tolist(), history, len(PROMPT), SAMPLED)
        return torch.softmax(torch.tensor(scores), -1)

    first = probs(0, PROMPT)
    return torch.stack([first[a] * probs(1, [*PROMPT, a]) for a in range(VOCAB)])


@pytest.mark.parametrize("batched", [False, True])
def test_sampled_output_follows_the_targets_penalized_distribution(batched: bool) -> None:
    """The first two tokens of γ = 2 steps, jointly: the second's distribution depends on the
    first through the penalties, so a verify that penalized its second row without the draft
    token before it would show here (by 0.31 in total variation), as would one that did not
    penalize at all."""
    generator = torch.Generator().manual_seed(0)
    beside = torch.Generator().manual_seed(1)
    runner = _TableRunner()
    n = 5_000  # the least likely pair is then expected 6.4 times
    counts = torch.zeros(VOCAB, VOCAB)
    for _ in range(n):
        state = _state(generator)
        while len(state.tokens) < len(PROMPT) + 2:
            if batched:  # beside another penalized request
                other = _state(beside)
                speculative_step_batch([state, other], [2, 1], runner, runner)  # type: ignore[arg-type]
            else:
                speculative_step(state, 2)
        counts[state.tokens[len(PROMPT)], state.tokens[len(PROMPT) + 1]] += 1
    expected = _expected_pairs().flatten() * n
    _, p_value = chisquare(counts.flatten().numpy(), expected.numpy())
    assert p_value > 0.001, (p_value, counts)


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("gamma", [0, 3])
async def test_log_probabilities_stay_the_targets_raw_ones(
    request, fast_path: str, gamma: int
) -> None:
    """Penalties change the tokens, not the log-probabilities returned with them: those are
    the target's raw ones, as without penalties (two requests on one engine; γ = 0 in groups
    of plain steps). Each step path alone: the table-model test above."""
    from tests.decoding.test_logprobs import assert_targets_own

    pair = dataclasses.replace(request.getfixturevalue("same_pair"), eos_token_ids=())
    engine = make_engine(pair, fast_path=fast_path, max_concurrent_requests=2, decode_steps=3)
    prompts = [PROMPT_IDS, (7, 8, 9, 7)]

    async def one(prompt):
        return [c async for c in engine.submit(GenerationRequest(
            request_id="r", prompt_token_ids=prompt, max_new_tokens=20,
            sampling=PENALTIES["all"], speculation=SpeculationParams(gamma), logprobs=True,
            top_logprobs=2))]

    try:
        outputs = await asyncio.gather(*(one(prompt) for prompt in prompts))
    finally:
        engine.close()
    for prompt, chunks in zip(prompts, outputs, strict=True):
        assert [t for c in chunks for t in c.token_ids] == greedy_by_loop(
            pair, prompt, 20, PENALTIES["all"])
        assert_targets_own(pair, prompt, chunks, top=2)


@pytest.mark.parametrize("fast_path", ["on", "off"])
@pytest.mark.parametrize("gamma", [0, 3])
@pytest.mark.parametrize("ending", ["eos", "stop_token_ids"])
async def test_min_new_tokens_is_transformers_generate(
    request, fast_path: str, gamma: int, ending: str
) -> None:
    """The target's third greedy token made the end (an EOS id, or a stop_token_id): with
    min_new_tokens 10 it cannot come before the tenth token, as transformers'
    ``min_new_tokens`` has it; the output then ends where it next comes, or at the length."""
    base = request.getfixturevalue("same_pair")
    with torch.inference_mode():
        first = base.target.model.generate(
            torch.tensor([PROMPT_IDS]), max_new_tokens=3, do_sample=False, eos_token_id=None,
            pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    end = first[2]
    pair = dataclasses.replace(base, eos_token_ids=(end,) if ending == "eos" else ())
    engine = make_engine(pair, fast_path=fast_path, decode_steps=3)
    try:
        handle = engine.submit(GenerationRequest(
            request_id="r", prompt_token_ids=PROMPT_IDS, max_new_tokens=40, min_new_tokens=10,
            speculation=SpeculationParams(gamma),
            stop_token_ids=(end,) if ending == "stop_token_ids" else ()))
        chunks = [c async for c in handle]
    finally:
        engine.close()
    output = [t for c in chunks for t in c.token_ids]
    with torch.inference_mode():
        expected = pair.target.model.generate(
            torch.tensor([PROMPT_IDS]), max_new_tokens=40, do_sample=False, eos_token_id=end,
            pad_token_id=0, min_new_tokens=10)[0, len(PROMPT_IDS):].tolist()
    assert output == expected
    assert end not in output[:10] and len(output) >= 10
    if output[-1] == end:
        assert chunks[-1].finish_reason.name == ("EOS" if ending == "eos" else "STOP")


async def test_no_stop_string_ends_the_output_before_min_new_tokens(request) -> None:
    """A stop string that the first token's text holds ends a plain request there; with
    min_new_tokens 6 the output goes on (the target's own greedy tokens) to the length or a
    later match."""
    pair = dataclasses.replace(request.getfixturevalue("same_pair"), eos_token_ids=())
    engine = make_engine(pair)
    try:
        plain = [c async for c in engine.submit(GenerationRequest(
            request_id="a", prompt_token_ids=PROMPT_IDS, max_new_tokens=12))]
        ids = [t for c in plain for t in c.token_ids]
        stop = pair.tokenizer.decode(ids[:1]).strip()[:1]
        assert stop
        early = [c async for c in engine.submit(GenerationRequest(
            request_id="b", prompt_token_ids=PROMPT_IDS, max_new_tokens=12, stop=(stop,)))]
        late = [c async for c in engine.submit(GenerationRequest(
            request_id="c", prompt_token_ids=PROMPT_IDS, max_new_tokens=12, stop=(stop,),
            min_new_tokens=6))]
    finally:
        engine.close()
    assert len([t for c in early for t in c.token_ids]) == 1
    out = [t for c in late for t in c.token_ids]
    assert len(out) >= 6 and out == ids[: len(out)]


async def test_the_token_after_min_new_tokens_may_complete_a_stop_string(request) -> None:
    """A stop string first completed by the k-th token: with min_new_tokens k - 1 the output
    stops there, with k it does not: the earliest end is the token after the first
    min_new_tokens, as for EOS and stop_token_ids (and in vLLM's min_tokens)."""
    pair = dataclasses.replace(request.getfixturevalue("same_pair"), eos_token_ids=())
    engine = make_engine(pair)

    async def run(**fields) -> list:
        return [c async for c in engine.submit(GenerationRequest(
            request_id="r", prompt_token_ids=PROMPT_IDS, max_new_tokens=12, **fields))]

    try:
        ids = [t for c in await run() for t in c.token_ids]
        decode = pair.tokenizer.decode
        k, stop = next((k, decode(ids[k - 1 : k]).strip()) for k in range(3, 10)
                       if decode(ids[k - 1 : k]).strip()
                       and decode(ids[k - 1 : k]).strip() not in decode(ids[: k - 1]))
        at_k = await run(stop=(stop,), min_new_tokens=k - 1)
        after_k = await run(stop=(stop,), min_new_tokens=k)
    finally:
        engine.close()
    assert [t for c in at_k for t in c.token_ids] == ids[:k]
    assert at_k[-1].finish_reason.name == "STOP"
    assert len([t for c in after_k for t in c.token_ids]) > k


@pytest.mark.parametrize("ignore_eos", [False, True])
async def test_the_engine_gives_each_request_its_own_penalties(
    request, monkeypatch, ignore_eos: bool
) -> None:
    """What the stepper builds: the prompt's length (a token more or less would count the
    prompt's last token as output, or the first output token as prompt), the ending tokens
    banned (the EOS ids unless ignored, and the request's stop_token_ids) and min_new_tokens."""
    from tests.steps import before_steps

    pair = request.getfixturevalue("same_pair")
    seen: list[Penalties | None] = []
    before_steps(monkeypatch, lambda states: seen.extend(s.penalties for s in states))
    engine = make_engine(pair)
    try:
        handle = engine.submit(GenerationRequest(
            request_id="r", prompt_token_ids=PROMPT_IDS, max_new_tokens=4, min_new_tokens=2,
            sampling=PENALTIES["presence"], stop_token_ids=(5, 7), ignore_eos=ignore_eos))
        [c async for c in handle]
    finally:
        engine.close()
    penalties = seen[0]
    assert penalties is not None and all(p is penalties for p in seen)
    assert penalties.prompt_length == len(PROMPT_IDS)
    assert penalties.min_output == 2
    eos = () if ignore_eos else tuple(pair.eos_token_ids)
    assert penalties.banned == tuple(sorted({*eos, 5, 7}))
    assert penalties.params == PENALTIES["presence"]
