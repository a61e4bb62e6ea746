"""`tandem generate` against a real server prints the text and the usage line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import pytest

from service._proto.tandem.v1 import generation_pb2 as pb
from service.client import add_arguments, channel_for


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
