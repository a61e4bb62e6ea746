"""service.errors.status_for: RetryInfo carries the error's delay; BadRequest the bare message."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from decoding.errors import InvalidRequestError, OverloadedError
from service.errors import status_for


def details(status: grpc.Status) -> status_pb2.Status:
    [(_, value)] = [m for m in status.trailing_metadata if m[0] == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def test_retry_info_carries_retry_after() -> None:
    status = status_for(OverloadedError("busy", retry_after_s=2.5), "r")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_details_pb2.RetryInfo()
    assert details(status).details[0].Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == 2.5


def test_field_violation_description_is_the_message_without_the_field() -> None:
    status = status_for(InvalidRequestError("stop[0]", "must not be empty"), "r")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "stop[0]: must not be empty"
    violation = error_details_pb2.BadRequest()
    assert details(status).details[0].Unpack(violation)
    assert violation.field_violations[0].field == "stop[0]"
    assert violation.field_violations[0].description == "must not be empty"
