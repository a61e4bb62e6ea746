"""The chart as Helm, Kubernetes and yamllint see it.

Helm runs in-process through helm-python-sdk (Helm's Go SDK v4 over ctypes): no ``helm``
binary and no cluster. The chart is rendered and linted in strict mode with its default values
and with ``ci/all-on-values.yaml`` (every optional part on, the ``ct`` convention); the schema
must refuse bad values; every rendered object must validate against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: unknown fields fail); yamllint covers the plain YAML and
the rendered output. The ``fail`` guards are tested by rendering: Helm's lint renders in "lint
mode", where ``fail`` only logs.
"""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.helm.rendering import (
    BAD_VALUES_DIR,
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUE_SETS,
    Rendered,
    load_values,
    merged,
)

YAMLLINT_CONFIG = ROOT / "helm" / ".yamllint"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest that the
# installed kubernetes-validate knows.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# Kinds from CRDs, for which kubernetes-validate has no schema: they are checked by hand.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Renderings checked against the Kubernetes schemas and yamllint: the two value sets, and the
# branches they leave out.
RENDER_CASES = {
    **VALUE_SETS,
    "baked-image": {
        "modelCache": {"enabled": False},
        "modelFetch": {"enabled": False},
        "telemetry": {"metricsPort": 0},
        "podDisruptionBudget": {"maxUnavailable": "50%", "unhealthyPodEvictionPolicy": ""},
        "gpu": {"count": 0},
        "lifecycle": {"preStopSleepSeconds": 0},
        "strategy": {"type": "Recreate"},
    },
    "existing-secrets": {
        "probes": {"type": "exec", "exec": {"command": ["python", "-m", "health_check"]}},
        "auth": {"enabled": True, "existingSecret": "api-token"},
        "tls": {"enabled": True, "existingSecret": "cert", "clientCA": {"enabled": True}},
        "modelCache": {
            "persistence": {"enabled": True, "existingClaim": "weights", "storageClassName": "-"}
        },
        "service": {"type": "LoadBalancer", "headless": {"enabled": True}},
    },
}


# --------------------------------------------------------------------------- chart files


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "tandem"
    assert meta["type"] == "application"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert (CHART_DIR / ".helmignore").is_file()
    assert (CHART_DIR / "templates" / "NOTES.txt").is_file()


def test_schema_is_strict_draft07(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    # Every default key is declared, and the defaults and the all-on values are valid.
    assert set(chart.values) <= set(schema["properties"])
    validator = jsonschema.Draft7Validator(schema)
    for values in VALUE_SETS.values():
        errors = list(validator.iter_errors(merged(chart.values, values)))
        assert not errors, [e.message for e in errors]


# --------------------------------------------------------------------------- helm lint


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_lint_strict(values_name: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[values_name], strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    # Strict mode turns warnings into errors; only informational messages may remain
    # (Helm suggests an icon).
    assert report["errors"] == [], report
    assert all(m["severity"] <= 1 for m in report["messages"]), report["messages"]


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize(
    ("values_file", "expected"),
    [
        ("wrong-type-values.yaml", ["/server/port", "/gpu/count"]),
        ("unknown-key-values.yaml", ["replicas"]),
    ],
)
def test_schema_rejects_bad_values_file(chart: helm.Chart, values_file: str, expected) -> None:
    values = load_values(BAD_VALUES_DIR / values_file)
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    for fragment in expected:
        assert fragment in str(caught.value)
    # Rendering (helm template / install) and lint refuse the same values.
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    report = helm.lint(CHART_DIR, values, strict=True)
    assert report["errors"], report


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": "2"},
        {"speculative": {"numTokens": "four"}},
        {"speculative": {"numTokens": -1}},
        {"telemetry": {"tracing": "jaeger"}},
        {"autoscaling": {"metric": {"name": "cpu"}}},
        {"server": {"maxQueu": 10}},
        {"probes": {"liveness": {"successThreshold": 2}}},
        {"tolerations": {"key": "nvidia.com/gpu"}},
        {"image": {"digest": "latest"}},
        {"resources": {"limts": {"memory": "64Gi"}}},
        {"resources": {"limits": {"nvidia.com/gpu": [1]}}},
        {"modelFetch": {"resources": {"request": {"cpu": "1"}}}},
        {"strategy": {"rollingUpdat": {"maxSurge": 0}}},
        {"strategy": {"type": "Rolling"}},
        {"strategy": {"rollingUpdate": {"maxSurge": "one"}}},
    ],
    ids=lambda v: json.dumps(v, separators=(",", ":")),
)
def test_schema_rejects(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_schema_model_values_are_the_servers_choices(chart: helm.Chart) -> None:
    """model.dtype, model.draftDtype and model.device take what service.settings accepts."""
    from service.settings import CHOICES, parse

    model = chart.schema["properties"]["model"]["properties"]
    assert model["dtype"]["enum"] == CHOICES["dtype"]
    assert model["draftDtype"]["enum"] == CHOICES["draft_dtype"]
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "CUDA", " Cuda:1 ", "AUTO",
                   "\tcpu\n", "\fcuda\r"):
        chart.validate_schema({"model": {"device": device}})
        assert parse([], env={"TANDEM_DEVICE": device}).device == device
    # Refused by both: spaces Go's regexp does not take for \s, digits other than ASCII.
    for device in ("\u00a0cuda", "\x0bcpu", "cuda\u2003", "\x85auto", "cuda:\u0663"):
        with pytest.raises(helm.HelmValuesError, match="/model/device"):
            chart.validate_schema({"model": {"device": device}})
        with pytest.raises(SystemExit):
            parse([], env={"TANDEM_DEVICE": device})


