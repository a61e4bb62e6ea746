"""Traces, metrics and request logs of real calls, read back from in-memory exporters, a real
OTLP/gRPC receiver and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.request
import uuid
from concurrent import futures
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from service.settings import Settings
from service.telemetry import setup_telemetry
from tests.conftest import make_engine
from tests.decoding.test_engine import wait_until_idle
from tests.service.conftest import serve

PROMPT_IDS = [10, 57, 203, 99, 14, 250, 31]
SERVER_SPAN = "/tandem.v1.GenerationService/Generate"


def greedy(n: int = 12, gamma: int = 3, cls=pb.GenerateRequest):
    return cls(prompt_token_ids=PROMPT_IDS, max_new_tokens=n,
               speculation=pb.SpeculationParams(num_speculative_tokens=gamma))


class Observed:
    def __init__(self, pair, **settings):
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.engine = make_engine(pair)
        self.settings = Settings(**{"tracing": "none", "metrics_port": 0, **settings})
        self.telemetry = setup_telemetry(
            self.settings, self.engine.info, self.engine.stats,
            span_processors=[SimpleSpanProcessor(self.spans)], metric_readers=[self.metrics],
        )

    async def __aenter__(self):
        self.served = await serve(self.engine, telemetry=self.telemetry,
                                  **{k: v for k, v in self.settings.__dict__.items()
                                     if k in ("metrics_port", "step_spans", "host", "log_content")})
        return self

    async def __aexit__(self, *exc):
        await self.served.channel.close()
        await self.served.running.shutdown(grace=0)
        self.telemetry.shutdown()

    def by_name(self, name):
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def counter(self, name, **attributes) -> float:
        total = 0.0
        data = self.metrics.get_metrics_data()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name != name:
                        continue
                    for point in metric.data.data_points:
                        if all(point.attributes.get(k) == v for k, v in attributes.items()):
                            total += point.value if hasattr(point, "value") else point.sum
        return total


@pytest.mark.parametrize("pair_name", ["same_pair", "different_pair"])
async def test_span_tree_attributes_and_counters(request, pair_name) -> None:
    async with Observed(request.getfixturevalue(pair_name)) as o:
        reply = await o.served.stub.Generate(greedy())
    (server,) = o.by_name(SERVER_SPAN)
    (root,) = o.by_name("tandem.generate")
    assert root.parent.span_id == server.context.span_id
    children = {s.name for s in o.spans.get_finished_spans()
                if s.parent and s.parent.span_id == root.context.span_id}
    assert children == {"tandem.queue", "tandem.prefill.target", "tandem.prefill.draft",
                        "tandem.decode"}
    (decode,) = o.by_name("tandem.decode")
    steps = o.by_name("tandem.step")
    assert len(steps) == reply.usage.target_forward_passes
    assert all(s.parent.span_id == decode.context.span_id for s in steps)
    assert sum(s.attributes["tandem.step.emitted_tokens"] for s in steps) == 12
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.usage.input_tokens"] == len(PROMPT_IDS)
    assert attrs["gen_ai.usage.output_tokens"] == 12
    assert attrs["gen_ai.request.max_tokens"] == 12
    assert attrs["gen_ai.request.temperature"] == 0.0
    assert not {"gen_ai.request.frequency_penalty", "gen_ai.request.presence_penalty",
                "gen_ai.request.seed", "gen_ai.request.stop_sequences"} & set(attrs)
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("length",)
    assert attrs["tandem.request_id"] == reply.request_id
    drafted = o.counter("tandem.spec_decode.num_draft_tokens")
    accepted = o.counter("tandem.spec_decode.num_accepted_tokens")
    assert drafted == reply.usage.draft_tokens > 0
    assert accepted == reply.usage.accepted_draft_tokens
    if pair_name == "same_pair":
        assert attrs["tandem.acceptance_rate"] == 1.0 and accepted == drafted
        assert o.counter("tandem.spec_decode.num_accepted_tokens_per_pos", position=2) > 0
    else:
        assert attrs["tandem.acceptance_rate"] < 0.3
    assert o.counter("tandem.requests", grpc_code="OK") == 1
    assert o.counter("gen_ai.server.request.duration") > 0


async def test_penalties_sent_are_span_attributes(same_pair) -> None:
    """The two penalties the GenAI conventions name, each under its own name (values a float32
    holds exactly); the repetition penalty has no such name and is not recorded."""
    request = greedy()
    request.sampling.repetition_penalty = 1.25
    request.sampling.frequency_penalty = 0.5
    request.sampling.presence_penalty = -0.25
    async with Observed(same_pair) as o:
        await o.served.stub.Generate(request)
    (root,) = o.by_name("tandem.generate")
    (server,) = o.by_name(SERVER_SPAN)
    for attrs in (root.attributes, server.attributes):
        assert attrs["gen_ai.request.frequency_penalty"] == 0.5
        assert attrs["gen_ai.request.presence_penalty"] == -0.25
        assert not [name for name in attrs if "repetition" in name]


async def test_seed_and_stop_strings_sent_are_span_attributes(same_pair) -> None:
    """Under the GenAI conventions' names, on the root span and the server's; a seed past
    OTLP's signed 64-bit integers (the field is unsigned) is left out, as its export would
    fail."""
    for seed in (0, 2**63 - 1, 2**63):
        request = greedy()
        request.sampling.seed = seed
        request.stop.extend(["zz", "\n\n"])
        async with Observed(same_pair) as o:
            await o.served.stub.Generate(request)
        (root,) = o.by_name("tandem.generate")
        (server,) = o.by_name(SERVER_SPAN)
        for attrs in (root.attributes, server.attributes):
            assert attrs.get("gen_ai.request.seed") == (seed if seed < 2**63 else None)
            assert tuple(attrs["gen_ai.request.stop_sequences"]) == ("zz", "\n\n")


async def test_acceptance_by_position_is_per_drafted_position(same_pair) -> None:
    """Calls of γ 3 and γ 1 with a draft that always agrees: acceptance is 1 at every
    position, as accepted over drafted at each position (over num_drafts it read 1/3 at
    positions 1 and 2)."""
    async with Observed(same_pair) as o:
        for gamma in (3, 1):
            await o.served.stub.Generate(greedy(n=12, gamma=gamma))
    accepted = [o.counter("tandem.spec_decode.num_accepted_tokens_per_pos", position=i)
                for i in range(3)]
    drafted = [o.counter("tandem.spec_decode.num_drafted_tokens_per_pos", position=i)
               for i in range(3)]
    assert accepted == drafted and drafted[0] > drafted[1] > 0
    assert drafted[0] == o.counter("tandem.spec_decode.num_drafts")


async def test_step_events_when_step_spans_are_off(same_pair) -> None:
    async with Observed(same_pair, step_spans=False) as o:
        await o.served.stub.Generate(greedy())
    assert o.by_name("tandem.step") == []
    (decode,) = o.by_name("tandem.decode")
    assert {e.name for e in decode.events} == {"tandem.step"}


async def test_failed_call_records_its_status(same_pair) -> None:
    async with Observed(same_pair) as o:
        with pytest.raises(grpc.aio.AioRpcError):
            await o.served.stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=0))
    (server,) = o.by_name(SERVER_SPAN)
    # The gRPC semantic conventions leave client errors UNSET on server spans; the code is there.
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    (root,) = o.by_name("tandem.generate")
    assert root.status.description == "INVALID_ARGUMENT"
    assert o.counter("tandem.requests", grpc_code="INVALID_ARGUMENT") == 1


async def test_calls_refused_before_their_handler_are_counted(same_pair, monkeypatch) -> None:
    """An unauthenticated generation call never reaches the servicer, yet is a finished call."""
    monkeypatch.setenv("TANDEM_AUTH_TOKEN", "s3cret")
    async with Observed(same_pair) as o:
        stub = o.served.stub
        for call in (stub.Generate(greedy(n=2)), stub.GetModelInfo(pb.GetModelInfoRequest())):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = stub.GenerateStream(greedy(n=2, cls=pb.GenerateStreamRequest))
        assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
        allowed = (("authorization", "Bearer s3cret"),)
        assert len((await stub.Generate(greedy(n=2), metadata=allowed)).token_ids) == 2
        refused_calls = {"grpc_code": "UNAUTHENTICATED"}
        assert o.counter("tandem.requests", **refused_calls, **{"rpc.method": "Generate"}) == 1
        assert o.counter(
            "tandem.requests", **refused_calls, **{"rpc.method": "GenerateStream"}) == 1
        assert o.counter("tandem.requests", **refused_calls) == 2  # GetModelInfo is not counted
        assert o.counter("tandem.requests", grpc_code="OK") == 1


async def test_internal_error_marks_the_server_span(same_pair, monkeypatch) -> None:
    from tests.steps import before_steps

    def broken(states):
        raise RuntimeError("boom")

    before_steps(monkeypatch, broken)
    async with Observed(same_pair) as o:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await o.served.stub.Generate(greedy())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    (server,) = o.by_name(SERVER_SPAN)
    assert server.status.status_code.name == "ERROR"
    assert "boom" not in server.status.description
    (root,) = o.by_name("tandem.generate")
    assert root.status.description == "INTERNAL"


async def test_cancelled_stream_is_recorded(same_pair, monkeypatch) -> None:
    from tests.steps import before_steps

    # Steps after the first wait until the call's span has ended, so the 100 tokens cannot all
    # be sent (and the call end OK) before the cancellation reaches the server.
    cancelled = threading.Event()
    steps = []

    def gate(states) -> None:
        steps.append(len(states))
        if len(steps) > 1:
            cancelled.wait(timeout=10)

    before_steps(monkeypatch, gate)
    async with Observed(same_pair) as o:
        call = o.served.stub.GenerateStream(greedy(n=100, gamma=1, cls=pb.GenerateStreamRequest))
        await call.read()
        call.cancel()
        for _ in range(250):
            if o.by_name("tandem.generate"):
                break
            await asyncio.sleep(0.02)
        cancelled.set()
        await wait_until_idle(o.engine)
    (root,) = o.by_name("tandem.generate")
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert o.counter("tandem.requests", grpc_code="CANCELLED") == 1


async def test_a_passed_deadline_is_recorded_as_such(same_pair, monkeypatch) -> None:
    """gRPC cancels the handler when the deadline passes: that is DEADLINE_EXCEEDED in the
    server's own records too, not CANCELLED."""
    import time

    from tests.steps import before_steps

    before_steps(monkeypatch, lambda states: time.sleep(0.02))
    async with Observed(same_pair) as o:
        for call in (o.served.stub.Generate(greedy(n=100, gamma=0), timeout=0.2),
                     o.served.stub.GenerateStream(
                         greedy(n=100, gamma=0, cls=pb.GenerateStreamRequest), timeout=0.2)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                if isinstance(call, grpc.aio.UnaryStreamCall):
                    async for _ in call:
                        pass
                else:
                    await call
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(250):
            if len(o.by_name("tandem.generate")) == 2:
                break
            await asyncio.sleep(0.02)
        await wait_until_idle(o.engine)
    roots = o.by_name("tandem.generate")
    assert [root.attributes["rpc.grpc.status_code"] for root in roots] == [
        grpc.StatusCode.DEADLINE_EXCEEDED.value[0]] * 2
    assert o.counter("tandem.requests", grpc_code="DEADLINE_EXCEEDED") == 2


async def test_a_deadline_passing_while_the_prompt_is_tokenized_is_recorded_as_such(
    same_pair, monkeypatch
) -> None:
    """Before the engine has the call it cannot end it at its deadline: gRPC cancels the
    handler, and grpc.aio's time_remaining() is then 0, never below. (Mutant: a deadline
    taken as passed only below 0, which recorded CANCELLED; the test above caught it only
    where the engine's own deadline check came second.)"""
    from tests.decoding.test_engine import SlowPrepare

    SlowPrepare(monkeypatch, 1.0)
    async with Observed(same_pair) as o:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await o.served.stub.Generate(pb.GenerateRequest(prompt="def f():", max_new_tokens=2),
                                         timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(250):
            if o.by_name("tandem.generate"):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)  # the tokenizing thread finishes
        await wait_until_idle(o.engine)
    [root] = o.by_name("tandem.generate")
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]


