"""Serving metrics computed from per-request records: pure functions, JSON-ready dataclasses.

The definitions follow vLLM's serving benchmark (``vllm/benchmarks/serve.py``,
``calculate_metrics``) so numbers can be read the same way:

- TTFT: from sending the request to the first message that carries a token.
- E2E latency: from sending the request to the last message that carries a token (vLLM's
  ``latency``); for a unary call, to the response.
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, only for requests with more than one output
  token; ``output_tokens`` is the server's ``usage.completion_tokens``.
- ITL (``itl_ms``): vLLM's definition, one value per stream message after the first, the gap
  since the previous token-carrying message. A message carrying k tokens is one arrival, so
  speculative decoding yields fewer, larger ITL values than plain decoding.
- Per-token ITL (``itl_per_token_ms``): the same arrivals seen per token: a message carrying k
  tokens contributes its gap followed by k-1 zero gaps (the first message contributes only its
  k-1 zeros). Its mean times the number of values equals the decode time, so it is comparable
  across speculation settings, which vLLM's per-message ITL is not.
- Goodput: completed requests per second that meet every SLO given (TTFT, TPOT, E2E, each
  ``<=``); a request with one output token has TPOT 0 for this purpose, as in vLLM.
- Throughput: completed requests and output tokens per second of benchmark wall time.
- Speculation: acceptance rate = accepted / drafted tokens and mean accepted length = emitted
  tokens per target forward pass, both summed over requests before dividing (token-weighted),
  and acceptance by draft position i = accepted_by_position[i] / drafted_by_position[i] summed
  over requests.

Percentiles use numpy's linear interpolation, as vLLM does. Statistics of an empty sample are
``None`` (``null`` in JSON), never a made-up 0.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OK = "OK"
"""The status of a request that completed; failures carry a gRPC status code name."""

MS_PER_S = 1000.0


@dataclass(frozen=True)
class Arrival:
    """One stream message: when it arrived (seconds, the client's monotonic clock), its tokens."""

    time: float
    num_tokens: int


@dataclass(frozen=True)
class UsageRecord:
    """The ``usage`` of a finished request, as the server reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    target_forward_passes: int = 0
    accepted_by_position: tuple[int, ...] = ()
    drafted_by_position: tuple[int, ...] = ()


@dataclass(frozen=True)
class RequestRecord:
    """What the client saw of one request."""

    index: int
    """Position of the prompt in the workload."""
    send_time: float
    """When the call was started (seconds, the same clock as the arrivals)."""
    end_time: float
    """When the call ended: last message, error or response."""
    arrivals: tuple[Arrival, ...] = ()
    """Every message, in order; a unary call has one, at ``end_time``."""
    status: str = OK
    """``"OK"`` or the gRPC status code name (``"RESOURCE_EXHAUSTED"``, ...)."""
    usage: UsageRecord | None = None
    output_token_ids: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def output_tokens(self) -> int:
        """``usage.completion_tokens`` when reported, else the tokens counted in the messages."""
        if self.usage is not None and self.usage.completion_tokens:
            return self.usage.completion_tokens
        return sum(arrival.num_tokens for arrival in self.arrivals)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds; ``None`` means not checked."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


@dataclass(frozen=True)
class Distribution:
    """Summary of a sample, in milliseconds."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True)
class SpeculationStats:
    """Speculation counters summed over the completed requests, and the ratios they give."""

    completion_tokens: int
    draft_tokens: int
    accepted_draft_tokens: int
    target_forward_passes: int
    acceptance_rate: float | None
    mean_accepted_length: float | None
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    acceptance_by_position: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class RunMetrics:
    """Everything measured in one run of a workload."""

    num_requests: int
    completed: int
    failed: int
    failures_by_code: dict[str, int]
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float
    """Completed requests per second."""
    output_throughput: float
    """Output tokens of completed requests per second."""
    slo: SLO
    good_requests: int
    goodput: float
    """Completed requests per second that met every SLO."""
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    itl_per_token_ms: Distribution
    e2e_ms: Distribution
    speculation: SpeculationStats


def first_token_time(record: RequestRecord) -> float | None:
    """Arrival time of the first message that carries a token."""
    return next((a.time for a in record.arrivals if a.num_tokens > 0), None)


def last_token_time(record: RequestRecord) -> float | None:
    """Arrival time of the last message that carries a token."""
    return next((a.time for a in reversed(record.arrivals) if a.num_tokens > 0), None)


def ttft(record: RequestRecord) -> float | None:
    """Time to first token, seconds; ``None`` when no token arrived."""
    first = first_token_time(record)
    return None if first is None else first - record.send_time


def e2e_latency(record: RequestRecord) -> float | None:
    """Send to last token, seconds; ``None`` when no token arrived."""
    last = last_token_time(record)
    return None if last is None else last - record.send_time


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first, seconds; ``None`` with fewer than 2 tokens, or
    where every token came in one message (a unary call): nothing was seen between them, and
    0 would read as infinitely fast decoding."""
    first, e2e, tokens = ttft(record), e2e_latency(record), record.output_tokens
    carrying = sum(1 for arrival in record.arrivals if arrival.num_tokens > 0)
    if first is None or e2e is None or tokens < 2 or carrying < 2:
        return None
    return (e2e - first) / (tokens - 1)


def itl(record: RequestRecord) -> list[float]:
    """vLLM's inter-token latencies, seconds: one gap per token-carrying message after the first."""
    times = [a.time for a in record.arrivals if a.num_tokens > 0]
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def itl_per_token(record: RequestRecord) -> list[float]:
    """Inter-token latencies per token, seconds: a k-token message is one gap then k-1 zeros."""
    gaps: list[float] = []
    previous: float | None = None
    for arrival in record.arrivals:
        if arrival.num_tokens <= 0:
            continue
        if previous is not None:
            gaps.append(arrival.time - previous)
        gaps.extend([0.0] * (arrival.num_tokens - 1))
        previous = arrival.time
    return gaps


def distribution(values_s: Iterable[float]) -> Distribution:
    """Mean, median, p90 and p99 of values given in seconds, reported in milliseconds."""
    values = np.asarray(list(values_s), dtype=np.float64) * MS_PER_S
    if values.size == 0:
        return Distribution(count=0, mean=None, median=None, p90=None, p99=None)
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return Distribution(
        count=int(values.size), mean=float(values.mean()), median=p50, p90=p90, p99=p99
    )


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Whether a completed request met every objective given (``<=``)."""
    if not record.ok:
        return False
    checks = (
        (slo.ttft_ms, ttft(record)),
        (slo.tpot_ms, tpot(record) or 0.0),  # unseen (one token, or one message): met
        (slo.e2e_ms, e2e_latency(record)),
    )
    for limit_ms, value_s in checks:
        if limit_ms is None:
            continue
        if value_s is None or value_s * MS_PER_S > limit_ms:
            return False
    return True


def failures_by_code(records: Iterable[RequestRecord]) -> dict[str, int]:
    """How many requests failed with each gRPC status code name, sorted by name."""
    counts = Counter(r.status for r in records if not r.ok)
    return dict(sorted(counts.items()))


def speculation_stats(usages: Iterable[UsageRecord]) -> SpeculationStats:
    """Sum the speculation counters of several requests and compute the ratios."""
    completion = drafted = accepted = passes = 0
    accepted_by: list[int] = []
    drafted_by: list[int] = []
    for usage in usages:
        completion += usage.completion_tokens
        drafted += usage.draft_tokens
        accepted += usage.accepted_draft_tokens
        passes += usage.target_forward_passes
        _add_into(accepted_by, usage.accepted_by_position)
        _add_into(drafted_by, usage.drafted_by_position)
    _add_into(accepted_by, [0] * len(drafted_by))
    _add_into(drafted_by, [0] * len(accepted_by))
    return SpeculationStats(
        completion_tokens=completion,
        draft_tokens=drafted,
        accepted_draft_tokens=accepted,
        target_forward_passes=passes,
        acceptance_rate=accepted / drafted if drafted else None,
        mean_accepted_length=completion / passes if passes else None,
        accepted_by_position=accepted_by,
        drafted_by_position=drafted_by,
        acceptance_by_position=[
            a / d if d else None for a, d in zip(accepted_by, drafted_by, strict=True)
        ],
    )


def summarize(
    records: Sequence[RequestRecord], *, duration_s: float | None = None, slo: SLO | None = None
) -> RunMetrics:
    """All metrics of one run. ``duration_s`` defaults to first send to last end."""
    slo = slo or SLO()
    if duration_s is None:
        duration_s = (
            max(r.end_time for r in records) - min(r.send_time for r in records) if records else 0.0
        )
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    good = sum(meets_slo(r, slo) for r in done)
    return RunMetrics(
        num_requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        failures_by_code=failures_by_code(records),
        duration_s=duration_s,
        total_prompt_tokens=sum(r.usage.prompt_tokens for r in done if r.usage is not None),
        total_output_tokens=output_tokens,
        request_throughput=_per_second(len(done), duration_s),
        output_throughput=_per_second(output_tokens, duration_s),
        slo=slo,
        good_requests=good,
        goodput=_per_second(good, duration_s),
        ttft_ms=distribution(v for r in done if (v := ttft(r)) is not None),
        tpot_ms=distribution(v for r in done if (v := tpot(r)) is not None),
        itl_ms=distribution(gap for r in done for gap in itl(r)),
        itl_per_token_ms=distribution(gap for r in done for gap in itl_per_token(r)),
        e2e_ms=distribution(v for r in done if (v := e2e_latency(r)) is not None),
        speculation=speculation_stats(r.usage for r in done if r.usage is not None),
    )


def to_jsonable(value: Any) -> Any:
    """Dataclasses (nested), tuples and dicts as plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def _add_into(total: list[int], counts: Sequence[int]) -> None:
    if len(total) < len(counts):
        total.extend([0] * (len(counts) - len(total)))
    for i, count in enumerate(counts):
        total[i] += count


def _per_second(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0
