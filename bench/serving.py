"""The load client: runs a workload against a Tandem server over gRPC and records every request.

It talks gRPC only (no torch, no tokenizer): the server tokenizes and reports token counts in
``usage``. A run sends the workload's prompts at its arrival offsets, at most ``concurrency``
calls in flight (an ``asyncio.Semaphore``); as in vLLM, a request's clock starts when it gets
through the semaphore, so TTFT does not include time spent waiting on the client's own limit.
A sweep repeats the same prompts for every speculation setting and every concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from tqdm import tqdm

from bench.compare import compare_outputs
from bench.metrics import OK, SLO, Arrival, RequestRecord, RunMetrics, UsageRecord, summarize
from bench.workloads import Prompt, Workload, arrival_offsets
from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class SpeculationSetting:
    """A value of ``speculation.num_speculative_tokens``: ``None`` adapts, 0 is off."""

    label: str
    num_speculative_tokens: int | None

    @classmethod
    def parse(cls, text: str) -> SpeculationSetting:
        """``adaptive``, ``off`` (or ``0``), or a fixed γ such as ``4``."""
        value = text.strip().lower()
        if value == "adaptive":
            return cls("adaptive", None)
        if value in ("off", "0"):
            return cls("off", 0)
        if value.isdigit() and int(value) > 0:
            return cls(f"gamma={int(value)}", int(value))
        raise ValueError(f"speculation setting {text!r}: use adaptive, off or a positive integer")


DEFAULT_SPECULATION = tuple(SpeculationSetting.parse(s) for s in ("adaptive", "off", "2", "4"))


@dataclass(frozen=True)
class ServingConfig:
    address: str
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    speculation: tuple[SpeculationSetting, ...] = DEFAULT_SPECULATION
    stream: bool = True
    slo: SLO = field(default_factory=SLO)
    request_timeout_s: float | None = 600.0
    warmup_requests: int = 1
    """Requests sent (and not recorded) before the sweep, so start-up costs stay out of it."""
    progress: bool = True


@dataclass(frozen=True)
class ServingRun:
    """One point of the sweep: a speculation setting at a concurrency."""

    speculation: str
    num_speculative_tokens: int | None
    concurrency: int
    stream: bool
    metrics: RunMetrics
    output_token_ids: list[list[int] | None]
    """Per prompt, in workload order; ``None`` where the request failed."""
    prompt_tokens: list[int | None]
    """Per prompt, the server's ``usage.prompt_tokens``; ``None`` where it was not reported."""
    greedy_matches_reference: bool | None = None
    """Greedy only: every completed output equals the reference run's (speculation off)."""
    mismatched_prompts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ServingResults:
    address: str
    model_info: dict[str, Any]
    workload: dict[str, Any]
    reference_run: str | None
    runs: list[ServingRun]


def build_request(
    message_type: Any, prompt: Prompt, workload: Workload, index: int, speculation: int | None
) -> Any:
    """A ``GenerateRequest`` or ``GenerateStreamRequest`` (both have the same fields)."""
    request = message_type(max_new_tokens=workload.max_new_tokens, request_id=f"bench-{index}")
    if prompt.text is not None:
        request.prompt = prompt.text
    else:
        assert prompt.messages is not None
        request.messages.extend(
            pb.ChatMessage(role=turn.role, content=turn.content) for turn in prompt.messages
        )
    request.sampling.temperature = workload.temperature
    seed = workload.request_seed(index)
    if seed is not None:
        request.sampling.seed = seed
    if speculation is not None:
        request.speculation.num_speculative_tokens = speculation
    return request


def usage_record(usage: Any) -> UsageRecord:
    return UsageRecord(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        draft_tokens=usage.draft_tokens,
        accepted_draft_tokens=usage.accepted_draft_tokens,
        target_forward_passes=usage.target_forward_passes,
        accepted_by_position=tuple(usage.accepted_by_position),
        drafted_by_position=tuple(usage.drafted_by_position),
    )


async def send_one(
    stub: pb_grpc.GenerationServiceStub,
    workload: Workload,
    index: int,
    speculation: int | None,
    *,
    stream: bool,
    timeout_s: float | None,
) -> RequestRecord:
    """Send one request and record when each message arrived and what it carried."""
    prompt = workload.prompts[index]
    arrivals: list[Arrival] = []
    token_ids: list[int] = []
    usage: UsageRecord | None = None
    status = OK
    send_time = time.perf_counter()
    try:
        if stream:
            request = build_request(pb.GenerateStreamRequest, prompt, workload, index, speculation)
            async for message in stub.GenerateStream(request, timeout=timeout_s):
                arrivals.append(Arrival(time.perf_counter(), len(message.token_ids)))
                token_ids.extend(message.token_ids)
                if message.HasField("usage"):
                    usage = usage_record(message.usage)
        else:
            request = build_request(pb.GenerateRequest, prompt, workload, index, speculation)
            response = await stub.Generate(request, timeout=timeout_s)
            arrivals.append(Arrival(time.perf_counter(), len(response.token_ids)))
            token_ids.extend(response.token_ids)
            if response.HasField("usage"):
                usage = usage_record(response.usage)
    except grpc.aio.AioRpcError as err:
        status = err.code().name
    return RequestRecord(
        index=index,
        send_time=send_time,
        end_time=time.perf_counter(),
        arrivals=tuple(arrivals),
        status=status,
        usage=usage,
        output_token_ids=tuple(token_ids),
    )


