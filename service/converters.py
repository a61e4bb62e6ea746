"""Protobuf <-> decoding-layer objects. No validation beyond what building them implies."""

from __future__ import annotations

import time
import uuid

from decoding.errors import InvalidRequestError
from decoding.params import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    SpeculationParams,
    TokenLogprob,
    Usage,
)
from service._proto.tandem.v1 import generation_pb2 as pb

AnyGenerateRequest = pb.GenerateRequest | pb.GenerateStreamRequest

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}


MAX_REQUEST_ID_LENGTH = 128


def request_id_of(message: AnyGenerateRequest) -> str:
    """The id this call goes by in trailers, logs and traces: the client's, or a new one when
    it sent none or one that :func:`to_request` refuses (so that refusal carries an id too)."""
    if valid_request_id(message.request_id):
        return message.request_id
    return uuid.uuid4().hex


def valid_request_id(request_id: str) -> bool:
    """Whether ``request_id`` may travel as gRPC metadata (printable ASCII) and in logs."""
    return 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH and all(
        " " <= c <= "~" for c in request_id
    )


def to_request(
    message: AnyGenerateRequest, request_id: str, time_remaining: float | None
) -> GenerationRequest:
    """Build the engine's request, with ``request_id`` (see :func:`request_id_of`). Raises
    InvalidRequestError for values out of range, the client's own request_id included."""
    if message.request_id and not valid_request_id(message.request_id):
        raise InvalidRequestError(
            "request_id",
            f"must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters",
        )
    sampling = message.sampling
    # An empty repeated field is indistinguishable from an unset one on the wire.
    return GenerationRequest(
        request_id=request_id,
        prompt=message.prompt if message.HasField("prompt") else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in message.messages) or None,
        prompt_token_ids=tuple(message.prompt_token_ids) or None,
        sampling=SamplingParams(
            temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k if sampling.HasField("top_k") else 0,
            min_p=sampling.min_p if sampling.HasField("min_p") else 0.0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            repetition_penalty=(
                sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0
            ),
            frequency_penalty=(
                sampling.frequency_penalty if sampling.HasField("frequency_penalty") else 0.0
            ),
            presence_penalty=(
                sampling.presence_penalty if sampling.HasField("presence_penalty") else 0.0
            ),
            logit_bias=tuple(sorted(sampling.logit_bias.items())),
        ),
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else None,
        stop=tuple(message.stop),
        speculation=SpeculationParams(
            num_speculative_tokens=(
                message.speculation.num_speculative_tokens
                if message.speculation.HasField("num_speculative_tokens")
                else None
            )
        ),
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        min_new_tokens=message.min_new_tokens,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
        prompt_logprobs=(
            message.prompt_logprobs if message.HasField("prompt_logprobs") else None
        ),
        include_stop_str_in_output=message.include_stop_str_in_output,
        priority=message.priority,
        truncate_prompt_tokens=(
            message.truncate_prompt_tokens if message.HasField("truncate_prompt_tokens")
            else None
        ),
    )


def to_tokenize_request(message: pb.TokenizeRequest, request_id: str) -> GenerationRequest:
    """The input of a Tokenize call as a request whose input the engine can tokenize. Raises
    InvalidRequestError unless exactly one of its two inputs is set (the engine's own message
    names a third, prompt_token_ids, that Tokenize does not have)."""
    given = [name for name, present in (("prompt", message.HasField("prompt")),
                                        ("messages", bool(message.messages))) if present]
    if len(given) != 1:
        raise InvalidRequestError(
            "input", f"exactly one of prompt, messages must be set, got {given}")
    return GenerationRequest(
        request_id=request_id,
        prompt=message.prompt if message.HasField("prompt") else None,
        messages=tuple(ChatMessage(m.role, m.content) for m in message.messages) or None,
    )


def to_usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        draft_tokens=usage.draft_tokens,
        accepted_draft_tokens=usage.accepted_draft_tokens,
        target_forward_passes=usage.target_forward_passes,
        acceptance_rate=usage.acceptance_rate,
        mean_accepted_length=usage.mean_accepted_length,
        accepted_by_position=usage.accepted_by_position,
        drafted_by_position=usage.drafted_by_position,
    )


def to_logprobs(logprobs: tuple[TokenLogprob, ...] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[pb.TopLogprob(token_id=i, logprob=v) for i, v in lp.top],
        )
        for lp in logprobs or ()
    ]


def to_stream_response(request_id: str, chunk: Chunk) -> pb.GenerateStreamResponse:
    response = pb.GenerateStreamResponse(
        request_id=request_id, text=chunk.text, token_ids=chunk.token_ids,
        logprobs=to_logprobs(chunk.logprobs),
        prompt_logprobs=to_logprobs(chunk.prompt_logprobs),
    )
    if chunk.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[chunk.finish_reason]
    if chunk.usage is not None:
        response.usage.CopyFrom(to_usage(chunk.usage))
    return response


def to_response(request_id: str, chunks: list[Chunk]) -> pb.GenerateResponse:
    last = chunks[-1]
    response = pb.GenerateResponse(
        request_id=request_id,
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=[lp for c in chunks for lp in to_logprobs(c.logprobs)],
        prompt_logprobs=[lp for c in chunks for lp in to_logprobs(c.prompt_logprobs)],
    )
    if last.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[last.finish_reason]
    if last.usage is not None:
        response.usage.CopyFrom(to_usage(last.usage))
    return response
