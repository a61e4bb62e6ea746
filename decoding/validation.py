"""Every check a request passes before the engine takes it, in one place.

Sampling values are checked when :class:`decoding.params.SamplingParams` is built; the rest
needs the model pair's limits and is checked here. Each error names the API field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decoding.errors import InvalidRequestError
from decoding.params import GenerationRequest

CHAT_ROLES = frozenset({"system", "user", "assistant"})

MAX_STOP_TOKEN_IDS = 64
"""The most stop_token_ids one request may give."""

MAX_TOP_LOGPROBS = 20
"""The most alternatives a request may ask for at each position (OpenAI's and vLLM's default
limit)."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context_window: int
    max_speculative_tokens: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_stop_strings: int
    max_stop_string_length: int = 256


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def prompt_ids_of(request: GenerationRequest, tokenizer: Any, limits: Limits) -> tuple[int, ...]:
    """The token ids ``request``'s input becomes (its prompt encoded, its messages rendered
    with the chat template and encoded, or its ids), truncated as it asks: what the models are
    fed. Checks the input alone; raises InvalidRequestError."""
    given = _inputs_given(request)
    if len(given) != 1:
        raise InvalidRequestError(
            "input", f"exactly one of prompt, messages, prompt_token_ids must be set, got {given}"
        )
    prompt_ids = _prompt_ids(request, tokenizer, limits)
    keep = request.truncate_prompt_tokens
    if keep is not None:
        if not 1 <= keep < limits.context_window:
            raise InvalidRequestError(
                "truncate_prompt_tokens",
                f"must be in [1, {limits.context_window - 1}] (the context window less one "
                f"token to generate), got {keep}",
            )
        prompt_ids = prompt_ids[-keep:]
    return prompt_ids


def prepare(request: GenerationRequest, tokenizer: Any, limits: Limits) -> PreparedRequest:
    """Validate ``request`` and turn its input into token ids. Raises InvalidRequestError."""
    prompt_ids = prompt_ids_of(request, tokenizer, limits)

    for token, _ in request.sampling.logit_bias:
        if token >= limits.vocab_size:
            raise InvalidRequestError(
                f"sampling.logit_bias[{token}]",
                f"{token} is outside the vocabulary [0, {limits.vocab_size})",
            )
    _check_stop(request.stop, limits, tokenizer)
    _check_stop_token_ids(request.stop_token_ids, limits)
    _check_logprobs(request)
    gamma = request.speculation.num_speculative_tokens
    if gamma is not None and not 0 <= gamma <= limits.max_speculative_tokens:
        raise InvalidRequestError(
            "speculation.num_speculative_tokens",
            f"must be in [0, {limits.max_speculative_tokens}], got {gamma}",
        )

    room = limits.context_window - len(prompt_ids)
    if room < 1:
        raise InvalidRequestError(
            input_field(request),
            f"prompt has {len(prompt_ids)} tokens; the context window is "
            f"{limits.context_window}, leaving no room to generate",
        )
    max_new = request.max_new_tokens
    if max_new is None:
        # The default counts from after min_new_tokens, up to the server's limit and the room
        # in the context, so that the output may still end by itself after them (vLLM's
        # max_tokens unset is the whole room).
        _check_min_new_tokens(request.min_new_tokens, min(limits.max_new_tokens_limit, room),
                              "max_new_tokens unset: the server's limit, or the room in the "
                              "context")
        max_new = min(limits.default_max_new_tokens + request.min_new_tokens,
                      limits.max_new_tokens_limit, room)
        return PreparedRequest(prompt_ids, max_new)
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidRequestError(
            "max_new_tokens", f"must be in [1, {limits.max_new_tokens_limit}], got {max_new}"
        )
    if max_new > room:
        raise InvalidRequestError(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
            f"context window of {limits.context_window}",
        )
    _check_min_new_tokens(request.min_new_tokens, max_new, "max_new_tokens")
    return PreparedRequest(prompt_ids, max_new)


def _check_min_new_tokens(min_new: int, max_new: int, bound: str) -> None:
    if not 0 <= min_new <= max_new:
        raise InvalidRequestError(
            "min_new_tokens", f"must be in [0, {max_new}] ({bound}), got {min_new}"
        )


