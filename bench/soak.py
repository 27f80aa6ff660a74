"""Soak: the multi-process gateway under continuous DICOM and HL7 traffic and random
``kill -9``, watched for lost or doubled objects, leaked memory and file descriptors.

    python -m bench.soak [--minutes 20] [--associations 2] [--connections 2]
                         [--kill-every 60-180] [--out bench/out/soak]

``make soak`` runs it with the defaults (about 20 minutes plus the drain; not part of
``make test``). What runs, all on 127.0.0.1:

- **Receivers**, in their own process (``python -m bench.soak _receivers``), which outlives
  every gateway kill: a pynetdicom storage SCP (AE ``SOAKPACS``) that writes each C-STORE's
  SOP Instance UID to ``receivers/dicom.txt`` before it answers 0x0000, and two MLLP sinks
  (tests/mllpsink.py, answering AA) whose messages' MSH-10 (and OBR-2) go to
  ``receivers/hl7.txt`` (forwarded messages) and ``receivers/results.txt`` (the model's
  result messages), each with the time it arrived.
- **The gateway**: ``gateway run`` (its own process group) with ``ingest.processes: 2``,
  ``workers.processes: 2``, the SQLite queue, and three routes: CT and MR studies are
  forwarded to the DICOM receiver; ORU^R01 messages are forwarded to the MLLP sink and run
  through ``report-findings``, whose result ORU^R01 goes to the results sink. The studies
  are small (64x64 MR of the head, 64x64 CT of the abdomen): ``lung-nodules`` is not
  routed, it would not keep up on 2 cores.
- **Senders**, threads of this process: ``--associations`` DICOM senders (pynetdicom), each
  sending one small study per association (3-8 instances, new UIDs from
  tests/dicomgen.py ``make_study``) then pausing ``--study-pause`` s; and
  ``--connections`` MLLP senders, each sending ORU^R01 messages (tests/hl7msgs.py) stop and
  wait on one connection, pausing ``--message-pause`` s after each ACK. Each records what
  was ACKNOWLEDGED: C-STORE status 0x0000, ``MSA|AA`` with its own MSH-10. What was
  refused or not answered (the gateway died) is sent again, with the same UIDs / MSH-10, on
  a new association or connection, up to ``--resend`` times; what is still unanswered at
  the end is counted as not acknowledged. Senders reconnect after a kill.
- **Chaos**: every random ``--kill-every`` seconds (default 60-180), with equal odds,
  either SIGKILL of the gateway's whole process group (then ``gateway run`` is started
  again on the same data) or SIGKILL of one child (a random ingest-N or worker-N, as
  /readyz lists them, else ``pgrep -P``), which the supervisor restarts. The time until
  /readyz is 200 again is recorded.
- **Sampling** every ``--sample-every`` s (default 10) into ``samples.csv``: RSS (sum over
  every process of the gateway's current process group, and per role), open file
  descriptors (/proc/PID/fd), threads (/proc/PID/status), process count, processes of
  killed generations still alive ("stray"), the queue (``gateway queue status --json``:
  ready, leased, dead jobs, open studies, received counts), and the running counts of
  acknowledged and delivered objects. ``soak.png`` plots them (matplotlib, Agg), kills
  marked.

At the end the senders stop, the queue is drained (bounded by ``--drain-timeout``), the
gateway is stopped with SIGTERM (it must exit 0), and it checks:

1. every acknowledged SOP Instance UID arrived at the DICOM receiver, and every
   acknowledged MSH-10 at the MLLP sink: missing ones are failures;
2. exactly once: duplicates at the receivers are counted. Delivery is at least once
   (docs/operations.md): a kill between the receiver's answer and the gateway's record of
   it delivers that object again after the restart. So a duplicate whose two receipts
   have a kill between them is reported as "after a kill"; any other duplicate fails the
   check. ``--strict-once`` fails on every duplicate;
3. every acknowledged ORU^R01 got exactly one result message (matched by OBR-2);
4. the queue holds nothing ready, leased or dead and no open study;
5. no process of a killed gateway generation is left;
6. memory and file descriptors are flat: a least-squares slope over the second half of the
   load phase (samples in the 30 s after a kill left out), in MB and fds per hour; "flat"
   when the growth it predicts over that window is under 10 % of the median (at least
   20 MB / 8 fds).

Results: a summary table, ``summary.json``, ``samples.csv``, ``soak.png`` and ``kills.jsonl``
in ``--out``; the gateway's data, config and log in ``--out``/gateway. Exit status 0 when
every check passed, 1 otherwise, 130 when interrupted. Every process it starts is
stopped at the end, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    OUT,
    REPO,
    GatewayConfig,
    GatewayProcess,
    log,
    machine,
    table,
    write_gateway_config,
)
from tests.dicomgen import SeriesSpec, free_port, make_study, wait_for_port
from tests.hl7msgs import oru_r01

RECEIVER_AE = "SOAKPACS"
START_TIMEOUT_S = 180.0  # gateway start, model processes included, on a loaded machine
RECOVER_TIMEOUT_S = 120.0  # a killed child back (readyz 200)
SETTLE_S = 30.0  # samples this soon after a kill are left out of the slope fits
ACK_TIMEOUT_S = 30.0  # a sender waits this long for a C-STORE response or an ACK
REPORTS = (
    "No acute findings.",
    "Small pulmonary nodule in the right upper lobe. No pneumothorax.",
    "Possible pleural effusion on the left. No mass.",
    "Cardiomegaly. No consolidation.",
    "Rib fracture on the right. Lungs clear.",
)


# --- the receivers (their own process) -----------------------------------------------------


def serve_receivers(folder: Path, dicom_port: int, hl7_port: int, results_port: int) -> int:
    """The DICOM receiver and the two MLLP sinks, until SIGTERM; what they receive goes to
    ``dicom.txt`` (SOP Instance UID|time a line, written before the 0x0000 goes back),
    ``hl7.txt`` and ``results.txt`` (MSH-10|OBR-2|time a line, written within 0.2 s)."""
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        MRImageStorage,
    )
    from pynetdicom import AE, evt

    from tests.mllpsink import MLLPSink

    folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops us, after the drain

    lock = threading.Lock()
    dicom_out = (folder / "dicom.txt").open("a", encoding="ascii")

    def on_store(event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            dicom_out.write(f"{uid}|{time.time():.3f}\n")
            dicom_out.flush()
        return 0x0000

    ae = AE(ae_title=RECEIVER_AE)
    ae.maximum_associations = 32
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
    # only what the soak sends: every extra context is deep-copied per association
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", dicom_port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None  # block=False returns the server
    sinks = {"hl7.txt": MLLPSink(port=hl7_port).start(),
             "results.txt": MLLPSink(port=results_port).start()}
    written = dict.fromkeys(sinks, 0)
    outputs = {name: (folder / name).open("a", encoding="utf-8") for name in sinks}

    def dump() -> None:
        for name, sink in sinks.items():
            got = sink.received
            now = time.time()  # at most 0.2 s after the sink got it
            for message in got[written[name]:]:
                outputs[name].write(f"{msh10(message)}|{obr2(message)}|{now:.3f}\n")
            written[name] = len(got)
            outputs[name].flush()

    try:
        while not stop.wait(0.2):
            dump()
    finally:
        server.shutdown()
        for sink in sinks.values():
            sink.stop()
        dump()
        for out in outputs.values():
            out.close()
        dicom_out.close()
    return 0


def _fields(message: bytes, segment: str) -> list[str]:
    for line in message.decode("utf-8", errors="replace").split("\r"):
        if line.startswith(segment + "|"):
            return line.split("|")
    return []


def msh10(message: bytes) -> str:
    f = _fields(message, "MSH")
    return f[9] if len(f) > 9 else ""


def obr2(message: bytes) -> str:
    f = _fields(message, "OBR")
    return f[2].split("^")[0] if len(f) > 2 else ""


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1 code, MSA-2 control id) of an ACK; ("", "") without an MSA."""
    f = _fields(ack, "MSA")
    return (f[1] if len(f) > 1 else "", f[2] if len(f) > 2 else "")


