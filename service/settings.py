"""The one settings object, built at start-up from flags with ``TANDEM_*`` equivalents.

Every flag ``--some-flag`` can also be set as ``TANDEM_SOME_FLAG`` (the Helm chart does so);
a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    # models
    target: str = "default"  # "default", a local HF folder, a .gguf file, or a hub id
    draft: str = "default"
    device: str = "auto"  # cpu, cuda, cuda:N, auto
    dtype: str = "auto"  # float32, bfloat16, float16, auto (bf16 on GPU, float32 on CPU)
    # auto: bfloat16 on GPUs that run it natively and on CPUs with oneDNN bfloat16, else as
    # dtype; empty: as dtype. The draft only proposes, so its precision never changes output.
    draft_dtype: str = "auto"
    cache_dir: str = ""  # empty: $TANDEM_CACHE or ~/.cache/tandem
    # serving
    host: str = "127.0.0.1"
    port: int = 50051
    # speculation: "auto" adapts γ per request from measured costs and acceptance
    num_speculative_tokens: str = "auto"
    max_speculative_tokens: int = 8
    # limits
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_strings: int = 8
    max_concurrent_requests: int = 8
    max_queue: int = 64
    kv_token_budget: int = 0  # 0: no budget beyond the concurrency limit
    fast_path: str = "auto"  # static KV cache + batched steps for Llama/Qwen2: auto, on, off
    max_context: int = 4096  # longest prompt + output on the fast path (sizes the cache)
    prefill_chunk: int = 512  # prompt tokens prefilled per request per round (0 = all at once)
    decode_steps: int = 0  # γ = 0 steps taken at once; 0: auto (4 with CUDA graphs, else 1)
    max_message_bytes: int = 4 * 1024 * 1024
    shutdown_grace_seconds: float = 30.0
    # telemetry
    metrics_port: int = 9464  # Prometheus /metrics; 0 turns it off
    tracing: str = "auto"  # auto (otlp if an OTLP endpoint is set, else none), otlp, console, none
    step_spans: bool = True  # one child span per speculative step; False: span events
    log_format: str = "text"  # text or json
    log_level: str = "INFO"
    log_content: bool = False  # prompts and outputs in DEBUG logs; never in spans or metrics
    # security
    auth_token_file: str = ""  # a file holding the bearer token; TANDEM_AUTH_TOKEN also works
    auth_exempt_health: bool = True
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set: clients must present a certificate signed by this CA

    @property
    def fixed_speculative_tokens(self) -> int | None:
        return None if self.num_speculative_tokens == "auto" else int(self.num_speculative_tokens)

    @property
    def resolved_cache_dir(self) -> Path | None:
        return Path(self.cache_dir).expanduser() if self.cache_dir else None


HELP = {
    "target": "target model: 'default', a Hugging Face folder, a .gguf file or a hub id",
    "draft": "draft model, same forms; must share the target's vocabulary",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "float32, bfloat16, float16 or auto",
    "draft_dtype": "the draft's dtype: auto (bfloat16 on GPUs and CPUs that run it natively, "
    "else --dtype's), empty for --dtype's, or a dtype; it never changes the output",
    "cache_dir": "model cache folder (default $TANDEM_CACHE or ~/.cache/tandem)",
    "host": "address to listen on",
    "port": "gRPC port (0 picks a free one)",
    "num_speculative_tokens": "default γ: 'auto' (adaptive) or an integer (0 = off)",
    "max_speculative_tokens": "largest γ a request may ask for or adapt to",
    "default_max_new_tokens": "max_new_tokens when a request leaves it unset",
    "max_new_tokens_limit": "largest max_new_tokens a request may ask for",
    "max_stop_strings": "most stop strings per request",
    "max_concurrent_requests": "requests decoding at once",
    "max_queue": "requests waiting beyond which calls get RESOURCE_EXHAUSTED",
    "kv_token_budget": "KV positions all running requests may reserve (0 = no budget)",
    "fast_path": "static KV cache and batched steps (Llama/Qwen2): auto, on or off",
    "max_context": "longest prompt + output on the fast path; sizes the preallocated cache",
    "prefill_chunk": "prompt tokens prefilled per request between the others' steps (0 = all)",
    "decode_steps": "steps without drafting taken at once, read back together "
    "(0 = auto: 4 with CUDA graphs, else 1)",
    "max_message_bytes": "largest request message accepted",
    "shutdown_grace_seconds": "time calls in flight get after SIGTERM",
    "metrics_port": "Prometheus /metrics port (0 = off)",
    "tracing": "span export: auto (otlp where OTEL_EXPORTER_OTLP_ENDPOINT or "
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, else none), otlp (OTEL_EXPORTER_OTLP_* "
    "variables), console or none",
    "step_spans": "record each speculative step as a child span (else as a span event)",
    "log_format": "text or json",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_content": "log each call's prompt and output at DEBUG (with --log-level DEBUG)",
    "auth_token_file": "file holding the bearer token clients must send (or TANDEM_AUTH_TOKEN)",
    "auth_exempt_health": "let health checks through without a token",
    "tls_cert": "server certificate (PEM) for TLS",
    "tls_key": "server private key (PEM) for TLS",
    "tls_client_ca": "CA (PEM) that client certificates must chain to: mutual TLS",
}
CHOICES = {
    "tracing": ["auto", "otlp", "console", "none"],
    "log_format": ["text", "json"],
    "dtype": ["auto", "float32", "bfloat16", "float16"],
    "draft_dtype": ["", "auto", "float32", "bfloat16", "float16"],
    "log_level": ["DEBUG", "INFO", "WARNING", "ERROR"],
    "fast_path": ["auto", "on", "off"],
}


MINIMA: dict[str, int | float] = {
    "port": 0, "metrics_port": 0, "max_speculative_tokens": 1, "default_max_new_tokens": 1,
    "max_new_tokens_limit": 1, "max_stop_strings": 0, "max_concurrent_requests": 1,
    "max_queue": 0, "kv_token_budget": 0, "max_context": 2, "prefill_chunk": 0,
    "decode_steps": 0, "max_message_bytes": 1, "shutdown_grace_seconds": 0,
}
"""The smallest value each numeric flag takes; ports are also at most 65535."""

_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
"""The devices ``decoding.models.resolve_device`` knows (it checks that a CUDA one exists), in
any case, between :data:`_DEVICE_SPACES`: what the chart's schema allows, whose pattern Helm
matches with Go's regexp (``\\s`` is these five; ASCII digits only)."""

