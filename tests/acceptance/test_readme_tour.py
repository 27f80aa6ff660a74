"""README.md's five-minute tour, followed as a user would, with the README's own commands.

The shipped ``config/gateway.yaml`` is copied with only its three ports (free ones instead of
11112/2575/8080) and its two data paths (a temporary folder instead of ``../var``) changed;
``gateway run -c`` runs as a subprocess. The commands are read from README.md's code blocks
and run with bash from the repository root, the ports and /tmp paths substituted, so a
change to the README's commands is a change to this test.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dicomgen import free_port
from tests.gatewayproc import REPO, GatewayProcess

pytestmark = pytest.mark.timeout(180)

README = REPO / "README.md"
SHIPPED_CONFIG = REPO / "config" / "gateway.yaml"
README_PORTS = {"dicom": 11112, "hl7": 2575, "http": 8080}


# --- the README, read as a user reads it ---------------------------------------------------


@dataclass(frozen=True)
class Block:
    lang: str
    text: str


def tour_blocks() -> list[Block]:
    """The fenced code blocks of the "A five-minute tour" section, in order."""
    text = README.read_text()
    start = text.index("## A five-minute tour")
    end = text.index("\n## ", start + 1)
    section = text[start:end]
    return [Block(m[1], m[2]) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.DOTALL)]


def sh_blocks() -> list[str]:
    return [b.text for b in tour_blocks() if b.lang == "sh"]


def command(keyword: str) -> str:
    """The tour's shell block that mentions *keyword* (exactly one)."""
    found = [t for t in sh_blocks() if keyword in t]
    assert len(found) == 1, f"README tour: {len(found)} sh blocks mention {keyword!r}"
    return found[0]


def expected_output(cmd: str) -> list[str]:
    """The plain (output) block right after the README's *cmd* command."""
    blocks = tour_blocks()
    i = next(i for i, b in enumerate(blocks) if cmd in b.text)
    assert blocks[i + 1].lang == "", f"README: the output block of {cmd} is missing"
    return blocks[i + 1].text.rstrip("\n").splitlines()


def inline_curl() -> str:
    """The README's `curl -s 127.0.0.1:8080/metrics` sentence."""
    m = re.search(r"`(curl [^`]*)`", README.read_text())
    assert m, "README: no curl example"
    return m[1]


# --- a copy of the shipped config on free ports ----------------------------------------------