@pytest.mark.parametrize(("remaining", "code"), [
    (None, "CANCELLED"), (5.0, "CANCELLED"), (0.2, "CANCELLED"), (0.002, "DEADLINE_EXCEEDED"),
    (0.0, "DEADLINE_EXCEEDED")])
def test_a_call_cancelled_at_its_deadline_is_recorded_deadline_exceeded(remaining, code) -> None:
    """The client's timer may fire first and cancel the call with a little of the server's
    copy of the deadline left (a review saw 0.1-2.3 ms, and CANCELLED recorded where the
    caller saw DEADLINE_EXCEEDED)."""
    from types import SimpleNamespace

    from service.servicer import _ended_early_code

    context = SimpleNamespace(time_remaining=lambda: remaining)
    assert _ended_early_code(context).name == code  # type: ignore[arg-type]


async def test_a_stream_closed_by_grpc_is_recorded_cancelled(same_pair) -> None:
    """When a client goes away mid-stream gRPC may close the handler's generator (rather
    than cancel its task): GeneratorExit at the yield. That is a cancelled call, and its
    request is cancelled too."""
    from service.servicer import GenerationServicer

    class Context:  # what the servicer asks of grpc.aio.ServicerContext on this path
        def set_trailing_metadata(self, metadata) -> None:
            self.trailing_metadata = metadata

        def time_remaining(self) -> None:
            return None

    class Recorder:
        def __init__(self) -> None:
            self.records = []

        def call_started(self, record) -> None:
            pass

        def call_finished(self, record) -> None:
            self.records.append(record)

    engine, recorder = make_engine(same_pair), Recorder()
    try:
        stream = GenerationServicer(engine, recorder).GenerateStream(
            greedy(n=100, gamma=1, cls=pb.GenerateStreamRequest), Context())
        assert (await stream.__anext__()).token_ids
        await stream.aclose()  # as grpc.aio does when the client leaves
        (record,) = recorder.records
        assert record.code == grpc.StatusCode.CANCELLED and record.finish_reason is None
        await wait_until_idle(engine)  # and the request's caches are freed
    finally:
        engine.close()


