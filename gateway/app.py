"""Wiring of one gateway process: builds its parts from the config, starts them, reloads
them on SIGHUP and drains them on SIGTERM.

Which parts a process runs is its :class:`Parts`: ``gateway run`` (gateway.supervisor)
starts ingest processes (the DICOM SCP and the MLLP listener) and worker processes (the
assembler, the workers, the model runner, retention); the supervisor itself serves
/healthz, /readyz and /metrics and writes the audit trail's "gateway started/stopped".
A :class:`Gateway` with every part is the whole gateway in one process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog

from gateway.config import Config, ServerTLS
from gateway.dashboard.server import HTTPServer, http_server
from gateway.dashboard.web import Health
from gateway.envelope import Job, NextJob, Stage
from gateway.errors import ConfigError, ListenError
from gateway.infer.bundles import Registry, sha256_file
from gateway.infer.runner import ModelRunner, RunnerSettings
from gateway.ingest.assemble import Assembler
from gateway.ingest.dicom_scp import NETWORK_TIMEOUT, DicomSCP
from gateway.ingest.hl7_listener import HL7Listener
from gateway.observability.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.preflight import load_config
from gateway.route.keywords import routing_keywords
from gateway.security.audit import AuditLog, Auditor, SyslogForwarder, records, trail_path
from gateway.security.tls import client_context, server_context
from gateway.services.certwatch import CertWatch
from gateway.services.retention import RetentionService
from gateway.store.queue import JobNotifications
from gateway.store.store import Store
from gateway.workers import Beat, Completion, Handler, JobWaker, Worker, worker_alive

log = structlog.get_logger(__name__)


WORKER_DRAIN_SECONDS = 10.0  # SIGTERM: how long jobs in hand get to finish


# What a reload cannot change: listeners, identities and storage are set up at start.
RESTART_ONLY = {
    "gateway": None,  # the whole section
    "dicom": ("ae_title", "host", "port", "max_associations", "max_pdu", "tls", "receive_to_disk"),
    "hl7": ("host", "port", "tls", "max_frame_bytes", "idle_timeout"),
    "ingest": None,  # the processes are started by the supervisor
    "workers": None,
}

#: The listening ports a supervisor chose for its children (the config may say 0):
#: ``dicom``, ``dicom_tls``, ``hl7``, ``hl7_tls``.
Ports = Mapping[str, int]


def with_ports(cfg: Config, ports: Ports | None) -> Config:
    """*cfg* listening on *ports* (those that are given) instead of its own."""
    if not ports:
        return cfg
    update: dict[str, object] = {}
    for section in ("dicom", "hl7"):
        part = getattr(cfg, section)
        keep: dict[str, object] = {}
        if part.port is not None and section in ports:
            keep["port"] = ports[section]
        if part.tls is not None and f"{section}_tls" in ports:
            keep["tls"] = part.tls.model_copy(update={"port": ports[f"{section}_tls"]})
        update[section] = part.model_copy(update=keep)
    return cfg.model_copy(update=update)


def reread_config(
    cfg: Config, ports: Ports | None, audit: Auditor, *, report: bool = True
) -> tuple[Config, list[str]] | None:
    """The config file of *cfg* read again, with the restart-only settings of *cfg*, and
    the restart-only settings that changed in the file; None when the file is invalid.
    With *report*, rejections and restart-only changes are logged and audited (the
    supervisor does it once for all its processes)."""
    assert cfg.source is not None
    try:
        new = with_ports(load_config(cfg.source), ports)
    except ConfigError as exc:
        if report:
            log.error(
                "config.reload_rejected",
                errors=exc.errors,
                outcome="the running configuration is kept",
            )
            audit(
                records.configuration_rejected(
                    records.gateway_process(), _file_hash(cfg.source), len(exc.errors)
                )
            )
        else:
            log.error("process.reload_rejected", errors=len(exc.errors))
        return None
    needs_restart = restart_only_changes(cfg, new)
    if needs_restart and report:
        log.warning(
            "config.reload_needs_restart",
            changed=needs_restart,
            outcome="those settings keep their running values until a restart",
        )
    return keep_restart_only(cfg, new), needs_restart


def report_reload(new: Config, needs_restart: list[str], audit: Auditor) -> None:
    """The audit record and the log line of a reload that was applied."""
    audit(
        records.configuration_reloaded(
            records.gateway_process(), _file_hash(new.source), needs_restart
        )
    )
    log.info(
        "config.reloaded",
        destinations=len(new.destinations),
        routes=len(new.routes),
        dicom_callers=len(new.dicom.allowed_callers),
        hl7_senders=len(new.hl7.allowed_senders),
    )


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings that differ between *old* and *new* but apply only after a restart."""
    changed = []
    for section, keys in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        for key in keys or type(before).model_fields:
            if getattr(before, key) != getattr(after, key):
                changed.append(f"{section}.{key}")
    if old.dashboard != new.dashboard:  # its HTTPS server starts with the gateway
        changed.append("dashboard")
    # the runner processes load the bundles at start; a model's limits apply at once
    for name in sorted(set(old.models) | set(new.models)):
        if name not in old.models or name not in new.models:
            changed.append(f"models.{name}")
        elif old.models[name].bundle != new.models[name].bundle:
            changed.append(f"models.{name}.bundle")
    return changed


