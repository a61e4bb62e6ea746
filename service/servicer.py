"""GenerationService: convert the request, call the engine, convert the chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from decoding.engine import Engine
from decoding.handle import RequestHandle
from decoding.params import Chunk, FinishReason, GenerationRequest
from decoding.validation import MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS
from service import converters
from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from service.errors import status_for


@dataclass
class CallRecord:
    """What one Generate/GenerateStream call did, for telemetry (times: time.time_ns())."""

    method: str
    request_id: str
    start_ns: int
    request: GenerationRequest | None = None
    handle: RequestHandle | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    first_token_ns: int = 0
    end_ns: int = 0
    finish_reason: FinishReason | None = None
    error: BaseException | None = field(default=None, repr=False)
    output: list[str] = field(default_factory=list, repr=False)  # text deltas, if kept


class CallObserver(Protocol):
    def call_started(self, record: CallRecord) -> None: ...
    def call_finished(self, record: CallRecord) -> None: ...

    def call_refused(self, method: str, code: grpc.StatusCode) -> None:
        """A Generate/GenerateStream call (``method``: the short name) that an interceptor
        refused before its handler ran, so no :class:`CallRecord` was ever made."""


class _NoObserver:
    def call_started(self, record: CallRecord) -> None:
        pass

    def call_finished(self, record: CallRecord) -> None:
        pass

    def call_refused(self, method: str, code: grpc.StatusCode) -> None:
        pass


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(
        self, engine: Engine, observer: CallObserver | None = None, keep_output: bool = False
    ) -> None:
        """``keep_output``: keep each call's text in its record (``--log-content``)."""
        self._engine = engine
        self._observer = observer or _NoObserver()
        self._keep_output = keep_output
        # Generate and GenerateStream handlers running: a drain waits for them, not only for
        # the engine, which is done with a stream before a slow reader has received it.
        self.calls_in_flight = 0

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        record = CallRecord("Generate", converters.request_id_of(request), time.time_ns())
        self.calls_in_flight += 1
        try:
            async with aclosing(self._chunks(request, context, record)) as stream:
                chunks = [chunk async for chunk in stream]
            return converters.to_response(record.request_id, chunks)
        finally:
            self.calls_in_flight -= 1

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        record = CallRecord("GenerateStream", converters.request_id_of(request), time.time_ns())
        self.calls_in_flight += 1
        try:
            # aclosing: a cancelled stream must close the engine's side at once, not at GC
            # time.
            async with aclosing(self._chunks(request, context, record)) as stream:
                async for chunk in stream:
                    yield converters.to_stream_response(record.request_id, chunk)
        finally:  # after the last message was written (or the call ended otherwise)
            self.calls_in_flight -= 1

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        info, config = self._engine.info, self._engine.info.config
        return pb.GetModelInfoResponse(
            target_model=info.target_model,
            draft_model=info.draft_model,
            vocab_size=info.vocab_size,
            context_window=info.context_window,
            device=info.device,
            dtype=info.dtype,
            draft_dtype=info.draft_dtype,
            default_num_speculative_tokens=config.num_speculative_tokens or 0,
            adaptive_speculation=config.num_speculative_tokens is None,
            max_num_speculative_tokens=config.max_speculative_tokens,
            max_new_tokens_limit=config.max_new_tokens_limit,
            max_stop_strings=config.max_stop_strings,
            max_concurrent_requests=config.max_concurrent_requests,
            max_queue=config.max_queue,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            max_stop_token_ids=MAX_STOP_TOKEN_IDS,
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        request_id = uuid.uuid4().hex  # for the log line of an internal error, and the trailer
        context.set_trailing_metadata((("x-request-id", request_id),))
        failed: grpc.Status | None = None
        try:
            ids = await self._engine.tokenize_async(
                converters.to_tokenize_request(request, request_id))
        except Exception as err:
            failed = status_for(err, request_id)
        if failed is not None:  # aborted outside the except block, as in _chunks
            await context.abort(failed.code, failed.details, (
                *failed.trailing_metadata, ("x-request-id", request_id)))
        return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                   context_window=self._engine.info.context_window)

    async def _chunks(
        self,
        message: converters.AnyGenerateRequest,
        context: grpc.aio.ServicerContext,
        record: CallRecord,
    ) -> AsyncGenerator[Chunk, None]:
        """The engine's chunks for one call; errors become the mapped status, and the
        request's caches are freed however the call ends."""
        self._observer.call_started(record)
        request_id_metadata = (("x-request-id", record.request_id),)
        context.set_trailing_metadata(request_id_metadata)
        failed: grpc.Status | None = None
        try:
            record.request = converters.to_request(
                message, record.request_id, context.time_remaining()
            )
            record.handle = await self._engine.submit_async(record.request)
            async for chunk in record.handle:
                if not record.first_token_ns and chunk.token_ids:
                    record.first_token_ns = time.time_ns()
                record.finish_reason = chunk.finish_reason or record.finish_reason
                if self._keep_output:
                    record.output.append(chunk.text)
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            # gRPC cancels the handler when the client cancels or its deadline passes, and
            # closes a stream's generator (GeneratorExit at the yield) when the client goes.
            record.code = _ended_early_code(context)
            raise
        except Exception as err:
            record.error = err
            failed = status_for(err, record.request_id)
            record.code = failed.code
        finally:
            if record.handle is not None:
                await record.handle.aclose()
            record.end_ns = time.time_ns()
            self._observer.call_finished(record)
        if failed is not None:
            # Aborted outside the except block: gRPC's AbortError would otherwise carry the
            # error as its context, and the gRPC instrumentation records the whole chain
            # (the error's text, file paths) as an exception event on the server span.
            metadata = (*failed.trailing_metadata, *request_id_metadata)
            await context.abort(failed.code, failed.details, metadata)


DEADLINE_SLACK_S = 0.05
"""A call cancelled this close to its deadline ended at it. The server's copy of a deadline
runs out a little after the client's (it starts when the call arrives), so a client whose own
timer fires first cancels the call with a millisecond or two left here: the caller saw
DEADLINE_EXCEEDED, and so must the server's spans, metrics and logs."""


def _ended_early_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED for a call whose deadline has passed (or all but,
    :data:`DEADLINE_SLACK_S`), else CANCELLED."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
