"""A real grpc.aio server on port 0 over an engine on tiny models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from decoding.engine import Engine
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from service.server import RunningServer, start_server
from service.settings import Settings
from service.telemetry import Telemetry
from tests.conftest import make_engine


@dataclass
class Served:
    running: RunningServer
    channel: grpc.aio.Channel
    stub: pb_grpc.GenerationServiceStub
    engine: Engine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"


async def serve(
    engine: Engine, *, telemetry: Telemetry | None = None, **settings: object
) -> Served:
    config = Settings(**{"port": 0, "metrics_port": 0, "tracing": "none", **settings})  # type: ignore[arg-type]
    interceptors = telemetry.interceptors if telemetry else ()
    running = await start_server(config, engine, observer=telemetry, interceptors=interceptors)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Served(running, channel, pb_grpc.GenerationServiceStub(channel), engine)


@pytest.fixture
async def served(same_pair) -> AsyncIterator[Served]:
    engine = make_engine(same_pair, max_new_tokens_limit=100, default_max_new_tokens=16)
    s = await serve(engine)
    yield s
    await s.channel.close()
    await s.running.shutdown(grace=0)
