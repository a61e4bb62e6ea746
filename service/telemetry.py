"""OpenTelemetry for Tandem: providers, exporters, the gRPC server interceptor, request logs.

Configured the standard way: ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``/``_ARG`` and ``OTEL_EXPORTER_OTLP_*`` are read by the SDK itself;
``OTEL_METRICS_EXPORTER=otlp`` adds OTLP metric export beside the Prometheus endpoint.
Prompts and generated text are never recorded: only counts, times and ids.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from decoding.engine import EngineInfo, EngineStats
from service.metrics import Metrics, metric_views
from service.servicer import CallRecord
from service.settings import Settings, otlp_protocol
from service.spans import record_call_spans

log = logging.getLogger(__name__)

REQUEST_LOG = logging.getLogger("tandem.requests")

# Health checks and reflection are probes and tooling, not traffic: no spans for them.
UNTRACED = filters.negate(
    filters.any_of(
        filters.service_name("grpc.health.v1.Health"),
        filters.service_prefix("grpc.reflection."),
    )
)


class TextFormatter(logging.Formatter):
    """The text log format: the message, then the record's fields passed as ``extra``
    (request id, status, counts) as ``key=value``, which the JSON format writes as keys."""

    _STANDARD = frozenset(RESERVED_ATTRS) | {"taskName"}

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = [
            f"{key}={_text_value(value)}"
            for key, value in record.__dict__.items()
            if key not in self._STANDARD and not key.startswith("_")
        ]
        return " ".join([super().formatMessage(record), *fields])


def _text_value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s", timestamp=False)
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


@dataclass
class Telemetry:
    """The call observer the servicer reports to, plus what it needs to shut down."""

    info: EngineInfo
    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider
    metrics: Metrics
    step_spans: bool = True
    log_content: bool = False  # a DEBUG line with each call's prompt and output
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    _closers: list[Callable[[], object]] = field(default_factory=list)

    def call_started(self, record: CallRecord) -> None:
        self.metrics.call_started(record)

    def call_refused(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.call_refused(method, code, self.info)

    def call_finished(self, record: CallRecord) -> None:
        self.metrics.call_finished(record, self.info)
        if self.tracer_provider is not None:
            record_call_spans(
                self.tracer_provider.get_tracer("tandem"), record, self.info, self.step_spans
            )
        log_request(record)
        if self.log_content:
            log_content(record)

    def shutdown(self) -> None:
        for close in self._closers:
            close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def log_content(record: CallRecord) -> None:
    """``--log-content``: the call's prompt and output text, at DEBUG (never in spans or
    metrics, and not at all without the flag)."""
    request = record.request
    prompt: object = None
    if request is not None:
        if request.prompt is not None:
            prompt = request.prompt
        elif request.messages is not None:
            prompt = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            prompt = list(request.prompt_token_ids or ())
    REQUEST_LOG.debug(
        "request content",
        extra={"request_id": record.request_id, "prompt": prompt,
               "output": "".join(record.output)},
    )


def log_request(record: CallRecord) -> None:
    """One structured line per finished call; counts and times only, never text."""
    usage = record.handle.usage if record.handle is not None else None
    span_context = trace.get_current_span().get_span_context()
    REQUEST_LOG.info(
        "request finished",
        extra={
            "request_id": record.request_id,
            "trace_id": format(span_context.trace_id, "032x") if span_context.is_valid else "",
            "method": record.method,
            "status": record.code.name,
            "finish_reason": record.finish_reason.value if record.finish_reason else "",
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "draft_tokens": usage.draft_tokens if usage else 0,
            "accepted_draft_tokens": usage.accepted_draft_tokens if usage else 0,
            "acceptance_rate": round(usage.acceptance_rate, 4) if usage else 0.0,
            "mean_accepted_length": round(usage.mean_accepted_length, 4) if usage else 0.0,
            "duration_s": round((record.end_ns - record.start_ns) / 1e9, 6),
            "ttft_s": round((record.first_token_ns - record.start_ns) / 1e9, 6)
            if record.first_token_ns
            else None,
        },
    )


OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def tracing_mode(tracing: str, env: Mapping[str, str]) -> str:
    """``--tracing`` as it applies: ``auto`` is ``otlp`` where an OTLP endpoint is configured
    (one of :data:`OTLP_ENDPOINT_VARIABLES`), else ``none``, so that a server started without
    a collector does not log a failed export every few seconds."""
    if tracing != "auto":
        return tracing
    return "otlp" if any(env.get(name) for name in OTLP_ENDPOINT_VARIABLES) else "none"


def otlp_span_exporter(env: Mapping[str, str]) -> SpanExporter:
    """OTLP span export over the protocol the environment asks for (grpc by default, or
    http/protobuf: a collector's port 4318), each configured by the SDK from OTEL_*."""
    if otlp_protocol("TRACES", env) == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        return HttpSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def otlp_metric_exporter(env: Mapping[str, str]) -> MetricExporter:
    """OTLP metric export over the protocol the environment asks for (as spans)."""
    if otlp_protocol("METRICS", env) == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetricExporter,
        )

        return HttpMetricExporter()
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def service_resource() -> Resource:
    """The SDK's resource from the environment (``OTEL_SERVICE_NAME``, else a ``service.name``
    in ``OTEL_RESOURCE_ATTRIBUTES``), named ``tandem`` where neither names the service (a
    name passed to ``Resource.create`` would override both)."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "tandem"}))
    return resource


def setup_telemetry(
    settings: Settings,
    info: EngineInfo,
    stats: Callable[[], EngineStats],
    *,
    span_processors: list[SpanProcessor] | None = None,
    metric_readers: list[MetricReader] | None = None,
) -> Telemetry:
    """Build providers and exporters from ``settings`` and the OTEL_* environment.

    Tests pass in-memory ``span_processors``/``metric_readers``; they are used in addition to
    whatever the settings ask for.
    """
    resource = service_resource()
    closers: list[Callable[[], object]] = []

    tracer_provider: TracerProvider | None = None
    processors = list(span_processors or [])
    tracing = tracing_mode(settings.tracing, os.environ)
    log.info("span export: %s", tracing)
    if tracing == "otlp":
        processors.append(BatchSpanProcessor(otlp_span_exporter(os.environ)))
    elif tracing == "console":
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if processors:
        tracer_provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        for processor in processors:
            tracer_provider.add_span_processor(processor)

    readers = list(metric_readers or [])
    if settings.metrics_port:
        import prometheus_client
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        registry = prometheus_client.CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        httpd, _ = prometheus_client.start_http_server(
            settings.metrics_port, addr=settings.host.strip("[]"), registry=registry
        )
        closers.append(httpd.shutdown)
    if "otlp" in os.environ.get("OTEL_METRICS_EXPORTER", ""):
        readers.append(PeriodicExportingMetricReader(otlp_metric_exporter(os.environ)))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, views=metric_views()
    )
    metrics = Metrics(meter_provider.get_meter("tandem"), stats)

    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracer_provider is not None:
        interceptors.append(
            aio_server_interceptor(tracer_provider=tracer_provider, filter_=UNTRACED)
        )
    return Telemetry(
        info=info,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics=metrics,
        step_spans=settings.step_spans,
        log_content=settings.log_content,
        interceptors=interceptors,
        _closers=closers,
    )