async def test_an_ipv6_host_serves_grpc_and_metrics(same_pair) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    async with Observed(same_pair, metrics_port=port, host="::1") as o:
        async with grpc.aio.insecure_channel(f"[::1]:{o.served.running.port}") as channel:
            reply = await pb_grpc.GenerationServiceStub(channel).Generate(greedy(n=2))
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5)
            .read().decode())
    assert len(reply.token_ids) == 2
    assert "tandem_requests_total" in text


def test_the_text_log_line_carries_the_request_fields() -> None:
    """The default (text) log format writes what the JSON one has as keys: request id,
    status, counts, so the id an INTERNAL error points to can be found."""
    import io
    import time

    from service.servicer import CallRecord
    from service.telemetry import REQUEST_LOG, TextFormatter, configure_logging, log_request

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(Settings(log_format="text"))
        assert isinstance(root.handlers[0].formatter, TextFormatter)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s %(message)s"))
    REQUEST_LOG.addHandler(handler)
    level = REQUEST_LOG.level
    REQUEST_LOG.setLevel(logging.INFO)
    try:
        now = time.time_ns()
        log_request(CallRecord("Generate", "rid-7", now, code=grpc.StatusCode.DEADLINE_EXCEEDED,
                               end_ns=now + 1_500_000))
    finally:
        REQUEST_LOG.removeHandler(handler)
        REQUEST_LOG.setLevel(level)
    line = stream.getvalue().strip()
    assert line.startswith("INFO tandem.requests request finished request_id=rid-7 "), line
    for field in ("method=Generate", "status=DEADLINE_EXCEEDED", 'finish_reason=""',
                  "completion_tokens=0", "duration_s=0.0015", "ttft_s=None"):
        assert f" {field}" in line, (field, line)


