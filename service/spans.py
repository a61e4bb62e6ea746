"""Spans for a request's life inside the engine, written when the call ends.

The engine records a timeline (queue, prefills, every step) as plain data; here it becomes a
span tree under the RPC's server span, with the exact start and end times:

    <server span of the RPC>            (opentelemetry-instrumentation-grpc)
      tandem.generate
        tandem.queue
        tandem.prefill.target
        tandem.prefill.draft
        tandem.decode
          tandem.step  x steps           (or span events on tandem.decode)
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer

from decoding.engine import EngineInfo
from decoding.handle import StepRecord
from service.metrics import operation_name
from service.servicer import CallRecord


def request_attributes(record: CallRecord, info: EngineInfo) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation_name(record),
        "gen_ai.request.model": info.target_model,
        "tandem.draft_model": info.draft_model,
        "tandem.request_id": record.request_id,
        "rpc.grpc.status_code": record.code.value[0],
    }
    request = record.request
    if request is not None:
        attributes["gen_ai.request.temperature"] = request.sampling.temperature
        attributes["gen_ai.request.top_p"] = request.sampling.top_p
        if request.sampling.top_k:
            attributes["gen_ai.request.top_k"] = request.sampling.top_k
        if request.sampling.frequency_penalty:
            attributes["gen_ai.request.frequency_penalty"] = request.sampling.frequency_penalty
        if request.sampling.presence_penalty:
            attributes["gen_ai.request.presence_penalty"] = request.sampling.presence_penalty
        if request.max_new_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_new_tokens
        seed = request.sampling.seed
        if seed is not None and seed < 2**63:  # OTLP's integers are signed 64-bit; the seed
            attributes["gen_ai.request.seed"] = seed  # is unsigned: one above is left out
        if request.stop:
            attributes["gen_ai.request.stop_sequences"] = list(request.stop)
    if record.finish_reason is not None:
        attributes["gen_ai.response.finish_reasons"] = [record.finish_reason.value]
    if record.handle is not None:
        usage = record.handle.usage
        attributes |= {
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "tandem.draft_tokens": usage.draft_tokens,
            "tandem.accepted_draft_tokens": usage.accepted_draft_tokens,
            "tandem.acceptance_rate": usage.acceptance_rate,
            "tandem.mean_accepted_length": usage.mean_accepted_length,
            "tandem.target_forward_passes": usage.target_forward_passes,
        }
    return attributes


def step_attributes(step: StepRecord) -> dict[str, Any]:
    return {
        "tandem.step.gamma": step.gamma,
        "tandem.step.accepted_tokens": step.accepted,
        "tandem.step.emitted_tokens": step.emitted,
        "tandem.step.draft_ms": step.draft_s * 1e3,
        "tandem.step.verify_ms": step.verify_s * 1e3,
    }


def record_call_spans(
    tracer: Tracer, record: CallRecord, info: EngineInfo, step_spans: bool
) -> None:
    attributes = request_attributes(record, info)
    server_span = trace.get_current_span()
    if server_span.is_recording():  # a stream the client left may see its span ended already
        server_span.set_attributes(attributes)
    failed = record.code.name not in ("OK",)
    timeline = record.handle.timeline if record.handle is not None else None
    start = timeline.submitted_ns if timeline else record.start_ns
    end = (timeline.finished_ns or record.end_ns) if timeline else record.end_ns
    root = tracer.start_span("tandem.generate", start_time=start, attributes=attributes)
    if failed:
        # The code's name only: exception text could carry paths or prompt fragments.
        root.set_status(Status(StatusCode.ERROR, record.code.name))
    if timeline is not None:
        context = trace.set_span_in_context(root)

        def child(name: str, begin: int, finish: int, attrs: dict[str, Any] | None = None):
            span = tracer.start_span(name, context=context, start_time=begin, attributes=attrs)
            span.end(end_time=max(begin, finish))
            return span

        child("tandem.queue", start, timeline.admitted_ns or end)
        if timeline.target_prefill_ns[0]:
            child("tandem.prefill.target", *timeline.target_prefill_ns)
        if timeline.draft_prefill_ns[0]:  # left at 0 when the draft was not prefilled
            child("tandem.prefill.draft", *timeline.draft_prefill_ns)
        if timeline.steps:
            decode = tracer.start_span(
                "tandem.decode", context=context, start_time=timeline.steps[0].start_ns,
                attributes={"tandem.steps": len(timeline.steps)},
            )
            decode_context = trace.set_span_in_context(decode)
            for step in timeline.steps:
                step_end = step.start_ns + int((step.draft_s + step.verify_s) * 1e9)
                if step_spans:
                    span = tracer.start_span("tandem.step", context=decode_context,
                                             start_time=step.start_ns,
                                             attributes=step_attributes(step))
                    span.end(end_time=step_end)
                else:
                    decode.add_event("tandem.step", step_attributes(step), step.start_ns)
            decode.end(end_time=max(end, timeline.steps[0].start_ns))
    root.end(end_time=max(start, end))