def keep_restart_only(old: Config, new: Config) -> Config:
    """*new*, with the restart-only settings of *old*: the config that is really running."""
    update: dict[str, object] = {
        "gateway": old.gateway,
        "ingest": old.ingest,
        "workers": old.workers,
        "dashboard": old.dashboard,
    }
    for section in ("dicom", "hl7"):
        keep = {key: getattr(getattr(old, section), key) for key in RESTART_ONLY[section] or ()}
        update[section] = getattr(new, section).model_copy(update=keep)
    update["models"] = {
        name: (new.models[name] if new.models.get(name, m).bundle == m.bundle else m)
        for name, m in old.models.items()
    }
    return new.model_copy(update=update)


def _file_hash(path: Path | None) -> str:
    try:
        return sha256_file(path) if path is not None else "?"
    except OSError:
        return "?"


def _model_runner(cfg: Config) -> ModelRunner | None:
    """The model runner for the configured models; None when there are none.  A bundle
    that cannot be read is reported and its jobs fail with the reason; the rest run."""
    if not cfg.models:
        return None
    registry = Registry.from_config(cfg.models, cfg.base_dir)
    for name, problem in registry.problems.items():
        log.error("model.unavailable", model=name, error=problem)
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
        log.error(
            "model.runtime_missing",
            error="torch and monai are not installed; models cannot run",
            fix="pip install -e '.[models]' (make run does this)",
        )
        return None
    for info in registry:
        log.info(
            "model.configured",
            model=info.name,
            version=info.version,
            input=info.input,
            weights_sha256=info.weights_sha256[:16],
        )
    inference = cfg.gateway.inference
    return ModelRunner(
        registry.models,
        RunnerSettings(
            processes=inference.processes,
            torch_threads=inference.torch_threads,
            device=inference.device,
            warm_up=inference.warm_up,
            log_level=logging.getLevelName(logging.getLogger().level),
        ),
    )


@contextlib.contextmanager
def listening(what: str, host: str, port: int | str) -> Iterator[None]:
    """Turn a bind failure into an error that says which listener and what to do."""
    try:
        yield
    except OSError as exc:
        hint = {
            errno.EADDRINUSE: "another program (or another gateway) uses it; stop it or "
            "change the port in the config",
            errno.EACCES: "ports below 1024 need privileges; use a higher port",
            errno.EADDRNOTAVAIL: "this machine has no such address; check the host",
        }.get(exc.errno or 0, "check the host and port in the config")
        raise ListenError(
            f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}; {hint}"
        ) from None


