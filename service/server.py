"""Build, start and drain the grpc.aio server: GenerationService, health, reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from decoding.engine import Engine
from decoding.errors import ShuttingDownError
from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from service.auth import auth_interceptor
from service.servicer import CallObserver, GenerationServicer
from service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
FLUSH_SECONDS = 1.0  # after the grace period: time for the final statuses to reach clients
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    engine: Engine
    servicer: GenerationServicer

    async def _wait_idle(self, timeout: float) -> None:
        """Until the engine has nothing to do and every call has ended (a stream the engine
        has finished may still be on its way to a slow reader), or ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            stats = self.engine.stats()
            if not (stats.running or stats.waiting or stats.preparing
                    or self.servicer.calls_in_flight):
                return
            await asyncio.sleep(0.02)

    async def shutdown(self, grace: float) -> None:
        """Drain: NOT_SERVING first (health keeps answering it), refuse new calls with
        UNAVAILABLE, give calls in flight ``grace`` seconds (until their last message is
        written), end what is left with UNAVAILABLE, then stop the server and the engine."""
        await self.health.enter_graceful_shutdown()
        self.engine.stop_accepting()
        await self._wait_idle(grace)
        self.engine.abort_all(ShuttingDownError("the server shut down before this call finished"))
        # The aborted calls end at their next step; then their statuses need a moment to go out.
        await self._wait_idle(FLUSH_SECONDS)
        await self.server.stop(FLUSH_SECONDS / 4)
        await asyncio.to_thread(self.engine.close)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


async def start_server(
    settings: Settings,
    engine: Engine,
    *,
    observer: CallObserver | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    # Authentication runs first, so nothing (tracing included) sees an unauthenticated call;
    # the observer counts the refused generation calls.
    auth = auth_interceptor(
        settings, on_refused=None if observer is None else _counting_refusals(observer)
    )
    server = grpc.aio.server(
        interceptors=[*([auth] if auth else []), *interceptors],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    servicer = GenerationServicer(engine, observer, keep_output=settings.log_content)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = grpc_address(settings.host, settings.port)
    credentials = server_credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    # The engine measured its costs on both models before we got here: it is warmed up.
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    engine.on_fatal.append(_not_serving_on_fatal(health_servicer))
    log.info("serving", extra={"port": port, "tls": credentials is not None})
    return RunningServer(server, port, health_servicer, engine, servicer)


def _counting_refusals(observer: CallObserver) -> Callable[[str], None]:
    """Tells ``observer`` of each refused Generate/GenerateStream call (the calls whose
    handler would have counted them), by short method name, as the servicer names them."""
    prefix = f"/{SERVICE_NAME}/"
    counted = {"Generate", "GenerateStream"}

    def refused(method: str) -> None:
        name = method.removeprefix(prefix)
        if method.startswith(prefix) and name in counted:
            observer.call_refused(name, grpc.StatusCode.UNAUTHENTICATED)

    return refused


def grpc_address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it: an IPv6 address (``::``, ``::1``) in brackets."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def _not_serving_on_fatal(
    health_servicer: health.aio.HealthServicer,
) -> Callable[[BaseException], None]:
    """An Engine.on_fatal callback (run on the worker thread): health turns NOT_SERVING at
    once when the device worker dies, whoever runs the server."""
    loop = asyncio.get_running_loop()

    def on_fatal(err: BaseException) -> None:
        coroutine = health_servicer.enter_graceful_shutdown()
        try:
            asyncio.run_coroutine_threadsafe(coroutine, loop)
        except RuntimeError:  # the loop is closed: nothing is served any more anyway
            coroutine.close()

    return on_fatal


async def serve_until_signalled(running: RunningServer, settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after draining) or the device worker dies (exit 1)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fatal: list[BaseException] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_fatal(err: BaseException) -> None:
        fatal.append(err)
        loop.call_soon_threadsafe(stop.set)

    running.engine.on_fatal.append(on_fatal)
    if running.engine.failed is not None:  # it died before we were listening
        on_fatal(running.engine.failed)
    await stop.wait()
    if fatal:
        log.critical("device worker died; exiting so that the orchestrator restarts us")
        await running.health.enter_graceful_shutdown()
        await running.server.stop(0)
        return 1
    log.info("draining", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await running.shutdown(settings.shutdown_grace_seconds)
    if fatal:  # it died during the drain
        log.critical("device worker died while draining")
        return 1
    return 0
