"""Settings from flags and TANDEM_* variables: an invalid variable is reported as the flag's
own value would be, naming the variable, unless the flag itself wins over it."""

from __future__ import annotations

import pytest

from service import cli
from service.server import grpc_address
from service.settings import Settings, parse


def test_environment_values_are_parsed_as_the_flags_are() -> None:
    settings = parse([], env={"TANDEM_PORT": "6000", "TANDEM_TRACING": "console",
                              "TANDEM_STEP_SPANS": "false", "TANDEM_LOG_LEVEL": "debug"})
    assert (settings.port, settings.tracing, settings.step_spans) == (6000, "console", False)
    assert settings.log_level == "DEBUG"
    assert parse(["--log-level", "warning"]).log_level == "WARNING"
    assert parse([], env={}) == Settings()


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TANDEM_PORT", "abc", "invalid literal for int()"),
        ("TANDEM_TRACING", "jaeger", "must be one of 'otlp', 'console', 'none'"),
        ("TANDEM_LOG_LEVEL", "loud", "must be one of"),
        ("TANDEM_STEP_SPANS", "maybe", "not a boolean"),
        ("TANDEM_NUM_SPECULATIVE_TOKENS", "-1", "must be 'auto' or a non-negative integer"),
        ("TANDEM_SHUTDOWN_GRACE_SECONDS", "soon", "could not convert"),
    ],
)
def test_an_invalid_environment_value_is_refused_naming_the_variable(
    name: str, value: str, says: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse([], env={name: value})
    message = str(exit_.value.code)
    assert f"{name}={value!r}" in message and says in message, message


def test_a_flag_wins_over_an_invalid_environment_value() -> None:
    assert parse(["--port", "7"], env={"TANDEM_PORT": "abc"}).port == 7
    assert parse(["--tracing", "none"], env={"TANDEM_TRACING": "jaeger"}).tracing == "none"


def test_other_commands_still_run_beside_an_invalid_environment(monkeypatch, capsys) -> None:
    monkeypatch.setenv("TANDEM_PORT", "abc")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["models", "--help"])
    assert exit_.value.code == 0
    assert "fetch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1:5"), ("0.0.0.0", "0.0.0.0:5"), ("::", "[::]:5"),
     ("[::]", "[::]:5"), ("::1", "[::1]:5"), ("localhost", "localhost:5")],
)
def test_grpc_address_brackets_ipv6(host: str, address: str) -> None:
    assert grpc_address(host, 5) == address