async def test_health_checks_make_no_spans(same_pair) -> None:
    async with Observed(same_pair) as o:
        health = health_pb2_grpc.HealthStub(o.served.channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert o.spans.get_finished_spans() == ()


async def test_an_internal_errors_text_never_reaches_a_span(same_pair, monkeypatch) -> None:
    """The caller sees only the request id; so must the spans: no exception text, no paths
    (the error chained to gRPC's AbortError was recorded with its whole traceback)."""
    from tests.steps import before_steps

    canary = f"canary-{uuid.uuid4().hex}"

    def broken(states) -> None:
        raise RuntimeError(f"bad token in /home/user/{canary}")

    before_steps(monkeypatch, broken)
    async with Observed(same_pair) as o:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await o.served.stub.Generate(greedy())
        assert err.value.code() == grpc.StatusCode.INTERNAL and canary not in err.value.details()
        for _ in range(250):
            if o.by_name("/tandem.v1.GenerationService/Generate"):
                break
            await asyncio.sleep(0.02)
    spans = o.spans.get_finished_spans()
    assert o.by_name("/tandem.v1.GenerationService/Generate")
    assert all(canary not in span.to_json() for span in spans)


async def test_canary_never_reaches_spans_metrics_or_logs(same_pair, caplog) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)  # not even at DEBUG, without --log-content
    async with Observed(same_pair) as o:
        await o.served.stub.Generate(pb.GenerateRequest(prompt=f"def {canary}():",
                                                        max_new_tokens=8))
        with pytest.raises(grpc.aio.AioRpcError):
            await o.served.stub.Generate(pb.GenerateRequest(prompt=canary, stop=[""]))
    dumped = [s.to_json() for s in o.spans.get_finished_spans()]
    dumped.append(o.metrics.get_metrics_data().to_json())
    dumped += [r.getMessage() + str(r.__dict__) for r in caplog.records]
    assert any("request finished" in d for d in dumped)  # the log line is there...
    assert all(canary not in d for d in dumped)  # ...and the canary is not


