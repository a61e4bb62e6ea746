"""Bearer-token authentication and TLS / mutual TLS on a real server (127.0.0.1, port 0).

Certificates are made inside the test (tests/service/certs.py): a CA, a server certificate for
localhost/127.0.0.1, a client certificate, and a second CA whose client certificate the server
must refuse.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc
from service.auth import TOKEN_ENV, auth_interceptor
from service.settings import Settings
from tests.conftest import make_engine
from tests.decoding.test_engine import wait_until_idle
from tests.service.certs import issue, make_ca
from tests.service.conftest import Served, serve

TOKEN = "s3cret-token-0123456789"
WRONG = "wrong-token-9876543210"
CALL_TIMEOUT = 20.0
HANDSHAKE_TIMEOUT = 10.0


def request(cls=pb.GenerateRequest, n: int = 3):
    return cls(prompt_token_ids=[10, 57, 203], max_new_tokens=n)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@asynccontextmanager
async def running(same_pair, **settings: object) -> AsyncIterator[Served]:
    served = await serve(make_engine(same_pair, default_max_new_tokens=4), **settings)
    try:
        yield served
    finally:
        await served.channel.close()
        await served.running.shutdown(grace=0)


class SubmitCounter:
    """Counts calls that reached the engine, i.e. that some handler ran."""

    def __init__(self, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = served.engine.submit_async

        async def submit_async(req):
            self.count += 1
            return await real(req)

        monkeypatch.setattr(served.engine, "submit_async", submit_async)


async def drained_code(call) -> grpc.StatusCode:
    """Read a streaming call to its end: its status code."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def stream_code(stub, metadata=None) -> grpc.StatusCode:
    return await drained_code(stub.GenerateStream(
        request(pb.GenerateStreamRequest), metadata=metadata, timeout=CALL_TIMEOUT
    ))


async def unary_error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro
    return err.value


# ---- authentication -----------------------------------------------------------------------


def test_no_token_configured_means_no_interceptor(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert auth_interceptor(Settings()) is None
    assert auth_interceptor(Settings(), env={TOKEN_ENV: "  "}) is None
    assert auth_interceptor(Settings(), env={TOKEN_ENV: TOKEN}) is not None


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  \n")
    with pytest.raises(ValueError, match="empty") as err:
        auth_interceptor(Settings(auth_token_file=str(path)))
    assert str(path) not in str(err.value)


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch) -> str:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "token"
    path.write_text(f"\n  {TOKEN}  \n")  # surrounding whitespace is stripped
    return str(path)