_DEVICE_SPACES = " \t\n\f\r"

ENV_OVERRIDES = {"cache_dir": "TANDEM_CACHE"}  # the name decoding.models reads too


def env_name(field_name: str) -> str:
    return ENV_OVERRIDES.get(field_name, "TANDEM_" + field_name.upper())


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _speculative(text: str) -> str:
    if text == "auto" or (text.isdigit() and int(text) >= 0):
        return text
    raise argparse.ArgumentTypeError("must be 'auto' or a non-negative integer")


KINDS: dict[str, Callable[[str], Any]] = {
    "num_speculative_tokens": _speculative,
    "log_level": str.upper,  # --log-level debug works as DEBUG
}
"""Flags whose values are parsed otherwise than by their field's type."""


@dataclass(frozen=True)
class _InvalidEnv:
    """The default of a flag whose ``TANDEM_*`` value is invalid: reported by
    :func:`from_namespace` unless the flag itself was given (a flag wins over the environment),
    so that every subcommand's parser can still be built."""

    message: str


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """Add one flag per Settings field; defaults come from ``TANDEM_*`` in ``env``, checked
    as the flag's own value would be."""
    env = os.environ if env is None else env
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kinds: dict[str, Callable[[str], Any]] = {
            "int": int, "float": float, "bool": _bool, "str": str
        }
        kind = KINDS.get(f.name, kinds[str(f.type)])
        choices = CHOICES.get(f.name)
        default: Any = f.default
        if env_name(f.name) in env:
            default = _from_env(env_name(f.name), env[env_name(f.name)], kind, choices)
        help_text = f"{HELP[f.name]} [env {env_name(f.name)}; default {f.default!r}]"
        if kind is _bool:
            parser.add_argument(flag, type=_bool, default=default, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, choices=choices, help=help_text)