async def run_workload(
    stub: pb_grpc.GenerationServiceStub,
    workload: Workload,
    speculation: int | None,
    *,
    concurrency: int,
    stream: bool = True,
    timeout_s: float | None = None,
    progress: bool = False,
    label: str = "",
) -> tuple[list[RequestRecord], float]:
    """Run every prompt of ``workload`` once; return the records in prompt order and the
    benchmark's wall time in seconds (first send to last end)."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    limit = asyncio.Semaphore(concurrency)
    offsets = arrival_offsets(len(workload.prompts), workload.arrival)
    bar = tqdm(total=len(offsets), desc=label, disable=not progress, leave=False)
    started = time.perf_counter()

    async def one(index: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, started + offsets[index] - time.perf_counter()))
        async with limit:
            record = await send_one(
                stub, workload, index, speculation, stream=stream, timeout_s=timeout_s
            )
        bar.update(1)
        return record

    try:
        records = await asyncio.gather(*(one(i) for i in range(len(offsets))))
    finally:
        bar.close()
    return list(records), time.perf_counter() - started


async def get_model_info(stub: pb_grpc.GenerationServiceStub) -> dict[str, Any]:
    """The server's ``GetModelInfo`` as a dict; empty when the call fails."""
    try:
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    except grpc.aio.AioRpcError as err:
        return {"error": err.code().name}
    return json_format.MessageToDict(info, preserving_proto_field_name=True)


async def sweep(config: ServingConfig, workload: Workload) -> ServingResults:
    """Every speculation setting at every concurrency, on the same prompts."""
    async with grpc.aio.insecure_channel(config.address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        model_info = await get_model_info(stub)
        for index in range(min(config.warmup_requests, len(workload.prompts))):
            await send_one(
                stub,
                workload,
                index,
                None,
                stream=config.stream,
                timeout_s=config.request_timeout_s,
            )
        runs = []
        for setting in config.speculation:
            for concurrency in config.concurrency:
                records, duration = await run_workload(
                    stub,
                    workload,
                    setting.num_speculative_tokens,
                    concurrency=concurrency,
                    stream=config.stream,
                    timeout_s=config.request_timeout_s,
                    progress=config.progress,
                    label=f"{setting.label} c={concurrency}",
                )
                runs.append(_run(setting, concurrency, config, records, duration))
    reference = _reference_run(runs) if workload.temperature == 0 else None
    if reference is not None:
        runs = [_compare(run, reference) for run in runs]
    return ServingResults(
        address=config.address,
        model_info=model_info,
        workload=workload.describe(),
        reference_run=None if reference is None else _run_label(reference),
        runs=runs,
    )


def _run(
    setting: SpeculationSetting,
    concurrency: int,
    config: ServingConfig,
    records: Sequence[RequestRecord],
    duration: float,
) -> ServingRun:
    return ServingRun(
        speculation=setting.label,
        num_speculative_tokens=setting.num_speculative_tokens,
        concurrency=concurrency,
        stream=config.stream,
        metrics=summarize(records, duration_s=duration, slo=config.slo),
        output_token_ids=[list(r.output_token_ids) if r.ok else None for r in records],
        prompt_tokens=[r.usage.prompt_tokens if r.usage is not None else None for r in records],
    )


def _run_label(run: ServingRun) -> str:
    return f"{run.speculation} c={run.concurrency}"


def _reference_run(runs: Sequence[ServingRun]) -> ServingRun | None:
    """The first run with speculation off (the target alone), else the first run."""
    off = [run for run in runs if run.num_speculative_tokens == 0]
    candidates = off or list(runs)
    return candidates[0] if candidates else None


def _compare(run: ServingRun, reference: ServingRun) -> ServingRun:
    comparison = compare_outputs(run.output_token_ids, reference.output_token_ids)
    return dataclasses.replace(
        run,
        greedy_matches_reference=comparison.identical,
        mismatched_prompts=comparison.mismatched_prompts,
    )


def run_sweep(config: ServingConfig, workload: Workload) -> ServingResults:
    """Synchronous entry point for the CLI."""
    return asyncio.run(sweep(config, workload))