async def test_token_from_file(same_pair, token_file, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(same_pair, auth_token_file=token_file) as s:
        counter = SubmitCounter(s, monkeypatch)
        # no token, wrong token, wrong scheme: UNAUTHENTICATED, and no handler ran
        for metadata in (None, bearer(WRONG), (("authorization", f"Basic {TOKEN}"),),
                         (("authorization", f"Bearer {TOKEN}x"),), (("authorization", "Bearer"),)):
            err = await unary_error(s.stub.Generate(request(), metadata=metadata,
                                                    timeout=CALL_TIMEOUT))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            assert TOKEN not in err.details() and WRONG not in err.details()
            request_id = dict(err.trailing_metadata() or ())["x-request-id"]
            assert f"'request_id': '{request_id}'" in str(
                [r.__dict__ for r in caplog.records if r.getMessage().startswith("unauth")]
            )
            assert await stream_code(s.stub, metadata) == grpc.StatusCode.UNAUTHENTICATED
        err = await unary_error(s.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                    timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = await unary_error(s.stub.Tokenize(pb.TokenizeRequest(prompt="x"),
                                                timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # an unknown method does not reveal that it does not exist
        unknown = s.channel.unary_unary("/tandem.v1.GenerationService/Nope")
        err = await unary_error(unknown(b"", timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert counter.count == 0

        # the right token, unary and streaming; the scheme is case-insensitive
        reply = await s.stub.Generate(request(), metadata=bearer(TOKEN), timeout=CALL_TIMEOUT)
        assert len(reply.token_ids) == 3
        assert await stream_code(s.stub, bearer(TOKEN)) == grpc.StatusCode.OK
        lower = (("authorization", f"bearer {TOKEN}"),)
        assert len((await s.stub.Generate(request(), metadata=lower)).token_ids) == 3
        assert counter.count == 3
        tokenized = await s.stub.Tokenize(pb.TokenizeRequest(prompt="x"), metadata=bearer(TOKEN))
        assert tokenized.count == len(tokenized.token_ids) > 0
    # the token never reaches the logs, nor does a wrong one
    assert TOKEN not in caplog.text and WRONG not in caplog.text
    assert "unauthenticated call refused" in caplog.text


async def test_a_refusal_stays_unauthenticated_when_counting_it_fails(
    same_pair, monkeypatch, caplog
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    class Failing:  # an observer whose count of refusals raises
        interceptors = ()

        def call_started(self, record) -> None:
            pass

        def call_finished(self, record) -> None:
            pass

        def call_refused(self, method, code) -> None:
            raise RuntimeError("metrics backend down")

    served = await serve(make_engine(same_pair, default_max_new_tokens=4),
                         telemetry=Failing())  # type: ignore[arg-type]
    try:
        err = await unary_error(served.stub.Generate(request(), timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "metrics backend down" not in err.details()
        assert "counting a refused call failed" in caplog.text
    finally:
        await served.channel.close()
        await served.running.shutdown(grace=0)


async def test_token_from_environment(same_pair, monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    async with running(same_pair) as s:
        err = await unary_error(s.stub.Generate(request(), timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = await unary_error(s.stub.Generate(request(), metadata=bearer(WRONG),
                                                timeout=CALL_TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await stream_code(s.stub) == grpc.StatusCode.UNAUTHENTICATED
        reply = await s.stub.Generate(request(), metadata=bearer(TOKEN), timeout=CALL_TIMEOUT)
        assert len(reply.token_ids) == 3
        assert await stream_code(s.stub, bearer(TOKEN)) == grpc.StatusCode.OK


async def reflection_code(channel: grpc.aio.Channel, metadata=None) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return await drained_code(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
        metadata=metadata, timeout=CALL_TIMEOUT,
    ))


@pytest.mark.parametrize("exempt", [True, False])
async def test_health_exemption_and_reflection(same_pair, token_file, exempt: bool) -> None:
    async with running(same_pair, auth_token_file=token_file, auth_exempt_health=exempt) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        check = health_pb2.HealthCheckRequest(service="")
        if exempt:
            reply = await health.Check(check, timeout=CALL_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        else:
            err = await unary_error(health.Check(check, timeout=CALL_TIMEOUT))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = await health.Check(check, metadata=bearer(TOKEN), timeout=CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # reflection (a bidirectional stream) is never exempt
        assert await reflection_code(s.channel) == grpc.StatusCode.UNAUTHENTICATED
        assert await reflection_code(s.channel, bearer(WRONG)) == grpc.StatusCode.UNAUTHENTICATED
        assert await reflection_code(s.channel, bearer(TOKEN)) == grpc.StatusCode.OK


# ---- TLS and mutual TLS -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("Tandem test CA"), make_ca("Some other CA")
    paths: dict[str, Path] = {}
    paths["ca"] = folder / "ca.crt"
    paths["ca"].write_bytes(ca.cert_pem)
    paths["server_crt"], paths["server_key"] = issue(ca, "localhost", server=True).write(
        folder, "server")
    paths["client_crt"], paths["client_key"] = issue(ca, "client", server=False).write(
        folder, "client")
    paths["foreign_crt"], paths["foreign_key"] = issue(
        other_ca, "intruder", server=False).write(folder, "foreign")
    return paths


def tls_channel(address: str, pki: dict[str, Path], client: str | None = None):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}_key"].read_bytes() if client else None,
        certificate_chain=pki[f"{client}_crt"].read_bytes() if client else None,
    )
    return grpc.aio.secure_channel(address, credentials)


async def generate_code(channel: grpc.aio.Channel, metadata=None) -> grpc.StatusCode:
    stub = pb_grpc.GenerationServiceStub(channel)
    try:
        reply = await stub.Generate(request(), metadata=metadata, timeout=HANDSHAKE_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        return err.code()
    assert len(reply.token_ids) == 3
    return grpc.StatusCode.OK


async def test_tls(same_pair, pki, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    settings = {"tls_cert": str(pki["server_crt"]), "tls_key": str(pki["server_key"])}
    async with running(same_pair, **settings) as s:
        # s.channel is a plaintext channel: it cannot talk to a TLS port
        assert await generate_code(s.channel) == grpc.StatusCode.UNAVAILABLE
        for host in ("127.0.0.1", "localhost"):
            async with tls_channel(f"{host}:{s.running.port}", pki) as channel:
                assert await generate_code(channel) == grpc.StatusCode.OK
                stream = pb_grpc.GenerationServiceStub(channel).GenerateStream(
                    request(pb.GenerateStreamRequest), timeout=CALL_TIMEOUT)
                assert len([t async for m in stream for t in m.token_ids]) == 3


async def test_mutual_tls(same_pair, pki, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    settings = {"tls_cert": str(pki["server_crt"]), "tls_key": str(pki["server_key"]),
                "tls_client_ca": str(pki["ca"])}
    refused = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}
    async with running(same_pair, **settings) as s:
        address = f"127.0.0.1:{s.running.port}"
        assert await generate_code(s.channel) == grpc.StatusCode.UNAVAILABLE  # plaintext
        for client in (None, "foreign"):  # no client certificate; one from another CA
            async with tls_channel(address, pki, client) as channel:
                code = await generate_code(channel)
                assert code in refused, client
        async with tls_channel(address, pki, "client") as channel:
            assert await generate_code(channel) == grpc.StatusCode.OK
        await wait_until_idle(s.engine)


async def test_mutual_tls_with_a_token(same_pair, pki, token_file) -> None:
    settings = {"tls_cert": str(pki["server_crt"]), "tls_key": str(pki["server_key"]),
                "tls_client_ca": str(pki["ca"]), "auth_token_file": token_file}
    async with (
        running(same_pair, **settings) as s,
        tls_channel(f"127.0.0.1:{s.running.port}", pki, "client") as channel,
    ):
        assert await generate_code(channel) == grpc.StatusCode.UNAUTHENTICATED
        assert await generate_code(channel, bearer(TOKEN)) == grpc.StatusCode.OK


# ---- gaps a mutation review found (each test fails on the mutant its comment names)

# A1 (token compared with ==, not hmac.compare_digest): equivalent in behaviour, so spied
async def test_the_token_is_compared_in_constant_time(monkeypatch) -> None:
    import service.auth as auth

    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    interceptor = auth.BearerTokenInterceptor("s3cret", exempt_health=True)

    async def continuation(details):
        return "handler"

    for token, passes in (("s3cret", True), ("wrong", False)):
        details = SimpleNamespace(method="/tandem.v1.GenerationService/Generate",
                                  invocation_metadata=(("authorization", f"Bearer {token}"),))
        handler = await interceptor.intercept_service(continuation, details)
        assert (handler == "handler") is passes
    assert len(calls) == 2
