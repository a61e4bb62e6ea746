"""Serving metrics on synthetic timings whose answers are worked out by hand."""

from __future__ import annotations

import json

import pytest

from bench.compare import compare_outputs, first_divergence
from bench.metrics import (
    SLO,
    Arrival,
    RequestRecord,
    UsageRecord,
    distribution,
    e2e_latency,
    failures_by_code,
    itl,
    itl_per_token,
    meets_slo,
    speculation_stats,
    summarize,
    to_jsonable,
    tpot,
    ttft,
)


def record(
    send: float,
    arrivals: list[tuple[float, int]],
    *,
    index: int = 0,
    status: str = "OK",
    usage: UsageRecord | None = None,
) -> RequestRecord:
    end = arrivals[-1][0] if arrivals else send + 1.0
    return RequestRecord(
        index=index,
        send_time=send,
        end_time=end,
        arrivals=tuple(Arrival(t, k) for t, k in arrivals),
        status=status,
        usage=usage,
    )


# Sent at 10.0; messages at 10.5 (1 token), 10.7 (3 tokens), 11.0 (2 tokens): 6 tokens.
SPECULATIVE = record(10.0, [(10.5, 1), (10.7, 3), (11.0, 2)])


def test_ttft_e2e_and_tpot_follow_vllm() -> None:
    assert ttft(SPECULATIVE) == pytest.approx(0.5)
    assert e2e_latency(SPECULATIVE) == pytest.approx(1.0)
    # (e2e - ttft) / (output_tokens - 1) = 0.5 / 5
    assert tpot(SPECULATIVE) == pytest.approx(0.1)


def test_itl_is_one_gap_per_message_as_in_vllm() -> None:
    assert itl(SPECULATIVE) == pytest.approx([0.2, 0.3])


def test_itl_per_token_counts_a_k_token_message_as_a_gap_and_k_minus_1_zeros() -> None:
    # first message: 0 zeros; then gap 0.2 + 2 zeros; then gap 0.3 + 1 zero
    assert itl_per_token(SPECULATIVE) == pytest.approx([0.2, 0.0, 0.0, 0.3, 0.0])
    gaps = itl_per_token(SPECULATIVE)
    assert len(gaps) == 6 - 1  # one per token after the first
    assert sum(gaps) == pytest.approx(e2e_latency(SPECULATIVE) - ttft(SPECULATIVE))


def test_a_first_message_with_several_tokens_adds_zero_gaps() -> None:
    assert itl_per_token(record(0.0, [(1.0, 3), (2.0, 1)])) == pytest.approx([0.0, 0.0, 1.0])
    assert itl(record(0.0, [(1.0, 3), (2.0, 1)])) == pytest.approx([1.0])


def test_messages_without_tokens_are_not_arrivals() -> None:
    # the last message carries only finish_reason and usage
    rec = record(0.0, [(1.0, 1), (2.0, 1), (5.0, 0)])
    assert e2e_latency(rec) == pytest.approx(2.0)
    assert itl(rec) == pytest.approx([1.0])
    assert itl_per_token(rec) == pytest.approx([1.0])


def test_output_tokens_prefer_usage_and_tpot_needs_two_tokens() -> None:
    usage = UsageRecord(completion_tokens=11)
    rec = record(0.0, [(1.0, 1), (2.0, 1)], usage=usage)
    assert rec.output_tokens == 11
    assert tpot(rec) == pytest.approx(1.0 / 10)
    assert tpot(record(0.0, [(1.0, 1)])) is None
    assert ttft(record(0.0, [], status="UNAVAILABLE")) is None
    # A unary call: all 64 tokens in one message, so no time per token was seen (it read 0).
    assert tpot(record(0.0, [(2.0, 64)])) is None


def test_distribution_uses_linear_percentiles_in_milliseconds() -> None:
    values = [i / 1000 for i in range(1, 11)]  # 1 .. 10 ms
    result = distribution(values)
    assert result.count == 10
    assert result.mean == pytest.approx(5.5)
    assert result.median == pytest.approx(5.5)
    assert result.p90 == pytest.approx(9.1)  # 1 + 0.9 * 9
    assert result.p99 == pytest.approx(9.91)
    empty = distribution([])
    assert (empty.count, empty.mean, empty.p99) == (0, None, None)