@dataclass
class Tour:
    gw: GatewayProcess
    config: Path
    folder: Path
    ports: dict[str, int]

    def localize(self, cmd: str) -> str:
        """The README's command for this gateway: its ports, its folder for /tmp, the venv."""
        for name, readme_port in README_PORTS.items():
            cmd = re.sub(rf"\b{readme_port}\b", str(self.ports[name]), cmd)
        cmd = cmd.replace("/tmp/", f"{self.folder}/")
        if not (REPO / ".venv" / "bin").is_dir():  # tests run from another environment
            cmd = cmd.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        return cmd

    def sh(
        self, readme_cmd: str, *extra: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the README's command (localized), with *extra* arguments appended."""
        return subprocess.run(
            ["bash", "-c", " ".join([self.localize(readme_cmd), *extra])],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        r = self.gw.cli("queue", "status", "--json")
        assert r.returncode == 0, r.stderr
        result: dict[str, Any] = json.loads(r.stdout)
        return result


def copy_shipped_config(folder: Path) -> tuple[Path, dict[str, int]]:
    """config/gateway.yaml with only the ports, the data paths and the bundle paths replaced."""
    text = SHIPPED_CONFIG.read_text()
    ports = {name: free_port() for name in README_PORTS}
    replacements = {
        f"port: {README_PORTS['dicom']}": f"port: {ports['dicom']}",
        f"port: {README_PORTS['hl7']}": f"port: {ports['hl7']}",
        f"port: {README_PORTS['http']}": f"port: {ports['http']}",
        "data_dir: ../var": f"data_dir: {folder / 'var'}",
        "encryption_key_file: ../var/keys.json": (
            f"encryption_key_file: {folder / 'var' / 'keys.json'}"
        ),
        # the shipped bundles, wherever the copy is
        "bundle: ../models/lung_nodules": f"bundle: {REPO / 'models' / 'lung_nodules'}",
        "bundle: ../models/report_findings": f"bundle: {REPO / 'models' / 'report_findings'}",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"config/gateway.yaml: expected one '{old}'"
        text = text.replace(old, new)
    path = folder / "gateway.yaml"
    path.write_text(text)
    # nothing else changed: allowed_callers, timers, limits are exactly as shipped
    shipped, copy = yaml.safe_load(SHIPPED_CONFIG.read_text()), yaml.safe_load(text)
    for section, key in (
        ("dicom", "port"),
        ("hl7", "port"),
        ("gateway", "data_dir"),
        ("gateway", "encryption_key_file"),
    ):
        shipped[section].pop(key), copy[section].pop(key)
    shipped["gateway"]["http"].pop("port"), copy["gateway"]["http"].pop("port")
    for name in shipped["models"]:
        shipped["models"][name].pop("bundle"), copy["models"][name].pop("bundle")
    assert copy == shipped
    return path, ports


def start_tour(folder: Path) -> Tour:
    folder.mkdir(parents=True, exist_ok=True)
    config, ports = copy_shipped_config(folder)
    gw = GatewayProcess(config, folder / "gateway.log").start()
    assert (gw.dicom_port, gw.hl7_port, gw.http_port) == (
        ports["dicom"],
        ports["hl7"],
        ports["http"],
    )
    return Tour(gw, config, folder, ports)


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    t = start_tour(tmp_path)
    yield t
    t.gw.stop()


def ack_segments(stdout: str) -> list[str]:
    """mllp_send prints each ACK as received: MLLP framing (0x0b ... 0x1c 0x0d) included."""
    return [s for s in stdout.strip("\x0b\x1c\r\n").replace("\r", "\n").split("\n") if s]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- what the README says about the default config -----------------------------------------


def test_shipped_config_is_what_the_readme_describes() -> None:
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    assert cfg["dicom"]["port"] == 11112
    assert cfg["dicom"]["ae_title"] == "AI_GATEWAY"
    assert cfg["hl7"]["port"] == 2575
    assert cfg["gateway"]["http"]["port"] == 8080
    # loopback only
    assert {cfg["dicom"]["host"], cfg["hl7"]["host"], cfg["gateway"]["http"]["host"]} == {
        "127.0.0.1"
    }
    # data in var/ (paths are relative to the config file)
    assert (SHIPPED_CONFIG.parent / cfg["gateway"]["data_dir"]).resolve() == REPO / "var"
    assert cfg["dicom"]["study_complete_after"] == 5
    # the tour's peers are allowed as shipped
    callers = {c["ae_title"] for c in cfg["dicom"]["allowed_callers"]}
    assert {"ECHOSCU", "STORESCU"} <= callers
    assert {"application": "EHR", "facility": "HOSP", "hosts": ["127.0.0.1"]} in cfg["hl7"][
        "allowed_senders"
    ]
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(SHIPPED_CONFIG)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


# --- the tour ---------------------------------------------------------------------------------


def test_readme_tour_end_to_end(tour: Tour) -> None:
    # 1. Check the gateway answers DICOM
    r = tour.sh(command("echoscu"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "OK"

    # 2. Send a study: make_ct_series + storescu, the README's options
    r = tour.sh(command("storescu"))
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted((tour.folder / "study").rglob("*.dcm"))
    assert len(files) == 20
    status = tour.status()  # every 0x0000 was a durable store: counted at once
    assert status["received"] == {"dicom": len(files)}
    assert status["studies"] == {"open": 1}

    # 3. Send an HL7 report; the answer is an ACK with MSA|AA|MSG0001
    r = tour.sh(command("mllp_send"))
    assert r.returncode == 0, r.stdout + r.stderr
    first_ack = r.stdout
    segments = ack_segments(first_ack)
    assert segments[0].startswith("MSH|^~\\&|AI_GATEWAY|AI|EHR|HOSP|")
    assert "MSA|AA|MSG0001" in segments
    # "Send it again: the same ACK comes back and nothing is stored twice."
    mllp_line = next(ln for ln in command("mllp_send").splitlines() if "mllp_send" in ln)
    r = tour.sh(mllp_line)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == first_ack
    assert tour.status()["received"] == {"dicom": len(files), "hl7": 1}

    # "A study is complete study_complete_after seconds (default 5) after its last instance"
    deadline = time.monotonic() + 20
    while (status := tour.status())["studies"] != {"complete": 1}:
        assert time.monotonic() < deadline, status
        time.sleep(0.25)

    # both are routed, and the shipped routes run the reference models on them
    deadline = time.monotonic() + 60
    while (tour.status().get("jobs:route"), tour.status().get("jobs:infer")) != (
        {"done": 2},
        {"done": 2},
    ):
        assert time.monotonic() < deadline, tour.status()
        time.sleep(0.25)
    log = (tour.folder / "gateway.log").read_text()
    done = [json.loads(ln) for ln in log.splitlines() if '"infer.done"' in ln]
    assert sorted(d["model"] for d in done) == ["lung-nodules", "report-findings"]
    assert next(d for d in done if d["model"] == "report-findings")["findings"] == 2

    # 5. Run a model yourself: the README's command; the findings lines as printed there
    (models_cmd,) = [ln for ln in command("gateway models run").splitlines() if ln.strip()]
    r = tour.sh(models_cmd, "-c", str(tour.config))
    assert r.returncode == 0, r.stdout + r.stderr
    want = [tour.localize(ln) for ln in expected_output("gateway models run")]
    got = r.stdout.rstrip("\n").splitlines()
    assert got[1:] == want[1:], r.stdout
    assert re.fullmatch(
        re.escape(want[0]).replace(r"0\.3", r"[0-9.]+").replace("463292a1e63c12fb", "[0-9a-f]{16}"),
        got[0],
    ), got[0]

    # 4. Watch the queue: the README's command, with -c for this copy of the config
    (queue_cmd,) = [ln for ln in command("gateway queue status").splitlines() if ln.strip()]
    r = tour.sh(queue_cmd, "-c", str(tour.config))
    assert r.returncode == 0, r.stdout + r.stderr
    got = r.stdout.rstrip("\n").splitlines()
    want = expected_output("gateway queue status")  # "…": this machine's free space
    assert len(got) == len(want), r.stdout
    for line, pattern in zip(got, want, strict=True):
        assert re.fullmatch(re.escape(pattern).replace("…", r"[0-9.]+"), line), (line, pattern)

    # 6. Ask what would happen: the README's explain command and its output (UID elided)
    (explain_cmd,) = [ln for ln in command("gateway explain").splitlines() if ln.strip()]
    r = tour.sh(explain_cmd, "-c", str(tour.config))
    assert r.returncode == 0, r.stdout + r.stderr
    got = r.stdout.rstrip("\n").splitlines()
    want = [tour.localize(line) for line in expected_output("gateway explain")]
    assert len(got) == len(want), r.stdout
    for line, pattern in zip(got, want, strict=True):
        assert re.fullmatch(re.escape(pattern).replace("…", r"[0-9.]+"), line), (line, pattern)

    # 7. See what the models found: the README's command, its header and count lines
    (findings_cmd,) = [ln for ln in command("gateway findings query").splitlines() if ln.strip()]
    r = tour.sh(findings_cmd, "-c", str(tour.config))
    assert r.returncode == 0, r.stdout + r.stderr
    got = r.stdout.rstrip("\n").splitlines()
    want = expected_output("gateway findings query")
    assert (got[0], got[-1]) == (want[0], want[-1]), r.stdout
    assert {line.split()[3] for line in got[1:-1]} == {"lung-nodules", "report-findings"}
    for phi in ("DOE", "PID12345", "MSG0001"):
        assert phi not in r.stdout, phi

    # curl -s 127.0.0.1:8080/metrics shows the counters; /healthz and /readyz the state
    curl = inline_curl()
    assert curl == "curl -s 127.0.0.1:8080/metrics"
    if shutil.which("curl"):
        r = tour.sh(curl)
        assert r.returncode == 0, r.stderr
        metrics = r.stdout
    else:
        code, body = tour.gw.get("/metrics")
        assert code == 200
        metrics = body.decode()
    assert f'gateway_dicom_instances_received_total{{outcome="stored"}} {len(files)}.0' in metrics
    assert 'gateway_hl7_messages_total{ack="AA",type="ORU^R01"} 2.0' in metrics
    assert 'gateway_queue_jobs{stage="route",state="done"} 2.0' in metrics
    assert 'gateway_model_runs_total{model="lung-nodules",outcome="ok"} 1.0' in metrics
    assert 'gateway_studies{state="complete"} 1.0' in metrics
    code, body = tour.gw.get("/healthz")
    assert (code, json.loads(body)) == (200, {"status": "ok"})
    code, body = tour.gw.get("/readyz")
    ready = json.loads(body)
    assert code == 200 and ready["ready"] is True, ready
    assert all(ready["checks"].values()), ready

    # refusals the README promises
    r = tour.sh(command("echoscu").replace("-aet ECHOSCU", "-aet INTRUDER"))
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stdout + r.stderr
    hl7_block = command("mllp_send")
    r = tour.sh(hl7_block.replace("|EHR|HOSP|", "|LAB|HOSP|").replace("oru.hl7", "lab.hl7"))
    assert r.returncode == 0, r.stdout + r.stderr
    segments = ack_segments(r.stdout)
    assert any(s.startswith("MSA|AR|MSG0001") for s in segments), r.stdout
    assert any(s.startswith("ERR|") for s in segments), r.stdout
    assert tour.status()["received"] == {"dicom": len(files), "hl7": 1}

    # "Logs are JSON lines on stdout without patient data."
    log = tour.gw.log()
    events = tour.gw.log_events()
    assert events and not [e for e in events if "unparsed" in e], log[:2000]
    for phi in ("DOE^JANE", "JANE", "PID12345", "12345^^^HOSP"):
        assert phi not in log, phi

    # "Stop with Ctrl-C or SIGTERM: the gateway ... exits."
    assert tour.gw.stop() == 0
    assert not port_open(tour.ports["dicom"])
    assert not port_open(tour.ports["hl7"])


def test_the_readme_results_config_is_valid(tmp_path: Path) -> None:
    """The README's "Results back to the PACS and the EHR" snippet, put into the shipped
    config, passes check-config."""
    text = README.read_text()
    start = text.index("## Results back to the PACS and the EHR")
    section = text[start : text.index("\n## ", start + 1)]
    (snippet,) = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    cfg = yaml.safe_load(SHIPPED_CONFIG.read_text())
    cfg.update(yaml.safe_load(snippet))
    for model in cfg["models"].values():
        model["bundle"] = str((SHIPPED_CONFIG.parent / model["bundle"]).resolve())
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", "-c", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 destinations, 2 models, 2 routes" in r.stdout
