"""deploy/kubernetes: each overlay renders (``kubectl kustomize``), every manifest passes
the Kubernetes OpenAPI schema in strict mode (kubernetes-validate, for the oldest and the
newest Kubernetes it knows of that we support), and the manifests agree with the gateway:
the Service exposes the ports the config listens on, the probes use /healthz and /readyz,
the NetworkPolicy admits the ranges the allow-lists name, the autoscaler's metric is one
the gateway exports, the pods drain within their grace period."""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Config, read_config
from gateway.envelope import JobState, Stage
from gateway.observability.metrics import Metrics
from gateway.supervisor import DRAIN_TIMEOUT, START_TIMEOUT
from tests.deploy.tools import DEPLOY, KUSTOMIZE, OVERLAYS, k8s_schema_errors, render

VERSIONS = ("1.29.0", "1.37.0")  # kubernetes-validate's schemas: the oldest we support, the newest


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def config_of(docs: list[dict[str, Any]], tmp_path: Path) -> Config:
    (cm,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "gateway.yaml"
    path.write_text(cm["data"]["gateway.yaml"])
    return read_config(path)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUSTOMIZE / "overlays" / request.param)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_passes_the_kubernetes_schema(
    overlay: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    _, docs = overlay
    errors = [e for d in docs if (e := k8s_schema_errors(d, version))]
    assert errors == []


def test_the_schema_check_fails_a_broken_manifest(tmp_path: Path) -> None:
    """A copy of the base with a misspelt field in the ingest Deployment: rendered, and
    rejected by the schema."""
    shutil.copytree(KUSTOMIZE / "base", tmp_path / "base")
    ingest = tmp_path / "base" / "ingest.yaml"
    ingest.write_text(ingest.read_text().replace("readinessProbe:", "readynessProbe:"))
    docs = render(tmp_path / "base")
    errors = [e for d in docs if (e := k8s_schema_errors(d, VERSIONS[-1]))]
    assert len(errors) == 1 and "readynessProbe" in errors[0]


def test_the_config_map_holds_a_valid_config(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = config_of(docs, tmp_path)
    assert cfg.gateway.database is not None, "several pods share a PostgreSQL queue"
    assert cfg.gateway.http.host == "0.0.0.0" and cfg.dicom.host == "0.0.0.0"
    for model in cfg.models.values():
        assert (DEPLOY.parent / "models" / model.bundle.relative_to("/opt/gateway/models")).is_dir()


def pods(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, its gateway container) for every Deployment."""
    out = []
    for dep in by_kind(docs, "Deployment"):
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        out.append((dep, container))
    return out


def test_pods_are_probed_limited_hardened_scraped_and_drain_in_time(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = config_of(docs, tmp_path)
    http = cfg.gateway.http.port
    roles = set()
    for dep, c in pods(docs):
        spec = dep["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        roles.add(env["GATEWAY_ROLE"])
        component = dep["metadata"]["labels"]["app.kubernetes.io/component"]
        assert env["GATEWAY_ROLE"] == component.removesuffix("-gpu")
        assert env["GATEWAY_CONFIG"] == "/etc/gateway/gateway.yaml"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == http
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= START_TIMEOUT
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        waits = int(pre_stop[1]) if pre_stop else 0
        assert pre_stop in (None, ["sleep", str(waits)])
        if component == "ingest":  # the endpoints follow the readiness with a delay
            assert waits >= 5
        assert spec["terminationGracePeriodSeconds"] > waits + DRAIN_TIMEOUT
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(http)
        assert notes["prometheus.io/path"] == "/metrics"
        assert spec["automountServiceAccountToken"] is False
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {
            "/etc/gateway",
            str(cfg.data_dir),
            str(cfg.spool_dir),
            str(cfg.key_file.parent),
        } <= mounts
        secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert secrets == {"gateway-keys", "gateway-db", "gateway-tls"}
        assert env["GATEWAY_KEY_SEED"] == "/run/secrets/gateway-keys/keys.json"
        assert str(cfg.gateway.database_password_file).startswith("/run/secrets/gateway-db/")
    assert roles == {"ingest", "worker"}


def test_the_service_exposes_what_the_config_listens_on(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = config_of(docs, tmp_path)
    svc = one(docs, "Service", "gateway-ingest")
    # the caller's own address reaches the pod: the allow-lists and the audit trail need it
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    ports = {p["port"] for p in svc["spec"]["ports"]}
    assert cfg.dicom.tls is not None and cfg.hl7.tls is not None
    assert ports == {cfg.dicom.port, cfg.dicom.tls.port, cfg.hl7.port, cfg.hl7.tls.port}
    ingest = one(docs, "Deployment", "gateway-ingest")
    (c,) = ingest["spec"]["template"]["spec"]["containers"]
    names = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    assert svc["spec"]["selector"] == ingest["spec"]["selector"]["matchLabels"]


def test_the_network_policy_admits_only_the_allow_listed_ranges(
    overlay: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, docs = overlay
    cfg = config_of(docs, tmp_path)
    policy = one(docs, "NetworkPolicy", "gateway-ingest")
    admitted: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {}
    monitoring: set[int] = set()
    for rule in policy["spec"]["ingress"]:
        blocks = [
            ipaddress.ip_network(f["ipBlock"]["cidr"]) for f in rule["from"] if "ipBlock" in f
        ]
        for port in rule["ports"]:
            if blocks:
                admitted.setdefault(port["port"], []).extend(blocks)
            else:  # a namespace selector: the monitoring namespace, for /metrics only
                assert [f["namespaceSelector"] for f in rule["from"]] == [
                    {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                ]
                monitoring.add(port["port"])
    assert cfg.dicom.tls is not None and cfg.hl7.tls is not None
    for ports, hosts in (
        (
            (cfg.dicom.port, cfg.dicom.tls.port),
            [h for c in cfg.dicom.allowed_callers for h in c.hosts],
        ),
        ((cfg.hl7.port, cfg.hl7.tls.port), [h for s in cfg.hl7.allowed_senders for h in s.hosts]),
    ):
        for port in ports:
            for host in hosts:
                net = ipaddress.ip_network(host, strict=False)
                assert any(net.subnet_of(b) for b in admitted[port]), (port, host)  # type: ignore[arg-type]
    # address ranges reach the listeners only; the monitoring namespace the metrics port only
    assert set(admitted) == {cfg.dicom.port, cfg.dicom.tls.port, cfg.hl7.port, cfg.hl7.tls.port}
    assert monitoring == {cfg.gateway.http.port}
    workers = one(docs, "NetworkPolicy", "gateway-worker")
    (rule,) = workers["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": cfg.gateway.http.port}]


def test_every_deployment_has_a_disruption_budget(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = overlay
    budgets = [p["spec"]["selector"]["matchLabels"] for p in by_kind(docs, "PodDisruptionBudget")]
    for dep, _ in pods(docs):
        assert dep["spec"]["selector"]["matchLabels"] in budgets, dep["metadata"]["name"]


def adapter_rule() -> dict[str, Any]:
    values = yaml.safe_load((KUSTOMIZE / "prometheus-adapter.yaml").read_text())
    (rule,) = values["rules"]["external"]
    return dict(rule)


def test_workers_scale_on_a_queue_metric_the_gateway_exports(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = overlay
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    if name == "single-node":
        assert hpas == []
        return
    (hpa,) = hpas
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway-worker"
    (metric,) = hpa["spec"]["metrics"]
    rule = adapter_rule()
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == rule["name"]["as"]
    # the query reads a gauge the gateway has, by labels and values it uses
    query = rule["metricsQuery"]
    exported = {m.name: m for m in Metrics().registry.collect()}
    (series,) = set(re.findall(r"\b(gateway_\w+)\{", query))
    assert series in exported and exported[series].type == "gauge"
    assert series in rule["seriesQuery"]
    stages = re.search(r'stage=~"([^"]+)"', query)
    states = re.search(r'state=~"([^"]+)"', query)
    assert stages and set(stages.group(1).split("|")) <= {s.value for s in Stage}
    assert states and set(states.group(1).split("|")) <= {s.value for s in JobState}
    assert Stage.DELIVER.value not in stages.group(1), "a destination that is down is not work"
    assert (
        hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    )


def test_the_shared_volume_and_the_gpu_workers(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    pvc = one(docs, "PersistentVolumeClaim", "gateway-shared")
    wanted = "ReadWriteOnce" if name == "single-node" else "ReadWriteMany"
    assert pvc["spec"]["accessModes"] == [wanted]
    gpus = [c for _, c in pods(docs) if "nvidia.com/gpu" in c["resources"].get("limits", {})]
    if name == "scale-out-gpu":
        (gpu,) = gpus
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert gpu["image"].endswith("-cuda")
    else:
        assert gpus == []
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {"ai-gateway"}
