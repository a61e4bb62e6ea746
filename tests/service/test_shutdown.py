"""Shutdown under load: a real ``tandem serve`` process gets SIGTERM while streams run.

Promised: health turns NOT_SERVING at once, new calls are refused with UNAVAILABLE, calls in
flight that finish within the grace period complete normally, the rest end with UNAVAILABLE
when it is over, and the process exits 0 soon after.

Tiny models generate far faster than any grace period, so the process is the real CLI
(``service.cli.main``: flags, model loading, signal handling, drain) started through a
three-line wrapper that adds a fixed sleep to every speculative step. That makes the
timings the test relies on independent of the machine's speed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.decoding.test_engine import reference_greedy

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 2.0
EXIT_MARGIN_S = 4.0  # after the grace: final statuses flushed (1 s), engine stopped, exit
STEP_DELAY_S = 0.05  # per engine step; running streams share a step when batched
SHORT, LONG = 8, 100  # tokens at one per step: ~0.4 s vs. ~5 s, well past the grace
STARTUP_TIMEOUT_S = 120.0

WRAPPER = """
import os, sys, time
import decoding.stepper as stepper
delay = float(os.environ["TEST_STEP_DELAY_S"])
real_step, real_batch = stepper.speculative_step, stepper.speculative_step_batch
def slow_step(state, gamma):
    time.sleep(delay)
    return real_step(state, gamma)
def slow_batch(states, gammas, draft, target, choose=None):
    time.sleep(delay)
    return real_batch(states, gammas, draft, target, choose)
stepper.speculative_step, stepper.speculative_step_batch = slow_step, slow_batch
from service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def long_prompt(pair) -> list[int]:
    """A prompt whose greedy continuation has no eos in LONG tokens (so it really is long)."""
    for first in range(10, 60):
        prompt = (first, 57, 203)
        if not set(reference_greedy(pair, prompt, LONG)) & set(pair.eos_token_ids):
            return list(prompt)
    raise AssertionError("no prompt without an early eos")


def stream_request(ids: list[int], n: int) -> pb.GenerateStreamRequest:
    request = pb.GenerateStreamRequest(prompt_token_ids=ids, max_new_tokens=n)
    request.speculation.num_speculative_tokens = 0  # one token per step: the slowest pace
    return request


async def finish(call) -> tuple[str, list[int], float]:
    """Read the rest of a stream: (code name, tokens, monotonic end time)."""
    tokens: list[int] = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            tokens.extend(message.token_ids)
    except grpc.aio.AioRpcError as err:
        return err.code().name, tokens, time.monotonic()
    return "OK", tokens, time.monotonic()


async def test_sigterm_drains_then_exits_0(tiny_dirs, same_pair, tmp_path) -> None:
    target, draft = tiny_dirs["same"]
    ids = long_prompt(same_pair)
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRAPPER, "serve",
            "--target", str(target), "--draft", str(draft), "--device", "cpu",
            "--dtype", "float32", "--host", "127.0.0.1", "--port", "0",
            "--shutdown-grace-seconds", str(GRACE_S), "--metrics-port", "0",
            "--tracing", "none", "--log-level", "WARNING",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env={**os.environ, "PYTHONPATH": str(ROOT), "TEST_STEP_DELAY_S": str(STEP_DELAY_S)},
        )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT_S)
        assert line.startswith(b"tandem: serving on "), (line, stderr_path.read_text()[-2000:])
        address = line.decode().rsplit(" ", 1)[1].strip()
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check, timeout=10)).status == \
                health_pb2.HealthCheckResponse.SERVING

            shorts = [stub.GenerateStream(stream_request(ids, SHORT), timeout=60)
                      for _ in range(3)]
            longs = [stub.GenerateStream(stream_request(ids, LONG), timeout=60)
                     for _ in range(3)]
            first_tokens = []
            for call in (*shorts, *longs):  # every stream is running
                message = await asyncio.wait_for(call.read(), 30)
                first_tokens.append(list(message.token_ids))
            results = [asyncio.create_task(finish(call)) for call in (*shorts, *longs)]

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            # health turns NOT_SERVING at once, and new calls are refused
            while (await health.Check(check, timeout=5)).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() - signalled < 1.0, "health still SERVING"
                await asyncio.sleep(0.02)
            for new_call in (stub.Generate(pb.GenerateRequest(prompt_token_ids=ids,
                                                              max_new_tokens=2), timeout=10),
                             stub.GenerateStream(stream_request(ids, 2), timeout=10).read()):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await new_call
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE

            outcomes = await asyncio.wait_for(asyncio.gather(*results),
                                              GRACE_S + EXIT_MARGIN_S + 5)
            returncode = await asyncio.wait_for(process.wait(), GRACE_S + EXIT_MARGIN_S + 5)
            exited = time.monotonic() - signalled

        expected = reference_greedy(same_pair, tuple(ids), LONG)
        short_outcomes, long_outcomes = outcomes[:3], outcomes[3:]
        for first, (code, tokens, _) in zip(first_tokens[:3], short_outcomes, strict=True):
            assert code == "OK"
            assert first + tokens == expected[:SHORT]
        # at least one short call was still running when the signal came: the drain let it end
        assert any(end > signalled for _, _, end in short_outcomes)
        for first, (code, tokens, end) in zip(first_tokens[3:], long_outcomes, strict=True):
            assert code == "UNAVAILABLE"
            assert end - signalled >= GRACE_S - 0.1  # it had the whole grace period
            assert len(first + tokens) < LONG
            assert first + tokens == expected[: len(first + tokens)]
        assert returncode == 0, stderr_path.read_text()[-2000:]
        assert exited < GRACE_S + EXIT_MARGIN_S, exited
        print(f"\nshutdown: exit {returncode} {exited:.2f}s after SIGTERM (grace {GRACE_S}s)")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
