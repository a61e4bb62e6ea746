"""Hostile input: requests built from arbitrary field values, and random bytes as a request.

Whatever arrives, the caller gets a valid response or INVALID_ARGUMENT, the server never
crashes, and the next valid call succeeds. Bytes that do not parse as the request message
never reach our code: grpc.aio itself answers UNKNOWN ("Unexpected <class 'DecodeError'>:
... Wire format was corrupt"), which these tests pin down.

The server runs on its own event loop in a background thread so that hypothesis can drive it
through a plain, synchronous channel.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from decoding.engine import Engine
from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from tests.conftest import make_engine
from tests.service.conftest import Served, serve

MAX_NEW_TOKENS_LIMIT = 8
TIMEOUT = 30.0
GENERATE = "/tandem.v1.GenerationService/Generate"
GENERATE_STREAM = "/tandem.v1.GenerationService/GenerateStream"
VALID_FINISH = {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS}


@dataclass
class ThreadServer:
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    served: Served
    engine: Engine
    channel: grpc.Channel
    stub: pb_grpc.GenerationServiceStub

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_until_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if not (stats.running or stats.waiting or stats.live_target_sequences
                    or stats.live_draft_sequences or stats.reserved_tokens):
                return
            assert time.monotonic() < deadline, stats
            time.sleep(0.01)


@pytest.fixture(scope="module")
def server(same_pair) -> Iterator[ThreadServer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-server-loop", daemon=True)
    thread.start()
    engine = make_engine(same_pair, max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
                         default_max_new_tokens=4)
    served = asyncio.run_coroutine_threadsafe(serve(engine), loop).result(30)
    channel = grpc.insecure_channel(served.address)
    server = ThreadServer(loop, thread, served, engine, channel,
                          pb_grpc.GenerationServiceStub(channel))
    try:
        yield server
    finally:
        channel.close()

        async def stop() -> None:
            await served.channel.close()
            await served.running.shutdown(grace=0)

        server.run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def valid_call_succeeds(server: ThreadServer) -> None:
    request = pb.GenerateRequest(prompt_token_ids=[10, 57, 203], max_new_tokens=3)
    assert len(server.stub.Generate(request, timeout=TIMEOUT).token_ids) == 3


# ---- arbitrary field values ---------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOAT32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
VALID_ROLES = st.sampled_from(["system", "user", "assistant"])


def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` seven times in eight, so that whole requests are often valid and reach the
    engine; ``hostile`` (anything the wire format allows) otherwise."""
    return st.integers(0, 7).flatmap(lambda k: hostile if k == 7 else valid)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


