"""Load and limits on a real server over tiny models (127.0.0.1, port 0).

- Overload is refused at once with RESOURCE_EXHAUSTED and a RetryInfo, health keeps answering.
- The KV token budget: a request that can never fit is INVALID_ARGUMENT; one that does not fit
  now waits and then completes. An oversized message is RESOURCE_EXHAUSTED.
- The load test: many concurrent clients, unary and streaming, greedy and seeded, some
  cancelling, some with deadlines too short; every completed output is exact, the engine ends
  idle with every slot freed, memory stays flat and health answers SERVING throughout.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import random
import time
from dataclasses import dataclass

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import make_engine
from tests.decoding.test_engine import reference_greedy, wait_until_idle
from tests.service.conftest import Served, serve
from tests.steps import before_steps

PROMPT_IDS = [10, 57, 203, 99, 14, 250, 31]
TIMEOUT = 30.0


def greedy(n: int, gamma: int = 0, cls=pb.GenerateRequest, ids=PROMPT_IDS):
    request = cls(prompt_token_ids=ids, max_new_tokens=n)
    request.speculation.num_speculative_tokens = gamma
    return request


def slow_steps(monkeypatch, delay: float = 0.01) -> None:
    before_steps(monkeypatch, lambda states: time.sleep(delay))


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def health_status(channel: grpc.aio.Channel, timeout: float = 5.0) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return reply.status


async def stop(s: Served) -> None:
    await s.channel.close()
    await asyncio.wait_for(s.running.shutdown(grace=0), 30)


# ---- limits -------------------------------------------------------------------------------


async def test_overload_is_refused_at_once_with_retry_info(same_pair, monkeypatch) -> None:
    slow_steps(monkeypatch)
    s = await serve(make_engine(same_pair, max_concurrent_requests=1, max_queue=1))
    try:
        running = s.stub.GenerateStream(greedy(100, cls=pb.GenerateStreamRequest),
                                        timeout=TIMEOUT)
        await running.read()
        waiting = asyncio.ensure_future(s.stub.Generate(greedy(5), timeout=TIMEOUT))
        await until(lambda: s.engine.stats().waiting == 1)
        for call in (s.stub.Generate(greedy(5), timeout=TIMEOUT),
                     s.stub.GenerateStream(greedy(5, cls=pb.GenerateStreamRequest),
                                           timeout=TIMEOUT).read()):
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert time.monotonic() - start < 1.0  # at once, not after a wait in a queue
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(err.value)
            assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            retry = error_details_pb2.RetryInfo()
            assert [d.Unpack(retry) for d in status.details] == [True]
            assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(1.0)
        assert await health_status(s.channel) == health_pb2.HealthCheckResponse.SERVING
        assert s.engine.stats().running == 1 and s.engine.stats().waiting == 1
        running.cancel()
        assert len((await waiting).token_ids) == 5
        await wait_until_idle(s.engine)
    finally:
        await stop(s)


async def test_kv_token_budget(same_pair, monkeypatch) -> None:
    slow_steps(monkeypatch)
    # a request reserves prompt + max_new_tokens + γ + 1 positions: 7 + 40 + 0 + 1 = 48
    s = await serve(make_engine(same_pair, kv_token_budget=60))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(greedy(53), timeout=TIMEOUT)  # 61 > 60: never fits
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("max_new_tokens:")
        assert "budget is 60" in err.value.details()

        big = asyncio.ensure_future(s.stub.Generate(greedy(40), timeout=TIMEOUT))
        await until(lambda: s.engine.stats().running == 1)
        small = asyncio.ensure_future(s.stub.Generate(greedy(10), timeout=TIMEOUT))  # 18
        await until(lambda: s.engine.stats().waiting == 1)  # 48 + 18 > 60: it waits
        assert s.engine.stats().reserved_tokens == 48
        assert not small.done()
        assert len((await big).token_ids) == 40
        assert len((await small).token_ids) == 10
        # the largest request that fits does run
        assert len((await s.stub.Generate(greedy(52), timeout=TIMEOUT)).token_ids) == 52
        await wait_until_idle(s.engine)
        assert s.engine.stats().reserved_tokens == 0
    finally:
        await stop(s)


async def test_oversized_message_is_resource_exhausted(same_pair) -> None:
    s = await serve(make_engine(same_pair), max_message_bytes=1024)
    try:
        for call in (s.stub.Generate(pb.GenerateRequest(prompt="x" * 4096), timeout=TIMEOUT),
                     s.stub.GenerateStream(pb.GenerateStreamRequest(prompt="x" * 4096),
                                           timeout=TIMEOUT).read()):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert s.engine.stats().running == 0
        assert len((await s.stub.Generate(greedy(3), timeout=TIMEOUT)).token_ids) == 3
    finally:
        await stop(s)


# ---- the load test ------------------------------------------------------------------------

CLIENTS = 16
REQUESTS = 240
RSS_MARGIN_MIB = 64  # resident memory after the run may exceed that after warm-up by this much
DEADLINE_S = 0.02  # far too short for 100 tokens on a busy server

# per block of 12 requests: what each one is
MIX = (["greedy-unary"] * 3 + ["greedy-stream"] * 2 + ["seeded-unary"] * 2
       + ["seeded-stream"] * 2 + ["cancel"] * 2 + ["deadline"])


@dataclass(frozen=True)
class Template:
    ids: tuple[int, ...]
    n: int
    gamma: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def build(self, cls):
        request = cls(prompt_token_ids=self.ids, max_new_tokens=self.n)
        if self.gamma is not None:
            request.speculation.num_speculative_tokens = self.gamma
        if self.temperature:
            request.sampling.temperature = self.temperature
            request.sampling.top_p = self.top_p
            request.sampling.top_k = self.top_k
            assert self.seed is not None
            request.sampling.seed = self.seed
        return request


def templates(rng: random.Random, vocab: int) -> tuple[list[Template], list[Template]]:
    def prompt() -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab) for _ in range(rng.randint(2, 12)))

    gammas = [None, 0, 1, 2, 3, 5]  # None: adaptive; each γ twice in each list
    greedy_ones = [Template(prompt(), rng.randint(6, 24), gammas[i % len(gammas)])
                   for i in range(12)]
    seeded = [
        Template(prompt(), rng.randint(6, 24), gammas[i % len(gammas)],
                 temperature=rng.choice([0.5, 0.8, 1.0, 1.3]),
                 top_p=rng.choice([1.0, 0.9, 0.7]), top_k=rng.choice([0, 0, 20, 50]),
                 seed=rng.randrange(2**63))
        for i in range(12)
    ]
    return greedy_ones, seeded


def greedy_expected(pair, template: Template) -> list[int]:
    """The target's own greedy tokens (transformers generate), cut after an eos as the
    engine does."""
    tokens = reference_greedy(pair, template.ids, template.n)
    for i, token in enumerate(tokens):
        if token in pair.eos_token_ids:
            return tokens[: i + 1]
    return tokens


async def stream_tokens(call) -> list[int]:
    return [t async for m in call for t in m.token_ids]


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss  # type: ignore[no-any-return]


async def test_load(different_pair) -> None:
    pair = different_pair
    engine = make_engine(pair, max_concurrent_requests=8, max_queue=256,
                         max_new_tokens_limit=100, default_max_new_tokens=16)
    s = await serve(engine)
    channels = [grpc.aio.insecure_channel(s.address) for _ in range(CLIENTS)]
    try:
        rng = random.Random(1234)
        greedy_templates, seeded_templates = templates(rng, pair.target.vocab_size)
        expected: dict[Template, list[int]] = {
            t: greedy_expected(pair, t) for t in greedy_templates}
        # seeded references: each request run alone on the idle server
        for t in seeded_templates:
            expected[t] = list((await s.stub.Generate(t.build(pb.GenerateRequest),
                                                      timeout=TIMEOUT)).token_ids)
        # alone, the server agrees with transformers on every greedy request
        for t in greedy_templates:
            reply = await s.stub.Generate(t.build(pb.GenerateRequest), timeout=TIMEOUT)
            assert list(reply.token_ids) == expected[t]

        jobs = [(MIX[i % len(MIX)], i) for i in range(REQUESTS)]
        rng.shuffle(jobs)
        outcomes: collections.Counter[str] = collections.Counter()
        mismatches: list[str] = []

        async def run_job(stub: pb_grpc.GenerationServiceStub, kind: str, i: int) -> str:
            if kind == "deadline":
                long = greedy(100, gamma=0, ids=[10 + i % 50, 57])
                try:
                    if i % 2:
                        await stub.Generate(long, timeout=DEADLINE_S)
                    else:
                        long_stream = greedy(100, gamma=0, cls=pb.GenerateStreamRequest,
                                             ids=[10 + i % 50, 57])
                        await stream_tokens(stub.GenerateStream(long_stream, timeout=DEADLINE_S))
                except grpc.aio.AioRpcError as err:
                    return err.code().name
                mismatches.append(f"{kind} {i}: finished within {DEADLINE_S}s")
                return "OK"
            if kind == "cancel":
                t = rng_jobs.choice(seeded_templates + greedy_templates)
                request = dataclasses.replace(t, n=60).build(pb.GenerateStreamRequest)
                call = stub.GenerateStream(request, timeout=TIMEOUT)
                for _ in range(1 + i % 2):
                    await call.read()
                call.cancel()
                return "CANCELLED" if call.cancelled() else "OK"
            pool = greedy_templates if kind.startswith("greedy") else seeded_templates
            t = pool[i % len(pool)]
            if kind.endswith("unary"):
                tokens = list((await stub.Generate(t.build(pb.GenerateRequest),
                                                   timeout=TIMEOUT)).token_ids)
            else:
                tokens = await stream_tokens(stub.GenerateStream(
                    t.build(pb.GenerateStreamRequest), timeout=TIMEOUT))
            if tokens != expected[t]:
                mismatches.append(f"{kind} {i}: {tokens} != {expected[t]}")
            return "OK"

        queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
        rng_jobs = random.Random(99)

        async def client(channel: grpc.aio.Channel) -> None:
            stub = pb_grpc.GenerationServiceStub(channel)
            while not queue.empty():
                kind, i = queue.get_nowait()
                try:
                    code = await run_job(stub, kind, i)
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                    mismatches.append(f"{kind} {i}: {code} {err.details()}")
                outcomes[f"{kind}:{code}"] += 1

        async def run_round(items) -> float:
            for item in items:
                queue.put_nowait(item)
            start = time.monotonic()
            await asyncio.gather(*(client(c) for c in channels))
            return time.monotonic() - start

        # warm-up round (the same mix), then the baseline for memory
        await run_round(jobs[:48])
        await wait_until_idle(engine, timeout=10)
        outcomes.clear()
        rss_before = rss()

        health_log: list[tuple[int, float]] = []
        done = asyncio.Event()

        async def poll_health() -> None:
            while not done.is_set():
                start = time.monotonic()
                status = await health_status(s.channel, timeout=5)
                health_log.append((status, time.monotonic() - start))
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health())
        duration = await run_round(jobs)
        done.set()
        await poller

        await wait_until_idle(engine, timeout=10)
        stats = engine.stats()
        rss_after = rss()
        by_code = collections.Counter(k.split(":")[1] for k in outcomes.elements())
        print(
            f"\nload: {REQUESTS} requests, {CLIENTS} clients, {duration:.1f}s "
            f"({REQUESTS / duration:.1f} req/s), outcomes {dict(sorted(by_code.items()))}, "
            f"health checks {len(health_log)} (max {max(t for _, t in health_log) * 1000:.0f}"
            f" ms), RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
        )

        assert not mismatches, mismatches[:5]
        assert sum(outcomes.values()) == REQUESTS
        for kind_code, count in outcomes.items():
            kind, code = kind_code.split(":")
            allowed = {"deadline": {"DEADLINE_EXCEEDED"}, "cancel": {"CANCELLED"}}.get(
                kind, {"OK"})
            assert code in allowed, (kind_code, count)
        assert (stats.running, stats.waiting, stats.live_target_sequences,
                stats.live_draft_sequences, stats.reserved_tokens) == (0, 0, 0, 0, 0)
        assert health_log and all(
            status == health_pb2.HealthCheckResponse.SERVING for status, _ in health_log)
        assert rss_after - rss_before < RSS_MARGIN_MIB * 2**20, (rss_before, rss_after)
    finally:
        for channel in channels:
            await channel.close()
        await stop(s)
