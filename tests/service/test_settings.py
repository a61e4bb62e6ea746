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
        ("TANDEM_TRACING", "jaeger", "must be one of 'auto', 'otlp', 'console', 'none'"),
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


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--port", "99999"], "--port (TANDEM_PORT) must be at most 65535, got 99999"),
        (["--metrics-port", "-1"], "--metrics-port (TANDEM_METRICS_PORT) must be at least 0"),
        (["--max-queue", "-5"], "--max-queue (TANDEM_MAX_QUEUE) must be at least 0, got -5"),
        (["--max-concurrent-requests", "0"], "--max-concurrent-requests"),
        (["--max-speculative-tokens", "0"], "--max-speculative-tokens"),
        (["--max-context", "0"], "--max-context (TANDEM_MAX_CONTEXT) must be at least 2"),
        (["--default-max-new-tokens", "0"], "--default-max-new-tokens"),
        (["--max-new-tokens-limit", "0"], "--max-new-tokens-limit"),
        (["--prefill-chunk", "-3"], "--prefill-chunk"),
        (["--decode-steps", "-1"], "--decode-steps"),
        (["--kv-token-budget", "-1"], "--kv-token-budget"),
        (["--max-message-bytes", "0"], "--max-message-bytes"),
        (["--shutdown-grace-seconds", "-1"], "--shutdown-grace-seconds"),
        (["--num-speculative-tokens", "20"], "(20) must not exceed --max-speculative-tokens"),
        (["--default-max-new-tokens", "300", "--max-new-tokens-limit", "200"],
         "(300) must not exceed --max-new-tokens-limit"),
        (["--device", "gpu"], "--device (TANDEM_DEVICE) must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_values_that_parse_but_cannot_work_are_refused_naming_flag_and_variable(
    argv: list[str], says: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert says in str(exit_.value.code)


def test_values_from_the_environment_are_range_checked_too() -> None:
    with pytest.raises(SystemExit, match=r"--max-queue \(TANDEM_MAX_QUEUE\) must be at least 0"):
        parse([], env={"TANDEM_MAX_QUEUE": "-1"})
    edges = parse(["--port", "65535", "--device", "CUDA:1", "--num-speculative-tokens", "8",
                   "--max-queue", "0", "--default-max-new-tokens", "2048"])
    assert (edges.port, edges.device, edges.fixed_speculative_tokens) == (65535, "CUDA:1", 8)


def test_serve_refuses_unreadable_files_and_bad_otel_settings_before_loading_models(
    tmp_path, monkeypatch
) -> None:
    import service.app

    def no_loading(settings):
        raise AssertionError("models loaded")

    monkeypatch.setattr(service.app, "serve", no_loading)
    empty = tmp_path / "token"
    empty.write_text("  \n")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--auth-token-file", str(empty), "--tls-cert", str(tmp_path / "no"),
                  "--tls-key", str(tmp_path / "no")])
    message = str(exit_.value.code)
    assert f"--auth-token-file (TANDEM_AUTH_TOKEN_FILE): {str(empty)!r} is empty" in message
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")  # no SDK exporter for it
    with pytest.raises(SystemExit, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json': must be"):
        cli.main(["serve"])
    assert "--tls-cert (TANDEM_TLS_CERT): cannot read" in message
    assert "--tls-key (TANDEM_TLS_KEY): cannot read" in message


def test_a_model_that_cannot_load_is_one_line(tmp_path, capsys) -> None:
    code = cli.main(["serve", "--target", str(tmp_path / "missing"), "--draft",
                     str(tmp_path / "missing"), "--device", "cpu", "--metrics-port", "0",
                     "--tracing", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("tandem serve: target source "), err


# ---- gaps a mutation review found (each test fails on the mutant its comment names)

# S1 (yes/on no longer true)
def test_boolean_spellings() -> None:
    for text in ("1", "true", "yes", "on", "TRUE", " Yes "):
        assert parse([], env={"TANDEM_LOG_CONTENT": text}).log_content is True, text
    for text in ("0", "false", "no", "off", ""):
        assert parse([], env={"TANDEM_STEP_SPANS": text}).step_spans is False, text
    assert parse(["--step-spans", "yes"]).step_spans is True


# S2 (max_stop_strings minimum 1), S3 (num_speculative_tokens 0 refused)
def test_zero_is_accepted_where_documented() -> None:
    assert parse(["--max-stop-strings", "0"]).max_stop_strings == 0
    with pytest.raises(SystemExit, match=r"--max-stop-strings \(TANDEM_MAX_STOP_STRINGS\)"):
        parse(["--max-stop-strings", "-1"])
    assert parse(["--num-speculative-tokens", "0"]).fixed_speculative_tokens == 0
    assert parse([], env={"TANDEM_NUM_SPECULATIVE_TOKENS": "0"}).fixed_speculative_tokens == 0


# S4 (client CA without server cert accepted), S5 (cert without key accepted)
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
        (["--tls-key", "k.pem"], "--tls-cert and --tls-key must be given together"),
    ],
)
def test_tls_flags_must_come_together(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert str(exit_.value.code) == says
