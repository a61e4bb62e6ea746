"""Bearer-token authentication (placeholder until the hardening work lands: no auth)."""

from __future__ import annotations

import grpc

from service.settings import Settings


def auth_interceptor(settings: Settings) -> grpc.aio.ServerInterceptor | None:
    return None
