"""deploy/compose: the compose file is valid against the Compose Specification's schema,
and it is wired the way the README's container tour needs: an ingest and a worker
container of the gateway on PostgreSQL, Orthanc as the PACS, secrets as compose secrets
(never environment values), the config valid and pointing at what is mounted."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, read_config
from tests.deploy.tools import COMPOSE, compose_errors

FOLDER = COMPOSE.parent


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def gateway_config() -> Config:
    return read_config(FOLDER / "gateway.yaml")


def test_the_compose_file_passes_the_compose_spec_schema() -> None:
    assert compose_errors(COMPOSE) is None


def test_the_schema_check_fails_a_broken_compose_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restart: [often]", 1))
    errors = compose_errors(broken)
    assert errors is not None and "restart" in errors


def test_one_ingest_and_one_worker_container_of_the_gateway_image() -> None:
    services = compose()["services"]
    assert {"ingest", "worker", "postgres", "orthanc"} <= set(services)
    for role in ("ingest", "worker"):
        svc = services[role]
        assert svc["environment"]["GATEWAY_ROLE"] == role
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (FOLDER / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        # the drain (60 s) fits in the stop grace period
        assert int(svc["stop_grace_period"].rstrip("s")) > 60


def test_secrets_are_compose_secrets_not_environment_values() -> None:
    doc = compose()
    declared = doc["secrets"]
    for name, secret in declared.items():
        assert set(secret) == {"file"}, f"secret {name} comes from a file"
        assert secret["file"].startswith("./secrets/")
    for name, svc in doc["services"].items():
        for secret in svc.get("secrets", []):
            assert secret in declared, f"{name} uses undeclared secret {secret}"
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|KEY", key):
                assert str(value).startswith("/run/secrets/"), f"{name}: {key} is a literal"
    assert doc["services"]["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == (
        "/run/secrets/pg-password"
    )
    # the secrets themselves are made on the host and never committed
    ignored = (FOLDER / "secrets" / ".gitignore").read_text().split()
    assert ignored[:2] == ["*", "!.gitignore"]


def test_the_config_is_valid_and_reads_what_the_containers_mount() -> None:
    cfg = gateway_config()
    doc = compose()
    services = doc["services"]
    for role, needs_tls in (("ingest", True), ("worker", False)):
        svc = services[role]
        mounts = {v.split(":")[1] for v in svc["volumes"]}
        secrets = {f"/run/secrets/{s}" for s in svc["secrets"]}
        assert "/etc/gateway/gateway.yaml" in mounts
        assert {str(cfg.data_dir), str(cfg.spool_dir), str(cfg.key_file.parent)} <= mounts
        assert str(cfg.gateway.database_password_file) in secrets
        assert svc["environment"]["GATEWAY_KEY_SEED"] in secrets
        if needs_tls:
            for tls in (cfg.dicom.tls, cfg.hl7.tls):
                assert tls is not None
                assert {str(tls.cert), str(tls.key), str(tls.ca)} <= secrets
    # the spool and the key file are shared; each container keeps its own data_dir
    volume = {
        r: {v.split(":")[1]: v.split(":")[0] for v in services[r]["volumes"]}
        for r in ("ingest", "worker")
    }
    assert volume["ingest"][str(cfg.spool_dir)] == volume["worker"][str(cfg.spool_dir)]
    assert volume["ingest"][str(cfg.data_dir)] != volume["worker"][str(cfg.data_dir)]
    url = cfg.gateway.database or ""
    assert url.startswith("postgresql://gateway@postgres:5432/gateway")
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "gateway"


def test_the_tour_reaches_the_gateway_and_the_results_reach_orthanc() -> None:
    """Published ports carry the config's ports; a caller on the host arrives from the
    compose network's first address, which the allow-lists admit; the pacs destination
    is the Orthanc service, whose config knows the gateway."""
    cfg = gateway_config()
    doc = compose()
    # HOST:CONTAINER or ADDRESS:HOST:CONTAINER; the tour's clients use the same numbers
    published = set()
    for mapping in doc["services"]["ingest"]["ports"]:
        host, container = mapping.split(":")[-2:]
        assert host == container, f"{mapping}: published under another number"
        published.add(container)
    wanted = {cfg.dicom.port, cfg.hl7.port, cfg.gateway.http.port}
    wanted |= {t.port for t in (cfg.dicom.tls, cfg.hl7.tls) if t is not None}
    assert {str(p) for p in wanted} <= published
    subnet = ipaddress.ip_network(doc["networks"]["gateway"]["ipam"]["config"][0]["subnet"])
    bridge = next(subnet.hosts())

    def admits(hosts: list[str]) -> bool:
        return any(bridge in ipaddress.ip_network(h, strict=False) for h in hosts)

    callers = {c.ae_title: c.hosts for c in cfg.dicom.allowed_callers}
    assert admits(callers["STORESCU"]) and admits(callers["ECHOSCU"])
    assert any(s.application == "EHR" and admits(s.hosts) for s in cfg.hl7.allowed_senders)
    orthanc = json.loads((FOLDER / "orthanc.json").read_text())
    pacs = cfg.destinations["pacs"].dicom
    assert pacs is not None
    assert (pacs.ae_title, pacs.host, pacs.port) == (
        orthanc["DicomAet"],
        "orthanc",
        orthanc["DicomPort"],
    )
    assert orthanc["DicomModalities"]["ai-gateway"] == [
        cfg.dicom.ae_title,
        "ingest",
        cfg.dicom.port,
    ]
    assert "ORTHANC" in callers and admits(callers["ORTHANC"])
    assert {r.name: r.send for r in cfg.routes}["chest-ct"] == ["pacs"]