def _inputs_given(request: GenerationRequest) -> list[str]:
    return [name for name in ("prompt", "messages", "prompt_token_ids")
            if getattr(request, name) is not None]


def input_field(request: GenerationRequest) -> str:
    """The name of the field that holds a prepared request's input (an error about the
    prompt's length names it)."""
    [name] = _inputs_given(request)
    return name


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A plain prompt's ids as ``tokenizer(text)``, vLLM and TGI make them: with the
    tokenizer's own special tokens (a Llama BOS; Qwen's add none). A chat template writes them
    into its text, and so may a client that renders one itself: text that starts with the BOS
    gets no second one."""
    bos: str | None = getattr(tokenizer, "bos_token", None)
    own_bos = bos is not None and bos != "" and text.startswith(bos)
    return list(tokenizer.encode(text, add_special_tokens=not own_bos))


def _prompt_ids(request: GenerationRequest, tokenizer: Any, limits: Limits) -> tuple[int, ...]:
    if request.prompt is not None:
        if not request.prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        encoded = encode_prompt(tokenizer, request.prompt)
        if not encoded:
            raise InvalidRequestError("prompt", "encodes to no tokens")
        return tuple(encoded)
    if request.messages is not None:
        if not request.messages:
            raise InvalidRequestError("messages", "must hold at least one message")
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequestError(
                    f"messages[{i}].role",
                    f"must be one of {sorted(CHAT_ROLES)}, got {_shown(message.role)}",
                )
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as err:  # a template may reject an order of roles
            raise InvalidRequestError("messages", "the chat template rejected them") from err
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    ids = request.prompt_token_ids or ()
    if not ids:
        raise InvalidRequestError("prompt_token_ids", "must not be empty")
    for i, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequestError(
                f"prompt_token_ids[{i}]",
                f"{token} is outside the vocabulary [0, {limits.vocab_size})",
            )
    return tuple(ids)


def _check_stop(stop: tuple[str, ...], limits: Limits, tokenizer: Any) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(
            "stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop)}"
        )
    special = special_tokens(tokenizer) if stop else {}
    for i, text in enumerate(stop):
        if not text:
            raise InvalidRequestError(f"stop[{i}]", "must not be empty")
        if len(text) > limits.max_stop_string_length:
            raise InvalidRequestError(
                f"stop[{i}]", f"longer than {limits.max_stop_string_length} characters"
            )
        if text in special:  # it would be accepted and never match
            raise InvalidRequestError(
                f"stop[{i}]",
                f"{text!r} is special token {special[text]}, which the output text never holds "
                f"(special tokens are not detokenized); give {special[text]} in stop_token_ids",
            )


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The text of each token that the output text leaves out (decoded with
    ``skip_special_tokens``: the tokenizer's added tokens marked special), with its id."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {token.content: token_id for token_id, token in added.items()
               if getattr(token, "special", False)}
    for text in getattr(tokenizer, "all_special_tokens", ()):
        special.setdefault(text, tokenizer.convert_tokens_to_ids(text))
    return special


def _check_logprobs(request: GenerationRequest) -> None:
    top = request.top_logprobs
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}"
        )
    if top and not request.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs to be true")
    prompt_top = request.prompt_logprobs
    if prompt_top is not None and not 0 <= prompt_top <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            "prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {prompt_top}"
        )


def _check_stop_token_ids(ids: tuple[int, ...], limits: Limits) -> None:
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequestError(
            "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}"
        )
    for i, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequestError(
                f"stop_token_ids[{i}]",
                f"{token} is outside the vocabulary [0, {limits.vocab_size})",
            )


SHOWN_CHARACTERS = 32


def _shown(text: str) -> str:
    """A client's string as an error message shows it: at most :data:`SHOWN_CHARACTERS` of it
    (an error's text goes back in the call's trailers, which gRPC limits to 16 KiB, and into
    its span)."""
    if len(text) <= SHOWN_CHARACTERS:
        return repr(text)
    return f"{text[:SHOWN_CHARACTERS]!r}… ({len(text)} characters)"

