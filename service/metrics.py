"""The metric instruments and what one finished call adds to them.

GenAI server metrics follow the OpenTelemetry semantic conventions (names, units, bucket
boundaries). Speculation counters mean what vLLM's ``spec_decode`` counters mean, so in PromQL:
acceptance rate = rate(num_accepted_tokens) / rate(num_draft_tokens), and mean accepted length
= rate(tandem_decode_emitted_tokens) / rate(tandem_decode_target_forward_passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View

from decoding.engine import EngineInfo, EngineStats
from service.servicer import CallRecord

# Bucket boundaries from the GenAI semantic conventions (gen-ai-metrics.md).
REQUEST_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12,
                            10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)


def metric_views() -> list[View]:
    def view(name: str, buckets: tuple[float, ...]) -> View:
        return View(instrument_name=name,
                    aggregation=ExplicitBucketHistogramAggregation(boundaries=buckets))

    return [
        view("gen_ai.server.request.duration", REQUEST_DURATION_BUCKETS),
        view("gen_ai.server.time_to_first_token", TTFT_BUCKETS),
        view("gen_ai.server.time_per_output_token", TPOT_BUCKETS),
        view("gen_ai.server.token.usage", TOKEN_BUCKETS),
    ]


def operation_name(record: CallRecord) -> str:
    return "chat" if record.request is not None and record.request.messages else "text_completion"


class Metrics:
    def __init__(self, meter: Meter, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Time per call, end to end")
        self.ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from the call's start to its first generated token")
        self.tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per generated token after the first")
        self.token_usage = meter.create_histogram(
            "gen_ai.server.token.usage", unit="{token}",
            description="Tokens per call, by gen_ai.token.type (input or output)")
        self.requests = meter.create_counter(
            "tandem.requests", unit="{request}", description="Finished calls by gRPC status")
        self.num_drafts = meter.create_counter(
            "tandem.spec_decode.num_drafts", unit="{step}",
            description="Speculative steps that drafted at least one token")
        self.num_draft_tokens = meter.create_counter(
            "tandem.spec_decode.num_draft_tokens", unit="{token}",
            description="Tokens the draft proposed")
        self.num_accepted_tokens = meter.create_counter(
            "tandem.spec_decode.num_accepted_tokens", unit="{token}",
            description="Draft tokens the target accepted")
        self.accepted_per_pos = meter.create_counter(
            "tandem.spec_decode.num_accepted_tokens_per_pos", unit="{token}",
            description="Accepted draft tokens by position in the draft (attribute position)")
        # Where γ varies (adaptive, or requests' own), position i is drafted only in steps of
        # γ > i: acceptance at i is accepted over drafted at i, not over num_drafts.
        self.drafted_per_pos = meter.create_counter(
            "tandem.spec_decode.num_drafted_tokens_per_pos", unit="{token}",
            description="Drafted tokens by position in the draft (attribute position)")
        self.forward_passes = meter.create_counter(
            "tandem.decode.target_forward_passes", unit="{pass}",
            description="Target forward passes in decoding (one per step)")
        self.emitted_tokens = meter.create_counter(
            "tandem.decode.emitted_tokens", unit="{token}",
            description="Tokens emitted by decoding steps (accepted plus bonus)")
        meter.create_observable_gauge(
            "tandem.requests.in_flight", [self._observe("running")], unit="{request}",
            description="Requests admitted and decoding")
        # Calls still being tokenized wait too: they count against --max-queue, and a burst
        # refused for them must not look like an idle queue.
        meter.create_observable_gauge(
            "tandem.queue.depth", [self._observe("waiting", "preparing")], unit="{request}",
            description="Requests waiting for admission (queued, or their prompts tokenized)")
        meter.create_observable_gauge(
            "tandem.spec_decode.gamma", [self._observe("last_gamma")], unit="{token}",
            description="γ used by the most recent speculative step")
        meter.create_observable_gauge(
            "tandem.kv.reserved_tokens", [self._observe("reserved_tokens")], unit="{token}",
            description="KV cache positions reserved by running requests")

    def _observe(self, *names: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A gauge's callback: the sum of these engine stats."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            stats = self._stats()
            yield Observation(sum(getattr(stats, name) for name in names))

        return callback

    def call_started(self, record: CallRecord) -> None:
        pass

    def call_refused(self, method: str, code: grpc.StatusCode, info: EngineInfo) -> None:
        """Counted as a finished call with its status; the request was never read, so it has
        no operation, duration or tokens."""
        self.requests.add(1, {
            "gen_ai.request.model": info.target_model, "rpc.method": method,
            "grpc_code": code.name,
        })

    def call_finished(self, record: CallRecord, info: EngineInfo) -> None:
        attributes = {
            "gen_ai.operation.name": operation_name(record),
            "gen_ai.request.model": info.target_model,
            "rpc.method": record.method,
        }
        code = {"grpc_code": record.code.name}
        self.requests.add(1, {**attributes, **code})
        if record.code.name != "OK":
            attributes["error.type"] = record.code.name
        self.request_duration.record((record.end_ns - record.start_ns) / 1e9, attributes)
        if record.handle is None:
            return
        usage = record.handle.usage
        if record.first_token_ns:
            self.ttft.record((record.first_token_ns - record.start_ns) / 1e9, attributes)
            if usage.completion_tokens > 1:
                per_token = (record.end_ns - record.first_token_ns) / 1e9
                self.tpot.record(per_token / (usage.completion_tokens - 1), attributes)
        self.token_usage.record(usage.prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        self.token_usage.record(
            usage.completion_tokens, {**attributes, "gen_ai.token.type": "output"}
        )
        steps = record.handle.timeline.steps
        self.num_drafts.add(sum(1 for s in steps if s.gamma))
        self.num_draft_tokens.add(usage.draft_tokens)
        self.num_accepted_tokens.add(usage.accepted_draft_tokens)
        for position, accepted in enumerate(usage.accepted_by_position):
            self.accepted_per_pos.add(accepted, {"position": position})
        for position, drafted in enumerate(usage.drafted_by_position):
            self.drafted_per_pos.add(drafted, {"position": position})
        self.forward_passes.add(usage.target_forward_passes)
        self.emitted_tokens.add(sum(s.emitted for s in steps))
