"""What the chart deploys: GPU scheduling, probes, shutdown, security, volumes, Services,
autoscaling, disruption budget and dashboard."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest

from tests.helm.rendering import NAMESPACE, RELEASE, VALUE_SETS, Rendered, merged

# Seconds the kubelet must leave the server after the drain: the final statuses
# (service.server.FLUSH_SECONDS), server.stop, closing the engine and the last OTLP export.
AFTER_DRAIN_SECONDS = 5
# --------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_gpu_limit(render, values_name: str) -> None:
    limits = render(VALUE_SETS[values_name]).server["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert "memory" in limits


def test_gpu_limit_from_values(render) -> None:
    rendered = render({"gpu": {"count": 2, "resourceName": "nvidia.com/mig-3g.40gb"}})
    limits = rendered.server["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == 2
    assert "nvidia.com/gpu" not in limits
    cpu_only = render({"gpu": {"count": 0}, "model": {"device": "cpu"}})
    assert not any("gpu" in k for k in cpu_only.server["resources"]["limits"])


def test_gpu_scheduling_defaults(default: Rendered) -> None:
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        default.pod["tolerations"]
    )


def test_scheduling_values(all_on: Rendered) -> None:
    pod = all_on.pod
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["priorityClassName"] == "inference-critical"
    assert pod["runtimeClassName"] == "nvidia"
    assert "nodeAffinity" in pod["affinity"]
    (spread,) = pod["topologySpreadConstraints"]
    # The chart adds the selector the values left out.
    assert spread["labelSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tandem",
        "app.kubernetes.io/instance": RELEASE,
    }
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == RELEASE
    assert all_on.one("ServiceAccount")["metadata"]["name"] == RELEASE


def test_rollout_strategy(default: Rendered, render) -> None:
    assert default.deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # Helm layers {type: Recreate} over the default rollingUpdate; the API would refuse both.
    recreate = render({"strategy": {"type": "Recreate"}})
    assert recreate.deployment["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_probes(render, values_name: str) -> None:
    values = VALUE_SETS[values_name]
    rendered = render(values)
    server = rendered.server
    port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    assert port == 50051
    probes = [server["startupProbe"], server["readinessProbe"], server["livenessProbe"]]
    if values_name == "default":
        for probe in probes:
            assert probe["grpc"]["port"] == port
            assert set(probe) - {"grpc"} <= {
                "initialDelaySeconds",
                "periodSeconds",
                "timeoutSeconds",
                "failureThreshold",
                "successThreshold",
            }
        assert server["readinessProbe"]["grpc"]["service"] == "tandem.v1.GenerationService"
        assert "service" not in server["livenessProbe"]["grpc"]
    else:
        # TLS is on in all-on: the kubelet's gRPC probe cannot speak TLS.
        assert all(probe["tcpSocket"] == {"port": "grpc"} for probe in probes)
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    service = rendered.one("Service", RELEASE)
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc"
    assert service["spec"]["type"] == "ClusterIP"


def test_probes_follow_server_port(render) -> None:
    rendered = render({"server": {"port": 6000}, "service": {"port": 443}})
    server = rendered.server
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 6000
    assert rendered.env()["TANDEM_PORT"] == "6000"
    assert rendered.one("Service", RELEASE)["spec"]["ports"][0]["port"] == 443


def test_exec_probes(render) -> None:
    command = ["python", "-m", "some_health_check"]
    rendered = render(
        {"probes": {"type": "exec", "exec": {"command": command}, "liveness": {"enabled": False}}}
    )
    assert rendered.server["startupProbe"]["exec"]["command"] == command
    assert rendered.server["readinessProbe"]["exec"]["command"] == command
    assert "livenessProbe" not in rendered.server


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_termination_grace_covers_drain(render, chart: helm.Chart, values_name: str) -> None:
    values = merged(chart.values, VALUE_SETS[values_name])
    rendered = render(VALUE_SETS[values_name])
    grace = int(rendered.env()["TANDEM_SHUTDOWN_GRACE_SECONDS"])
    assert grace == values["server"]["shutdownGraceSeconds"]
    pre_stop = rendered.server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    termination = rendered.pod["terminationGracePeriodSeconds"]
    assert termination >= grace + int(pre_stop[1]) + AFTER_DRAIN_SECONDS


@pytest.mark.parametrize(
    "values",
    [
        {"terminationGracePeriodSeconds": 40},  # 30 + 10: equal is not enough
        {"terminationGracePeriodSeconds": 44},  # 30 + 10 + 4: no time to flush and close
        {"server": {"shutdownGraceSeconds": 120}},
        {"lifecycle": {"preStopSleepSeconds": 55}},
    ],
)
def test_termination_grace_guard(chart: helm.Chart, values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_termination_grace_leaves_time_after_the_drain(render, chart: helm.Chart) -> None:
    # The server's FLUSH_SECONDS and stop take 1.25 s after the grace period, then the
    # engine closes and telemetry flushes: one second over the drain is not enough.
    for short in (41, 40 + AFTER_DRAIN_SECONDS - 1):
        with pytest.raises(helm.HelmRenderError, match=r"\+ 5: after the drain"):
            chart.render({"terminationGracePeriodSeconds": short}, name=RELEASE,
                         namespace=NAMESPACE)
    rendered = render({"terminationGracePeriodSeconds": 40 + AFTER_DRAIN_SECONDS})
    assert rendered.pod["terminationGracePeriodSeconds"] == 45


def effective(container: dict[str, Any], pod: dict[str, Any], key: str) -> Any:
    return container.get("securityContext", {}).get(key, pod.get("securityContext", {}).get(key))


@pytest.mark.parametrize("values_name", list(VALUE_SETS))
def test_nothing_runs_as_root(render, values_name: str) -> None:
    rendered = render(VALUE_SETS[values_name])
    pod = rendered.pod
    containers = pod["containers"] + pod.get("initContainers", [])
    # The server, and the fetch init container where the default pair is served.
    assert len(containers) == (2 if values_name == "default" else 1)
    for container in containers:
        name = container["name"]
        user = effective(container, pod, "runAsUser")
        assert user == 10001, name
        assert effective(container, pod, "runAsGroup") == 10001, name
        assert effective(container, pod, "runAsNonRoot") is True, name
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["capabilities"]["drop"] == ["ALL"], name
        assert context.get("privileged") is False, name
        assert effective(container, pod, "seccompProfile") == {"type": "RuntimeDefault"}, name
        # Writable places on a read-only root: /tmp and the model cache.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/tmp"] == "tmp" and mounts["/var/cache/tandem"] == "model-cache", name
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False


def test_model_cache_volumes(render, default: Rendered, all_on: Rendered) -> None:
    volumes = {v["name"]: v for v in default.pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {"sizeLimit": "64Gi"}}
    assert not default.of_kind("PersistentVolumeClaim")
    (init,) = default.pod["initContainers"]
    assert init["command"] == ["tandem", "models", "fetch"]
    assert default.env(init)["TANDEM_CACHE"] == "/var/cache/tandem"
    assert init["image"] == default.server["image"] == "tandem:0.1.0"

    pvc = all_on.one("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in all_on.pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["storageClassName"] == "premium-rwx"

    existing = render(
        {"modelCache": {"persistence": {"enabled": True, "existingClaim": "weights"}}}
    )
    assert not existing.of_kind("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in existing.pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "weights"}

    no_class = render({"modelCache": {"persistence": {"enabled": True, "storageClassName": "-"}}})
    assert no_class.one("PersistentVolumeClaim")["spec"]["storageClassName"] == ""

    # `tandem models fetch` fetches only the default pair: no init container for another.
    custom = render({"model": {"target": "Qwen/Qwen2.5-7B-Instruct",
                               "draft": "Qwen/Qwen2.5-0.5B-Instruct"}})
    assert "initContainers" not in custom.pod
    half = render({"model": {"target": "/var/cache/tandem/mine", "draft": "default"}})
    assert [c["name"] for c in half.pod["initContainers"]] == ["fetch-models"]
    custom_no_cache = render({"model": {"target": "/weights/t", "draft": "/weights/d"},
                              "modelCache": {"enabled": False}})
    assert "initContainers" not in custom_no_cache.pod
    # A hub id without the cache volume downloads onto a writable root filesystem only.
    writable = render({"model": {"target": "Qwen/Qwen2.5-7B-Instruct", "draft": "/weights/d"},
                       "modelCache": {"enabled": False},
                       "securityContext": {"readOnlyRootFilesystem": False}})
    assert writable.env()["TANDEM_TARGET"] == "Qwen/Qwen2.5-7B-Instruct"
    # Or where extraEnv points HF_HOME somewhere writable (here the /tmp emptyDir).
    elsewhere = render({"model": {"target": "Qwen/Qwen2.5-7B-Instruct", "draft": "/weights/d"},
                        "modelCache": {"enabled": False},
                        "extraEnv": [{"name": "HF_HOME", "value": "/tmp/hf"}]})
    assert elsewhere.env()["HF_HOME"] == "/tmp/hf"

    baked = render({"modelCache": {"enabled": False}, "modelFetch": {"enabled": False}})
    assert "initContainers" not in baked.pod
    assert "TANDEM_CACHE" not in baked.env()
    assert "model-cache" not in {v["name"] for v in baked.pod["volumes"]}


def test_existing_claim_needs_no_persistence_enabled(render) -> None:
    # README: weights copied onto a claim of your own, named by existingClaim alone.
    rendered = render({"modelCache": {"persistence": {"existingClaim": "my-weights"}},
                       "model": {"target": "/var/cache/tandem/my-7b"}})
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache",
                                      "persistentVolumeClaim": {"claimName": "my-weights"}}
    assert not rendered.of_kind("PersistentVolumeClaim")
    # No cache volume at all: no claim either.
    baked = render({"modelCache": {"enabled": False, "persistence": {"existingClaim": "w"}},
                    "modelFetch": {"enabled": False}})
    assert "model-cache" not in {v["name"] for v in baked.pod["volumes"]}


RWOP = {"accessModes": ["ReadWriteOncePod"]}


def test_a_read_write_once_pod_claim_needs_a_rollout_that_cannot_surge(render, chart) -> None:
    # A surge pod can never mount the claim the old pod holds: the rollout would hang.
    for values in (
        {"modelCache": {"persistence": {"enabled": True, **RWOP}}},
        {"modelCache": {"persistence": {"existingClaim": "weights", **RWOP}}},
        # The API defaults a missing maxSurge to 25%: one pod.
        {"modelCache": {"persistence": {"enabled": True, **RWOP}},
         "strategy": {"rollingUpdate": {"maxSurge": None, "maxUnavailable": 1}}},
        {"modelCache": {"persistence": {"enabled": True, **RWOP}},
         "strategy": {"rollingUpdate": {"maxSurge": "10%", "maxUnavailable": 1}}},
    ):
        with pytest.raises(helm.HelmRenderError, match=r"ReadWriteOncePod.*maxSurge=0"):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
    for strategy in (
        {"type": "Recreate"},
        {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        {"rollingUpdate": {"maxSurge": "0%", "maxUnavailable": 1}},
    ):
        rendered = render({"modelCache": {"persistence": {"enabled": True, **RWOP}},
                           "strategy": strategy})
        assert rendered.one("PersistentVolumeClaim")["spec"]["accessModes"] == [
            "ReadWriteOncePod"]
    # ReadWriteOnce with the default surge renders: its risk (another node) is documented.
    assert render({"modelCache": {"persistence": {"enabled": True}}}).one("PersistentVolumeClaim")


# --------------------------------------------------------------------------- services, HPA, PDB


def test_headless_service(default: Rendered, all_on: Rendered) -> None:
    assert [s["metadata"]["name"] for s in default.of_kind("Service")] == [RELEASE]
    headless = all_on.one("Service", f"{RELEASE}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert headless["spec"]["ports"] == [
        {
            "name": "grpc",
            "port": 50051,
            "targetPort": "grpc",
            "protocol": "TCP",
            "appProtocol": "grpc",
        }
    ]
    assert headless["spec"]["selector"] == all_on.deployment["spec"]["selector"]["matchLabels"]
    assert "round_robin" in all_on.notes


def test_hpa(default: Rendered, all_on: Rendered, render) -> None:
    assert not default.of_kind("HorizontalPodAutoscaler")
    assert default.deployment["spec"]["replicas"] == 1
    hpa = all_on.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": RELEASE,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "tandem_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    # The HPA owns the replica count.
    assert "replicas" not in all_on.deployment["spec"]

    in_flight = render({"autoscaling": {"enabled": True}}).one("HorizontalPodAutoscaler")
    (metric,) = in_flight["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "tandem_requests_in_flight"
    assert metric["pods"]["target"]["averageValue"] == "6"


def test_pdb(default: Rendered, all_on: Rendered) -> None:
    spec = default.one("PodDisruptionBudget")["spec"]
    assert spec["maxUnavailable"] == 1 and "minAvailable" not in spec
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    spec = all_on.one("PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == 1 and "maxUnavailable" not in spec


def test_dashboard(default: Rendered, all_on: Rendered) -> None:
    assert not default.of_kind("ConfigMap")
    config_map = all_on.one("ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["tandem-dashboard.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "tandem_requests_in_flight",
        "tandem_queue_depth",
        "tandem_spec_decode_num_drafts_total",
        "tandem_spec_decode_num_draft_tokens_total",
        "tandem_spec_decode_num_accepted_tokens_total",
        "gen_ai_server_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "tandem_requests_total",
    ):
        assert metric in exprs, metric


def test_image_digest_wins(render) -> None:
    digest = "sha256:" + "a" * 64
    rendered = render({"image": {"repository": "r.example/tandem", "tag": "x", "digest": digest}})
    assert rendered.server["image"] == f"r.example/tandem@{digest}"


# ---- gaps a mutation review found (each test fails on the mutant its comment names)

AUTH_EXEC_PROBES = {"auth": {"enabled": True, "token": "t"},
                    "probes": {"type": "exec", "exec": {"command": ["true"]}}}


# H1 (secret volumes mode 0644 instead of 0440)
def test_secret_files_are_0440(all_on: Rendered) -> None:
    chart_secrets = {"auth", "tls", "client-ca"}  # (hub-token is the values' extraVolumes)
    secrets = {v["name"]: v["secret"] for v in all_on.pod["volumes"] if v["name"] in chart_secrets}
    assert set(secrets) == chart_secrets
    assert {name: s["defaultMode"] for name, s in secrets.items()} == {
        "auth": 0o440, "tls": 0o440, "client-ca": 0o440}


# H3 (fsGroup gone: the 0440 secret files, owned by root, unreadable to uid 10001)
def test_the_server_is_in_the_group_that_may_read_the_secrets(render, default: Rendered,
                                                              all_on: Rendered) -> None:
    for rendered in (default, all_on):
        pod_context = rendered.pod["securityContext"]
        group = rendered.server["securityContext"].get("runAsGroup", pod_context["runAsGroup"])
        assert pod_context.get("fsGroup") == group == 10001


# H2 (`default true` turns auth.exemptHealth=false back into true)
def test_exempt_health_false_reaches_the_server(render) -> None:
    from service.settings import parse

    for exempt in (False, True):
        rendered = render({**AUTH_EXEC_PROBES,
                           "auth": {**AUTH_EXEC_PROBES["auth"], "exemptHealth": exempt}})
        env = rendered.env()
        assert env["TANDEM_AUTH_EXEMPT_HEALTH"] == str(exempt).lower()
        strings = {k: v for k, v in env.items() if isinstance(v, str)}
        assert parse([], env=strings).auth_exempt_health is exempt


# H4 (checksum over the auth token only: a new TLS certificate or client CA rolls no pods)
def test_any_secret_change_rolls_pods(render) -> None:
    base = {"tls": {"enabled": True, "cert": "c1", "key": "k1",
                    "clientCA": {"enabled": True, "cert": "ca1"}},
            "probes": {"type": "tcpSocket"}}

    def checksum(tls: dict) -> str:
        values = {**base, "tls": {**base["tls"], **tls}}
        return render(values).deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/secrets"]

    first = checksum({})
    assert checksum({"cert": "c2"}) != first
    assert checksum({"key": "k2"}) != first
    assert checksum({"clientCA": {"enabled": True, "cert": "ca2"}}) != first
    assert checksum({}) == first
