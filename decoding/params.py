"""Plain request and result objects shared by the engine and the service layer.

Field names follow the public API (``sampling.temperature``, ``max_new_tokens``...) so that a
validation error can name the field the caller wrote.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from decoding.errors import InvalidRequestError

MAX_TEMPERATURE = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_ADDITIVE_PENALTY = 2.0  # frequency and presence penalties, as OpenAI's API and vLLM bound them
MAX_LOGIT_BIAS = 100.0  # each bias, as OpenAI's API bounds it (vLLM clamps to it)
MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` means greedy; the rest is then unused."""

    temperature: float = 0.0
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 keeps the whole vocabulary
    # Tokens less likely than min_p times the most likely one are dropped, after top-k and
    # top-p (Hugging Face's order); 0 keeps them all.
    min_p: float = 0.0
    seed: int | None = None  # None: the engine draws one, so the request is still self-contained
    # Penalties on tokens already in the sequence, applied to the logits before temperature
    # (greedy included), as vLLM and Hugging Face apply them (see decoding.penalties):
    repetition_penalty: float = 1.0  # a logit of a prompt or output token: > 0 divided, else times
    frequency_penalty: float = 0.0  # subtracted once per time a token is in the output
    presence_penalty: float = 0.0  # subtracted once from a token that is in the output
    # (token id, bias) pairs added to those tokens' logits, before the penalties, as vLLM
    # adds them; the ids are checked against the vocabulary when the request is prepared.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature):
            raise InvalidRequestError("sampling.temperature", "must be a number, got NaN")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                "sampling.temperature", f"must be in [0, {MAX_TEMPERATURE}], got {self.temperature}"
            )
        if math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if not isinstance(self.min_p, (int, float)) or math.isnan(self.min_p) or not (
            0.0 <= self.min_p <= 1.0
        ):
            raise InvalidRequestError("sampling.min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequestError("sampling.seed", "must fit in an unsigned 64-bit integer")
        for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not isinstance(getattr(self, name), (int, float)):
                raise InvalidRequestError(f"sampling.{name}", "must be a number")
        rp = self.repetition_penalty
        if math.isnan(rp) or not 0.0 < rp <= MAX_REPETITION_PENALTY:
            raise InvalidRequestError(
                "sampling.repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}], got {rp}"
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if math.isnan(value) or not -MAX_ADDITIVE_PENALTY <= value <= MAX_ADDITIVE_PENALTY:
                raise InvalidRequestError(
                    f"sampling.{name}",
                    f"must be in [-{MAX_ADDITIVE_PENALTY}, {MAX_ADDITIVE_PENALTY}], got {value}",
                )
        self._check_logit_bias()

    def _check_logit_bias(self) -> None:
        if isinstance(self.logit_bias, dict):  # {id: bias} from Python: kept as sorted pairs
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError(
                "sampling.logit_bias",
                f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}",
            )
        ids: set[int] = set()
        for token, bias in self.logit_bias:
            field_name = f"sampling.logit_bias[{token}]"
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError("sampling.logit_bias",
                                          f"token ids must be integers >= 0, got {token!r}")
            if token in ids:
                raise InvalidRequestError(field_name, "given more than once")
            ids.add(token)
            if not isinstance(bias, (int, float)) or math.isnan(bias) or not (
                -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS
            ):
                raise InvalidRequestError(
                    field_name, f"must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias}"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any penalty or bias changes the logits."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0 or bool(self.logit_bias))


@dataclass(frozen=True)
class SpeculationParams:
    """``num_speculative_tokens`` is γ: None lets the engine adapt it, 0 turns speculation off."""

    num_speculative_tokens: int | None = None


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context window
    STOP = "stop"  # a stop string or one of the request's stop_token_ids
    EOS = "eos"  # an end-of-sequence token


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of ``prompt``, ``messages``, ``prompt_token_ids`` is set."""

    request_id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None  # None: the engine's default
    stop: tuple[str, ...] = ()
    speculation: SpeculationParams = field(default_factory=SpeculationParams)
    deadline: float | None = None  # time.monotonic() after which the request is abandoned
    stop_token_ids: tuple[int, ...] = ()  # ids that end generation (kept in the output)
    ignore_eos: bool = False  # go on past the model's EOS tokens (to max_new_tokens or a stop)
    logprobs: bool = False  # return the target's log-probability of every output token
    top_logprobs: int = 0  # and of this many most likely tokens at each position (needs logprobs)
    # The target's log-probability of every prompt token after the first, with this many most
    # likely tokens at each of their positions (vLLM's prompt_logprobs); None: none.
    prompt_logprobs: int | None = None
    # The output ends at the earliest at the token after this many: no EOS (unless ignored),
    # none of stop_token_ids, no stop string before (vLLM's min_tokens, transformers'
    # min_new_tokens).
    min_new_tokens: int = 0
    # The stop string that ended the output is kept at the end of its text (vLLM's
    # include_stop_str_in_output); by default the text ends before it.
    include_stop_str_in_output: bool = False
    # Keep only the last this many prompt tokens (vLLM's truncate_prompt_tokens, TGI's
    # truncate), after the chat template; None keeps them all.
    truncate_prompt_tokens: int | None = None
    # Waiters start lowest value first, in arrival order within one value (vLLM's priority);
    # a running request is never preempted for another.
    priority: int = 0

    def __post_init__(self) -> None:
        # Checked here, not in decoding.validation: admission compares it with the waiters'
        # before the request is prepared, and a value that does not compare broke that for
        # every request after it.
        priority = self.priority
        if not isinstance(priority, int) or isinstance(priority, bool) or not (
            -(2**31) <= priority < 2**31
        ):
            raise InvalidRequestError(
                "priority", f"must be an integer in [{-(2**31)}, {2**31 - 1}], got {priority!r}"
            )


@dataclass
class Usage:
    """Token and speculation counts of one request (see decoding.speculative for the terms)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    target_forward_passes: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        passes = self.target_forward_passes
        return self.completion_tokens / passes if passes else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability under the target model, from its raw logits (before
    the penalties, temperature, top-k, top-p and min-p), and the ``top`` most likely tokens
    at its position with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """What one speculative step emitted: its token ids and text delta.

    The last chunk of a request carries ``finish_reason`` and ``usage``; it may hold no tokens.
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when requested
    # One per prompt token after the first, on a request's first chunk only, when requested.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