def _from_env(
    name: str, text: str, kind: Callable[[str], Any], choices: list[str] | None
) -> Any:
    try:
        value = kind(text)
    except (ValueError, argparse.ArgumentTypeError) as err:
        return _InvalidEnv(f"{name}={text!r}: {err}")
    if choices is not None and value not in choices:
        return _InvalidEnv(f"{name}={text!r}: must be one of {', '.join(map(repr, choices))}")
    return value


def from_namespace(args: argparse.Namespace) -> Settings:
    invalid = [
        value.message for f in fields(Settings)
        if isinstance(value := getattr(args, f.name), _InvalidEnv)
    ]
    if invalid:
        raise SystemExit("invalid environment: " + "; ".join(invalid))
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    if (settings.tls_cert == "") != (settings.tls_key == ""):
        raise SystemExit("--tls-cert and --tls-key must be given together")
    if settings.tls_client_ca and not settings.tls_cert:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    problems = out_of_range(settings)
    if problems:
        raise SystemExit("invalid settings: " + "; ".join(problems))
    return settings


def _names(field_name: str) -> str:
    return f"--{field_name.replace('_', '-')} ({env_name(field_name)})"


def out_of_range(settings: Settings) -> list[str]:
    """What is wrong with values that parse but cannot work, each naming its flag and
    variable: checked before the models load, so a bad value costs no minutes of loading."""
    problems = []
    for name, least in MINIMA.items():
        value = getattr(settings, name)
        if value < least:
            problems.append(f"{_names(name)} must be at least {least}, got {value}")
    for name in ("port", "metrics_port"):
        if getattr(settings, name) > 65535:
            problems.append(f"{_names(name)} must be at most 65535, got {getattr(settings, name)}")
    fixed = settings.fixed_speculative_tokens
    if fixed is not None and fixed > settings.max_speculative_tokens:
        problems.append(
            f"{_names('num_speculative_tokens')} ({fixed}) must not exceed "
            f"{_names('max_speculative_tokens')} ({settings.max_speculative_tokens})"
        )
    if settings.default_max_new_tokens > settings.max_new_tokens_limit:
        problems.append(
            f"{_names('default_max_new_tokens')} ({settings.default_max_new_tokens}) must not "
            f"exceed {_names('max_new_tokens_limit')} ({settings.max_new_tokens_limit})"
        )
    if not _DEVICE.fullmatch(settings.device.strip(_DEVICE_SPACES).lower()):
        problems.append(
            f"{_names('device')} must be auto, cpu, cuda or cuda:N, got {settings.device!r}"
        )
    return problems


def unreadable_files(settings: Settings) -> list[str]:
    """The token and TLS files that are set but cannot be read (or, for the token, are
    empty), each naming its flag and variable: ``tandem serve`` checks them before loading
    the models."""
    problems = []
    for name in ("auth_token_file", "tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(settings, name)
        if not path:
            continue
        try:
            text = Path(path).read_bytes()
        except OSError as err:
            problems.append(f"{_names(name)}: cannot read {path!r}: {err.strerror or err}")
            continue
        if name == "auth_token_file" and not text.strip():
            problems.append(f"{_names(name)}: {path!r} is empty")
    return problems


OTLP_PROTOCOLS = ("grpc", "http/protobuf")
"""The OTLP transports Tandem exports over (``OTEL_EXPORTER_OTLP_PROTOCOL``; http/json is the
third the specification names, which the Python SDK does not implement)."""


def otlp_protocol(signal: str, env: Mapping[str, str]) -> str:
    """The OTLP protocol for ``signal`` (TRACES or METRICS), as the specification reads it:
    ``OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else grpc
    (the SDK's own default). Raises ValueError naming the variable for one Tandem cannot use."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(name, "").strip()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise ValueError(f"{name}={value!r}: must be one of "
                                 f"{', '.join(map(repr, OTLP_PROTOCOLS))}")
            return value
    return "grpc"


def otel_problems(env: Mapping[str, str]) -> list[str]:
    """The OTLP protocol variables ``tandem serve`` could not honour: checked with the
    settings, before the models load."""
    problems = []
    for signal in ("TRACES", "METRICS"):
        try:
            otlp_protocol(signal, env)
        except ValueError as err:
            if str(err) not in problems:
                problems.append(str(err))
    return problems


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="tandem serve")
    add_arguments(parser, env)
    return from_namespace(parser.parse_args(argv))
