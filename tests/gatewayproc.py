"""The whole gateway as a subprocess, configured on free loopback ports, like a site runs it."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.dicomgen import free_port

REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, **overrides: Any) -> Path:
    """A config for tests: free ports, data under *folder*, the README tour's peers allowed.

    *overrides* replace top-level sections key by key (e.g. ``dicom={"study_complete_after": 1}``).
    """
    cfg: dict[str, Any] = {
        "gateway": {
            "data_dir": str(folder / "var"),
            "http": {"host": "127.0.0.1", "port": free_port()},
            "encryption_key_file": str(folder / "var" / "keys.json"),
            # a test gateway needs little room; the shipped 1 GB floor would refuse data on
            # a nearly full CI disk (the floor's own drill sets it: test_faults.py)
            "min_free_mb": 16,
        },
        "dicom": {
            "ae_title": "AI_GATEWAY",
            "host": "127.0.0.1",
            "port": free_port(),
            "allowed_callers": [
                {"ae_title": "PACS", "hosts": ["127.0.0.1"]},
                {"ae_title": "STORESCU", "hosts": ["127.0.0.1"]},
                {"ae_title": "ECHOSCU", "hosts": ["127.0.0.1"]},
            ],
            "study_complete_after": 2,
        },
        "hl7": {
            "host": "127.0.0.1",
            "port": free_port(),
            "allowed_senders": [{"application": "EHR", "facility": "HOSP", "hosts": ["127.0.0.1"]}],
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


#: Every gateway the tests made in this session (for the session-wide PHI scan).
STARTED: list[GatewayProcess] = []


@dataclass
class GatewayProcess:
    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    cfg: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # more options of `gateway run`, e.g. ("--role", "ingest")
    env: dict[str, str] = field(default_factory=dict)  # more environment, e.g. LD_PRELOAD

    def __post_init__(self) -> None:
        self.cfg = yaml.safe_load(self.config.read_text())
        STARTED.append(self)  # tests/conftest.py scans every log and audit trail at the end

    @property
    def dicom_port(self) -> int:
        return int(self.cfg["dicom"]["port"])

    @property
    def hl7_port(self) -> int:
        return int(self.cfg["hl7"]["port"])

    @property
    def http_port(self) -> int:
        return int(self.cfg["gateway"]["http"]["port"])

    @property
    def data_dir(self) -> Path:
        return Path(self.cfg["gateway"]["data_dir"])

    @property
    def key_file(self) -> Path:
        return Path(self.cfg["gateway"]["encryption_key_file"])

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "-c", str(self.config), *self.args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready after {timeout}s:\n{self.log()}")

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT``, or ``https://...`` with a dashboard (gateway.http is
        HTTPS then, health endpoints included)."""
        scheme = "https" if self.cfg.get("dashboard") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def tls_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the dashboard's CA (the tests' PKI signs the server
        certificate with it too), presenting *cert* when given."""
        ctx = ssl.create_default_context(cafile=self.cfg["dashboard"]["tls"]["ca"])
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of one request to gateway.http; header names in lower
        case."""
        if context is None and self.cfg.get("dashboard"):
            context = self.tls_context()
        req = urllib.request.Request(self.http_url + path, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as r:
                return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}

    def get(self, path: str) -> tuple[int, bytes]:
        status, body, _ = self.request(path)
        return status, body

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the drain path."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def processes(self) -> list[dict[str, Any]]:
        """The supervised processes as /readyz details list them (name, role, pid...)."""
        processes: list[dict[str, Any]] = json.loads(self.get("/readyz")[1])["details"][
            "processes"
        ]
        return processes

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"unparsed": line})
        return events

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", *args, "-c", str(self.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # --- what tests ask of a running gateway -------------------------------------------

    def send_study(self, paths: list[Path], aet: str = "STORESCU") -> None:
        """dcmtk storescu of *paths* to the plain DICOM port; fails the test if refused."""
        from tests.dicomgen import dcmtk_env, storescu_args

        r = subprocess.run(
            storescu_args(paths, port=self.dicom_port, aet=aet),
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr

    def queue_status(self) -> dict[str, Any]:
        """``gateway queue status --json``."""
        r = self.cli("queue", "status", "--json")
        assert r.returncode == 0, r.stderr
        value: dict[str, Any] = json.loads(r.stdout)
        return value

    def audit_records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The audit trail's records (of one *event* type)."""
        path = self.data_dir / "audit" / "audit.jsonl"
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [r for r in records if event is None or r["event"] == event]

    def wait_audit(self, event: str, after: int, timeout: float = 10.0) -> dict[str, Any]:
        """The first *event* record after the first *after* ones (waits for it)."""
        found: list[dict[str, Any]] = wait_until(
            f"an audit record '{event}'",
            lambda: (r := self.audit_records(event))[after:] and r,
            timeout,
        )
        return found[after]


def wait_until(what: str, check: Any, timeout: float = 60.0) -> Any:
    """Poll *check* until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
