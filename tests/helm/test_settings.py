"""How values become the server's settings: TANDEM_* and OTEL_* variables, and secrets as
files."""

from __future__ import annotations

import base64

from tests.helm.rendering import RELEASE, Rendered

# --------------------------------------------------------------------------- environment


REQUIRED_ENV = {
    "TANDEM_TARGET",
    "TANDEM_DRAFT",
    "TANDEM_HOST",
    "TANDEM_PORT",
    "TANDEM_DEVICE",
    "TANDEM_DTYPE",
    "TANDEM_NUM_SPECULATIVE_TOKENS",
    "TANDEM_MAX_SPECULATIVE_TOKENS",
    "TANDEM_MAX_CONCURRENT_REQUESTS",
    "TANDEM_MAX_QUEUE",
    "TANDEM_MAX_NEW_TOKENS_LIMIT",
    "TANDEM_DEFAULT_MAX_NEW_TOKENS",
    "TANDEM_KV_TOKEN_BUDGET",
    "TANDEM_MAX_MESSAGE_BYTES",
    "TANDEM_SHUTDOWN_GRACE_SECONDS",
    "TANDEM_METRICS_PORT",
    "TANDEM_TRACING",
    "TANDEM_LOG_FORMAT",
    "TANDEM_CACHE",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}


def test_default_env(default: Rendered) -> None:
    env = default.env()
    assert set(env) >= REQUIRED_ENV
    assert {k: env[k] for k in REQUIRED_ENV if k.startswith("TANDEM_")} == {
        "TANDEM_TARGET": "default",
        "TANDEM_DRAFT": "default",
        "TANDEM_HOST": "0.0.0.0",
        "TANDEM_PORT": "50051",
        "TANDEM_DEVICE": "auto",
        "TANDEM_DTYPE": "auto",
        "TANDEM_NUM_SPECULATIVE_TOKENS": "auto",
        "TANDEM_MAX_SPECULATIVE_TOKENS": "8",
        "TANDEM_MAX_CONCURRENT_REQUESTS": "8",
        "TANDEM_MAX_QUEUE": "64",
        "TANDEM_MAX_NEW_TOKENS_LIMIT": "2048",
        "TANDEM_DEFAULT_MAX_NEW_TOKENS": "256",
        "TANDEM_KV_TOKEN_BUDGET": "0",
        # Helm holds numbers as float64: without int64 this would read 4.194304e+06.
        "TANDEM_MAX_MESSAGE_BYTES": "4194304",
        "TANDEM_SHUTDOWN_GRACE_SECONDS": "30",
        "TANDEM_METRICS_PORT": "9464",
        "TANDEM_TRACING": "none",
        "TANDEM_LOG_FORMAT": "json",
        "TANDEM_CACHE": "/var/cache/tandem",
    }
    # Optional settings stay out unless set.
    for name in (
        "TANDEM_DRAFT_DTYPE",
        "TANDEM_AUTH_TOKEN_FILE",
        "TANDEM_TLS_CERT",
        "TANDEM_TLS_KEY",
        "TANDEM_TLS_CLIENT_CA",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ):
        assert name not in env
    assert env["OTEL_SERVICE_NAME"] == RELEASE
    # Hub downloads go to the cache volume too, not to the small /tmp.
    assert env["HF_HOME"] == "/var/cache/tandem/huggingface"
    # Every value is a string, as Kubernetes requires.
    assert all(isinstance(v, str | dict) for v in env.values())


