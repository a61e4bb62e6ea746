"""Bearer-token authentication: one interceptor that runs ahead of every other.

The token comes from ``settings.auth_token_file`` (the file's contents, stripped) or, when no
file is set, from the ``TANDEM_AUTH_TOKEN`` environment variable. With neither there is no
interceptor and no authentication (put the server behind mTLS or a private network then).

Clients send ``authorization: Bearer <token>`` metadata. A call without it, or with another
token, gets UNAUTHENTICATED before any handler (or any later interceptor) sees it, for unary
and streaming methods alike. Health checks may be exempted (``auth_exempt_health``, so that
kubelet probes need no secret); reflection is not. The token is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from service.settings import Settings

log = logging.getLogger(__name__)

TOKEN_ENV = "TANDEM_AUTH_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
_SCHEME = "bearer"


def load_token(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """The configured token, or None when authentication is off. An empty token file is a
    configuration error (it must not silently turn authentication off)."""
    env = os.environ if env is None else env
    if settings.auth_token_file:
        token = Path(settings.auth_token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError("the auth token file is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    return token or None


def auth_interceptor(
    settings: Settings,
    env: Mapping[str, str] | None = None,
    on_refused: Callable[[str], None] | None = None,
) -> grpc.aio.ServerInterceptor | None:
    """``on_refused(method)``: told the full method name of each call refused."""
    token = load_token(settings, env)
    if token is None:
        return None
    return BearerTokenInterceptor(
        token, exempt_health=settings.auth_exempt_health, on_refused=on_refused
    )


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the presented token's length too.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _denial(details: str, request_id: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call: UNAUTHENTICATED, with an ``x-request-id`` as every
    Generate response has (a new id, since the request is never read; the refusal's log line
    has it).
    A stream-stream handler fits every kind of call: on the wire the server cannot tell them
    apart, and it aborts before reading a message, so the request is never even deserialized."""

    async def deny(request_iterator: AsyncIterator[Any], context: Any) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, details, (("x-request-id", request_id),)
        )

    return grpc.stream_stream_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, token: str, *, exempt_health: bool,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._expected = _digest(token)
        self._exempt_health = exempt_health
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self._exempt_health and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        presented = self._presented(handler_call_details.invocation_metadata or ())
        if presented is None:
            return self._refuse(logging.INFO, "missing bearer token", method)
        if not hmac.compare_digest(_digest(presented), self._expected):
            return self._refuse(logging.WARNING, "invalid bearer token", method)
        return await continuation(handler_call_details)

    def _refuse(self, level: int, details: str, method: str) -> grpc.RpcMethodHandler:
        request_id = uuid.uuid4().hex
        log.log(level, "unauthenticated call refused: %s", details,
                extra={"method": method, "request_id": request_id})
        if self._on_refused is not None:
            try:
                self._on_refused(method)
            except Exception:  # counting it must not turn the refusal into UNKNOWN
                log.warning("counting a refused call failed", exc_info=True)
        return _denial(details, request_id)

    @staticmethod
    def _presented(metadata: Any) -> str | None:
        """The token of the first ``authorization`` entry, if it is a Bearer one."""
        for key, value in metadata:
            if key != "authorization":
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != _SCHEME or not credentials.strip():
                return None
            return credentials.strip()
        return None
