"""Workers: take a job by stage (and lane), do one step, persist the outcome.

A stage handler is a plain function ``(job, beat) -> next jobs`` (or a :class:`Completion`:
the next jobs and what goes into the findings store with them).  The worker owns the
rest, in one place: ``complete`` with the next jobs in the same transaction on success;
:class:`~gateway.errors.Transient` -> retry at the time the job's retry policy gives, or
dead letter once it gives up; :class:`~gateway.errors.Permanent` -> dead letter at once,
keeping the error.  Network threads never wait on workers: they only enqueue.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway.envelope import Job, NextJob, Stage
from gateway.errors import Permanent, QueueUnavailable, Transient
from gateway.observability.logging import exception_fields
from gateway.store.findings import ModelRun
from gateway.store.queue import JobNotifications, LeaseLost, Queue

log = structlog.get_logger(__name__)

Beat = Callable[[], None]


@dataclass(frozen=True)
class Completion:
    """What a handler hands back beyond its next jobs, committed with the job's completion:
    a model *run* for the findings store, or the (model, subject) whose result was
    *delivered*."""

    then: Sequence[NextJob] = ()
    run: ModelRun | None = None
    delivered: tuple[str, str] | None = None


class Handler(Protocol):
    def __call__(self, job: Job, beat: Beat) -> Sequence[NextJob] | Completion: ...


class RetryDecider(Protocol):
    def decide(
        self, *, attempts: int, first_failure_at: float, now: float, rand: float
    ) -> float | None: ...


def worker_identity(name: str) -> str:
    """``host:pid:name``: lets a restarted gateway tell its dead predecessor's leases."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"


def worker_alive(identity: str) -> bool:
    """False for a worker of this host whose process is gone; True when unsure (another
    host's worker, or a name in another form): its lease then simply expires."""
    host, _, rest = identity.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False  # this process has just started: no worker of it holds a lease yet
    return process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether process *pid* of this host still runs: it exists (or belongs to another
    user) and has not exited waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether *pid* has exited and waits to be reaped.  A gateway killed with ``kill -9``
    leaves its worker children to init, which may reap them late (seen in the test VM):
    until then ``kill(pid, 0)`` succeeds, and their leases were held until they expired."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # no /proc (not Linux): trust kill(pid, 0)
    # "pid (comm) state ...": comm may hold spaces and parentheses; state follows the last ")"
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def renewal_due(since: float, since_mono: float, now: float, mono: float, period: float) -> bool:
    """Whether a lease renewed at *since* (wall clock) / *since_mono* (monotonic) is due
    again at *now* / *mono*: the longer of the two clocks' intervals has reached *period*.
    A wall clock stepped back an hour must not stop renewals for an hour (the lease would
    expire under a working job), and one stepped forwards renews at once (into the new
    time, before a sweep takes the lease back)."""
    return max(now - since, mono - since_mono) >= period


class LeaseKeeper:
    """Renews the lease of the job a worker has in hand, every tenth of the lease, from its
    own thread, for as long as the handler runs.

    A handler renews it too, with its ``beat``, between steps; but one step can wait on a
    peer for longer than the lease (a DICOM destination answering a C-STORE after a minute,
    inside pynetdicom where no beat can run).  Without this the lease expired meanwhile, the
    job went back to ready, and the handler's next beat lost it: the instances the peer had
    confirmed were not recorded, and the next attempt sent them again, for ever.  The lease
    still expires when the process dies (this thread goes with it)."""

    def __init__(
        self, name: str, queue: Queue, lease_seconds: float, clock: Callable[[], float]
    ) -> None:
        self.queue = queue
        self.lease_seconds = lease_seconds
        self.period = lease_seconds / 10
        self.clock = clock
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._renewed_at = 0.0
        self._renewed_mono = 0.0  # the same moment on the monotonic clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def hold(self, job: Job, now: float) -> None:
        """The worker has *job* in hand, leased (or renewed) at *now*."""
        with self._lock:
            self._job, self._renewed_at, self._renewed_mono = job, now, time.monotonic()

    def release(self) -> None:
        with self._lock:
            self._job = None

    def _run(self) -> None:
        while not self._stop.wait(self.period / 2):
            with self._lock:
                job, renewed_at, renewed_mono = self._job, self._renewed_at, self._renewed_mono
            now, mono = self.clock(), time.monotonic()
            if job is None or not renewal_due(renewed_at, renewed_mono, now, mono, self.period):
                continue
            try:
                self.queue.heartbeat(job, self.lease_seconds, now)
            except LeaseLost:
                # taken over (or finished meanwhile): the handler's beat or completion says so
                with self._lock:
                    if self._job is job:
                        self._job = None
                continue
            except Exception as exc:  # the queue is unavailable now: try again next period
                log.warning("worker.lease_renewal_failed", job=job.id, **exception_fields(exc))
                continue
            with self._lock:
                if self._job is job:
                    self._renewed_at, self._renewed_mono = now, mono