# --- what the senders saw --------------------------------------------------------------------


@dataclass
class Ledger:
    """What was sent and acknowledged, shared by the sender threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    dicom_acked: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> study
    dicom_sends: int = 0  # C-STOREs attempted, resends included
    dicom_statuses: Counter[str] = field(default_factory=Counter)  # non-0x0000 answers
    dicom_unanswered: int = 0  # association gone or timed out before the response
    dicom_refused_associations: int = 0  # could not associate (gateway down, rejected)
    dicom_resent_studies: set[str] = field(default_factory=set)
    dicom_given_up: set[str] = field(default_factory=set)
    dicom_unacked_at_end: set[str] = field(default_factory=set)
    studies_started: int = 0
    hl7_acked: dict[str, str] = field(default_factory=dict)  # MSH-10 -> accession (OBR-2)
    hl7_sends: int = 0
    hl7_codes: Counter[str] = field(default_factory=Counter)  # answers other than AA
    hl7_unanswered: int = 0
    hl7_refused_connections: int = 0
    hl7_resent: set[str] = field(default_factory=set)
    hl7_given_up: set[str] = field(default_factory=set)
    hl7_unacked_at_end: set[str] = field(default_factory=set)

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return len(self.dicom_acked), len(self.hl7_acked)


@dataclass
class Instance:
    sop_uid: str
    study_uid: str
    dataset: Any  # pydicom Dataset
    attempts: int = 0


def new_study(folder: Path, rng: random.Random, tag: str) -> list[Instance]:
    """A small study with fresh UIDs: 3-8 instances 64x64 of MR (head) or CT (abdomen)."""
    from pydicom import dcmread

    modality = rng.choice(("MR", "CT"))
    spec = SeriesSpec(modality, count=rng.randint(3, 8), rows=64, cols=64,
                      body_part="HEAD" if modality == "MR" else "ABDOMEN",
                      description=f"SOAK {modality}")
    shutil.rmtree(folder, ignore_errors=True)
    paths = make_study(folder, patient_id=f"SOAK{tag}", accession=f"ACC{tag}"[:16],
                       series=[spec], seed=rng.randrange(1 << 30))
    instances = []
    for path in paths:
        ds = dcmread(path)
        instances.append(Instance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), ds))
    shutil.rmtree(folder, ignore_errors=True)
    return instances


def dicom_sender(index: int, port: int, ledger: Ledger, stop: threading.Event,
                 workdir: Path, pause: float, resend: int, seed: int) -> None:
    """One study per association, in a loop; unacknowledged instances go again first."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom import AE

    rng = random.Random(seed)
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ACK_TIMEOUT_S
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    pending: list[Instance] = []
    count = 0
    while not stop.is_set():
        if not pending:
            count += 1
            pending = new_study(workdir / f"sender{index}", rng, f"{index}-{count}")
            with ledger.lock:
                ledger.studies_started += 1
        assoc = ae.associate("127.0.0.1", port, ae_title=GATEWAY_AE)
        if not assoc.is_established:
            with ledger.lock:
                ledger.dicom_refused_associations += 1
            stop.wait(1.0)
            continue
        left: list[Instance] = []
        try:
            for i, inst in enumerate(pending):
                if stop.is_set() or not assoc.is_established:
                    left += pending[i:]
                    break
                if inst.attempts:
                    with ledger.lock:
                        ledger.dicom_resent_studies.add(inst.study_uid)
                inst.attempts += 1
                try:
                    rsp = assoc.send_c_store(inst.dataset)
                except (RuntimeError, OSError):  # aborted between the check and the send
                    rsp = None
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                with ledger.lock:
                    ledger.dicom_sends += 1
                    if status == 0x0000:
                        ledger.dicom_acked[inst.sop_uid] = inst.study_uid
                    elif status is None:
                        ledger.dicom_unanswered += 1
                    else:
                        ledger.dicom_statuses[f"0x{status:04X}"] += 1
                if status != 0x0000:
                    left.append(inst)
        finally:
            if assoc.is_established:
                with contextlib.suppress(Exception):
                    assoc.release()
            else:
                with contextlib.suppress(Exception):
                    assoc.abort()
        pending = []
        for inst in left:
            if inst.attempts > resend:
                with ledger.lock:
                    ledger.dicom_given_up.add(inst.sop_uid)
            else:
                pending.append(inst)
        stop.wait(1.0 if left else pause)
    with ledger.lock:
        ledger.dicom_unacked_at_end.update(i.sop_uid for i in pending if i.attempts)


