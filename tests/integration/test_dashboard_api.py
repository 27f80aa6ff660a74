"""The dashboard's API on a running gateway, over HTTPS, as a browser or a script uses it:
who may read (bearer tokens, client certificates), what each refusal says, that every
view and refusal is audited, that only an operator replays a dead letter, and that the
health endpoints answer as before (over HTTPS now, without a credential)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.certs import issue
from tests.dashboardkit import DashboardKit, make_dashboard
from tests.gatewayproc import GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DashboardKit:
    return make_dashboard(tmp_path_factory.mktemp("dashboard-kit"))


@pytest.fixture(scope="module")
def sink() -> Iterator[MLLPSink]:
    with MLLPSink() as ehr:
        ehr.reply = "AR"  # refuses every message: a forward becomes a dead letter
        yield ehr


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, kit: DashboardKit, sink: MLLPSink
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("dashboard-api")
    config = write_config(
        folder,
        dashboard=kit.section(),
        destinations={"ehr": {"hl7": {"host": "127.0.0.1", "port": sink.port}}},
        routes=[{"name": "reports", "when": {"hl7": {"MSH-9": "ORU^R01"}}, "forward": ["ehr"]}],
    )
    gw = GatewayProcess(config, folder / "gateway.log").start()
    yield gw
    gw.stop()


def api(
    gw: GatewayProcess, path: str, token: str | None, method: str = "GET"
) -> tuple[int, Any, dict[str, str]]:
    headers = DashboardKit.bearer(token) if token else {}
    status, body, got = gw.request(path, method=method, headers=headers)
    return status, json.loads(body) if body else None, got


def test_health_endpoints_answer_over_https_without_a_credential(gateway: GatewayProcess) -> None:
    assert gateway.http_url.startswith("https://")
    status, body, headers = gateway.request("/healthz")
    assert (status, body) == (200, b'{"status": "ok"}\n')
    assert headers["content-type"] == "application/json"
    status, body, _ = gateway.request("/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    assert "dashboard.tls.cert" in json.loads(body)["details"]["certificates"]
    status, body, headers = gateway.request("/metrics")
    assert status == 200 and b"gateway_queue_jobs" in body
    assert headers["content-type"].startswith("text/plain")
    assert gateway.request("/nothing-here")[:2] == (404, b'{"error":"not found"}')


def test_an_unauthenticated_request_is_refused_with_401_and_audited(
    gateway: GatewayProcess,
) -> None:
    before = len(gateway.audit_records("security-alert"))
    for token in (None, "not-a-token-of-the-file"):
        status, body, headers = api(gateway, "/api/queue", token)
        assert status == 401, body
        assert headers["www-authenticate"] == 'Bearer realm="gateway"'
    status, _, _ = gateway.request("/api/queue", headers={"Authorization": "Basic eDp5"})
    assert status == 401
    refused = gateway.audit_records("security-alert")[before:]
    assert len(refused) == 3
    assert {r["objects"][0]["id"] for r in refused} == {"/api/queue"}
    assert all(r["actor"]["user"] == "?" for r in refused)
    assert "unknown token" in refused[1]["detail"]


def test_each_view_read_with_a_token_is_one_audit_record_naming_the_holder(
    gateway: GatewayProcess, kit: DashboardKit
) -> None:
    before = len(gateway.audit_records("query"))
    views = ["whoami", "queue", "studies", "dead", "destinations", "certificates", "findings"]
    for view in views:
        status, body, headers = api(gateway, f"/api/{view}", kit.viewer)
        assert status == 200, (view, body)
        assert headers["cache-control"] == "no-store"
    reads = gateway.audit_records("query")[before:]
    assert [r["objects"] for r in reads] == [[{"type": "view", "id": f"/api/{v}"}] for v in views]
    assert {(r["actor"]["user"], r["actor"]["application"]) for r in reads} == {
        ("ward-screen", "dashboard:viewer")
    }
    assert api(gateway, "/api/whoami", kit.operator)[1] == {
        "name": "alice",
        "role": "operator",
        "via": "token",
    }


def test_the_queue_view_shows_the_free_space_of_each_volume_and_the_floor(
    gateway: GatewayProcess, kit: DashboardKit
) -> None:
    volumes = api(gateway, "/api/queue", kit.viewer)[1]["volumes"]
    assert [v["volume"] for v in volumes] == ["data", "spool"]
    for v in volumes:
        assert v["min_free_bytes"] == 16 * 2**20  # the tests' floor (write_config)
        assert v["free_bytes"] > 0 and v["low"] is (v["free_bytes"] < v["min_free_bytes"])


def test_a_client_certificate_named_in_the_tokens_file_is_a_credential(
    gateway: GatewayProcess, kit: DashboardKit
) -> None:
    ctx = gateway.tls_context(kit.pki.client_cert, kit.pki.client_key)
    status, body, _ = gateway.request("/api/whoami", context=ctx)
    assert status == 200, body
    assert json.loads(body) == {"name": "qa-laptop", "role": "viewer", "via": "certificate"}
    (record,) = gateway.audit_records("query")[-1:]
    assert record["actor"]["cert_subject"].startswith("CN=client,")


def test_only_an_operator_replays_a_dead_letter(
    gateway: GatewayProcess, kit: DashboardKit, sink: MLLPSink
) -> None:
    (ack,) = send_mllp(gateway.hl7_port, [oru_r01(control_id="DASHDEAD1")])
    assert b"MSA|AA|DASHDEAD1" in ack

    def dead() -> list[dict[str, Any]] | None:
        return api(gateway, "/api/dead", kit.viewer)[1]["dead"] or None

    (letter,) = wait_until("the refused forward's dead letter", dead, 30)
    assert letter["stage"] == "deliver" and letter["lane"] == "ehr"
    assert len(letter["target"]) == 12 and "AR" in letter["last_error"]
    assert api(gateway, "/api/dead", kit.viewer)[1]["can_replay"] is False

    path = f"/api/dead/{letter['id']}/replay"
    status, body, _ = api(gateway, path, kit.viewer, method="POST")
    assert status == 403, body
    assert gateway.audit_records("security-alert")[-1]["actor"]["user"] == "ward-screen"

    assert api(gateway, "/api/dead", kit.operator)[1]["can_replay"] is True
    status, body, _ = api(gateway, path, kit.operator, method="POST")
    assert (status, body) == (200, {"job_id": letter["id"], "replayed": True})
    replayed = gateway.audit_records("job-replay")[-1]
    assert replayed["actor"]["user"] == "alice"
    assert replayed["objects"] == [{"type": "job", "id": str(letter["id"])}]
    # a job that is not a dead letter (one that is done: the replayed one may already be
    # dead again, the EHR refuses it at once)
    db = sqlite3.connect(f"{(gateway.data_dir / 'queue.sqlite3').as_uri()}?mode=ro", uri=True)
    try:
        (done,) = db.execute("SELECT id FROM jobs WHERE state = 'done' LIMIT 1").fetchone()
    finally:
        db.close()
    status, body, _ = api(gateway, f"/api/dead/{done}/replay", kit.operator, method="POST")
    assert status == 404, body
    # an id no job can have (beyond 64 bits: schemathesis found it answered 500)
    status, body, _ = api(gateway, f"/api/dead/{2**70}/replay", kit.operator, method="POST")
    assert status == 404, body
    # the replayed job is refused again and comes back, its attempts counted afresh
    wait_until("the replayed job dead again", lambda: dead(), 30)


def test_a_changed_tokens_file_applies_without_a_restart(
    gateway: GatewayProcess, kit: DashboardKit
) -> None:
    original = kit.tokens_file.read_text()
    data = yaml.safe_load(original)
    data["tokens"].append({"name": "night", "role": "viewer", "token": "n" * 32})
    try:
        time.sleep(0.01)  # a new modification time
        kit.tokens_file.write_text(yaml.safe_dump(data))
        assert api(gateway, "/api/whoami", "n" * 32)[0] == 200
        kit.tokens_file.write_text("tokens: [{name: broken}]\n")  # invalid: the last good kept
        assert api(gateway, "/api/whoami", "n" * 32)[0] == 200
        assert '"dashboard.tokens_rejected"' in gateway.log()
    finally:
        kit.tokens_file.write_text(original)
    assert api(gateway, "/api/whoami", "n" * 32)[0] == 401
    assert api(gateway, "/api/whoami", kit.viewer)[0] == 200


def test_a_certificate_renewed_in_place_is_served_after_sighup(
    gateway: GatewayProcess, kit: DashboardKit, tmp_path: Path
) -> None:
    def serial() -> int:
        ctx = gateway.tls_context()
        with (
            socket.create_connection(("127.0.0.1", gateway.http_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)

    before = serial()
    renewed = issue(tmp_path, "server", kit.pki.ca, server=True)
    shutil.copy(renewed.cert, kit.pki.server_cert)
    shutil.copy(renewed.key, kit.pki.server_key)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGHUP)
    wait_until("the renewed certificate", lambda: serial() != before or None, 20)
    assert serial() == renewed_serial(renewed.cert)
    assert '"listener": "dashboard"' in gateway.log()


def renewed_serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def test_the_page_is_served_with_a_policy_that_allows_nothing_but_the_gateway(
    gateway: GatewayProcess,
) -> None:
    status, body, headers = gateway.request("/")
    assert status == 200 and b"/static/vendor/chart.umd.min.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["strict-transport-security"].startswith("max-age=")
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
    status, script, _ = gateway.request("/static/vendor/chart.umd.min.js")
    assert status == 200 and len(script) > 100_000


def test_the_openapi_schema_lists_every_view(gateway: GatewayProcess) -> None:
    status, body, _ = gateway.request("/openapi.json")
    paths = json.loads(body)["paths"]
    assert status == 200
    assert {"/healthz", "/readyz", "/metrics", "/api/queue", "/api/studies"} <= set(paths)
    assert "/api/dead/{job_id}/replay" in paths


def test_without_a_dashboard_the_http_port_is_plain_and_has_no_api(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    try:
        assert gw.http_url.startswith("http://")
        assert gw.get("/healthz") == (200, b'{"status": "ok"}\n')
        assert gw.get("/api/queue")[0] == 404
        assert gw.get("/")[0] == 404
    finally:
        gw.stop()