def _ports(plain: int | None, tls: ServerTLS | None) -> str:
    """The ports a listener binds, for an error message: "11112", "11112/2762", "2762"."""
    return "/".join(str(p) for p in (plain, tls.port if tls else None) if p is not None)


def open_audit(cfg: Config, metrics: Metrics) -> Auditor:
    """The audit trail of *cfg* (who sent what and where it went: hash-chained, apart from
    the logs), forwarded to syslog when configured.  Every process of a gateway writes to
    the same file (the writer locks it)."""
    syslog = cfg.gateway.audit.syslog
    forward = (
        SyslogForwarder(syslog.host, syslog.port, client_context(syslog.tls, cfg.path))
        if syslog is not None
        else None
    )
    return Auditor(
        AuditLog.open(trail_path(cfg.data_dir), forward=forward),
        on_error=metrics.audit_failures.inc,
        repeat_window=cfg.gateway.audit.repeat_window,
    )


def refresh_metrics(metrics: Metrics, store: Store, certwatch: CertWatch) -> None:
    """Set the gauges read from the queue database and the certificate files (when
    /metrics is read)."""
    certwatch.update_metrics(metrics)
    counts = store.queue.counts()
    metrics.queue_depth.clear()
    for key, states in counts.items():
        if key.startswith("jobs:"):
            for state, n in states.items():
                metrics.queue_depth.labels(stage=key[5:], state=state).set(n)
    metrics.studies.clear()
    for state, n in counts.get("studies", {}).items():
        metrics.studies.labels(state=state).set(n)
    metrics.dead_letters.set(
        sum(s.get("dead", 0) for k, s in counts.items() if k.startswith("jobs:"))
    )
    metrics.oldest_waiting.clear()
    for lane, age in store.queue.oldest_waiting_by_lane(time.time()).items():
        metrics.oldest_waiting.labels(lane=lane or "route").set(age)
    for volume in store.space.volumes():
        if volume.free >= 0:
            metrics.disk_free.labels(volume=volume.name).set(volume.free)


def store_ok(store: Store) -> bool:
    """The queue database answers."""
    try:
        store.queue.counts()
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Parts:
    """What one gateway process runs; every part by default (the whole gateway)."""

    ingest: bool = True  # the DICOM SCP and the MLLP listener
    work: bool = True  # the assembler, the workers and the model runner
    retention: bool = True  # the retention pass (one process of a gateway)
    http: bool = True  # /healthz, /readyz and /metrics in this process
    # the audit trail's "gateway started/stopped", and the reload's log and audit record:
    # the process a site sees as "the gateway"; the others log process.* events
    announce: bool = True
    # one of several ingest processes: the ports are shared (SO_REUSEPORT), and incoming/
    # holds the others' live transfers (the supervisor purged it before they started)
    shared_ports: bool = False
    role: str = "all"  # for the logs