class Worker:
    """One thread taking jobs of *stages* (only from *lane* when given) one at a time."""

    def __init__(
        self,
        name: str,
        queue: Queue,
        stages: list[Stage],
        handler: Handler,
        retry_policy: Callable[[Job], RetryDecider],
        *,
        lane: str | None = None,
        alone: bool = False,
        lease_seconds: float = 60.0,
        idle_wait: float = 0.25,
        on_outcome: Callable[[Job, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.identity = worker_identity(name)  # recorded on the jobs it leases
        self.queue = queue
        self.stages = stages
        self.handler = handler
        self.retry_policy = retry_policy
        self.lane = lane
        self.alone = alone  # one job of the lane at a time, site-wide
        self.lease_seconds = lease_seconds
        self.idle_wait = idle_wait
        self.on_outcome = on_outcome
        self.clock = clock
        self.rand = rand
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)
        # renews the lease while a handler waits on a peer; started with the worker (a
        # worker driven by run_once alone, as in tests, renews through beat only)
        self.keeper = LeaseKeeper(name, queue, lease_seconds, clock)
        self._keeping = False

    def start(self) -> None:
        self._keeping = True
        self.keeper.start()
        self._thread.start()

    def wake(self) -> None:
        """New work may be waiting: look now instead of after the idle wait."""
        self._wake.set()

    def request_stop(self) -> None:
        """Take no new job; the one in hand finishes (its outcome is persisted)."""
        self._stop.set()
        self._wake.set()
        self.keeper.stop()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop, waiting up to *timeout* for the job in hand; False if it is still running
        (its lease then expires and the job is retried, after a restart if need be)."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception as exc:  # the queue itself failed: wait, then try again
                log.error("worker.failed", worker=self.name, **exception_fields(exc))
                worked = False
            if not worked:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def run_once(self) -> bool:
        """Lease and process one job; False when none was ready."""
        job = self.queue.lease(
            self.stages,
            self.identity,
            self.lease_seconds,
            self.clock(),
            lane=self.lane,
            alone=self.alone,
        )
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: Job) -> None:
        held = job
        last_beat = self.clock()
        last_beat_mono = time.monotonic()

        def beat() -> None:
            # renew the lease, at most ten times per lease period (each renewal is a commit)
            nonlocal held, last_beat, last_beat_mono
            now, mono = self.clock(), time.monotonic()
            if renewal_due(last_beat, last_beat_mono, now, mono, self.lease_seconds / 10):
                held = self.queue.heartbeat(held, self.lease_seconds, now)
                last_beat, last_beat_mono = now, mono
                if self._keeping:
                    self.keeper.hold(held, now)

        fields = {
            "worker": self.name,
            "job": job.id,
            "stage": job.stage.value,
            "attempt": job.attempts,
            "lane": job.lane or None,
        }
        started = time.monotonic()
        if self._keeping:
            self.keeper.hold(job, last_beat)
        try:
            try:
                outcome = self.handler(job, beat)
            finally:
                self.keeper.release()
            done = outcome if isinstance(outcome, Completion) else Completion(outcome)
            then = done.then
            self.queue.complete(
                held, self.clock(), then=then, run=done.run, delivered=done.delivered
            )
        except LeaseLost:
            log.warning("job.lease_lost", **fields)
            return
        except Transient as exc:
            self._retry(held, exc.message, fields)
            return
        except Permanent as exc:
            self.queue.dead(held, exc.message, self.clock())
            log.error("job.dead", **fields, error=exc.message)
            self._outcome(job, "dead")
            return
        except Exception as exc:  # a bug: retried like a transient failure, never lost
            log.error("job.failed", **fields, **exception_fields(exc))
            self._retry(held, f"internal error ({type(exc).__name__}); see gateway log", fields)
            return
        log.info(
            "job.done",
            **fields,
            next=[n.stage.value for n in then],
            seconds=round(time.monotonic() - started, 3),
        )
        self._outcome(job, "done")

    def _retry(self, job: Job, error: str, fields: dict[str, object]) -> None:
        now = self.clock()
        policy = self.retry_policy(job)
        run_at = policy.decide(
            attempts=job.attempts,
            first_failure_at=job.first_failed_at or now,
            now=now,
            rand=self.rand(),
        )
        if run_at is None:
            message = f"gave up after {job.attempts} attempts: {error}"
            self.queue.dead(job, message, now)
            log.error("job.dead", **fields, error=message)
            self._outcome(job, "dead")
        else:
            self.queue.fail(job, error, run_at, now)
            log.warning("job.retry", **fields, error=error, retry_in=round(run_at - now, 1))
            self._outcome(job, "retry")

    def _outcome(self, job: Job, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(job, outcome)
            except Exception as exc:  # an observer never breaks the worker
                log.error("worker.observer_failed", **exception_fields(exc))


class JobWaker:
    """Wakes this process's idle workers as soon as a job becomes ready anywhere on the
    site (an engine with :class:`~gateway.store.queue.JobNotifications`: PostgreSQL's
    NOTIFY), so that they need not poll the database: their own idle wait then only
    catches jobs that become *due* later (a retry time), which send no notification."""

    #: how long one wait for a notification lasts (also the longest a stop waits)
    WAIT = 1.0

    def __init__(self, queue: JobNotifications, wake: Callable[[], None]) -> None:
        self.queue = queue
        self.wake = wake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-waker", daemon=True)

    def start(self) -> None:
        self.queue.listen()  # before any worker's first empty lease: no wake-up is lost
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.WAIT + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.queue.wait_for_jobs(self.WAIT):
                    self.wake()
            except QueueUnavailable as exc:  # the database went away: listen again later
                log.warning("queue.notifications_lost", reason=exc.message)
                self.wake()  # whatever was missed meanwhile: look now
                self._stop.wait(1.0)
