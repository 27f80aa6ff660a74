"""Benchmarks: the gateway against a minimal reference peer, same machine, same client.

``python -m bench.ingest`` (DICOM C-STORE vs dcmtk storescp) and ``python -m bench.hl7``
(MLLP vs an fsync-ing reference sink); ``make bench`` runs both. See docs/performance.md.

This module holds what both share: starting the gateway as a subprocess on free loopback
ports with a throw-away data dir, waiting until it is ready, reading its memory, stopping
it with SIGTERM, and small statistics/printing helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.dicomgen import dcmtk_env, free_port

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"

#: The calling AE / HL7 sender the benchmarks use; the generated config allows them.
CALLING_AE = "PACS"
GATEWAY_AE = "AI_GATEWAY"
HL7_APPLICATION = "EHR"
HL7_FACILITY = "HOSP"


def log(msg: str) -> None:
    print(msg, flush=True)


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder under bench/out (same filesystem for gateway and reference,
    so fsync costs compare)."""
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=OUT))


def cached_data(
    name: str, count: int, what: str, make: Callable[[Path], list[Path]]
) -> list[Path]:
    """*count* files made once by *make(folder)* into ``bench/out/NAME/`` (a manifest
    lists them) and reused by later runs while every file is still there."""
    folder = OUT / name
    manifest = folder / "manifest.json"
    if manifest.exists():
        paths = [folder / n for n in json.loads(manifest.read_text())]
        if len(paths) == count and all(p.exists() for p in paths):
            log(f"using cached series {folder} ({count} files)")
            return paths
    shutil.rmtree(folder, ignore_errors=True)
    log(f"generating {count} {what} into {folder} ...")
    t0 = time.perf_counter()
    paths = make(folder)
    manifest.write_text(json.dumps([p.name for p in paths]))
    log(f"  done in {time.perf_counter() - t0:.1f}s")
    return paths


def gateway_command() -> list[str]:
    """``.venv/bin/gateway`` next to this interpreter, else ``gateway`` on PATH, else
    ``python -m gateway.cli``."""
    beside = Path(sys.executable).parent / "gateway"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("gateway")
    return [found] if found else [sys.executable, "-m", "gateway.cli"]


@dataclass
class GatewayConfig:
    path: Path
    folder: Path
    dicom_port: int
    hl7_port: int
    http_port: int


def write_gateway_config(folder: Path, **sections: Any) -> GatewayConfig:
    """A minimal config (schema: gateway/config.py ``Config``) on free loopback ports, with
    data dir and key file inside ``folder``, allowing PACS@127.0.0.1 and EHR/HOSP@127.0.0.1.
    *sections* add or replace top-level sections (destinations, routes) or, for dicts that
    exist, update their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, hl7_port, http_port = free_port(), free_port(), free_port()
    cfg: dict[str, Any] = {
        "gateway": {
            "data_dir": str(folder / "var"),
            "http": {"host": "127.0.0.1", "port": http_port},
            "encryption_key_file": str(folder / "var" / "keys.json"),
        },
        "dicom": {
            "ae_title": GATEWAY_AE,
            "host": "127.0.0.1",
            "port": dicom_port,
            "allowed_callers": [{"ae_title": CALLING_AE, "hosts": ["127.0.0.1"]}],
            # quiet period: long enough that study completion does not fire mid-benchmark
            "study_complete_after": 60,
        },
        "hl7": {
            "host": "127.0.0.1",
            "port": hl7_port,
            "allowed_senders": [
                {"application": HL7_APPLICATION, "facility": HL7_FACILITY,
                 "hosts": ["127.0.0.1"]}
            ],
        },
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update(value)
        else:
            cfg[name] = value
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return GatewayConfig(path, folder, dicom_port, hl7_port, http_port)


def _http_status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _echo_ok(port: int) -> bool:
    if shutil.which("echoscu") is None:
        return False
    r = subprocess.run(
        ["echoscu", "-aet", CALLING_AE, "-aec", GATEWAY_AE, "-to", "2", "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, timeout=15,
    )
    return r.returncode == 0


@dataclass
class GatewayProcess:
    """The gateway as a subprocess (``gateway run -c FILE``); stop() sends SIGTERM."""

    cfg: GatewayConfig
    proc: subprocess.Popen[bytes] | None = None
    #: start it in its own session and process group (``os.killpg`` kills every process)
    new_session: bool = False
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.cfg.folder / "gateway.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                [*gateway_command(), "run", "-c", str(self.cfg.path)],
                cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                env=dict(dcmtk_env(), PYTHONUNBUFFERED="1"),
                start_new_session=self.new_session,
            )
        deadline = time.monotonic() + timeout
        readyz_missing = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            status = None if readyz_missing else _http_status(self.cfg.http_port, "/readyz")
            if status == 200:
                return self
            if status == 404:
                readyz_missing = True  # no /readyz (yet): fall back to a C-ECHO
            if (status is None or readyz_missing) and _echo_ok(self.cfg.dicom_port):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gateway not ready after {timeout}s; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the drain path), then SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"  gateway did not exit {timeout}s after SIGTERM: SIGKILL")
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_count(self, *needles: str) -> int:
        """Lines of the gateway's log (its processes' JSON lines) holding every needle."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if all(n in line for n in needles))

    def wait_for_log(self, count: int, *needles: str, timeout: float = 120.0) -> None:
        """Until ``count`` lines hold every needle (e.g. each runner process's
        ``model.loaded``); RuntimeError after ``timeout`` s or if the gateway exits."""
        deadline = time.monotonic() + timeout
        while self.log_count(*needles) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}; log tail:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} log lines with {needles} not there after "
                                   f"{timeout:.0f}s; log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the supervisor's /metrics (every process's counts added up):
        the sum of the samples called ``name`` whose labels include ``labels``; 0.0 when
        there is none yet, None when /metrics cannot be read."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.cfg.http_port}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                        sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total