def test_goodput_counts_completed_requests_within_every_slo() -> None:
    fast = record(0.0, [(0.1, 1), (0.2, 1), (0.3, 1)], index=0)  # ttft 100, tpot 100, e2e 300
    slow_start = record(0.0, [(0.5, 1), (0.6, 1)], index=1)  # ttft 500, tpot 100, e2e 600
    slow_decode = record(0.0, [(0.1, 1), (1.1, 1)], index=2)  # ttft 100, tpot 1000
    one_token = record(0.0, [(0.2, 1)], index=3)  # tpot counts as 0 for goodput
    failed = record(0.0, [], index=4, status="RESOURCE_EXHAUSTED")
    records = [fast, slow_start, slow_decode, one_token, failed]
    slo = SLO(ttft_ms=200, tpot_ms=150)
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    assert meets_slo(fast, SLO(ttft_ms=100, tpot_ms=100, e2e_ms=300))  # limits are inclusive
    assert not meets_slo(fast, SLO(e2e_ms=299))
    metrics = summarize(records, duration_s=2.0, slo=slo)
    assert metrics.good_requests == 2
    assert metrics.goodput == pytest.approx(1.0)
    # no SLO: every completed request is good
    assert summarize(records, duration_s=2.0).good_requests == 4


def test_failures_are_counted_by_status_code() -> None:
    records = [
        record(0.0, [(1.0, 1)]),
        record(0.0, [], status="RESOURCE_EXHAUSTED"),
        record(0.0, [], status="DEADLINE_EXCEEDED"),
        record(0.0, [], status="RESOURCE_EXHAUSTED"),
    ]
    assert failures_by_code(records) == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    metrics = summarize(records)
    assert (metrics.num_requests, metrics.completed, metrics.failed) == (4, 1, 3)
    assert metrics.failures_by_code == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}


def test_throughput_and_latency_summary() -> None:
    a = record(
        0.0, [(0.5, 1), (1.0, 3)], index=0, usage=UsageRecord(prompt_tokens=7, completion_tokens=4)
    )
    b = record(
        1.0, [(1.5, 2), (3.0, 2)], index=1, usage=UsageRecord(prompt_tokens=5, completion_tokens=4)
    )
    metrics = summarize([a, b])
    assert metrics.duration_s == pytest.approx(3.0)  # first send to last end
    assert metrics.request_throughput == pytest.approx(2 / 3)
    assert metrics.total_output_tokens == 8
    assert metrics.total_prompt_tokens == 12
    assert metrics.output_throughput == pytest.approx(8 / 3)
    assert metrics.ttft_ms.mean == pytest.approx(500.0)
    assert metrics.e2e_ms.median == pytest.approx(1500.0)  # 1000 and 2000
    assert metrics.tpot_ms.count == 2
    assert metrics.tpot_ms.mean == pytest.approx((500 / 3 + 1500 / 3) / 2)
    assert metrics.itl_ms.count == 2  # one gap per message after the first
    assert metrics.itl_per_token_ms.count == 6  # one per token after the first


def test_speculation_stats_sum_counts_before_dividing() -> None:
    first = UsageRecord(
        completion_tokens=10,
        draft_tokens=8,
        accepted_draft_tokens=6,
        target_forward_passes=4,
        accepted_by_position=(3, 2, 1),
        drafted_by_position=(4, 3, 1),
    )
    second = UsageRecord(
        completion_tokens=6,
        draft_tokens=2,
        accepted_draft_tokens=0,
        target_forward_passes=6,
        accepted_by_position=(0,),
        drafted_by_position=(2,),
    )
    stats = speculation_stats([first, second])
    assert stats.acceptance_rate == pytest.approx(6 / 10)
    assert stats.mean_accepted_length == pytest.approx(16 / 10)
    assert stats.accepted_by_position == [3, 2, 1]
    assert stats.drafted_by_position == [6, 3, 1]
    assert stats.acceptance_by_position == pytest.approx([0.5, 2 / 3, 1.0])


def test_speculation_off_has_no_acceptance_rate() -> None:
    stats = speculation_stats([UsageRecord(completion_tokens=5, target_forward_passes=5)])
    assert stats.acceptance_rate is None
    assert stats.mean_accepted_length == pytest.approx(1.0)
    assert stats.acceptance_by_position == []


def test_results_are_json_serialisable() -> None:
    metrics = summarize([SPECULATIVE, record(0.0, [], status="UNAVAILABLE")], slo=SLO(ttft_ms=1000))
    text = json.dumps(to_jsonable(metrics))
    loaded = json.loads(text)
    assert loaded["failures_by_code"] == {"UNAVAILABLE": 1}
    assert loaded["slo"] == {"ttft_ms": 1000, "tpot_ms": None, "e2e_ms": None}
    assert loaded["ttft_ms"]["median"] == pytest.approx(500.0)


def test_compare_outputs_reports_where_outputs_diverge() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    result = compare_outputs([[1, 2], [3, 4], None, [7]], [[1, 2], [3, 5], [6], [7, 8]])
    assert result.compared == 3
    assert result.identical is False
    assert result.mismatched_prompts == [1, 3]
    assert result.first_divergence == [1, 1]
    assert compare_outputs([None], [[1]]).identical is None
    assert compare_outputs([[1]], [[1]]).identical is True