async def test_log_content_logs_prompt_and_output_at_debug_only(same_pair, caplog) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    async with Observed(same_pair, log_content=True) as o:
        reply = await o.served.stub.Generate(pb.GenerateRequest(prompt=f"def {canary}():",
                                                                max_new_tokens=8))
        stream = [m async for m in o.served.stub.GenerateStream(pb.GenerateStreamRequest(
            messages=[pb.ChatMessage(role="user", content=canary)], max_new_tokens=5))]
    contents = [r for r in caplog.records if r.getMessage() == "request content"]
    assert [r.levelno for r in contents] == [logging.DEBUG] * 2
    assert contents[0].prompt == f"def {canary}():" and contents[0].output == reply.text
    assert contents[1].prompt == [{"role": "user", "content": canary}]
    assert contents[1].output == "".join(m.text for m in stream)
    assert all(canary not in s.to_json() for s in o.spans.get_finished_spans())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_prometheus_endpoint_serves_speculation_counters(same_pair) -> None:
    port = free_port()
    async with Observed(same_pair, metrics_port=port) as o:
        reply = await o.served.stub.Generate(greedy())
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            .read().decode())
    values = {line.split(" ")[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values["tandem_spec_decode_num_draft_tokens_total"] == reply.usage.draft_tokens
    assert values["tandem_spec_decode_num_accepted_tokens_total"] == reply.usage.draft_tokens
    assert "tandem_requests_in_flight" in values and "tandem_queue_depth" in values
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in text


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_otlp_export_keeps_parent_links(same_pair, monkeypatch) -> None:
    receiver = Receiver()
    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "tandem-test")
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    try:
        # auto: the endpoint above is set, so spans go over OTLP
        async with Observed(same_pair, tracing="auto") as o:
            await o.served.stub.Generate(
                greedy(), metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")])
            o.telemetry.tracer_provider.force_flush()
    finally:
        collector.stop(0)
    spans = {s.name: s for r in receiver.requests for rs in r.resource_spans
             for ss in rs.scope_spans for s in ss.spans}
    assert {SERVER_SPAN, "tandem.generate", "tandem.decode", "tandem.step"} <= set(spans)
    server, root = spans[SERVER_SPAN], spans["tandem.generate"]
    assert server.trace_id.hex() == trace_id  # the caller's trace continues
    assert server.parent_span_id.hex() == parent_id
    assert root.parent_span_id == server.span_id
    assert spans["tandem.decode"].parent_span_id == root.span_id
    resource = receiver.requests[0].resource_spans[0].resource
    assert any(a.key == "service.name" and a.value.string_value == "tandem-test"
               for a in resource.attributes)


@pytest.mark.parametrize(("env", "name"), [
    ({}, "tandem"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout-llm,deployment.environment=prod"},
     "checkout-llm"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=checkout-llm", "OTEL_SERVICE_NAME": "llm"},
     "llm"),
])
def test_the_service_is_named_as_the_otel_environment_says(monkeypatch, env, name) -> None:
    """OTEL_RESOURCE_ATTRIBUTES names the service where OTEL_SERVICE_NAME does not (a name
    passed to Resource.create overrode it: every server was "tandem")."""
    from service.telemetry import service_resource

    for variable in ("OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    attributes = service_resource().attributes
    assert attributes["service.name"] == name
    if "deployment.environment" in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        assert attributes["deployment.environment"] == "prod"


async def test_otlp_export_over_http_where_the_protocol_says_so(same_pair, monkeypatch) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (a collector's port 4318): spans are POSTed
    to <endpoint>/v1/traces as protobuf (they went over gRPC whatever it said)."""
    import http.server

    bodies: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    try:
        async with Observed(same_pair, tracing="auto") as o:
            await o.served.stub.Generate(greedy())
            await asyncio.to_thread(o.telemetry.tracer_provider.force_flush)
    finally:
        collector.shutdown()
        collector.server_close()
    assert bodies and {path for path, _ in bodies} == {"/v1/traces"}
    names = set()
    for _, body in bodies:
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        names |= {s.name for rs in request.resource_spans for ss in rs.scope_spans
                  for s in ss.spans}
    assert {SERVER_SPAN, "tandem.generate", "tandem.decode"} <= names


def test_the_otlp_protocol_is_read_as_the_specification_says() -> None:
    from service.settings import otel_problems, otlp_protocol

    assert otlp_protocol("TRACES", {}) == "grpc"
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc"}
    assert otlp_protocol("TRACES", env) == "http/protobuf"  # the general one
    assert otlp_protocol("METRICS", env) == "grpc"  # the signal's own wins
    assert otel_problems(env) == []
    # One the SDK does not implement stops `tandem serve` before the models load.
    assert otel_problems({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}) == [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json': must be one of 'grpc', 'http/protobuf'"]


def test_auto_tracing_exports_over_otlp_only_where_an_endpoint_is_set() -> None:
    from service.telemetry import tracing_mode

    assert tracing_mode("auto", {}) == "none"
    assert tracing_mode("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}) == "none"
    assert tracing_mode("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == "otlp"
    assert tracing_mode("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) == "otlp"
    for explicit in ("otlp", "console", "none"):
        assert tracing_mode(explicit, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}) == explicit
        assert tracing_mode(explicit, {}) == explicit


# ---- gaps a mutation review found (each test fails on the mutant its comment names)

# gen-ai-metrics.md: gen_ai.server.time_to_first_token's ExplicitBucketBoundaries
TTFT_SPEC = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
             5.0, 7.5, 10.0)


def metric_points(reader: InMemoryMetricReader) -> dict[str, tuple[str, list]]:
    """name -> (unit, data points)"""
    out: dict[str, tuple[str, list]] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = (metric.unit, list(metric.data.data_points))
    return out


# T1 (TTFT view with TPOT's buckets), T2 (duration unit ms), T3 (error.type misnamed),
# T4 (token type "prompt" for "input")
async def test_genai_metrics_buckets_units_and_attributes(same_pair) -> None:
    async with Observed(same_pair) as o:
        reply = await o.served.stub.Generate(greedy())
        with pytest.raises(grpc.aio.AioRpcError):
            await o.served.stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=0))
    points = metric_points(o.metrics)
    for name in ("gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
                 "gen_ai.server.time_per_output_token"):
        assert points[name][0] == "s", name
    assert points["gen_ai.server.token.usage"][0] == "{token}"
    (ttft,) = points["gen_ai.server.time_to_first_token"][1]
    assert tuple(ttft.explicit_bounds) == TTFT_SPEC
    durations = {p.attributes.get("error.type"): p for p in
                 points["gen_ai.server.request.duration"][1]}
    assert set(durations) == {None, "INVALID_ARGUMENT"}
    usage = {p.attributes["gen_ai.token.type"]: p.sum
             for p in points["gen_ai.server.token.usage"][1]}
    assert usage == {"input": len(PROMPT_IDS), "output": reply.usage.completion_tokens}


# T5 (queue depth gauge observes running)
def test_gauges_observe_their_own_engine_stats() -> None:
    from service.metrics import Metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    stats = SimpleNamespace(running=2, waiting=5, preparing=4, last_gamma=3,
                            reserved_tokens=700)
    Metrics(provider.get_meter("t"), lambda: stats)
    values = {name: pts[0].value for name, (_, pts) in metric_points(reader).items()}
    provider.shutdown()
    # Queued or being tokenized, a call waits for admission (and counts against --max-queue).
    assert values == {"tandem.requests.in_flight": 2, "tandem.queue.depth": 9,
                      "tandem.spec_decode.gamma": 3, "tandem.kv.reserved_tokens": 700}


# T6 (a cancelled call's tandem.generate span not marked ERROR)
def test_a_cancelled_call_marks_its_span_as_failed() -> None:
    from service.servicer import CallRecord
    from service.spans import record_call_spans

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    now = time.time_ns()
    record = CallRecord("GenerateStream", "rid", now, code=grpc.StatusCode.CANCELLED,
                        end_ns=now + 1000)
    info = SimpleNamespace(target_model="t", draft_model="d")
    record_call_spans(provider.get_tracer("t"), record, info, True)
    (root,) = exporter.get_finished_spans()
    assert root.name == "tandem.generate"
    assert root.status.status_code.name == "ERROR" and root.status.description == "CANCELLED"


# T7 (trace_id not zero-padded), T9 (prompt_tokens from completion_tokens)
async def test_request_log_line_trace_id_and_counts(same_pair, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tandem.requests")
    trace_id = "000000000000000000000000000000ab"
    async with Observed(same_pair) as o:
        reply = await o.served.stub.Generate(
            greedy(), metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    (line,) = [r for r in caplog.records if r.getMessage() == "request finished"]
    assert line.trace_id == trace_id
    assert (line.prompt_tokens, line.completion_tokens) == (len(PROMPT_IDS),
                                                            reply.usage.completion_tokens)
    assert line.status == "OK" and line.finish_reason == "length"


# T8 (reflection calls traced)
async def test_reflection_makes_no_spans(same_pair) -> None:
    async with Observed(same_pair) as o:
        stub = reflection_pb2_grpc.ServerReflectionStub(o.served.channel)
        async for _ in stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            pass
    assert o.spans.get_finished_spans() == ()