@contextlib.contextmanager
def running_gateway(prefix: str, keep: bool = False, start_timeout: float = 60.0,
                    **sections: Any) -> Iterator[GatewayProcess]:
    """A fresh gateway (own config, ports and data dir) for the ``with`` block; *sections*
    go to :func:`write_gateway_config`."""
    folder = scratch_dir(prefix)
    gw = GatewayProcess(write_gateway_config(folder, **sections))
    try:
        yield gw.start(timeout=start_timeout)
    finally:
        rc = gw.stop()
        if rc not in (0, None, -signal.SIGTERM):
            log(f"  note: gateway exited with {rc}; log tail:\n{gw.log_tail(1500)}")
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def running(args: Sequence[str], *, env: dict[str, str] | None = None,
            stdout: Any = subprocess.DEVNULL) -> Iterator[subprocess.Popen[bytes]]:
    """A helper subprocess (storescp, the reference sink), terminated on the way out."""
    proc = subprocess.Popen(list(args), env=env, stdout=stdout, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


# --- memory ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """The direct children of process *pid* (from /proc), [] when it is gone."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants (worker processes count too)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += rss_kib(p)
        todo += child_pids(p)
    return total


# --- statistics and output ----------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def verdict(value: float, target: float, aim: float | None = None, *, below: bool = False) -> str:
    """'ok' / 'MISSED' against a target (``below``: smaller is better), and the aim."""
    met = value <= target if below else value >= target
    text = "ok" if met else "MISSED"
    if aim is not None:
        hit = value <= aim if below else value >= aim
        text += ", aim reached" if hit else ", aim not reached"
    return text


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    import platform

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["storescu", "--version"], capture_output=True, text=True, timeout=5)
        info["dcmtk"] = out.stdout.split("\n", 1)[0].strip()
    return info


class Postgres:
    """One private throwaway PostgreSQL server for the run; a new schema per gateway
    (``tests.pg.start_private``: initdb + pg_ctl in a temporary folder)."""

    def __init__(self) -> None:
        from tests import pg

        self._pg = pg
        self.server = pg.start_private()
        self._count = 0

    def new_dsn(self) -> str:
        import psycopg

        self._count += 1
        name = f"bench_{self._count}"
        with psycopg.connect(self.server.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return str(self.server.dsn(schema=name))

    def remove(self) -> None:
        self.server.remove()