class Gateway:
    def __init__(self, cfg: Config, parts: Parts | None = None, ports: Ports | None = None) -> None:
        self.parts = parts = parts or Parts()
        self.ports = ports
        self.cfg = cfg = with_ports(cfg, ports)
        self._event = "gateway" if parts.announce else "process"
        self.metrics = Metrics()
        self.store = Store.for_config(cfg)
        self.audit = open_audit(cfg, self.metrics)
        self._server_tls: dict[str, ssl.SSLContext | None] = {}
        self.dicom: DicomSCP | None = None
        self.hl7: HL7Listener | None = None
        if parts.ingest:
            dicom_tls = server_context(cfg.dicom.tls, cfg.path) if cfg.dicom.tls else None
            hl7_tls = server_context(cfg.hl7.tls, cfg.path) if cfg.hl7.tls else None
            # the live server contexts: a reload loads renewed certificate files into them
            self._server_tls = {"dicom": dicom_tls, "hl7": hl7_tls}
            self.dicom = DicomSCP(
                cfg.dicom,
                self.store,
                self.metrics,
                incoming=cfg.data_dir / "incoming",
                ssl_context=dicom_tls,
                keywords=routing_keywords(cfg.routes),
                audit=self.audit,
                reuse_port=parts.shared_ports,
                purge_older_than=NETWORK_TIMEOUT if parts.shared_ports else 0.0,
            )
            self.hl7 = HL7Listener(
                cfg.hl7,
                self.store,
                ssl_context=hl7_tls,
                on_message=self._count_message,
                on_connection=lambda outcome: self.metrics.hl7_connections.labels(outcome).inc(),
                audit=self.audit,
                reuse_port=parts.shared_ports,
            )
        # Workers keep their books on a second connection whose commits are not fsync'd
        # one by one (Store.for_workers): a lost lease or completion only re-runs a job.
        # The study timers stay on the durable connection.
        self.work_store: Store | None = None
        self.assembler: Assembler | None = None
        self.runner: ModelRunner | None = None
        self.pipeline: Pipeline | None = None
        self.workers: list[Worker] = []
        self.waker: JobWaker | None = None
        if parts.work:
            self.work_store = self.store.for_workers()
            self.assembler = Assembler(
                self.store.queue, self.metrics, on_complete=self.wake_workers
            )
            self.runner = _model_runner(cfg)
            self.pipeline = Pipeline(
                cfg, self.work_store, self.metrics, runner=self.runner, audit=self.audit
            )
            self.workers = self._workers()
            # PostgreSQL tells idle workers when a job becomes ready on any node
            queue = self.work_store.queue
            if isinstance(queue, JobNotifications):
                self.waker = JobWaker(queue, self.wake_workers)
        self.certwatch = CertWatch(cfg)
        self.retention: RetentionService | None = None
        if parts.retention:
            self.retention = RetentionService(
                lambda: Store.for_config(cfg, create=False, durable=False),
                cfg.gateway.retention_days,  # a restart-only setting
                metrics=self.metrics,
                audit=self.audit,
                findings_days=cfg.findings.retention_days,
            )
        self.http: HTTPServer | None = None
        if parts.http:
            health = Health(
                self.readiness,
                self.refresh_metrics,
                self.metrics.render,
                self.readiness_details,
            )
            with listening("http", cfg.gateway.http.host, cfg.gateway.http.port):
                self.http = http_server(
                    cfg, lambda: self.cfg, self.store, self.certwatch, self.audit, health
                )
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="hl7", daemon=True)
        self._stopped = threading.Event()
        self._started = False

    def _workers(self) -> list[Worker]:
        """One worker for routing (and, later, inference), one per destination lane."""
        p = self.pipeline
        assert p is not None and self.work_store is not None

        def handler(job: Job, beat: Beat) -> Sequence[NextJob] | Completion:
            stage: dict[Stage, Handler] = {
                Stage.ROUTE: p.route,
                Stage.INFER: p.infer,
                Stage.BUILD: p.build,
                Stage.DELIVER: p.deliver,
            }
            return stage[job.stage](job, beat)

        def outcome(job: Job, result: str) -> None:
            self.metrics.jobs.labels(stage=job.stage.value, outcome=result).inc()
            if result == "done":
                self.wake_workers()  # the jobs it enqueued are ready now

        # with notifications (PostgreSQL) the idle wait only catches retries coming due
        idle = 2.0 if isinstance(self.work_store.queue, JobNotifications) else 0.25
        lease = self.cfg.workers.lease_seconds
        workers = [
            # routing and result building: both short, neither waits on a peer
            Worker(
                "route",
                self.work_store.queue,
                [Stage.ROUTE, Stage.BUILD],
                handler,
                p.retry_policy,
                on_outcome=outcome,
                idle_wait=idle,
                lease_seconds=lease,
            )
        ]
        # one infer worker per runner process: each waits on its model run (in the runner
        # process), so routing and delivery go on meanwhile
        for i in range(self.cfg.gateway.inference.processes if self.cfg.models else 0):
            workers.append(
                Worker(
                    f"infer-{i}",
                    self.work_store.queue,
                    [Stage.INFER],
                    handler,
                    p.retry_policy,
                    on_outcome=outcome,
                    idle_wait=idle,
                    lease_seconds=lease,
                )
            )
        for name in self.cfg.destinations:
            workers.append(
                Worker(
                    f"deliver-{name}",
                    self.work_store.queue,
                    [Stage.DELIVER],
                    handler,
                    p.retry_policy,
                    lane=name,
                    alone=self.cfg.destinations[name].one_at_a_time,
                    on_outcome=outcome,
                    idle_wait=idle,
                    lease_seconds=lease,
                )
            )
        return workers

    def wake_workers(self) -> None:
        for worker in getattr(self, "workers", ()):
            worker.wake()

    def _count_message(self, message_type: str, ack: str) -> None:
        # Messages are not routed the moment they arrive: the route worker's next poll
        # (within 250 ms) takes them in bursts, so its commits interleave less with the
        # acknowledgement path.
        self.metrics.hl7_messages.labels(type=message_type, ack=ack).inc()

    def readiness_details(self) -> dict[str, object]:
        return {**self.certwatch.readiness_details(), **self.store.space.readiness_details()}

    def readiness(self) -> dict[str, bool]:
        checks = {"started": self._started}
        if self.dicom is not None:
            checks["dicom"] = bool(self.dicom.servers)
            checks["hl7"] = self._started and not self._stopped.is_set()
            checks["disk_space"] = not self.store.space.low()  # new data can be taken
        checks["store"] = store_ok(self.store)
        return checks

    def reload_certificates(self) -> None:
        """Load renewed certificate and key files (same paths) into the running TLS
        listeners, and make destinations' senders start again with theirs. A file that
        does not load leaves the running certificate in place."""
        for section, ctx in self._server_tls.items():
            tls = getattr(self.cfg, section).tls
            if ctx is None or tls is None:
                continue
            cert, key = self.cfg.path(tls.cert), self.cfg.path(tls.key)
            try:
                server_context(tls, self.cfg.path)  # all files load together, or none
                ctx.load_cert_chain(cert, key)
                if tls.ca is not None:
                    ctx.load_verify_locations(cafile=str(self.cfg.path(tls.ca)))
            except Exception as exc:
                log.error(
                    "tls.reload_failed",
                    listener=section,
                    error=str(exc)[:300],
                    outcome="the running certificate is kept",
                )
                continue
            log.info("tls.reloaded", listener=section)
        if self.pipeline is not None:
            self.pipeline.reset_senders()

    def refresh_metrics(self) -> None:
        refresh_metrics(self.metrics, self.store, self.certwatch)

    def start(self) -> None:
        if self.http is not None:
            self.http.start()
        self._loop_thread.start()
        try:
            if self.hl7 is not None:
                with listening(
                    "hl7", self.cfg.hl7.host, _ports(self.cfg.hl7.port, self.cfg.hl7.tls)
                ):
                    asyncio.run_coroutine_threadsafe(self.hl7.start(), self._loop).result(
                        timeout=30
                    )
            if self.dicom is not None:
                with listening(
                    "dicom", self.cfg.dicom.host, _ports(self.cfg.dicom.port, self.cfg.dicom.tls)
                ):
                    self.dicom.start()
        except BaseException:
            self.stop()
            raise
        if self.work_store is not None:
            released = self.work_store.queue.release_dead_workers(worker_alive, time.time())
            if released:
                log.warning(
                    "queue.released_dead_workers",
                    jobs=released,
                    reason="leased by a gateway process that is gone; resumed now",
                )
        if self.assembler is not None:
            self.assembler.start()
        if self.runner is not None:
            self.runner.start()  # the processes load and warm up the models meanwhile
        if self.waker is not None:
            self.waker.start()
        for worker in self.workers:
            worker.start()
        if self.retention is not None:
            self.retention.start()
        self._started = True
        if self.parts.announce:
            self.audit(records.application_activity(records.gateway_process(), "started"))
        log.info(
            f"{self._event}.started",
            role=self.parts.role,
            dicom_ports=self.dicom.ports if self.dicom else None,
            hl7_ports=self.hl7.ports if self.hl7 else None,
            http_port=self.http.port if self.http else None,
            data_dir=str(self.cfg.data_dir),
        )

    def stop(self) -> None:
        """Drain: stop accepting, let in-flight work finish, close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.retention is not None:
            self.retention.request_stop()
        log.info(f"{self._event}.stopping", role=self.parts.role)
        if self.dicom is not None:
            self.dicom.stop()
        if self.hl7 is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.hl7.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._loop_thread.is_alive():
            self._loop_thread.join(timeout=10)
        if self.waker is not None:
            self.waker.stop()
        for worker in self.workers:
            worker.request_stop()
        deadline = time.monotonic() + WORKER_DRAIN_SECONDS
        for worker in self.workers:
            if not worker.stop(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "gateway.worker_still_busy",
                    worker=worker.name,
                    outcome="its job is retried when its lease expires",
                )
        if self.runner is not None:
            self.runner.close()  # a model still running is stopped; its job is retried
            for worker in self.workers:
                worker.stop(2.0)
        if self.retention is not None:
            self.retention.stop(timeout=30)
        if self.pipeline is not None:
            self.pipeline.close()
        if self.assembler is not None and self.assembler.running:
            self.assembler.stop()
        if self.http is not None:
            self.http.stop()
        self.store.close()
        if self.work_store is not None:
            self.work_store.close()
        if self.parts.announce:
            self.audit(records.application_activity(records.gateway_process(), "stopped"))
            if self.audit.trail is not None:
                seq, head = self.audit.trail.head
                # an anchor outside the trail: `gateway audit verify` can be checked against it
                log.info("audit.head", seq=seq, hash=head)
        self.audit.close()
        log.info(f"{self._event}.stopped", role=self.parts.role)

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP) and apply what can change without a restart:
        allow-lists, the study quiet period, destinations, routes and models.  Nothing
        running is dropped.  An invalid file changes nothing."""
        found = reread_config(self.cfg, self.ports, self.audit, report=self.parts.announce)
        if found is None:
            return False
        new, needs_restart = found
        self.cfg = new
        if self.dicom is not None:
            self.dicom.reconfigure(new.dicom, routing_keywords(new.routes))
        if self.hl7 is not None:
            asyncio.run_coroutine_threadsafe(
                self.hl7.update_allowed_senders(new.hl7.allowed_senders), self._loop
            ).result(timeout=30)
        if self.pipeline is not None:
            self.pipeline.cfg = new
            lanes = {w.lane for w in self.workers}
            for worker in self._workers():
                if worker.lane not in lanes:  # a new destination gets its lane
                    self.workers.append(worker)
                    worker.start()
        self.certwatch.cfg = new
        if self.http is not None:
            self.http.reload(new)  # the dashboard's tokens file and certificate
        self.reload_certificates()
        if self.parts.announce:
            report_reload(new, needs_restart, self.audit)
        else:
            log.info("process.reloaded", role=self.parts.role)
        return True

    def run_forever(
        self,
        on_started: Callable[[], None] | None = None,
        on_reloaded: Callable[[bool], None] | None = None,
    ) -> None:
        """Start, then block until SIGTERM/SIGINT, then drain and return.  SIGHUP reloads
        the config.  *on_started* and *on_reloaded* tell a supervisor."""
        done = threading.Event()
        hangup = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info(f"{self._event}.signal", signal=signal.Signals(signum).name)
            (hangup if signum == signal.SIGHUP else done).set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        self.start()
        if on_started is not None:
            on_started()
        try:
            while not done.wait(0.5):
                if hangup.is_set():
                    hangup.clear()
                    ok = self.reload()
                    if on_reloaded is not None:
                        on_reloaded(ok)
        finally:
            started = time.monotonic()
            self.stop()
            log.info(f"{self._event}.drained", seconds=round(time.monotonic() - started, 2))