def test_env_from_values(render) -> None:
    rendered = render(
        {
            "model": {
                "target": "/models/target.gguf",
                "draft": "org/draft-model",
                "device": "cuda:0",
                "dtype": "float16",
                "draftDtype": "bfloat16",
            },
            "speculative": {"numTokens": 0, "maxTokens": 12},
            "server": {
                "host": "::",
                "maxConcurrentRequests": 3,
                "maxQueue": 0,
                "maxNewTokensLimit": 16384,
                "defaultMaxNewTokens": 1024,
                "kvTokenBudget": 1048576,
                "maxMessageBytes": 16777216,
                "shutdownGraceSeconds": 5,
            },
            "telemetry": {
                "metricsPort": 0,
                "tracing": "console",
                "logFormat": "text",
                "otel": {
                    "endpoint": "http://collector:4317",
                    "serviceName": "llm",
                    "sampler": "always_on",
                    "samplerArg": "",
                    "resourceAttributes": {"team": "search"},
                },
            },
            "modelCache": {"mountPath": "/weights"},
            "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        }
    )
    env = rendered.env()
    expected = {
        "TANDEM_TARGET": "/models/target.gguf",
        "TANDEM_DRAFT": "org/draft-model",
        "TANDEM_DEVICE": "cuda:0",
        "TANDEM_DTYPE": "float16",
        "TANDEM_DRAFT_DTYPE": "bfloat16",
        "TANDEM_NUM_SPECULATIVE_TOKENS": "0",
        "TANDEM_MAX_SPECULATIVE_TOKENS": "12",
        "TANDEM_HOST": "::",
        "TANDEM_MAX_CONCURRENT_REQUESTS": "3",
        "TANDEM_MAX_QUEUE": "0",
        "TANDEM_MAX_NEW_TOKENS_LIMIT": "16384",
        "TANDEM_DEFAULT_MAX_NEW_TOKENS": "1024",
        "TANDEM_KV_TOKEN_BUDGET": "1048576",
        "TANDEM_MAX_MESSAGE_BYTES": "16777216",
        "TANDEM_SHUTDOWN_GRACE_SECONDS": "5",
        "TANDEM_METRICS_PORT": "0",
        "TANDEM_TRACING": "console",
        "TANDEM_LOG_FORMAT": "text",
        "TANDEM_CACHE": "/weights",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_SERVICE_NAME": "llm",
        "OTEL_TRACES_SAMPLER": "always_on",
        "HF_HUB_OFFLINE": "1",
    }
    assert {k: env.get(k) for k in expected} == expected
    assert "OTEL_TRACES_SAMPLER_ARG" not in env
    assert env["OTEL_RESOURCE_ATTRIBUTES"].endswith(",team=search")
    assert "k8s.pod.name=$(K8S_POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
    # Metrics off: no metrics port on the pod or the Service.
    assert [p["name"] for p in rendered.server["ports"]] == ["grpc"]
    assert [p["name"] for p in rendered.one("Service")["spec"]["ports"]] == ["grpc"]
    assert env["HF_HOME"] == "/weights/huggingface"
    # Neither model is the default pair: no init container fetches it.
    assert "initContainers" not in rendered.pod


def test_the_init_container_sees_the_servers_model_settings(render) -> None:
    rendered = render({
        "model": {"target": "default", "draft": "/models/draft.gguf"},
        "modelCache": {"mountPath": "/weights"},
        "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    })
    (init,) = rendered.pod["initContainers"]
    init_env = rendered.env(init)
    assert init_env["TANDEM_DRAFT"] == rendered.env()["TANDEM_DRAFT"] == "/models/draft.gguf"
    assert init_env["TANDEM_CACHE"] == "/weights"
    assert init_env["HF_HUB_OFFLINE"] == "1"


def test_extra_env_may_replace_hf_home(render) -> None:
    rendered = render({"extraEnv": [{"name": "HF_HOME", "value": "/hub"}]})
    assert rendered.env()["HF_HOME"] == "/hub"  # env() also rejects duplicate names


def test_all_on_env(all_on: Rendered) -> None:
    env = all_on.env()
    assert env["TANDEM_TARGET"] == "Qwen/Qwen2.5-7B-Instruct"
    assert env["TANDEM_NUM_SPECULATIVE_TOKENS"] == "4"
    assert env["TANDEM_MAX_MESSAGE_BYTES"] == "8388608"
    assert env["TANDEM_TRACING"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["HF_TOKEN_PATH"] == "/etc/tandem/hub/token"
    assert env["TANDEM_AUTH_EXEMPT_HEALTH"] == "true"


# --------------------------------------------------------------------------- secrets


def mounted_file(rendered: Rendered, env_name: str) -> tuple[str, str]:
    """The (Secret name, key) behind the file an env var points at."""
    path = rendered.env()[env_name]
    assert isinstance(path, str) and path.startswith("/"), path
    mounts = rendered.server["volumeMounts"]
    mount = next(m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/"))
    assert mount.get("readOnly") is True
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    item = next(i for i in secret["items"] if i["path"] == relative)
    return secret["secretName"], item["key"]


def test_secrets_are_files_never_env(all_on: Rendered) -> None:
    pod = all_on.pod
    for container in pod["containers"] + pod.get("initContainers", []):
        assert "envFrom" not in container
        for item in container.get("env", []):
            assert "secretKeyRef" not in item.get("valueFrom", {}), item
    secrets = {s["metadata"]["name"]: s for s in all_on.of_kind("Secret")}
    assert mounted_file(all_on, "TANDEM_AUTH_TOKEN_FILE") == (f"{RELEASE}-auth", "token")
    assert mounted_file(all_on, "TANDEM_TLS_CERT") == (f"{RELEASE}-tls", "tls.crt")
    assert mounted_file(all_on, "TANDEM_TLS_KEY") == (f"{RELEASE}-tls", "tls.key")
    assert mounted_file(all_on, "TANDEM_TLS_CLIENT_CA") == (f"{RELEASE}-client-ca", "ca.crt")
    assert secrets[f"{RELEASE}-tls"]["type"] == "kubernetes.io/tls"
    token = base64.b64decode(secrets[f"{RELEASE}-auth"]["data"]["token"]).decode()
    assert token == "ci-placeholder-token"
    # The plain token appears in no environment value.
    assert all(token not in str(v) for v in all_on.env().values())


def test_existing_secrets(render) -> None:
    rendered = render(
        {
            "auth": {"enabled": True, "existingSecret": "api-token", "secretKey": "bearer"},
            "tls": {
                "enabled": True,
                "existingSecret": "tandem-cert",
                "clientCA": {"enabled": True},
            },
            "probes": {"type": "tcpSocket"},
        }
    )
    assert not rendered.of_kind("Secret")
    assert mounted_file(rendered, "TANDEM_AUTH_TOKEN_FILE") == ("api-token", "bearer")
    assert mounted_file(rendered, "TANDEM_TLS_CERT") == ("tandem-cert", "tls.crt")
    # Without its own Secret the client CA comes from the TLS Secret (cert-manager's ca.crt).
    assert mounted_file(rendered, "TANDEM_TLS_CLIENT_CA") == ("tandem-cert", "ca.crt")
    separate = render(
        {
            "tls": {
                "enabled": True,
                "existingSecret": "tandem-cert",
                "clientCA": {"enabled": True, "existingSecret": "clients", "key": "bundle.pem"},
            },
            "probes": {"type": "tcpSocket"},
        }
    )
    assert mounted_file(separate, "TANDEM_TLS_CLIENT_CA") == ("clients", "bundle.pem")


def test_secret_change_rolls_pods(render) -> None:
    def checksum(token: str) -> str:
        rendered = render({"auth": {"enabled": True, "token": token}})
        return rendered.deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/secrets"
        ]

    assert checksum("one") != checksum("two")


def test_the_servers_settings_accept_the_charts_env(
    render, default: Rendered, all_on: Rendered
) -> None:
    """Every TANDEM_* value the chart renders is one the server parses (an invalid one would
    stop it at start-up, naming the variable)."""
    from service.settings import parse

    # A limit below the server's own default of 256 needs a default to match.
    small_limit = render({"server": {"maxNewTokensLimit": 128, "defaultMaxNewTokens": 64}})
    for rendered in (default, all_on, small_limit):
        env = {k: v for k, v in rendered.env().items() if isinstance(v, str)}
        settings = parse([], env=env)
        assert settings.port == int(env["TANDEM_PORT"])
        assert settings.tracing == env["TANDEM_TRACING"]
        assert settings.default_max_new_tokens == int(env["TANDEM_DEFAULT_MAX_NEW_TOKENS"])
        assert settings.max_new_tokens_limit == int(env["TANDEM_MAX_NEW_TOKENS_LIMIT"])
