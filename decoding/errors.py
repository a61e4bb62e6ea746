"""Domain errors. ``service/errors.py`` maps each class to one gRPC status code."""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(TandemError):
    """The request cannot be served as written. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OverloadedError(TandemError):
    """Admission refused now; the caller may retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeviceOutOfMemoryError(TandemError):
    """The device ran out of memory while serving one request; that request alone fails."""


class DeadlineExceededError(TandemError):
    """The request's deadline passed before it finished."""


class ShuttingDownError(TandemError):
    """The engine is draining or stopped and accepts no new work."""


class EngineFailedError(TandemError):
    """The device worker died; the process should exit so that it is restarted."""


class ModelLoadError(TandemError):
    """A model could not be fetched, verified or loaded, or the pair does not match."""
