"""Logits processing and the acceptance rule of speculative decoding.

The rejection sampler follows Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding" (arXiv 2211.17192, Algorithm 1), and Chen et al. 2023, "Accelerating Large
Language Model Decoding with Speculative Sampling" (arXiv 2302.01318). Temperature, top-k, top-p
and min-p are applied to the draft's and the target's logits alike *before* the rule, so the
output follows the target's processed distribution exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from decoding.params import SamplingParams
from decoding.transfer import to_device


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits [n, vocab] into probabilities [n, vocab] (float32) under ``params``.

    Order as in Hugging Face's processors: temperature, then top-k, then top-p, then min-p.
    (vLLM applies min-p before top-k and top-p, by reading its sampler: top-p then measures
    the mass of what min-p kept, renormalised, so the two orders may keep different sets.)
    With temperature 0 the result is one-hot on the argmax, which makes greedy a special case
    of the rejection rule (used only by tests; the engine takes the cheaper greedy path).
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # Shift first (softmax does not care): a tiny temperature then sends every other logit to
    # -inf instead of overflowing the largest one to inf, which made softmax NaN.
    # A temperature below float32's smallest normal number (possible from Python, not from
    # the float32 proto field) would become 0 on the device, and 0 / 0 NaN: it samples like
    # greedy either way.
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep a token while the mass *before* it is below top_p: the smallest set whose mass
        # reaches top_p, and never an empty one.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.min_p > 0.0:
        # Relative to the most likely token, which is always kept (min_p <= 1); renormalising
        # after top-k and top-p changes no ratio, so the threshold is theirs too.
        drop = probs < params.min_p * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of ``probs`` [n, vocab] -> [n], drawn from the request's generator.

    By the exponential race: argmax(p / q) with q ~ Exp(1) per entry is an exact sample of p.
    That is how ``torch.multinomial`` draws one sample, so this takes the same numbers from
    the generator and returns the same token; it only skips that function's checks of its
    input (a few kernels, and a host sync on some builds). Probabilities come from
    :func:`processed_probs`, so they are finite, non-negative and sum to one.
    """
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """:func:`sample` of row k of ``probs`` [R, vocab] from ``generators[k]``, each drawing what
    it would alone, in row order: R fills of the noise, then one division and one argmax."""
    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row : row + 1].exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


@dataclass(frozen=True)
class Acceptance:
    num_accepted: int  # accepted tokens: the prefix of the draft tokens the target agreed with
    bonus_token: int  # the token the target chose itself after that prefix


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Acceptance:
    """Greedy acceptance; see :func:`accept_sampled` for the terms.

    draft_tokens: [γ] ids the draft proposed. target_logits: [γ+1, vocab], row i scores the
    token after the prefix extended by the first i draft tokens. A draft token is accepted while
    it equals the target's argmax; the bonus token is the target's argmax after the accepted
    prefix, so the result is exactly the target's own greedy continuation.
    """
    return greedy_acceptance(draft_tokens.tolist(), target_logits.argmax(-1).tolist())


def greedy_acceptance(draft_tokens: list[int], target_tokens: list[int]) -> Acceptance:
    """:func:`accept_greedy` on host lists: the draft's γ ids and the target's γ+1 argmax ids."""
    for position, drafted in enumerate(draft_tokens):
        if drafted != target_tokens[position]:
            return Acceptance(position, target_tokens[position])
    gamma = len(draft_tokens)
    return Acceptance(gamma, target_tokens[gamma])