@pytest.mark.parametrize(
    "model",
    [
        {"dtype": "bf16"},
        {"dtype": "float64"},
        {"draftDtype": "fp16"},
        {"device": "gpu"},
        {"device": "cuda:"},
        {"device": "cuda:0,1"},
        {"device": "cuda 0"},
        {"device": "xcpu"},
    ],
    ids=lambda v: json.dumps(v, separators=(",", ":")),
)
def test_model_values_the_server_refuses_fail_the_render(
    chart: helm.Chart, model: dict[str, str]
) -> None:
    # Rendered, each would stop `tandem serve` at start-up: a crash loop, not a failed install.
    with pytest.raises(helm.HelmValuesError, match="/model/"):
        chart.render({"model": model}, name=RELEASE, namespace=NAMESPACE)


# --------------------------------------------------------------------------- Kubernetes schemas


def validate_objects(rendered: Rendered) -> set[tuple[str, str]]:
    """Validate every object strictly; return the (apiVersion, kind) that have no schema."""
    unvalidated = set()
    for obj in rendered.objects:
        key = (obj["apiVersion"], obj["kind"])
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                unvalidated.add(key)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} on {version}: {path}: {error.message}"
                )
    return unvalidated


@pytest.mark.parametrize("values_name", list(RENDER_CASES))
def test_manifests_validate_against_kubernetes(render, values_name: str) -> None:
    rendered = render(RENDER_CASES[values_name])
    unvalidated = validate_objects(rendered)
    # Only CRD kinds may lack a schema: they warn in kubeconform terms, and are checked below.
    assert unvalidated <= CRD_KINDS, unvalidated
    if values_name == "all-on":
        assert unvalidated == CRD_KINDS


