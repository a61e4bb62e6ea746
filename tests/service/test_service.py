"""GenerationService over a real server on port 0: tokens, streaming, health, reflection,
cancellation and every invalid input the API promises to refuse."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.decoding.test_engine import wait_until_idle

PROMPT_IDS = [10, 57, 203, 99, 14, 250, 31]


def greedy(gamma: int | None = 3, n: int = 24, cls=pb.GenerateRequest):
    request = cls(prompt_token_ids=PROMPT_IDS, max_new_tokens=n)
    if gamma is not None:
        request.speculation.num_speculative_tokens = gamma
    return request


async def test_unary_and_stream_agree(served) -> None:
    unary = await served.stub.Generate(greedy())
    messages = [m async for m in served.stub.GenerateStream(greedy(cls=pb.GenerateStreamRequest))]
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    assert "".join(m.text for m in messages) == unary.text
    assert messages[-1].finish_reason == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert messages[-1].usage.completion_tokens == len(unary.token_ids)
    assert not any(m.HasField("usage") for m in messages[:-1])
    # draft == target: every draft token is accepted, so steps carry several tokens
    assert max(len(m.token_ids) for m in messages) == 4
    assert unary.usage.acceptance_rate == pytest.approx(1.0)
    assert unary.usage.draft_tokens == unary.usage.accepted_draft_tokens > 0


async def test_logprobs_come_with_their_tokens(served) -> None:
    """One entry per token, unary and streamed alike; greedy tokens are the most likely."""
    unary_request = greedy(n=12)
    unary_request.logprobs, unary_request.top_logprobs = True, 2
    unary = await served.stub.Generate(unary_request)
    stream_request = greedy(n=12, cls=pb.GenerateStreamRequest)
    stream_request.logprobs, stream_request.top_logprobs = True, 2
    messages = [m async for m in served.stub.GenerateStream(stream_request)]
    for message in messages:
        assert [lp.token_id for lp in message.logprobs] == list(message.token_ids)
    streamed = [lp for m in messages for lp in m.logprobs]
    assert list(unary.logprobs) == streamed
    assert [lp.token_id for lp in unary.logprobs] == list(unary.token_ids)
    for entry in unary.logprobs:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token_id == entry.token_id
        assert entry.top_logprobs[0].logprob == entry.logprob >= entry.top_logprobs[1].logprob
    assert not (await served.stub.Generate(greedy(n=4))).logprobs


async def test_tokenize_gives_the_ids_generate_feeds(served) -> None:
    """A prompt and a chat: the ids the tokenizer (and its chat template) makes, as many as
    Generate counts for the same input; the context window as GetModelInfo gives it."""
    tokenizer = served.engine.pair.tokenizer
    info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
    text = "def add(a, b):\n    return a + b"
    chat = [pb.ChatMessage(role="system", content="be brief"),
            pb.ChatMessage(role="user", content=text)]
    for message, expected in (
        (pb.TokenizeRequest(prompt=text), tokenizer.encode(text)),
        (pb.TokenizeRequest(messages=chat), tokenizer.encode(tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in chat],
            add_generation_prompt=True, tokenize=False), add_special_tokens=False)),
    ):
        call = served.stub.Tokenize(message)
        tokenized = await call
        assert dict(await call.trailing_metadata())["x-request-id"]
        assert list(tokenized.token_ids) == expected
        assert tokenized.count == len(expected)
        assert tokenized.context_window == info.context_window
        generate = pb.GenerateRequest(max_new_tokens=1)
        generate.MergeFrom(pb.GenerateRequest.FromString(message.SerializeToString()))
        reply = await served.stub.Generate(generate)
        assert reply.usage.prompt_tokens == len(expected)


@pytest.mark.parametrize(("message", "field"), [
    (pb.TokenizeRequest(), "input"),
    (pb.TokenizeRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     "input"),
    (pb.TokenizeRequest(prompt=""), "prompt"),
    (pb.TokenizeRequest(messages=[pb.ChatMessage(role="robot", content="y")]),
     "messages[0].role"),
])
async def test_tokenize_refuses_bad_input_naming_the_field(served, message, field) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Tokenize(message)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
    assert "prompt_token_ids" not in err.value.details()  # a field Tokenize does not have
    assert dict(err.value.trailing_metadata())["x-request-id"]


async def test_prompt_logprobs_come_first_and_once(served) -> None:
    """One entry per prompt token after the first, unary and streamed alike, on the first
    message only; none unless asked for."""
    unary_request = greedy(n=8)
    unary_request.prompt_logprobs = 1
    unary = await served.stub.Generate(unary_request)
    stream_request = greedy(n=8, cls=pb.GenerateStreamRequest)
    stream_request.prompt_logprobs = 1
    messages = [m async for m in served.stub.GenerateStream(stream_request)]
    assert len(messages) > 1
    assert list(messages[0].prompt_logprobs) == list(unary.prompt_logprobs)
    assert not any(m.prompt_logprobs for m in messages[1:])
    assert len(unary.prompt_logprobs) == unary.usage.prompt_tokens - 1 > 0
    for entry in unary.prompt_logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 1
        assert entry.top_logprobs[0].logprob >= entry.logprob
    assert not unary.logprobs
    assert not (await served.stub.Generate(greedy(n=4))).prompt_logprobs


async def test_stop_token_ids_and_ignore_eos_travel(served) -> None:
    request = greedy(n=10)
    request.ignore_eos = True
    free = list((await served.stub.Generate(request)).token_ids)
    assert len(free) == 10
    request.stop_token_ids.append(free[5])
    stopped = await served.stub.Generate(request)
    assert list(stopped.token_ids) == free[: free.index(free[5]) + 1]
    assert stopped.finish_reason == pb.FINISH_REASON_STOP


async def test_request_id_is_echoed_or_generated(served) -> None:
    request = greedy(n=2)
    request.request_id = "caller-42"
    assert (await served.stub.Generate(request)).request_id == "caller-42"
    generated = (await served.stub.Generate(greedy(n=2))).request_id
    assert len(generated) == 32


async def test_an_invalid_request_id_is_refused_under_an_id_of_the_servers(served) -> None:
    request = greedy(n=2)
    request.request_id = "é"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request_id:")
    trailers = dict(err.value.trailing_metadata() or ())
    assert len(trailers["x-request-id"]) == 32  # generated, since the client's cannot travel


async def test_health_answers_while_a_long_prompt_is_tokenized(served, monkeypatch) -> None:
    """Tokenizing runs off the event loop: a prompt of megabytes (here a tokenizer made slow)
    holds up neither health checks nor other calls."""
    import time

    from tests.decoding.test_engine import SlowPrepare, until

    SlowPrepare(monkeypatch, 1.0)
    # The client shares the server's event loop here: a blocked loop would hold up both.
    slow = asyncio.ensure_future(
        served.stub.Generate(pb.GenerateRequest(prompt="def f():", max_new_tokens=2))
    )
    await until(lambda: served.engine.stats().preparing == 1)  # being tokenized now
    started = time.monotonic()
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < 0.5
    assert not slow.done()
    assert len((await slow).token_ids) == 2


async def test_a_call_being_tokenized_when_the_drain_begins_completes(
    same_pair, monkeypatch
) -> None:
    from tests.conftest import make_engine
    from tests.decoding.test_engine import SlowPrepare, until
    from tests.service.conftest import serve

    SlowPrepare(monkeypatch, 0.5)
    s = await serve(make_engine(same_pair))
    try:
        call = asyncio.ensure_future(
            s.stub.Generate(pb.GenerateRequest(prompt="def f():", max_new_tokens=4))
        )
        await until(lambda: s.engine.stats().preparing == 1)  # it is being tokenized now
        await s.running.shutdown(grace=5)
        assert len((await call).token_ids) == 4
    finally:
        await s.channel.close()


async def test_a_stream_the_engine_finished_still_reaches_a_slow_reader_in_the_grace(
    same_pair,
) -> None:
    """The grace period is for the calls, not the engine: a stream whose tokens are all made
    but not yet read (a slow reader's small receive window holds them back) is delivered
    whole if its reader finishes within the grace."""
    import time

    from tests.conftest import make_engine
    from tests.service.conftest import serve

    s = await serve(make_engine(same_pair, max_new_tokens_limit=120))
    slow = grpc.aio.insecure_channel(  # a small receive window, no window growth
        s.address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    )
    try:
        request = greedy(gamma=0, n=120, cls=pb.GenerateStreamRequest)
        request.ignore_eos, request.logprobs, request.top_logprobs = True, True, 20
        call = pb_grpc.GenerationServiceStub(slow).GenerateStream(request, timeout=60)
        tokens = list((await call.read()).token_ids)
        while s.engine.stats().running:  # the engine has made every token
            await asyncio.sleep(0.01)
        started = time.monotonic()
        shutdown = asyncio.ensure_future(s.running.shutdown(grace=10.0))
        await asyncio.sleep(1.0)  # the reader is late, well inside the grace
        assert not shutdown.done()
        while (message := await call.read()) is not grpc.aio.EOF:
            tokens += message.token_ids
        assert len(tokens) == 120 and await call.code() == grpc.StatusCode.OK
        await shutdown
        assert time.monotonic() - started < 5.0  # it ended when the call did
    finally:
        await slow.close()
        await s.channel.close()


async def test_model_info(served) -> None:
    info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == served.engine.info.vocab_size
    assert info.context_window == 128
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.max_num_speculative_tokens == 8 and info.adaptive_speculation
    assert (info.max_top_logprobs, info.max_stop_token_ids) == (20, 64)


async def test_health_and_reflection(served) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "tandem.v1.GenerationService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in replies for s in r.list_services_response.service]
    assert "tandem.v1.GenerationService" in names
    assert "grpc.health.v1.Health" in names


async def test_health_turns_not_serving_during_shutdown(same_pair, monkeypatch) -> None:
    import time

    from tests.conftest import make_engine
    from tests.service.conftest import serve
    from tests.steps import before_steps

    # keep the call in flight while we look at health
    before_steps(monkeypatch, lambda states: time.sleep(0.02))
    s = await serve(make_engine(same_pair))
    health = health_pb2_grpc.HealthStub(s.channel)
    stream = s.stub.GenerateStream(greedy(n=100, cls=pb.GenerateStreamRequest))
    await stream.read()  # a call in flight keeps the server draining
    shutdown = asyncio.create_task(s.running.shutdown(grace=5.0))
    await asyncio.sleep(0.1)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await shutdown
    await s.channel.close()


async def test_cancelled_stream_frees_its_caches(served) -> None:
    call = served.stub.GenerateStream(greedy(gamma=1, n=100, cls=pb.GenerateStreamRequest))
    await call.read()
    call.cancel()
    await wait_until_idle(served.engine)
    reply = await served.stub.Generate(greedy(n=4))
    assert len(reply.token_ids) == 4


async def test_deadline_stops_generation(served, monkeypatch) -> None:
    import time

    from tests.steps import before_steps

    # 100 steps of at least 10 ms each cannot finish inside the 50 ms deadline on any machine
    before_steps(monkeypatch, lambda states: time.sleep(0.01))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(greedy(gamma=0, n=100), timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until_idle(served.engine)


def _invalid_cases():
    def make(**kw):
        request = pb.GenerateRequest(**{k: v for k, v in kw.items() if k != "build"})
        if "build" in kw:
            kw["build"](request)
        return request

    ids = PROMPT_IDS
    return {
        "no input": (make(), "input"),
        "empty prompt": (make(prompt=""), "prompt"),
        "two inputs": (make(prompt="x", prompt_token_ids=[1, 2]), "input"),
        "temperature NaN": (make(prompt="x", sampling=pb.SamplingParams(temperature=math.nan)),
                            "sampling.temperature"),
        "temperature negative": (make(prompt="x", sampling=pb.SamplingParams(temperature=-1)),
                                 "sampling.temperature"),
        "temperature above 2": (make(prompt="x", sampling=pb.SamplingParams(temperature=2.5)),
                                "sampling.temperature"),
        "top_p zero": (make(prompt="x", sampling=pb.SamplingParams(top_p=0.0)), "sampling.top_p"),
        "top_p above 1": (make(prompt="x", sampling=pb.SamplingParams(top_p=1.01)),
                          "sampling.top_p"),
        "negative top_k": (make(prompt="x", sampling=pb.SamplingParams(top_k=-3)),
                           "sampling.top_k"),
        "repetition_penalty zero": (
            make(prompt="x", sampling=pb.SamplingParams(repetition_penalty=0.0)),
            "sampling.repetition_penalty"),
        "repetition_penalty above 10": (
            make(prompt="x", sampling=pb.SamplingParams(repetition_penalty=10.5)),
            "sampling.repetition_penalty"),
        "repetition_penalty NaN": (
            make(prompt="x", sampling=pb.SamplingParams(repetition_penalty=math.nan)),
            "sampling.repetition_penalty"),
        "frequency_penalty below -2": (
            make(prompt="x", sampling=pb.SamplingParams(frequency_penalty=-2.5)),
            "sampling.frequency_penalty"),
        "frequency_penalty above 2": (
            make(prompt="x", sampling=pb.SamplingParams(frequency_penalty=2.5)),
            "sampling.frequency_penalty"),
        "min_p above 1": (
            make(prompt="x", sampling=pb.SamplingParams(min_p=1.5)), "sampling.min_p"),
        "min_p below 0": (
            make(prompt="x", sampling=pb.SamplingParams(min_p=-0.1)), "sampling.min_p"),
        "presence_penalty below -2": (
            make(prompt="x", sampling=pb.SamplingParams(presence_penalty=-2.5)),
            "sampling.presence_penalty"),
        "presence_penalty above 2": (
            make(prompt="x", sampling=pb.SamplingParams(presence_penalty=2.5)),
            "sampling.presence_penalty"),
        "max_new_tokens 0": (make(prompt="x", max_new_tokens=0), "max_new_tokens"),
        "max_new_tokens above limit": (make(prompt="x", max_new_tokens=101), "max_new_tokens"),
        "logit_bias above 100": (
            make(prompt="x", sampling=pb.SamplingParams(logit_bias={5: 100.5})),
            "sampling.logit_bias[5]"),
        "logit_bias id outside the vocabulary": (
            make(prompt="x", sampling=pb.SamplingParams(logit_bias={5000: 1.0})),
            "sampling.logit_bias[5000]"),
        "min_new_tokens above max_new_tokens": (
            make(prompt="x", max_new_tokens=5, min_new_tokens=6), "min_new_tokens"),
        "min_new_tokens above the limit, max_new_tokens unset": (
            make(prompt="x", min_new_tokens=10**6), "min_new_tokens"),
        "beyond the context window": (
            make(prompt_token_ids=[1] * 100, max_new_tokens=50),
            "max_new_tokens"),
        "token id outside the vocabulary": (
            make(prompt_token_ids=[1, 10**6]), "prompt_token_ids[1]"),
        "empty stop string": (make(prompt="x", stop=["ok", ""]), "stop[1]"),
        "too many stop strings": (make(prompt="x", stop=["a"] * 9), "stop"),
        "γ above the maximum": (
            make(prompt_token_ids=ids, speculation=pb.SpeculationParams(num_speculative_tokens=9)),
            "speculation.num_speculative_tokens"),
        "too many top_logprobs": (make(prompt="x", logprobs=True, top_logprobs=21),
                                  "top_logprobs"),
        "top_logprobs without logprobs": (make(prompt="x", top_logprobs=3), "top_logprobs"),
        "too many prompt_logprobs": (make(prompt="x", prompt_logprobs=21), "prompt_logprobs"),
        "truncate_prompt_tokens 0": (make(prompt="x", truncate_prompt_tokens=0),
                                     "truncate_prompt_tokens"),
        "stop token id outside the vocabulary": (make(prompt="x", stop_token_ids=[10**6]),
                                                 "stop_token_ids[0]"),
        "unknown chat role": (
            make(messages=[pb.ChatMessage(role="wizard", content="hi")]),
            "messages[0].role"),
        # Echoed whole, it would not fit the trailers' 16 KiB (RESOURCE_EXHAUSTED, no field).
        "a long unknown chat role": (
            make(messages=[pb.ChatMessage(role="user", content="hi"),
                           pb.ChatMessage(role="r" * 100_000, content="hi")]),
            "messages[1].role"),
    }


INVALID = _invalid_cases()


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_input_is_invalid_argument_naming_the_field(served, case: str) -> None:
    request, field = INVALID[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":")
    status = rpc_status.from_call(err.value)
    violation = error_details_pb2.BadRequest()
    status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == field
    assert served.engine.stats().running == 0
    # and the server keeps serving
    assert len((await served.stub.Generate(greedy(n=2))).token_ids) == 2


def test_unset_sampling_fields_and_ignore_eos_reach_the_engine_as_sent() -> None:
    """An unset seed is no seed (each call samples afresh and may plan γ with the batch), not
    seed 0; a seed of 0 that was sent is kept; ignore_eos travels. (Mutants: the seed copied
    whether set or not; ignore_eos dropped.)"""
    from service import converters

    request = converters.to_request(pb.GenerateRequest(prompt="x"), "rid", None)
    assert request.sampling.seed is None and request.ignore_eos is False
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.top_k) == (
        0.0, 1.0, 0)
    seeded = pb.GenerateRequest(prompt="x", ignore_eos=True)
    seeded.sampling.temperature = 0.7
    seeded.sampling.seed = 0
    request = converters.to_request(seeded, "rid", None)
    assert request.sampling.seed == 0 and request.ignore_eos is True