def accept_sampled(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Acceptance:
    """The rejection rule. Terms used throughout Tandem:

    - γ (``num_speculative_tokens``): how many tokens the draft proposes in one step.
    - draft tokens: the γ tokens the draft proposed, each sampled from ``draft_probs``.
    - accepted tokens: the longest prefix of the draft tokens that survives the rule below.
    - bonus token: the one token the target chooses itself after the accepted prefix: the
      correction after a rejection, or one extra token when all γ were accepted. A step thus
      emits between 1 and γ+1 tokens.
    - acceptance rate α = accepted / drafted; mean accepted length = tokens emitted per target
      forward pass.

    draft_tokens: [γ]; draft_probs: [γ, vocab], the draft's processed distribution at each
    draft position; target_probs: [γ+1, vocab], the target's processed distribution at the same
    positions plus one. Draft token x at position i is accepted with probability
    min(1, target_probs[i, x] / draft_probs[i, x]). On the first rejection the bonus token is
    drawn from norm(max(0, target_probs[i] - draft_probs[i])); if all are accepted it is drawn
    from target_probs[γ]. The emitted tokens then follow the target's distribution exactly.
    """
    gamma = draft_tokens.shape[0]
    chosen = draft_tokens[:, None]
    target_p = target_probs[:gamma].gather(-1, chosen).squeeze(-1)  # [γ]
    draft_p = draft_probs.gather(-1, chosen).squeeze(-1)  # [γ]
    uniform = torch.rand(gamma, generator=generator, device=draft_tokens.device)
    # u < p/q written as u*q < p: no division, and q == 0 (impossible for a sampled token) rejects.
    rejected = (uniform * draft_p >= target_p).tolist()  # one host sync
    if True not in rejected:
        return Acceptance(gamma, int(sample(target_probs[gamma : gamma + 1], generator)[0]))
    num_accepted = rejected.index(True)
    residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min(0.0)
    total = residual.sum()
    # The residual is zero only if the two distributions are equal, where nothing is rejected;
    # guard against float round-off anyway by falling back to the target's distribution
    # (chosen on the device: no host sync for the test).
    recovered = torch.where(total > 0, residual / total, target_probs[num_accepted])
    return Acceptance(num_accepted, int(sample(recovered[None], generator)[0]))


def accept_sampled_rows(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    gammas: Sequence[int],
    generators: Sequence[torch.Generator],
) -> list[Acceptance]:
    """:func:`accept_sampled` for many requests at once (γ = 0 included: then the bonus token
    is a plain sample from the target), each with its own generator.

    Request k has ``gammas[k]`` draft tokens; every argument holds the requests' rows end to
    end, in order: draft_tokens [Σγ], draft_probs [Σγ, vocab], target_probs [Σ(γ+1), vocab].
    Each request gets exactly what :func:`accept_sampled` gives it alone: the same numbers
    from its generator in the same order (its γ uniforms, then its bonus token's draw) and
    the same arithmetic on its rows; only the uniforms' test (one host sync for all) and the
    bonus draws (:func:`sample_rows`) are shared.
    """
    device = target_probs.device
    drafted = list(accumulate(gammas, initial=0))
    scored = list(accumulate((gamma + 1 for gamma in gammas), initial=0))
    rejected: list[bool] = []
    if drafted[-1]:
        uniform = torch.empty(drafted[-1], device=device)  # as torch.rand(γ) per request
        for k, generator in enumerate(generators):
            if gammas[k]:
                uniform[drafted[k] : drafted[k + 1]].uniform_(generator=generator)
        rows = [scored[k] + j for k, gamma in enumerate(gammas) for j in range(gamma)]
        target_p = target_probs[to_device(rows, device), draft_tokens]  # [Σγ]
        draft_p = draft_probs.gather(-1, draft_tokens[:, None]).squeeze(-1)  # [Σγ]
        rejected = (uniform * draft_p >= target_p).tolist()
    accepted: list[int] = []
    bonus_probs: list[torch.Tensor] = []  # each request's bonus distribution, [1, vocab]
    for k, gamma in enumerate(gammas):
        flags = rejected[drafted[k] : drafted[k + 1]]
        num_accepted = flags.index(True) if True in flags else gamma
        accepted.append(num_accepted)
        row = scored[k] + num_accepted
        if num_accepted == gamma:
            bonus_probs.append(target_probs[row : row + 1])
            continue
        # As accept_sampled, on this request's rows alone.
        target_row = target_probs[row]
        residual = (target_row - draft_probs[drafted[k] + num_accepted]).clamp_min(0.0)
        total = residual.sum()
        bonus_probs.append(torch.where(total > 0, residual / total, target_row)[None])
    bonus = sample_rows(torch.cat(bonus_probs), generators).tolist()
    return [Acceptance(n, token) for n, token in zip(accepted, bonus, strict=True)]