def _read_frame(sock: socket.socket, buffer: bytearray) -> bytes:
    """One MLLP frame's payload (blocking, the socket's timeout); ConnectionError at EOF."""
    while True:
        end = buffer.find(b"\x1c\r")
        if end >= 0:
            start = buffer.find(b"\x0b")
            payload = bytes(buffer[start + 1:end])
            del buffer[:end + 2]
            return payload
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        buffer += chunk


def hl7_sender(index: int, port: int, ledger: Ledger, stop: threading.Event, pause: float,
               resend: int, seed: int) -> None:
    """ORU^R01 stop and wait on one connection (a new one after any failure)."""
    rng = random.Random(seed)
    sock: socket.socket | None = None
    buffer = bytearray()
    pending: tuple[str, str, bytes] | None = None
    attempts = 0
    count = 0
    try:
        while not stop.is_set():
            if pending is None:
                count += 1
                cid, accession = f"SOAK{index}N{count:07d}", f"A{index}N{count:07d}"
                pending = (cid, accession, oru_r01(
                    control_id=cid, accession=accession, mrn=f"MRN{index}{count:06d}",
                    text=rng.choice(REPORTS)))
                attempts = 0
            cid, accession, message = pending
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.settimeout(ACK_TIMEOUT_S)
                    buffer.clear()
                except OSError:
                    with ledger.lock:
                        ledger.hl7_refused_connections += 1
                    stop.wait(1.0)
                    continue
            if attempts:
                with ledger.lock:
                    ledger.hl7_resent.add(cid)
            attempts += 1
            try:
                sock.sendall(b"\x0b" + message + b"\x1c\r")
                code, ack_id = msa(_read_frame(sock, buffer))
            except OSError:
                with ledger.lock:
                    ledger.hl7_sends += 1
                    ledger.hl7_unanswered += 1
                code, ack_id = "", ""
                sock.close()
                sock = None
            else:
                with ledger.lock:
                    ledger.hl7_sends += 1
                    if code == "AA" and ack_id == cid:
                        ledger.hl7_acked[cid] = accession
                    else:
                        ledger.hl7_codes[code if ack_id == cid else f"{code} (other id)"] += 1
            if code == "AA" and ack_id == cid:
                pending = None
                stop.wait(pause)
                continue
            if attempts > resend:
                with ledger.lock:
                    ledger.hl7_given_up.add(cid)
                pending = None
            stop.wait(1.0)
        if pending is not None and attempts:
            with ledger.lock:
                ledger.hl7_unacked_at_end.add(pending[0])
    finally:
        if sock is not None:
            sock.close()


# --- the gateway's processes ---------------------------------------------------------------


def process_groups() -> dict[int, int]:
    """pid -> process group id, for every process."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[2])
    return found


def role_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"--child" in argv:
        i = argv.index(b"--child")
        return argv[i + 1].decode() if i + 1 < len(argv) else "other"
    if b"gateway.cli" in argv or any(a.endswith(b"/gateway") for a in argv):
        return "supervisor"
    return "model"  # the model runner's spawned processes (and their resource tracker)


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS KiB, threads) of one process; zeros when it is gone."""
    rss = threads = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


ROLES = ("supervisor", "ingest", "worker", "model")


class Gateway:
    """``gateway run`` in its own process group (``kill -9`` of the group = of the whole
    gateway), restarted on the same config and data; remembers each generation's group."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.process = GatewayProcess(cfg, new_session=True)
        self.groups: list[int] = []  # one process group per start

    @property
    def cfg(self) -> GatewayConfig:
        return self.process.cfg

    @property
    def pgid(self) -> int | None:
        proc = self.process.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> float:
        t0 = time.monotonic()
        self.process.start(timeout=START_TIMEOUT_S)
        self.groups.append(self.process.pid)
        return time.monotonic() - t0

    def members(self) -> dict[int, str]:
        """pid -> role of every process of the current generation."""
        pgid = self.pgid
        if pgid is None:
            return {}
        return {pid: role_of(pid) for pid, g in process_groups().items() if g == pgid}

    def strays(self) -> list[int]:
        """Processes of earlier (killed) generations that still run."""
        old = set(self.groups[:-1]) if self.pgid is not None else set(self.groups)
        return [pid for pid, g in process_groups().items()
                if g in old and not _zombie(pid)]

    def children(self) -> dict[str, int]:
        """name -> pid of the supervised children (/readyz, else ``pgrep -P``)."""
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.cfg.http_port}/readyz", timeout=5) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        except OSError:
            body = b""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            processes = json.loads(body)["details"]["processes"]
            return {p["process"]: int(p["pid"]) for p in processes if p.get("pid")}
        pgid = self.pgid
        if pgid is None:
            return {}
        out = subprocess.run(["pgrep", "-P", str(pgid)], capture_output=True, text=True)
        return {f"{role_of(int(p))}?{p}": int(p) for p in out.stdout.split()}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.cfg.http_port}/readyz", timeout=5) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def kill_all(self) -> None:
        pgid = self.pgid
        if pgid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        assert self.process.proc is not None
        self.process.proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
                g == pgid and not _zombie(p) for p, g in process_groups().items()):
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM (the drain), SIGKILL of the group if that takes over 90 s."""
        rc = self.process.stop(timeout=90)
        if self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.groups[-1], signal.SIGKILL)  # anything left of it
        return rc

    def queue_status(self) -> dict[str, Any] | None:
        """``gateway queue status --json``; None when it fails."""
        try:
            out = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "queue", "status", "--json", "-c",
                 str(self.cfg.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        with contextlib.suppress(ValueError):
            value: dict[str, Any] = json.loads(out.stdout)
            return value
        return None

    def dead_jobs(self) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "queue", "dead", "--json", "-c",
             str(self.cfg.path)], cwd=REPO, capture_output=True, text=True, timeout=60)
        with contextlib.suppress(ValueError):
            jobs: list[dict[str, Any]] = json.loads(out.stdout)
            return jobs
        return []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def queue_numbers(status: dict[str, Any] | None) -> dict[str, int | None]:
    """ready / leased / dead jobs over every stage, open studies, received counts."""
    if status is None:
        return dict.fromkeys(("ready", "leased", "dead", "studies_open", "received_dicom",
                              "received_hl7"))
    jobs = [v for k, v in status.items() if k.startswith("jobs:") and isinstance(v, dict)]
    return {
        "ready": sum(int(j.get("ready", 0)) for j in jobs),
        "leased": sum(int(j.get("leased", 0)) for j in jobs),
        "dead": sum(int(j.get("dead", 0)) for j in jobs),
        "studies_open": int(status.get("studies", {}).get("open", 0)),
        "received_dicom": int(status.get("received", {}).get("dicom", 0)),
        "received_hl7": int(status.get("received", {}).get("hl7", 0)),
    }


