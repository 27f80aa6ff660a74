"""``gateway run``: a supervisor of one process per role.

The acknowledgement path never shares a process (and its GIL) with routing, models,
result building or delivery::

    gateway run (this module: the supervisor)
      ├─ ingest process x ingest.processes   DICOM SCP + MLLP listener, SO_REUSEPORT
      └─ worker process x workers.processes  assembler, workers, model runner, retention

- Children are fresh interpreters (``python -m gateway.cli run --child ROLE ...``), never
  forks of this threaded process.  Each asks the kernel to kill it when its parent dies
  (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the supervisor leaves no child holding the
  ports or the queue.
- The supervisor checks what a child cannot report well: the config, the key file and the
  queue database (it opens the store), the TLS files, and every listening port: it binds
  each one once (``SO_REUSEPORT``) and keeps it bound, so a port given as 0 gets a number
  that stays reserved, and a port in use is one clear error before any child starts.
- A child tells the supervisor that it is ready (or has reloaded) on a pipe: one JSON line
  per event.  /readyz is ready when every child is; a child that exits is logged (its exit
  code or signal) and started again after a back-off (0.5 s, doubling, at most 30 s).
- SIGTERM/SIGINT: every child drains (stops accepting, finishes what is in flight), the
  supervisor waits for them and exits 0.  SIGHUP: the supervisor checks the file, then
  every child reloads it; ``config.reloaded`` is logged once all have.
- /metrics adds up the children's values (prometheus_client's multiprocess mode; see
  :mod:`gateway.observability.metrics` for why) with the queue's gauges, read here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client.multiprocess import mark_process_dead

from gateway.app import (
    Gateway,
    Parts,
    Ports,
    listening,
    open_audit,
    refresh_metrics,
    report_reload,
    reread_config,
    store_ok,
    with_ports,
)
from gateway.config import Config
from gateway.dashboard.server import HTTPServer, http_server
from gateway.dashboard.web import Health
from gateway.errors import ProcessFailed
from gateway.ingest.dicom_scp import purge_incoming
from gateway.observability.logging import configure_logging
from gateway.observability.metrics import MULTIPROC_ENV, Metrics
from gateway.security.audit import records
from gateway.security.tls import server_context
from gateway.services.certwatch import CertWatch
from gateway.store.store import Store
from gateway.workers import process_alive

log = structlog.get_logger(__name__)

ROLES = ("ingest", "worker", "all")
START_TIMEOUT = 120.0  # seconds every child gets to say it is ready, at start
RELOAD_TIMEOUT = 30.0  # seconds every child gets to apply a reload
DRAIN_TIMEOUT = 60.0  # seconds the children get to drain after SIGTERM; then SIGKILL
BACKOFF_FIRST = 0.5  # seconds before a child that exited is started again; doubles...
BACKOFF_CAP = 30.0  # ...up to this
STABLE_AFTER = 30.0  # a child that ran this long starts the back-off afresh
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """One supervised process and what the supervisor knows of it."""

    role: str  # "ingest" or "worker"
    index: int
    proc: subprocess.Popen[bytes] | None = None
    control: int | None = None  # the read end of its pipe
    pending: bytes = b""
    ready: bool = False
    reloaded: bool = False
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # exits in a row, each soon after its start: the back-off
    restart_at: float | None = None
    last_exit: str | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, object]:
        return {
            "process": self.name,
            "role": self.role,
            "pid": self.proc.pid if self.alive and self.proc is not None else None,
            "ready": self.ready,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


def exit_text(code: int) -> str:
    """``exit code 1`` or ``signal SIGKILL``: how a child ended."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def reserve_port(what: str, host: str, port: int) -> tuple[socket.socket, int]:
    """Bind *host*:*port* for the ingest processes and keep it bound (not listening): the
    port (a free one for 0) stays ours while the gateway runs, and the children bind it
    too (``SO_REUSEPORT``).  A port in use raises :class:`ListenError`, naming it.

    The first bind is without ``SO_REUSEPORT``: with it, the bind would succeed beside
    another gateway's listeners (same user, same option) and take half its connections."""
    with listening(what, host, port):
        family, address = _address(host, port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            port = int(probe.getsockname()[1])
        keep = socket.socket(family, socket.SOCK_STREAM)
        try:
            keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            keep.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            keep.bind((address[0], port, *address[2:]))
        except BaseException:
            keep.close()
            raise
    return keep, port


class Supervisor:
    """``gateway run --role ROLE``: starts, watches and stops the processes of one node."""

    def __init__(self, cfg: Config, role: str = "all", log_level: str = "INFO") -> None:
        if cfg.source is None:
            raise ProcessFailed("gateway run needs a config file")
        self.role = role
        self.log_level = log_level
        self.children = [
            *(Child("ingest", i) for i in range(cfg.ingest.processes) if role != "worker"),
            *(Child("worker", i) for i in range(cfg.workers.processes) if role != "ingest"),
        ]
        self.selector = selectors.DefaultSelector()
        self.reserved: list[socket.socket] = []
        self.ports: dict[str, int] = {}
        self.started = False
        self.stopping = False
        self._signals: list[int] = []
        self.metrics_dir = metrics_dir(cfg.data_dir)
        self.metrics = Metrics(children_dir=self.metrics_dir)
        self.store: Store | None = None
        self.http: HTTPServer | None = None
        try:
            # what a child would fail on, checked once, here, before any child starts
            self.store = Store.for_config(cfg)
            self.audit = open_audit(cfg, self.metrics)
            for section in (cfg.dicom, cfg.hl7):
                if section.tls is not None and role != "worker":
                    server_context(section.tls, cfg.path)
            self.certwatch = CertWatch(cfg)
            health = Health(self.readiness, self.refresh_metrics, self.metrics.render, self.details)
            with listening("http", cfg.gateway.http.host, cfg.gateway.http.port):
                self.http = http_server(
                    cfg, lambda: self.cfg, self.store, self.certwatch, self.audit, health
                )
            if role != "worker":
                self._reserve_ports(cfg)
        except BaseException:
            self._close()
            raise
        self.cfg = with_ports(cfg, self.ports)

    def _reserve_ports(self, cfg: Config) -> None:
        wanted = [
            ("hl7", "hl7", cfg.hl7.host, cfg.hl7.port),
            ("hl7", "hl7_tls", cfg.hl7.host, cfg.hl7.tls.port if cfg.hl7.tls else None),
            ("dicom", "dicom", cfg.dicom.host, cfg.dicom.port),
            ("dicom", "dicom_tls", cfg.dicom.host, cfg.dicom.tls.port if cfg.dicom.tls else None),
        ]
        for what, key, host, port in wanted:
            if port is not None:
                sock, self.ports[key] = reserve_port(what, host, port)
                self.reserved.append(sock)

    # --- what /readyz and /metrics say --------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        ingest = [c.ready for c in self.children if c.role == "ingest"]
        workers = [c.ready for c in self.children if c.role == "worker"]
        checks = {"started": self.started and not self.stopping}
        if ingest:
            checks["dicom"] = checks["hl7"] = all(ingest)
            checks["disk_space"] = self.store is not None and not self.store.space.low()
        if workers:
            checks["workers"] = all(workers)
        checks["store"] = self.store is not None and store_ok(self.store)
        return checks

    def details(self) -> dict[str, object]:
        space = self.store.space.readiness_details() if self.store is not None else {}
        return {
            **self.certwatch.readiness_details(),
            **space,
            "role": self.role,
            "processes": [c.describe() for c in self.children],
        }

    def refresh_metrics(self) -> None:
        assert self.store is not None
        refresh_metrics(self.metrics, self.store, self.certwatch)
        for role in ("ingest", "worker"):
            mine = [c for c in self.children if c.role == role]
            if mine:
                self.metrics.processes.labels(role=role).set(sum(c.ready for c in mine))

    # --- the children -------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        assert self.cfg.source is not None
        read, write = os.pipe()
        args = [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "-c",
            str(self.cfg.source),
            "--log-level",
            self.log_level,
            "--child",
            child.role,
            "--index",
            str(child.index),
            "--ports",
            json.dumps(self.ports),
            "--control-fd",
            str(write),
            "--parent-pid",
            str(os.getpid()),
        ]
        env = dict(os.environ, **{MULTIPROC_ENV: self.metrics_dir})
        try:
            # stdout and stderr are ours: the children's JSON lines go where ours go
            child.proc = subprocess.Popen(args, pass_fds=(write,), env=env)
        finally:
            os.close(write)
        os.set_blocking(read, False)
        child.control, child.pending = read, b""
        child.ready = child.reloaded = False
        child.started_at = time.monotonic()
        child.restart_at = None
        self.selector.register(read, selectors.EVENT_READ, child)
        log.info("process.spawned", child=child.name, child_pid=child.proc.pid)

    def _close_control(self, child: Child) -> None:
        if child.control is not None:
            self.selector.unregister(child.control)
            os.close(child.control)
            child.control = None

    def _read(self, child: Child) -> None:
        assert child.control is not None
        try:
            data = os.read(child.control, 65536)
        except BlockingIOError:
            return
        if not data:
            self._close_control(child)
            return
        child.pending += data
        while b"\n" in child.pending:
            line, child.pending = child.pending.split(b"\n", 1)
            with contextlib.suppress(ValueError):
                event = json.loads(line).get("event")
                if event == "ready":
                    child.ready = True
                elif event == "reloaded":
                    child.reloaded = True

    def _reap(self) -> None:
        """Notice children that exited; start again those whose back-off is over."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            pid = child.proc.pid
            child.proc = None
            child.ready = False
            child.last_exit = exit_text(code)
            if child.control is not None:
                with contextlib.suppress(OSError):
                    self._read(child)  # what it said before it went
                self._close_control(child)
            with contextlib.suppress(OSError):
                mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping:
                log.info("process.exited", child=child.name, child_pid=pid, exit=child.last_exit)
                continue
            if not self.started:
                raise ProcessFailed(
                    f"the {child.name} process exited while starting ({child.last_exit}); "
                    "its message is above"
                )
            if now - child.started_at >= STABLE_AFTER:
                child.failures = 0
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2**child.failures)
            child.failures += 1
            child.restart_at = now + delay
            log.error(
                "process.exited",
                child=child.name,
                child_pid=pid,
                exit=child.last_exit,
                exit_code=code if code >= 0 else None,
                signal=exit_text(code).removeprefix("signal ") if code < 0 else None,
                restart_in=delay,
            )
        if self.stopping:
            return
        for child in self.children:
            if child.proc is None and child.restart_at is not None and child.restart_at <= now:
                child.restarts += 1
                self.metrics.process_restarts.labels(role=child.role).inc()
                log.warning("process.restarting", child=child.name, restarts=child.restarts)
                self._spawn(child)

    def _tick(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:  # the signal wake-up pipe
                with contextlib.suppress(BlockingIOError):
                    os.read(key.fd, 4096)
            else:
                self._read(key.data)
        self._reap()

    # --- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:  # that one only wakes the loop (set_wakeup_fd)
            self._signals.append(signum)

    def _take_signals(self) -> tuple[bool, bool]:
        """(stop, reload) asked since the last call."""
        taken, self._signals = self._signals, []
        for signum in taken:
            log.info("gateway.signal", signal=signal.Signals(signum).name)
        return (
            any(s in (signal.SIGTERM, signal.SIGINT) for s in taken),
            signal.SIGHUP in taken,
        )

    def _signal_children(self, signum: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    # --- the life of the gateway --------------------------------------------------------

    def run(self) -> int:
        """Start the children, supervise them until SIGTERM/SIGINT, drain, return 0."""
        wake_read, wake_write = os.pipe()
        for fd in (wake_read, wake_write):
            os.set_blocking(fd, False)
        self.selector.register(wake_read, selectors.EVENT_READ, None)
        previous_wakeup = signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._on_signal)
        try:
            if self._start():
                self._supervise()
        finally:
            self._stop()
            signal.set_wakeup_fd(previous_wakeup)
            self.selector.unregister(wake_read)
            os.close(wake_read)
            os.close(wake_write)
            self._close()
        return 0

    def _start(self) -> bool:
        """Start every child and wait until all are ready; False when told to stop first."""
        assert self.http is not None
        self.http.start()
        if self.role != "worker":
            # partial receptions of a gateway that was killed: nothing in them was
            # acknowledged (a restarted child purges only files silent for long)
            purge_incoming(self.cfg.data_dir / "incoming")
        for child in self.children:
            self._spawn(child)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(c.ready for c in self.children):
            self._tick(0.25)
            stop, _ = self._take_signals()
            if stop:
                return False
            if time.monotonic() > deadline:
                late = ", ".join(c.name for c in self.children if not c.ready)
                raise ProcessFailed(f"not ready after {START_TIMEOUT:.0f} s: {late}")
        self.started = True
        self.audit(records.application_activity(records.gateway_process(), "started"))
        names = {"dicom": "dicom", "dicom_tls": "dicom+tls", "hl7": "mllp", "hl7_tls": "mllp+tls"}
        log.info(
            "gateway.started",
            role=self.role,
            processes={c.name: c.proc.pid for c in self.children if c.proc is not None},
            ports={names[k]: p for k, p in self.ports.items()},
            http_port=self.http.port,
            http_scheme=self.http.scheme,
            data_dir=str(self.cfg.data_dir),
        )
        return True

    def _supervise(self) -> None:
        while True:
            self._tick(0.25)
            stop, reload = self._take_signals()
            if stop:
                return
            if reload:
                self._reload()

    def _reload(self) -> None:
        found = reread_config(self.cfg, self.ports, self.audit)
        if found is None:
            return
        new, needs_restart = found
        self.cfg = new
        self.certwatch.cfg = new
        if self.http is not None:
            self.http.reload(new)  # the dashboard's tokens file and certificate
        for child in self.children:
            child.reloaded = False
        self._signal_children(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while any(c.alive and c.ready and not c.reloaded for c in self.children):
            if time.monotonic() > deadline:
                late = [c.name for c in self.children if c.alive and not c.reloaded]
                log.error("config.reload_incomplete", processes=late)
                break
            self._tick(0.1)
            stop, again = self._take_signals()
            if stop:  # stopping wins; handled by the caller's next look
                self._signals.append(signal.SIGTERM)
                return
            if again:
                self._signal_children(signal.SIGHUP)
        report_reload(new, needs_restart, self.audit)

    def _stop(self) -> None:
        """Drain every child (SIGTERM), wait for them, then close what is ours."""
        self.stopping = True
        if any(c.proc is not None for c in self.children):
            log.info("gateway.stopping", role=self.role)
            self._signal_children(signal.SIGTERM)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while any(c.proc is not None for c in self.children):
                if time.monotonic() > deadline:
                    for child in self.children:
                        if child.proc is not None:
                            log.error("process.drain_timeout", child=child.name)
                            with contextlib.suppress(ProcessLookupError):
                                child.proc.kill()
                            child.proc.wait()
                self._tick(0.1)
                self._take_signals()
        if self.started:
            self.audit(records.application_activity(records.gateway_process(), "stopped"))
            if self.audit.trail is not None:
                seq, head = self.audit.trail.head
                # an anchor outside the trail: `gateway audit verify` can be checked against it
                log.info("audit.head", seq=seq, hash=head)
            log.info("gateway.stopped", role=self.role)

    def _close(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved.clear()
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.store is not None:
            self.store.close()
            self.store = None
        audit = getattr(self, "audit", None)
        if audit is not None:
            audit.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)



# --- the child side ---------------------------------------------------------------------


def metrics_dir(data_dir: Path) -> str:
    """This supervisor's folder for its children's metric files: ``data_dir/metrics/PID``
    (mode 0700).  The folders of supervisors that are gone (a ``kill -9`` leaves its
    folder behind) are removed first; those of another gateway running on the same data
    dir (``--role ingest`` beside ``--role worker``) are left alone."""
    root = data_dir / "metrics"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in root.iterdir():
        if old.name.isdigit() and not process_alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(os.getpid())
    shutil.rmtree(mine, ignore_errors=True)  # a pid reused after a reboot
    mine.mkdir(mode=0o700)
    return str(mine)



def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent (the supervisor) dies, however it dies;
    exit now if it is already gone.  Linux only; elsewhere a child notices its parent
    is gone when it next reads from it, and the supervisor's drain stops it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def run_child(
    cfg: Config,
    role: str,
    index: int,
    ports: Ports,
    control_fd: int,
    parent_pid: int,
    log_level: str = "INFO",
) -> int:
    """One process of ``gateway run``: the ingest or the worker part of the gateway."""
    die_with_parent(parent_pid)
    name = f"{role}-{index}"
    configure_logging(log_level, process=name)
    control = os.fdopen(control_fd, "w", buffering=1)

    def tell(event: str, **fields: object) -> None:
        with contextlib.suppress(OSError):
            control.write(json.dumps({"event": event, **fields}) + "\n")

    parts = Parts(
        ingest=role == "ingest",
        work=role == "worker",
        retention=role == "worker" and index == 0,  # one retention pass per gateway
        http=False,
        announce=False,
        shared_ports=True,
        role=name,
    )
    gateway = Gateway(cfg, parts, ports)
    gateway.run_forever(
        on_started=lambda: tell("ready"),
        on_reloaded=lambda ok: tell("reloaded", ok=ok),
    )
    with contextlib.suppress(OSError):
        control.close()
    return 0


def run_supervisor(cfg: Config, role: str, log_level: str) -> int:
    """``gateway run``: the supervisor's whole life."""
    configure_logging(log_level, process="supervisor")
    return Supervisor(cfg, role, log_level).run()
