"""One table from domain errors to gRPC status codes.

Anything not in the table is a bug: the caller gets INTERNAL with the request id and nothing
else (no exception text, path or prompt); the full error goes to the server's log.
"""

from __future__ import annotations

import datetime
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from decoding.errors import (
    DeadlineExceededError,
    DeviceOutOfMemoryError,
    EngineFailedError,
    InvalidRequestError,
    OverloadedError,
    ShuttingDownError,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeviceOutOfMemoryError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDownError: grpc.StatusCode.UNAVAILABLE,
    EngineFailedError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(err: BaseException, request_id: str) -> grpc.Status:
    """The status a caller sees for ``err``."""
    code = next((c for kind, c in STATUS_OF.items() if isinstance(err, kind)), None)
    if code is None:
        log.error("internal error", exc_info=err, extra={"request_id": request_id})
        return rpc_status.to_status(
            status_pb2.Status(
                code=grpc.StatusCode.INTERNAL.value[0],
                message=f"internal error (request_id={request_id})",
            )
        )
    status = status_pb2.Status(code=code.value[0], message=str(err))
    if isinstance(err, InvalidRequestError):
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=err.field, description=err.message
                )
            ]
        )
        status.details.append(_pack(detail))
    if isinstance(err, OverloadedError):
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=err.retry_after_s))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
