"""``gateway run`` as a supervisor of ingest and worker processes, with real processes on
loopback: a child that dies is started again, ingest processes share the ports, the roles
run apart on one queue, and neither SIGTERM nor ``kill -9`` of the supervisor leaves a
child behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.dicomgen import SeriesSpec, dcmtk_env, free_port, make_study, storescu_args
from tests.gatewayproc import GatewayProcess, wait_until, write_config
from tests.hl7msgs import oru_r01, send_mllp
from tests.mllpsink import MLLPSink


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def child_pids(gw: GatewayProcess) -> dict[str, int]:
    return {p["process"]: p["pid"] for p in gw.processes() if p["pid"] is not None}


def echo(port: int) -> int:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="AI_GATEWAY")
    try:
        assert assoc.is_established
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_a_killed_ingest_process_is_restarted_and_answers_again(tmp_path: Path) -> None:
    gw = GatewayProcess(write_config(tmp_path), tmp_path / "gateway.log").start()
    try:
        before = child_pids(gw)
        assert set(before) == {"ingest-0", "worker-0"}
        assert gw.proc is not None and before["ingest-0"] != gw.proc.pid
        os.kill(before["ingest-0"], signal.SIGKILL)
        wait_until("the supervisor to notice", lambda: gw.get("/readyz")[0] == 503, 10)
        wait_until("a new ingest process", lambda: gw.get("/readyz")[0] == 200, 30)
        after = child_pids(gw)
        assert after["ingest-0"] != before["ingest-0"]
        assert after["worker-0"] == before["worker-0"]  # the others keep running
        assert echo(gw.dicom_port) == 0
        ack = send_mllp(gw.hl7_port, [oru_r01(control_id="AFTER001")])[0]
        assert b"MSA|AA|AFTER001" in ack
        exited = [e for e in gw.log_events() if e.get("event") == "process.exited"]
        assert exited and exited[0]["child"] == "ingest-0" and exited[0]["signal"] == "SIGKILL"
        (ingest,) = [p for p in gw.processes() if p["process"] == "ingest-0"]
        assert ingest["restarts"] == 1 and ingest["last_exit"] == "signal SIGKILL"
        metrics = gw.get("/metrics")[1].decode()
        assert 'gateway_process_restarts_total{role="ingest"} 1.0' in metrics
    finally:
        assert gw.stop() == 0


def test_two_ingest_processes_accept_associations_on_one_port(tmp_path: Path) -> None:
    config = write_config(tmp_path, ingest={"processes": 2}, dicom={"study_complete_after": 1})
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    try:
        assert set(child_pids(gw)) == {"ingest-0", "ingest-1", "worker-0"}
        studies = [
            make_study(tmp_path / f"s{i}", series=[SeriesSpec("CT", count=1, rows=16, cols=16)])
            for i in range(16)
        ]

        def send(files: list[Path]) -> int:
            r = subprocess.run(
                storescu_args(files, port=gw.dicom_port, aet="STORESCU"),
                env=dcmtk_env(),
                capture_output=True,
                timeout=120,
            )
            return r.returncode

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(send, studies)) == [0] * 16
        # each association's summary line says how many instances it stored, and where
        # (written just after the peer's release, so it may trail storescu's exit a little)
        def released() -> list[dict[str, Any]] | None:
            found = [
                e
                for e in gw.log_events()
                if e.get("event") == "dicom.association.released" and e.get("stored")
            ]
            return found if sum(e["stored"] for e in found) == 16 else None

        stored = wait_until("16 stored instances", released, 10)
        assert {e["process"] for e in stored} == {"ingest-0", "ingest-1"}
        assert len({e["process_id"] for e in stored}) == 2
        # both processes' counts are in the supervisor's /metrics, added up
        metrics = gw.get("/metrics")[1].decode()
        assert 'gateway_dicom_instances_received_total{outcome="stored"} 16.0' in metrics
        assert 'gateway_dicom_associations_total{outcome="accepted"} 16.0' in metrics
    finally:
        assert gw.stop() == 0


def test_role_ingest_stores_and_role_worker_routes_what_was_stored(tmp_path: Path) -> None:
    with MLLPSink() as sink:
        config = write_config(
            tmp_path,
            destinations={
                "ehr": {
                    "hl7": {"host": "127.0.0.1", "port": sink.port, "ack_timeout": 2},
                    "retry": {"initial": 0.2, "max": 1, "give_up_after": 60},
                }
            },
            routes=[
                {"name": "reports", "when": {"hl7": {"MSH-9": {"regex": "^ORU"}}},
                 "forward": ["ehr"]},
            ],
        )
        ingest = GatewayProcess(config, tmp_path / "ingest.log", args=("--role", "ingest"))
        ingest.start()
        try:
            assert set(child_pids(ingest)) == {"ingest-0"}
            checks = json.loads(ingest.get("/readyz")[1])["checks"]
            assert "workers" not in checks and checks["dicom"] and checks["hl7"]
            ack = send_mllp(ingest.hl7_port, [oru_r01(control_id="ROLE0001")])[0]
            assert b"MSA|AA|ROLE0001" in ack
            time.sleep(2)  # a worker would have routed it within 250 ms
            status = ingest.queue_status()
            assert status["received"] == {"hl7": 1}
            assert status.get("jobs:route") == {"ready": 1}, status
            assert not sink.received
            # the worker node: the same data_dir and queue, its own health port
            cfg: dict[str, Any] = yaml.safe_load(config.read_text())
            cfg["gateway"]["http"]["port"] = free_port()
            worker_config = tmp_path / "worker.yaml"
            worker_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
            worker = GatewayProcess(worker_config, tmp_path / "worker.log",
                                    args=("--role", "worker"))
            worker.start()
            try:
                assert set(child_pids(worker)) == {"worker-0"}
                (delivered,) = sink.wait_for(1, timeout=30)
                assert b"ROLE0001" in delivered
                wait_until(
                    "the route job done",
                    lambda: worker.queue_status().get("jobs:route") == {"done": 1},
                    30,
                )
                events = {e.get("event") for e in worker.log_events()}
                assert "dicom.listening" not in events and "hl7.listening" not in events
            finally:
                assert worker.stop() == 0
        finally:
            assert ingest.stop() == 0


def test_sigterm_drains_every_process_and_exits_zero(tmp_path: Path) -> None:
    config = write_config(tmp_path, ingest={"processes": 2}, workers={"processes": 2})
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    pids = child_pids(gw)
    assert set(pids) == {"ingest-0", "ingest-1", "worker-0", "worker-1"}
    ack = send_mllp(gw.hl7_port, [oru_r01(control_id="DRAIN001")])[0]
    assert b"MSA|AA|DRAIN001" in ack
    assert gw.stop() == 0
    assert all(gone(pid) for pid in pids.values())
    events = gw.log_events()
    stopped = {e.get("process") for e in events if e.get("event") == "process.stopped"}
    assert stopped == set(pids)
    assert events[-1]["event"] == "gateway.stopped"
    assert gw.audit_records("application-activity")[-1]["detail"] == "gateway stopped"


def test_kill9_of_the_supervisor_leaves_no_process_behind(tmp_path: Path) -> None:
    config = write_config(tmp_path, ingest={"processes": 2})
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    pids = child_pids(gw)
    assert len(pids) == 3
    gw.kill9()
    wait_until("every child gone", lambda: all(gone(pid) for pid in pids.values()), 10)
    # nothing holds the ports: the gateway starts again on them and answers
    again = GatewayProcess(config, tmp_path / "gateway2.log").start()
    try:
        assert echo(again.dicom_port) == 0
    finally:
        assert again.stop() == 0


def test_a_config_port_0_is_chosen_once_for_every_ingest_process(tmp_path: Path) -> None:
    config = write_config(tmp_path, ingest={"processes": 2}, dicom={"port": 0}, hl7={"port": 0})
    gw = GatewayProcess(config, tmp_path / "gateway.log").start()
    try:
        listening = [e for e in gw.log_events() if e.get("event") == "dicom.listening"]
        ports = {tuple(e["ports"]) for e in listening}
        assert len(listening) == 2 and len(ports) == 1
        (dicom_port,) = ports.pop()
        assert dicom_port != 0
        assert echo(dicom_port) == 0
    finally:
        assert gw.stop() == 0