@st.composite
def requests(draw) -> tuple[bool, pb.GenerateRequest | pb.GenerateStreamRequest]:
    stream = draw(st.booleans())
    request = (pb.GenerateStreamRequest if stream else pb.GenerateRequest)()
    inputs = ("prompt", "messages", "ids")
    which = draw(mostly(st.sampled_from(inputs).map(lambda name: {name}),
                        st.sets(st.sampled_from(inputs))))
    if "prompt" in which:
        request.prompt = draw(mostly(st.text(min_size=1, max_size=60), st.text(max_size=60)))
    if "messages" in which:
        roles = mostly(VALID_ROLES, st.text(max_size=12))
        size = mostly(st.integers(1, 3), st.integers(0, 3))
        for _ in range(draw(size)):
            request.messages.add(role=draw(roles), content=draw(st.text(max_size=40)))
    if "ids" in which:
        in_vocab = st.lists(st.integers(0, 319), min_size=1, max_size=24)
        anything = st.lists(st.one_of(st.integers(0, 400), UINT32), max_size=24)
        request.prompt_token_ids.extend(draw(mostly(in_vocab, anything)))
    sampling = request.sampling
    values = {
        "temperature": mostly(maybe(st.floats(0, 2, width=32)), FLOAT32),
        "top_p": mostly(maybe(st.floats(0, 1, exclude_min=True, width=32)), FLOAT32),
        "top_k": mostly(maybe(st.integers(0, 400)), INT32),
        "min_p": mostly(maybe(st.floats(0, 1, width=32)), FLOAT32),
        "seed": maybe(st.integers(0, 2**64 - 1)),
        "repetition_penalty": mostly(maybe(st.floats(0, 10, exclude_min=True, width=32)),
                                     FLOAT32),
        "frequency_penalty": mostly(maybe(st.floats(-2, 2, width=32)), FLOAT32),
        "presence_penalty": mostly(maybe(st.floats(-2, 2, width=32)), FLOAT32),
    }
    for name, strategy in values.items():
        value = draw(strategy)
        if value is not None:
            setattr(sampling, name, value)
    sampling.logit_bias.update(draw(mostly(
        st.dictionaries(st.integers(0, 319), st.floats(-100, 100, width=32), max_size=4),
        st.dictionaries(UINT32, FLOAT32, max_size=4),
    )))
    max_new = draw(mostly(maybe(st.integers(1, MAX_NEW_TOKENS_LIMIT)), UINT32))
    if max_new is not None:
        request.max_new_tokens = max_new
    request.min_new_tokens = draw(mostly(st.integers(0, 4), UINT32))
    prompt_logprobs = draw(mostly(maybe(st.integers(0, 20)), UINT32))
    request.include_stop_str_in_output = draw(st.booleans())
    request.priority = draw(mostly(st.integers(-2, 2), INT32))
    truncate = draw(mostly(maybe(st.integers(1, 40)), UINT32))
    if truncate is not None:
        request.truncate_prompt_tokens = truncate
    if prompt_logprobs is not None:
        request.prompt_logprobs = prompt_logprobs
    request.stop.extend(draw(mostly(
        st.lists(st.text(min_size=1, max_size=12), max_size=3),
        st.lists(st.text(max_size=300), max_size=10),
    )))
    gamma = draw(mostly(maybe(st.integers(0, 8)), UINT32))
    if gamma is not None:
        request.speculation.num_speculative_tokens = gamma
    request.request_id = draw(mostly(
        st.one_of(st.just(""), st.from_regex(r"[ -~]{1,24}", fullmatch=True)),
        st.text(max_size=200),
    ))
    return stream, request


def check_response(request, token_ids, finish_reason, usage, request_id: str,
                   prompt_logprobs) -> None:
    assert finish_reason in VALID_FINISH
    wanted = request.HasField("prompt_logprobs")
    assert len(prompt_logprobs) == (usage.prompt_tokens - 1 if wanted else 0)
    assert 1 <= len(token_ids) <= MAX_NEW_TOKENS_LIMIT
    if request.HasField("max_new_tokens"):
        assert len(token_ids) <= request.max_new_tokens
    assert len(token_ids) >= request.min_new_tokens
    assert all(0 <= t < 320 for t in token_ids)
    assert usage.completion_tokens == len(token_ids)
    assert request_id == (request.request_id or request_id) and request_id


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=requests())
def test_arbitrary_requests_get_a_response_or_invalid_argument(server, case) -> None:
    stream, request = case
    try:
        if stream:
            messages = list(server.stub.GenerateStream(request, timeout=TIMEOUT))
            assert messages
            last = messages[-1]
            tokens = [t for m in messages for t in m.token_ids]
            check_response(request, tokens, last.finish_reason, last.usage, last.request_id,
                           [lp for m in messages for lp in m.prompt_logprobs])
        else:
            reply = server.stub.Generate(request, timeout=TIMEOUT)
            check_response(request, list(reply.token_ids), reply.finish_reason, reply.usage,
                           reply.request_id, reply.prompt_logprobs)
        event("OK")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        event(f"INVALID_ARGUMENT {err.details().split(':')[0]}")