def test_service_monitor_by_hand(all_on: Rendered) -> None:
    """kubernetes-validate has no schema for the ServiceMonitor CRD, so check its shape."""
    monitor = all_on.one("ServiceMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "scheme": "http",
        "interval": "15s",
        "scrapeTimeout": "10s",
    }
    # It selects the main Service, which has the metrics port; the headless one has none, so
    # no pod is scraped twice.
    selector = spec["selector"]["matchLabels"]
    services = [
        s for s in all_on.of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    with_metrics = [
        s["metadata"]["name"]
        for s in services
        if any(p["name"] == "metrics" for p in s["spec"]["ports"])
    ]
    assert with_metrics == [RELEASE]


def test_no_service_monitor_by_default(default: Rendered) -> None:
    assert not default.of_kind("ServiceMonitor")


# --------------------------------------------------------------------------- yamllint


def yamllint_problems(text: str, path: str, *, rendered: bool = False) -> list[str]:
    if rendered:
        # Rendered manifests carry data in long lines (OTEL_RESOURCE_ATTRIBUTES, the
        # dashboard's PromQL); line length is a rule for the files people edit.
        config = YamlLintConfig(f"extends: {YAMLLINT_CONFIG}\nrules:\n  line-length: disable\n")
    else:
        config = YamlLintConfig(file=str(YAMLLINT_CONFIG))
    # Warnings count too, as with `yamllint --strict`.
    return [
        f"{path}:{p.line}:{p.column} {p.level} {p.desc} ({p.rule})"
        for p in linter.run(text, config, path)
    ]


def test_yamllint_plain_yaml() -> None:
    files = [
        CHART_DIR / "Chart.yaml",
        CHART_DIR / "values.yaml",
        *sorted((CHART_DIR / "ci").glob("*.yaml")),
        *sorted(BAD_VALUES_DIR.glob("*.yaml")),
    ]
    problems = [p for f in files for p in yamllint_problems(f.read_text(), str(f))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("values_name", list(RENDER_CASES))
def test_yamllint_rendered(render, values_name: str) -> None:
    stream = render(RENDER_CASES[values_name]).as_stream()
    problems = yamllint_problems(stream, f"rendered-{values_name}.yaml", rendered=True)
    assert not problems, "\n".join(problems) + "\n\n" + stream


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True, "existingSecret": "t"}}, "cannot speak TLS"),
        (
            {"auth": {"enabled": True, "existingSecret": "a", "exemptHealth": False}},
            "cannot send a token",
        ),
        ({"auth": {"enabled": True}}, "auth.existingSecret or auth.token"),
        (
            {"tls": {"enabled": True, "cert": "c"}, "probes": {"type": "tcpSocket"}},
            "tls.existingSecret",
        ),
        ({"tls": {"clientCA": {"enabled": True}}}, "needs tls.enabled"),
        ({"modelCache": {"enabled": False}}, "modelFetch.enabled needs modelCache.enabled"),
        (
            {"telemetry": {"metricsPort": 0}, "serviceMonitor": {"enabled": True}},
            "serviceMonitor.enabled",
        ),
        (
            {"telemetry": {"metricsPort": 0}, "autoscaling": {"enabled": True}},
            "autoscaling.enabled",
        ),
        ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas"),
        ({"probes": {"type": "exec"}}, "probes.exec.command"),
        ({"telemetry": {"metricsPort": 50051}}, "must differ"),
        ({"speculative": {"numTokens": 9, "maxTokens": 8}}, "must not exceed"),
        # The server's default max_new_tokens (256) over the limit: it refuses to start.
        ({"server": {"maxNewTokensLimit": 128}}, r"server.defaultMaxNewTokens \(256\)"),
        (
            {"server": {"maxNewTokensLimit": 512, "defaultMaxNewTokens": 513}},
            "must not exceed server.maxNewTokensLimit",
        ),
        # No cache volume, a read-only root: nowhere to download a hub id or convert a .gguf.
        (
            {"modelCache": {"enabled": False}, "modelFetch": {"enabled": False},
             "model": {"target": "Qwen/Qwen2.5-7B-Instruct"}},
            "model.target=Qwen/Qwen2.5-7B-Instruct needs modelCache.enabled, or HF_HOME",
        ),
        (
            {"modelCache": {"enabled": False}, "modelFetch": {"enabled": False},
             "model": {"draft": "/weights/draft.GGUF"}},
            "model.draft=/weights/draft.GGUF needs modelCache.enabled, or TANDEM_CACHE",
        ),
        # HF_HOME elsewhere does not place a .gguf file's conversion.
        (
            {"modelCache": {"enabled": False}, "modelFetch": {"enabled": False},
             "model": {"draft": "/weights/draft.gguf"},
             "extraEnv": [{"name": "HF_HOME", "value": "/tmp/hf"}]},
            "model.draft=/weights/draft.gguf needs modelCache.enabled",
        ),
        # The TLS Secret made from tls.cert and tls.key has no ca.crt to mount.
        (
            {
                "tls": {"enabled": True, "cert": "c", "key": "k", "clientCA": {"enabled": True}},
                "probes": {"type": "tcpSocket"},
            },
            "tls.clientCA.cert or tls.clientCA.existingSecret",
        ),
    ],
)
def test_guards(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_notes(default: Rendered, all_on: Rendered) -> None:
    notes = default.notes
    assert f"port-forward service/{RELEASE} 50051:50051" in notes
    assert "grpcurl -plaintext" in notes
    assert "tandem.v1.GenerationService/Generate" in notes
    assert "authorization: Bearer" in all_on.notes
    assert "-cert client.crt" in all_on.notes
