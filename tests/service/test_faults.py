"""Faults on a real server: a failure inside one request, the device out of memory, and the
device worker itself dying. Faults are injected by patching the engine's step for requests
that start with a marker, so the requests beside them run the real code."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import decoding.engine as engine_module
from service._proto.tandem.v1 import generation_pb2 as pb
from service.server import serve_until_signalled
from service.settings import Settings
from tests.conftest import make_engine
from tests.decoding.test_engine import wait_until_idle
from tests.service.conftest import Served, serve
from tests.steps import before_steps

PROMPT_IDS = [10, 57, 203, 99, 14, 250, 31]
SECRET_PROMPT = "zebra secret prompt"  # must never show up in a status message
FAULT_TEXT = "boom in /opt/secret/path/model.py"
TIMEOUT = 30.0
STEP_DELAY = 0.01  # keeps calls in flight long enough to overlap


async def reply(call):
    return await call


def greedy(n: int = 12, cls=pb.GenerateRequest, ids=PROMPT_IDS):
    request = cls(prompt_token_ids=ids, max_new_tokens=n)
    request.speculation.num_speculative_tokens = 2
    return request


def patch_step(monkeypatch, marker: list[int], exc: BaseException) -> None:
    """Slow every step a little; raise ``exc`` in requests whose prompt starts with ``marker``."""
    def hook(states):
        time.sleep(STEP_DELAY)
        if any(state.tokens[: len(marker)] == marker for state in states):
            raise exc

    before_steps(monkeypatch, hook)


async def started(served: Served, running: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while served.engine.stats().running < running:
        assert time.monotonic() < deadline, served.engine.stats()
        await asyncio.sleep(0.005)


async def health_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


async def collect_stream(call) -> list[int]:
    """Every token of a stream (read() style: works after an earlier read())."""
    tokens: list[int] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        tokens.extend(message.token_ids)
    return tokens


async def test_a_fault_in_one_request_fails_only_that_request(same_pair, monkeypatch) -> None:
    marker = list(same_pair.tokenizer.encode(SECRET_PROMPT, add_special_tokens=False))
    s = await serve(make_engine(same_pair))
    try:
        expected = list((await s.stub.Generate(greedy(), timeout=TIMEOUT)).token_ids)
        patch_step(monkeypatch, marker, RuntimeError(f"{FAULT_TEXT}: {SECRET_PROMPT}"))
        unary = [asyncio.create_task(reply(s.stub.Generate(greedy(), timeout=TIMEOUT)))
                 for _ in range(2)]
        stream = asyncio.create_task(collect_stream(
            s.stub.GenerateStream(greedy(cls=pb.GenerateStreamRequest), timeout=TIMEOUT)))
        await started(s, 3)
        bad = pb.GenerateRequest(prompt=SECRET_PROMPT, max_new_tokens=12, request_id="req-fault-1")
        call = s.stub.Generate(bad, timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INTERNAL
        details = err.value.details()
        assert details == "internal error (request_id=req-fault-1)"
        for leaked in (FAULT_TEXT, "boom", "/opt", "RuntimeError", SECRET_PROMPT, "zebra"):
            assert leaked not in details
        assert ("x-request-id", "req-fault-1") in tuple(err.value.trailing_metadata() or ())
        # the requests beside it are untouched
        for task in unary:
            assert list((await task).token_ids) == expected
        assert await stream == expected
        await wait_until_idle(s.engine)
        assert len((await s.stub.Generate(greedy(n=3), timeout=TIMEOUT)).token_ids) == 3
    finally:
        await s.channel.close()
        await s.running.shutdown(grace=0)


async def test_out_of_device_memory_fails_one_request_and_frees_it(same_pair, monkeypatch) -> None:
    marker = [7, 7, 7]
    s = await serve(make_engine(same_pair))
    try:
        expected = list((await s.stub.Generate(greedy(), timeout=TIMEOUT)).token_ids)
        patch_step(monkeypatch, marker, torch.OutOfMemoryError("CUDA out of memory. Tried..."))
        beside = asyncio.create_task(reply(s.stub.Generate(greedy(), timeout=TIMEOUT)))
        await started(s, 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(greedy(ids=[*marker, 10, 57]), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CUDA" not in err.value.details()
        assert list((await beside).token_ids) == expected
        await wait_until_idle(s.engine)  # its caches are freed: live sequences back to 0
        stats = s.engine.stats()
        assert stats.live_target_sequences == stats.live_draft_sequences == 0
        assert stats.reserved_tokens == 0
        assert list((await s.stub.Generate(greedy(), timeout=TIMEOUT)).token_ids) == expected
    finally:
        await s.channel.close()
        await s.running.shutdown(grace=0)


class WorkerKilled(BaseException):
    """Not an Exception: nothing per-request catches it, so the worker thread itself dies."""


def kill_worker_on(monkeypatch, marker: int) -> None:
    real_advance = engine_module.Engine._advance

    def advance(self, running):
        ids = running.request.prompt_token_ids
        if ids and ids[0] == marker:
            raise WorkerKilled
        time.sleep(STEP_DELAY)
        return real_advance(self, running)

    monkeypatch.setattr(engine_module.Engine, "_advance", advance)


async def code_of(awaitable) -> grpc.StatusCode:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_worker_death_ends_every_call_and_turns_health_not_serving(
    same_pair, monkeypatch
) -> None:
    kill_worker_on(monkeypatch, marker=5)
    s = await serve(make_engine(same_pair, max_concurrent_requests=2))
    try:
        assert await health_status(s.channel) == health_pb2.HealthCheckResponse.SERVING
        streams = [s.stub.GenerateStream(greedy(n=100, cls=pb.GenerateStreamRequest),
                                         timeout=TIMEOUT) for _ in range(2)]
        for call in streams:
            await call.read()  # running
        killer = asyncio.create_task(code_of(s.stub.Generate(greedy(ids=[5, 6]),
                                                             timeout=TIMEOUT)))
        while s.engine.stats().waiting < 1:
            await asyncio.sleep(0.005)
        waiting = asyncio.create_task(code_of(s.stub.Generate(greedy(n=100), timeout=TIMEOUT)))
        while s.engine.stats().waiting < 2:
            await asyncio.sleep(0.005)
        # the killer waits first in the queue; free a slot so that the worker reaches it
        streams[0].cancel()
        codes = await asyncio.wait_for(
            asyncio.gather(code_of(collect_stream(streams[1])), waiting, killer), 10)
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
        assert s.engine.failed is not None
        stats = s.engine.stats()  # the dead worker's requests gave their caches back
        assert stats.live_target_sequences == stats.live_draft_sequences == 0
        deadline = time.monotonic() + 5
        while await health_status(s.channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING after the worker died"
            await asyncio.sleep(0.01)
        # new calls are refused at once
        code = await code_of(s.stub.Generate(greedy(n=2), timeout=TIMEOUT))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        await s.channel.close()
        await asyncio.wait_for(s.running.shutdown(grace=0), 20)


async def test_worker_death_makes_serve_until_signalled_return_1(same_pair, monkeypatch) -> None:
    kill_worker_on(monkeypatch, marker=5)
    s = await serve(make_engine(same_pair))
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(serve_until_signalled(s.running, Settings(port=0)))
    try:
        stream = s.stub.GenerateStream(greedy(n=100, cls=pb.GenerateStreamRequest),
                                       timeout=TIMEOUT)
        await stream.read()
        killer = asyncio.create_task(code_of(s.stub.Generate(greedy(ids=[5, 6]),
                                                             timeout=TIMEOUT)))
        assert await asyncio.wait_for(serving, 10) == 1  # the process would exit non-zero
        assert await asyncio.wait_for(code_of(collect_stream(stream)), 10) in {
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert await asyncio.wait_for(killer, 10) in {
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    finally:
        serving.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await s.channel.close()
        await asyncio.wait_for(s.running.server.stop(0), 10)
        await asyncio.to_thread(s.engine.close, 5)


async def test_worker_death_during_the_drain_still_makes_it_return_1(
    same_pair, monkeypatch
) -> None:
    """SIGTERM first, then the worker dies while the drain waits for the calls in flight: the
    calls end UNAVAILABLE and the exit status still says the worker died."""
    kill_worker_on(monkeypatch, marker=5)
    s = await serve(make_engine(same_pair, max_concurrent_requests=1))
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(
        serve_until_signalled(s.running, Settings(port=0, shutdown_grace_seconds=10)))
    try:
        stream = s.stub.GenerateStream(greedy(n=100, cls=pb.GenerateStreamRequest),
                                       timeout=TIMEOUT)
        await stream.read()  # running
        killer = asyncio.create_task(code_of(s.stub.Generate(greedy(ids=[5, 6]),
                                                             timeout=TIMEOUT)))
        while s.engine.stats().waiting < 1:  # queued behind the stream
            await asyncio.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)  # the drain begins
        while not s.engine._stopping:
            await asyncio.sleep(0.005)
        stream.cancel()  # the worker reaches the killer, inside the grace
        assert await asyncio.wait_for(serving, 20) == 1
        assert await asyncio.wait_for(killer, 10) == grpc.StatusCode.UNAVAILABLE
        assert s.engine.failed is not None
    finally:
        serving.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await s.channel.close()
        await asyncio.to_thread(s.engine.close, 5)