def test_the_server_survives_the_fuzzing(server) -> None:
    server.wait_until_idle()
    valid_call_succeeds(server)


# ---- random bytes as a request message ----------------------------------------------------


def raw_call(server: ThreadServer, method: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    """Send ``payload`` as the request message, unparsed (identity serializers)."""
    try:
        if method == GENERATE:
            server.channel.unary_unary(method)(payload, timeout=TIMEOUT)
        else:
            for _ in server.channel.unary_stream(method)(payload, timeout=TIMEOUT):
                pass
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


NOT_PROTOBUF = [
    b"\xff\xff\xff\xff",  # an invalid tag
    b"\x08",  # a varint cut short
    b"\x0a\x05ab",  # a length beyond the end
    b"\x0a\x02\xff\xfe",  # prompt that is not UTF-8
]


@pytest.mark.parametrize("method", [GENERATE, GENERATE_STREAM])
@pytest.mark.parametrize("payload", NOT_PROTOBUF, ids=lambda p: p.hex())
def test_bytes_that_do_not_parse_are_unknown(server, method: str, payload: bytes) -> None:
    code, details = raw_call(server, method, payload)
    assert code == grpc.StatusCode.UNKNOWN
    assert "DecodeError" in details and "/" not in details and "Traceback" not in details
    valid_call_succeeds(server)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200),
       method=st.sampled_from([GENERATE, GENERATE_STREAM]))
def test_random_bytes_get_an_error_status(server, payload: bytes, method: str) -> None:
    # Random bytes may happen to parse (unknown fields are kept): then the request is judged
    # like any other, and is almost always refused for naming no input.
    code, details = raw_call(server, method, payload)
    event(code.name)
    assert code in {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.OK}, (code, details)


def test_the_server_survives_random_bytes(server) -> None:
    server.wait_until_idle()
    valid_call_succeeds(server)


# ---- the request id travels as metadata: printable ASCII only -----------------------------


@pytest.mark.parametrize("request_id", ["\x1f", "tab\there", "caf\u00e9", "line\nbreak",
                                        "x" * 129, "\u2603"])
def test_a_request_id_that_cannot_be_metadata_is_invalid_argument(server, request_id) -> None:
    for call in (server.stub.Generate, lambda r, **kw: list(server.stub.GenerateStream(r, **kw))):
        request = pb.GenerateRequest(prompt_token_ids=[10, 57], max_new_tokens=2,
                                     request_id=request_id)
        if call is not server.stub.Generate:
            request = pb.GenerateStreamRequest.FromString(request.SerializeToString())
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("request_id:")
        assert request_id not in err.value.details()
    valid_call_succeeds(server)


def test_a_printable_request_id_is_echoed(server) -> None:
    request_id = " ~!{odd but printable}~ " + "y" * 100
    reply, call = server.stub.Generate.with_call(
        pb.GenerateRequest(prompt_token_ids=[10, 57], max_new_tokens=2, request_id=request_id),
        timeout=TIMEOUT)
    assert reply.request_id == request_id
    assert ("x-request-id", request_id) in tuple(call.trailing_metadata())


# ---- found by the fuzzer ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.4e-45, 1e-38, 1e-8])
@pytest.mark.parametrize("gamma", [0, 3])
def test_a_tiny_temperature_samples_like_greedy(server, temperature: float, gamma: int) -> None:
    """It used to overflow logits / temperature to inf and make softmax NaN (INTERNAL)."""
    def request(t: float) -> pb.GenerateRequest:
        r = pb.GenerateRequest(prompt_token_ids=[10, 57, 203], max_new_tokens=6)
        r.sampling.temperature = t
        r.sampling.seed = 7
        r.speculation.num_speculative_tokens = gamma
        return r

    greedy = server.stub.Generate(request(0.0), timeout=TIMEOUT)
    tiny = server.stub.Generate(request(temperature), timeout=TIMEOUT)
    assert list(tiny.token_ids) == list(greedy.token_ids)