# --- sampling ------------------------------------------------------------------------------

CSV_FIELDS = [
    "t_s", "utc", "phase", "generation", "processes", "stray_processes", "rss_mb",
    *(f"rss_mb_{r}" for r in ROLES), "fds", *(f"fds_{r}" for r in ROLES), "threads",
    "queue_ready", "queue_leased", "queue_dead", "studies_open", "received_dicom",
    "received_hl7", "acked_dicom", "acked_hl7", "delivered_dicom", "delivered_hl7",
    "delivered_results", "kills",
]


def line_count(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


@dataclass
class Soak:
    args: argparse.Namespace
    out: Path
    gateway: Gateway
    receivers: Path
    ledger: Ledger = field(default_factory=Ledger)
    t0: float = field(default_factory=time.monotonic)
    t0_wall: float = field(default_factory=time.time)  # the receivers' clock
    phase: str = "load"
    kills: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sample(self, writer: Any) -> dict[str, Any]:
        members = self.gateway.members()
        rss = dict.fromkeys(ROLES, 0)
        fds = dict.fromkeys(ROLES, 0)
        threads = 0
        for pid, role in members.items():
            r, t = proc_status(pid)
            key = role if role in rss else "model"
            rss[key] += r
            fds[key] += open_fds(pid)
            threads += t
        queue = queue_numbers(self.gateway.queue_status())
        acked_dicom, acked_hl7 = self.ledger.counts()
        row: dict[str, Any] = {
            "t_s": round(self.now(), 1),
            "utc": time.strftime("%H:%M:%S", time.gmtime()),
            "phase": self.phase,
            "generation": len(self.gateway.groups),
            "processes": len(members),
            "stray_processes": len(self.gateway.strays()),
            "rss_mb": round(sum(rss.values()) / 1024, 1),
            **{f"rss_mb_{r}": round(rss[r] / 1024, 1) for r in ROLES},
            "fds": sum(fds.values()),
            **{f"fds_{r}": fds[r] for r in ROLES},
            "threads": threads,
            "queue_ready": queue["ready"],
            "queue_leased": queue["leased"],
            "queue_dead": queue["dead"],
            "studies_open": queue["studies_open"],
            "received_dicom": queue["received_dicom"],
            "received_hl7": queue["received_hl7"],
            "acked_dicom": acked_dicom,
            "acked_hl7": acked_hl7,
            "delivered_dicom": line_count(self.receivers / "dicom.txt"),
            "delivered_hl7": line_count(self.receivers / "hl7.txt"),
            "delivered_results": line_count(self.receivers / "results.txt"),
            "kills": len(self.kills),
        }
        writer.writerow(row)
        self.samples.append(row)
        return row

    def sampler(self, stop: threading.Event) -> None:
        with (self.out / "samples.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            final = False  # once stopped: one more sample, the state after the drain
            while True:
                started = time.monotonic()
                try:
                    row = self.sample(writer)
                    f.flush()
                    log(f"  [{row['t_s']:7.0f}s] {self.phase:5} rss {row['rss_mb']:7.1f} MB  "
                        f"fds {row['fds']:4}  threads {row['threads']:4}  procs "
                        f"{row['processes']}  queue {row['queue_ready']}/{row['queue_leased']}"
                        f"/{row['queue_dead']} (ready/leased/dead)  acked "
                        f"{row['acked_dicom']}+{row['acked_hl7']}  delivered "
                        f"{row['delivered_dicom']}+{row['delivered_hl7']}"
                        f"+{row['delivered_results']}")
                except Exception as exc:  # a sample must not end the soak
                    log(f"  sample failed: {exc!r}")
                if final:
                    return
                final = stop.wait(max(0.0, self.args.sample_every
                                      - (time.monotonic() - started)))

    # --- chaos ---

    def chaos(self, deadline: float, rng: random.Random) -> None:
        lo, hi = self.args.kill_every
        next_kill = time.monotonic() + rng.uniform(lo, hi)
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            self.check_alive()
            if time.monotonic() < next_kill or time.monotonic() >= deadline:
                continue
            if rng.random() < 0.5:
                self.kill_gateway()
            else:
                self.kill_child(rng)
            next_kill = time.monotonic() + rng.uniform(lo, hi)

    def _record(self, event: dict[str, Any]) -> None:
        event = {"t_s": round(self.now(), 1), **event}
        self.kills.append(event)
        with (self.out / "kills.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")
        log(f"  chaos: {json.dumps(event)}")

    def check_alive(self) -> None:
        """A supervisor that exited without being killed is a finding: recorded (kind
        ``exited``), and the gateway started again."""
        proc = self.gateway.process.proc
        if proc is None or proc.poll() is None:
            return
        t = self.now()
        log(f"  the gateway exited by itself ({proc.returncode}); log tail:\n"
            f"{self.gateway.process.log_tail(1500)}")
        self.gateway.kill_all()  # what is left of its group
        self._restart(t, {"kind": "exited", "target": "supervisor", "exit": proc.returncode})

    def kill_gateway(self) -> None:
        t = self.now()
        pids = self.gateway.members()
        self.gateway.kill_all()
        self._restart(t, {"kind": "gateway", "target": "process group", "pids": len(pids)})

    def _restart(self, t: float, event: dict[str, Any]) -> None:
        error = None
        seconds = None
        for _ in range(3):
            try:
                seconds = self.gateway.start()
                break
            except RuntimeError as exc:
                error = str(exc)[-1500:]
                log(f"  restart failed: {error}")
                time.sleep(5)
        self._record({"t_s": round(t, 1), **event, "ready_after_s": _round(seconds, 2),
                      "error": None if seconds is not None else error})
        if seconds is None:
            raise RuntimeError(f"the gateway did not start again: {error}")

    def kill_child(self, rng: random.Random) -> None:
        t = self.now()
        children = self.gateway.children()
        if not children:
            log("  chaos: no child to kill (the gateway is not answering); skipped")
            return
        name = rng.choice(sorted(children))
        pid = children[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        seconds = None
        time.sleep(1.0)  # the supervisor notices within 0.25 s; /readyz then says 503
        while time.monotonic() - t_kill < RECOVER_TIMEOUT_S:
            now = self.gateway.children()
            replaced = "?" in name or now.get(name) not in (None, pid)
            if replaced and self.gateway.ready():
                seconds = time.monotonic() - t_kill
                break
            time.sleep(0.2)
        self._record({"t_s": round(t, 1), "kind": "child", "target": name, "pid": pid,
                      "ready_after_s": _round(seconds, 2),
                      "error": None if seconds is not None else
                      f"not back within {RECOVER_TIMEOUT_S:.0f} s"})

    # --- drain ---

    def drain(self, timeout: float) -> tuple[bool, float]:
        """Until no job is ready or leased, no study is open and the receivers' counts
        stand still for two looks; (drained, seconds)."""
        t0 = time.monotonic()
        last: tuple[int, int, int] | None = None
        still = 0
        while time.monotonic() - t0 < timeout:
            q = queue_numbers(self.gateway.queue_status())
            counts = (line_count(self.receivers / "dicom.txt"),
                      line_count(self.receivers / "hl7.txt"),
                      line_count(self.receivers / "results.txt"))
            idle = q["ready"] == 0 and q["leased"] == 0 and q["studies_open"] == 0
            still = still + 1 if idle and counts == last else 0
            last = counts
            if still >= 2:
                return True, time.monotonic() - t0
            time.sleep(2.0)
        return False, time.monotonic() - t0


def log_findings(path: Path) -> dict[str, Any]:
    """What the gateway's log says went wrong: warning/error lines per event name, the
    children's exits (by exit code or signal), and lines that are not JSON (tracebacks)."""
    levels: Counter[str] = Counter()
    exits: Counter[str] = Counter()
    unparsed = 0
    examples: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            unparsed += 1
            if len(examples) < 10:
                examples.append(line[:300])
            continue
        if not isinstance(event, dict):
            continue
        if event.get("level") in ("warning", "error", "critical"):
            levels[f"{event['level']} {event.get('event')}"] += 1
        if event.get("event") == "process.exited" and "exit" in event:
            exits[f"{event.get('child')}: {event['exit']}"] += 1
    return {"by_event": dict(levels.most_common()), "child_exits": dict(exits),
            "unparsed_lines": unparsed, "unparsed_examples": examples}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- checks ---------------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    except OSError:
        return []


def delivery_check(acked: Sequence[str], received: Sequence[tuple[str, float]],
                   kills: Sequence[float]) -> dict[str, Any]:
    """Acknowledged vs received (key, receiver's time). A duplicate is *after a kill* when a
    kill (wall time) lies between its two receipts: the at-least-once window (a kill between
    the receiver's answer and the gateway's record of it); any other is a bug."""
    times: dict[str, list[float]] = {}
    for key, when in received:
        times.setdefault(key, []).append(when)
    acked_set = set(acked)
    missing = sorted(acked_set - set(times))
    duplicated = {k: sorted(v) for k, v in times.items() if len(v) > 1}
    after_kill = unexplained = 0
    unexplained_examples: dict[str, list[float]] = {}
    for key, seen in duplicated.items():
        for first, second in itertools.pairwise(seen):
            # the sinks' times are up to 0.2 s late: a kill just before still counts
            if any(first - 0.5 <= k <= second for k in kills):
                after_kill += 1
            else:
                unexplained += 1
                if len(unexplained_examples) < 10:
                    unexplained_examples[key] = seen
    return {
        "acknowledged": len(acked_set),
        "received": len(received),
        "distinct_received": len(times),
        "missing": len(missing),
        "missing_examples": missing[:10],
        "duplicated_objects": len(duplicated),
        "duplicate_deliveries": after_kill + unexplained,
        "duplicates_after_a_kill": after_kill,
        "duplicates_unexplained": unexplained,
        "duplicate_examples": {k: len(v) for k, v in sorted(duplicated.items())[:10]},
        "unexplained_examples": unexplained_examples,
        "received_not_acknowledged": len(set(times) - acked_set),
    }


def received(path: Path, key: int) -> list[tuple[str, float]]:
    """(field *key*, time) of each line of a receiver's file (fields split on ``|``, the
    time last)."""
    found = []
    for line in read_lines(path):
        fields = line.split("|")
        with contextlib.suppress(ValueError, IndexError):
            found.append((fields[key], float(fields[-1])))
    return found


def slope(samples: Sequence[dict[str, Any]], key: str, kills: Sequence[float],
          start: float, end: float) -> dict[str, Any]:
    """Least-squares slope of *key* per hour over samples in [start, end], leaving out
    those within SETTLE_S after a kill; flat when the growth it predicts over the
    window is under 10 % of the median (at least 20 MB / 8 fds)."""
    points = [(s["t_s"], float(s[key])) for s in samples
              if start <= s["t_s"] <= end and s.get(key) not in (None, "")
              and s["processes"] and not any(0 <= s["t_s"] - k < SETTLE_S for k in kills)]
    if len(points) < 3 or len({t for t, _ in points}) < 2:
        return {"samples": len(points), "per_hour": None, "flat": None}
    xs = [t / 3600 for t, _ in points]
    ys = [v for _, v in points]
    fit = statistics.linear_regression(xs, ys)
    window_h = xs[-1] - xs[0]
    med = statistics.median(ys)
    tolerance = max(20.0 if key.startswith("rss") else 8.0, 0.1 * med)
    growth = fit.slope * window_h
    return {"samples": len(points), "per_hour": round(fit.slope, 2),
            "window_s": round(window_h * 3600), "median": round(med, 1),
            "min": round(min(ys), 1), "max": round(max(ys), 1),
            "growth_over_window": round(growth, 2), "tolerance": round(tolerance, 1),
            "flat": growth <= tolerance}


# --- the plot -------------------------------------------------------------------------------


def plot(samples: Sequence[dict[str, Any]], kills: Sequence[dict[str, Any]],
         path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[soak]'): no plot")
        return False
    t = [s["t_s"] / 60 for s in samples]

    def series(key: str) -> list[float]:
        return [float("nan") if s.get(key) in (None, "") else float(s[key]) for s in samples]

    fig, axes = plt.subplots(5, 1, figsize=(11, 14), sharex=True)
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("RSS (MB)", [("rss_mb", "all"), *((f"rss_mb_{r}", r) for r in ROLES)]),
        ("open fds", [("fds", "all"), *((f"fds_{r}", r) for r in ROLES)]),
        ("threads / processes", [("threads", "threads"), ("processes", "processes"),
                                 ("stray_processes", "stray")]),
        ("queue", [("queue_ready", "ready"), ("queue_leased", "leased"),
                   ("queue_dead", "dead"), ("studies_open", "open studies")]),
        ("objects (cumulative)", [("acked_dicom", "DICOM acked"),
                                  ("delivered_dicom", "DICOM delivered"),
                                  ("acked_hl7", "HL7 acked"), ("delivered_hl7", "HL7 delivered"),
                                  ("delivered_results", "results delivered")]),
    ]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key, label in keys:
            ax.plot(t, series(key), label=label, linewidth=1.2 if label == "all" else 0.9)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
        for k in kills:
            ax.axvline(k["t_s"] / 60, color="orange" if k["kind"] == "child" else "red",
                       alpha=0.5, linewidth=0.8)
        drain = next((s["t_s"] / 60 for s in samples if s["phase"] == "drain"), None)
        if drain is not None:
            ax.axvline(drain, color="grey", linestyle="--", linewidth=0.8)
    axes[-1].set_xlabel("minutes (red: kill -9 of the gateway; orange: of one child; "
                        "dashed: senders stopped, drain)")
    fig.suptitle("gateway soak")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# --- the run --------------------------------------------------------------------------------


def gateway_config(folder: Path, dicom_port: int, hl7_port: int, results_port: int,
                   lease_seconds: float) -> GatewayConfig:
    retry = {"initial": 1, "max": 10, "give_up_after": 3600}
    return write_gateway_config(
        folder,
        dicom={"study_complete_after": 2},
        ingest={"processes": 2},
        workers={"processes": 2, "lease_seconds": lease_seconds},
        destinations={
            "pacs": {"dicom": {"ae_title": RECEIVER_AE, "host": "127.0.0.1",
                               "port": dicom_port}, "retry": retry},
            "ehr": {"hl7": {"host": "127.0.0.1", "port": hl7_port, "ack_timeout": 10},
                    "retry": retry},
            "results": {"hl7": {"host": "127.0.0.1", "port": results_port, "ack_timeout": 10},
                        "retry": retry},
        },
        models={"report-findings": {"bundle": str(REPO / "models" / "report_findings"),
                                    "deidentify": True}},
        routes=[
            {"name": "images", "when": {"dicom": {"Modality": ["CT", "MR"]}},
             "forward": ["pacs"]},
            {"name": "reports", "when": {"hl7": {"MSH-9": "ORU^R01"}},
             "run": ["report-findings"], "send": ["results"], "forward": ["ehr"]},
        ],
    )


@contextlib.contextmanager
def receivers(folder: Path) -> Iterator[tuple[int, int, int]]:
    ports = free_port(), free_port(), free_port()
    with (folder.parent / "receivers.log").open("ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "_receivers", str(folder), *map(str, ports)],
            cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in ports:
            wait_for_port(port, timeout=60)
        yield ports
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc.returncode not in (0, None):
            log(f"  note: the receivers exited with {proc.returncode}; see receivers.log")


def _kill_every(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition("-")
    try:
        values = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds as MIN-MAX, e.g. 60-180: {text!r}") from None
    if not 0 < values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"0 < MIN <= MAX: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0,
                   help="load phase, in minutes (default 20); the drain follows")
    p.add_argument("--associations", type=int, default=2,
                   help="concurrent DICOM senders (default 2)")
    p.add_argument("--connections", type=int, default=2,
                   help="concurrent MLLP senders (default 2)")
    p.add_argument("--kill-every", type=_kill_every, default=(60.0, 180.0), metavar="MIN-MAX",
                   help="seconds between kills, drawn uniformly (default 60-180)")
    p.add_argument("--out", type=Path, default=OUT / "soak",
                   help="results folder (default bench/out/soak)")
    p.add_argument("--sample-every", type=float, default=10.0,
                   help="seconds between samples (default 10)")
    p.add_argument("--study-pause", type=float, default=1.0,
                   help="seconds a DICOM sender waits after each study (default 1)")
    p.add_argument("--message-pause", type=float, default=0.2,
                   help="seconds an MLLP sender waits after each ACK (default 0.2)")
    p.add_argument("--resend", type=int, default=5,
                   help="times an unacknowledged object is sent again (default 5)")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="seconds to wait for the queue to empty at the end (default 600)")
    p.add_argument("--lease-seconds", type=float, default=20.0,
                   help="the gateway's workers.lease_seconds (default 20)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the time)")
    p.add_argument("--strict-once", action="store_true",
                   help="fail on any duplicate, also one a kill explains (at-least-once)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.associations < 0 or args.connections < 0 or \
            args.associations + args.connections == 0 or args.sample_every <= 0:
        p.error("--minutes > 0, --sample-every > 0, and at least one sender")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def prepare_out(out: Path) -> None:
    """``--out``, emptied of what an earlier soak left there (only its own names)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gateway", "receivers", "studies"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("samples.csv", "soak.png", "summary.json", "kills.jsonl", "receivers.log"):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_receivers"]:
        folder, *ports = argv[1:]
        return serve_receivers(Path(folder), *(int(p) for p in ports))
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # stop what was started, as on Ctrl-C
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    out: Path = args.out.resolve()
    prepare_out(out)
    # the gateway and the receivers import this checkout's packages, wherever they run from
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    log(f"soak: {args.minutes:g} min load, {args.associations} DICOM association(s), "
        f"{args.connections} MLLP connection(s), a kill every {args.kill_every[0]:g}-"
        f"{args.kill_every[1]:g} s, samples every {args.sample_every:g} s, seed {seed}; "
        f"results in {out}")

    stop_senders, stop_sampler = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    sampler: threading.Thread | None = None
    soak: Soak | None = None
    gateway: Gateway | None = None
    result: dict[str, Any] = {}
    try:
        with receivers(out / "receivers") as (dicom_port, hl7_port, results_port):
            cfg = gateway_config(out / "gateway", dicom_port, hl7_port, results_port,
                                 args.lease_seconds)
            gateway = Gateway(cfg)
            log("starting the gateway (2 ingest + 2 worker processes) ...")
            log(f"  ready in {gateway.start():.1f} s; log {gateway.process.log_path}")
            soak = Soak(args, out, gateway, out / "receivers")
            sampler = threading.Thread(target=soak.sampler, args=(stop_sampler,),
                                       name="sampler", daemon=True)
            sampler.start()
            for i in range(args.associations):
                threads.append(threading.Thread(
                    target=dicom_sender, name=f"dicom-{i}", daemon=True,
                    args=(i, cfg.dicom_port, soak.ledger, stop_senders, out / "studies",
                          args.study_pause, args.resend, rng.randrange(1 << 30))))
            for i in range(args.connections):
                threads.append(threading.Thread(
                    target=hl7_sender, name=f"hl7-{i}", daemon=True,
                    args=(i, cfg.hl7_port, soak.ledger, stop_senders, args.message_pause,
                          args.resend, rng.randrange(1 << 30))))
            for t in threads:
                t.start()
            load_start = soak.now()
            soak.chaos(time.monotonic() + args.minutes * 60, rng)
            load_end = soak.now()
            log("load phase over: stopping the senders ...")
            stop_senders.set()
            for t in threads:
                t.join(timeout=ACK_TIMEOUT_S + 30)
            soak.phase = "drain"
            if not gateway.ready():  # a kill just before the end: let it come back
                deadline = time.monotonic() + RECOVER_TIMEOUT_S
                while not gateway.ready() and time.monotonic() < deadline:
                    time.sleep(1)
            log(f"draining the queue (at most {args.drain_timeout:.0f} s) ...")
            drained, drain_s = soak.drain(args.drain_timeout)
            log(f"  {'drained' if drained else 'NOT drained'} after {drain_s:.0f} s")
            final = gateway.queue_status()
            dead = gateway.dead_jobs() if (queue_numbers(final)["dead"] or 0) else []
            stop_sampler.set()
            sampler.join(timeout=120)
            strays = gateway.strays()
            rc = gateway.stop()
            log(f"gateway stopped (SIGTERM): exit {rc}")
        result = evaluate(soak, final, dead, drained, drain_s, rc, strays,
                          (load_start, load_end), seed)
    except KeyboardInterrupt as exc:
        log(f"\ninterrupted ({exc or 'Ctrl-C'}): stopping everything")
        return 130
    finally:
        stop_senders.set()
        stop_sampler.set()
        if gateway is not None:
            with contextlib.suppress(Exception):
                gateway.stop()
            for pgid in gateway.groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        shutil.rmtree(out / "studies", ignore_errors=True)
    assert soak is not None
    if plot(soak.samples, soak.kills, out / "soak.png"):
        log(f"plot: {out / 'soak.png'}")
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(f"summary: {out / 'summary.json'}; samples: {out / 'samples.csv'}")
    return 0 if result["passed"] else 1


def evaluate(soak: Soak, final: dict[str, Any] | None, dead: list[dict[str, Any]],
             drained: bool, drain_s: float, rc: int | None, strays: list[int],
             load: tuple[float, float], seed: int) -> dict[str, Any]:
    """The checks, printed as a table; the summary.json content."""
    ledger = soak.ledger
    folder = soak.receivers
    kill_walls = [soak.t0_wall + float(k["t_s"]) for k in soak.kills]
    dicom = delivery_check(list(ledger.dicom_acked), received(folder / "dicom.txt", 0),
                           kill_walls)
    hl7 = delivery_check(list(ledger.hl7_acked), received(folder / "hl7.txt", 0), kill_walls)
    # a result per acknowledged message: matched by OBR-2 (the accession, unique per message)
    cid_of = {accession: cid for cid, accession in ledger.hl7_acked.items()}
    result_ids = received(folder / "results.txt", 0)
    results = delivery_check(
        list(ledger.hl7_acked),
        [(cid_of.get(accession, "?" + rid), when) for (accession, when), (rid, _) in
         zip(received(folder / "results.txt", 1), result_ids, strict=True)],
        kill_walls)
    results["distinct_result_ids"] = len({rid for rid, _ in result_ids})
    # of the DICOM duplicates, those in studies the sender sent again (after a kill)
    dup_uids = [u for u, n in Counter(u for u, _ in received(folder / "dicom.txt", 0)).items()
                if n > 1]
    dicom["duplicates_in_resent_studies"] = sum(
        1 for u in dup_uids if ledger.dicom_acked.get(u) in ledger.dicom_resent_studies)
    q = queue_numbers(final)
    kills = soak.kills
    start, end = load
    mid = start + (end - start) / 2
    kill_times = [float(k["t_s"]) for k in kills]
    slopes = {key: slope(soak.samples, key, kill_times, mid, end)
              for key in ("rss_mb", "fds", "threads", *(f"rss_mb_{r}" for r in ROLES),
                          *(f"fds_{r}" for r in ROLES))}
    recover = [k["ready_after_s"] for k in kills if k["ready_after_s"] is not None]
    findings = log_findings(soak.gateway.process.log_path)
    unexpected_exits = {k: n for k, n in findings["child_exits"].items()
                        if not k.endswith(("signal SIGKILL", "exit code 0"))}
    checks = {
        "every acknowledged instance delivered": dicom["missing"] == 0,
        "every acknowledged message delivered": hl7["missing"] == 0,
        "a result for every acknowledged message": results["missing"] == 0,
        "no duplicate but after a kill (instances)": dicom["duplicates_unexplained"] == 0,
        "no duplicate but after a kill (messages)": hl7["duplicates_unexplained"] == 0,
        "no duplicate but after a kill (results)": results["duplicates_unexplained"] == 0,
        "queue drained (nothing ready or leased, no open study)": drained and q["ready"] == 0
        and q["leased"] == 0 and q["studies_open"] == 0,
        "no dead job": q["dead"] == 0,
        "every kill recovered": all(k["ready_after_s"] is not None for k in kills),
        "no process exited unless killed": not unexpected_exits
        and not any(k["kind"] == "exited" for k in kills),
        "no process of a killed gateway left": not strays,
        "gateway exits 0 on SIGTERM": rc == 0,
        "RSS flat": slopes["rss_mb"]["flat"] is not False,
        "open fds flat": slopes["fds"]["flat"] is not False,
    }
    if soak.args.strict_once:
        checks["exactly once (no duplicate at all)"] = not any(
            c["duplicate_deliveries"] for c in (dicom, hl7, results))
    summary: dict[str, Any] = {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "seed": seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(soak.args).items()},
        "load_s": round(end - start, 1),
        "drain_s": round(drain_s, 1),
        "sent": {
            "studies": ledger.studies_started,
            "dicom_c_stores": ledger.dicom_sends,
            "dicom_unanswered": ledger.dicom_unanswered,
            "dicom_statuses": dict(ledger.dicom_statuses),
            "dicom_associations_refused": ledger.dicom_refused_associations,
            "dicom_resent_studies": len(ledger.dicom_resent_studies),
            "dicom_given_up": len(ledger.dicom_given_up),
            "dicom_unacknowledged_at_end": len(ledger.dicom_unacked_at_end),
            "hl7_sends": ledger.hl7_sends,
            "hl7_unanswered": ledger.hl7_unanswered,
            "hl7_codes": dict(ledger.hl7_codes),
            "hl7_connections_refused": ledger.hl7_refused_connections,
            "hl7_resent": len(ledger.hl7_resent),
            "hl7_given_up": len(ledger.hl7_given_up),
            "hl7_unacknowledged_at_end": len(ledger.hl7_unacked_at_end),
        },
        "dicom": dicom,
        "hl7": hl7,
        "results": results,
        "queue_final": final,
        "dead_jobs": dead[:20],
        "kills": {
            "total": len(kills),
            "gateway": sum(1 for k in kills if k["kind"] == "gateway"),
            "child": sum(1 for k in kills if k["kind"] == "child"),
            "ready_after_s_median": _round(statistics.median(recover), 2) if recover else None,
            "ready_after_s_max": _round(max(recover), 2) if recover else None,
            "events": kills,
        },
        "stray_processes": strays,
        "gateway_log": findings,
        "gateway_exit": rc,
        "slopes_second_half": slopes,
        "checks": checks,
        "passed": all(checks.values()),
    }
    rows = [[name, c["acknowledged"], c["distinct_received"], c["missing"],
             f"{c['duplicate_deliveries']} ({c['duplicates_after_a_kill']} after a kill)",
             c["received_not_acknowledged"]]
            for name, c in (("DICOM instances", dicom), ("HL7 messages", hl7),
                            ("results (ORU)", results))]
    log("")
    log(f"load {end - start:.0f} s, drain {drain_s:.0f} s; {len(kills)} kills "
        f"({summary['kills']['gateway']} of the gateway, {summary['kills']['child']} of a "
        f"child), back after median {summary['kills']['ready_after_s_median']} s, max "
        f"{summary['kills']['ready_after_s_max']} s")
    log(f"sent: {ledger.studies_started} studies, {ledger.dicom_sends} C-STOREs "
        f"({ledger.dicom_unanswered} unanswered, {len(ledger.dicom_resent_studies)} studies "
        f"resent, statuses {dict(ledger.dicom_statuses) or '-'}), {ledger.hl7_sends} HL7 "
        f"sends ({ledger.hl7_unanswered} unanswered, codes {dict(ledger.hl7_codes) or '-'})")
    log(table(["objects", "acknowledged", "delivered", "missing", "duplicates",
               "delivered, not acked"], rows))
    log("")
    log(table(["series (2nd half of load)", "per hour", "median", "min", "max", "flat"],
              [[k, _cell(v["per_hour"]), _cell(v.get("median")), _cell(v.get("min")),
                _cell(v.get("max")), "-" if v["flat"] is None else
                ("yes" if v["flat"] else "NO")]
               for k, v in slopes.items() if k in ("rss_mb", "fds", "threads")
               or k.startswith("rss_mb_")]))
    log(f"queue at the end: ready {q['ready']}, leased {q['leased']}, dead {q['dead']}, "
        f"open studies {q['studies_open']}; stray processes {len(strays)}; "
        f"gateway exit {rc}")
    if findings["by_event"]:
        log("gateway log, warnings and errors: " + ", ".join(
            f"{k} x{n}" for k, n in list(findings["by_event"].items())[:12]))
    if findings["child_exits"]:
        log("children's exits: " + ", ".join(
            f"{k} x{n}" for k, n in findings["child_exits"].items()))
    if findings["unparsed_lines"]:
        log(f"{findings['unparsed_lines']} log lines are not JSON (tracebacks?), e.g. "
            f"{findings['unparsed_examples'][:3]}")
    log("")
    for name, ok in checks.items():
        log(f"  {'ok    ' if ok else 'FAILED'}  {name}")
    return summary


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:,.2f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
