"""The queue contract: the gateway's only state besides the spool, one engine behind it.

Every caller (the ingest edges through :class:`~gateway.store.store.Store`, the
assembler, the workers, retention, the ``gateway queue`` commands) holds a :class:`Queue`
and nothing more specific; :func:`gateway.store.backend.open_queue` picks the engine
(SQLite now: :mod:`gateway.store.sqlite`).  ``tests/unit/test_queue.py`` is the contract's
test suite, run unchanged against every engine.

What every engine guarantees:

- **Durable ingest.** ``record_instance`` and ``record_message`` return only after their
  transaction is committed durably (the edge answers success after that, never before).
  The dedup key (a keyed hash of the SOP Instance UID, or of sender + MSH-10) is unique:
  a resend is answered from what is stored and stores nothing.
- **Study assembly survives restarts.** A study's quiet-period timer is a row; a study
  completed is queued for routing in the same transaction; a late instance reopens it
  as a new generation.
- **Leases with tokens.** ``lease`` takes the next due job in one statement (no gap
  between choosing and taking), per stage and, for deliveries, per lane (one destination
  never blocks another).  ``heartbeat``, ``complete``, ``fail`` and ``dead`` are guarded
  by the job's lease token and raise :class:`LeaseLost` when another worker took over.
- **One waiting job per (stage, subject).** Enqueueing what is already waiting updates it;
  a job returned to ready behind a newer one is closed as superseded.
- **Next jobs with the completion.** ``complete(job, now, then)`` marks it done and
  enqueues what follows in one transaction: a crash leaves both or neither.
- **Singletons.** ``exclusive(name)`` holds a lock that one process of the whole site
  has at a time (every node sharing the database): a retention pass runs on one node.
- **Findings with their job.** A model run's findings (:mod:`gateway.store.findings`)
  are written in the transaction that completes its infer job.
- **Deliveries recorded.** What reached a destination is a row, so a retry skips it:
  delivery is at least once, with stable identities (deterministic result UIDs).
- **Wall-clock steps backwards.** Times are wall-clock seconds, and a clock that steps
  back (an NTP correction, a VM snapshot restored) would otherwise hold every stored time
  in the future: quiet periods, run times and leases an hour too long for an hour's step.
  A row last written more than :data:`CLOCK_SLACK` seconds "in the future" (an open
  study's ``last_at``, a waiting or leased job's ``updated_at``) shows the step: the next
  ``complete_due_studies`` / ``sweep_expired`` moves it, with its due time, run time or
  lease expiry, back by the step, keeping what was left of the wait.  A job a sweep or a
  dead worker's release puts back was due when it was leased: it runs now.  (A step
  *forwards* looks like time passing: quiet periods and leases end early; see
  docs/reliability.md.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from gateway.envelope import Envelope, Job, Kind, NextJob, Payload, Stage
from gateway.errors import QueueUnavailable
from gateway.store.findings import ModelRun, RunFilter
from gateway.store.spool import SPOOL_KEY

SUPERSEDED = "superseded: a newer job for the same subject is waiting"

#: seconds a row's last write may lie ahead of the caller's *now* before it counts as a
#: wall-clock step backwards and is moved back: room for skew between the nodes of a site
#: and for a *now* read before waiting for a busy database (a smaller step back delays
#: waits by at most this much)
CLOCK_SLACK = 10.0


#: the largest job id either engine can hold (a signed 64-bit integer); a larger one names
#: no job, and is never handed to the database (which would refuse to bind it)
JOB_ID_MAX = 2**63 - 1


def storable_job_ids(job_ids: Iterable[int]) -> list[int]:
    """The ids of *job_ids* that a job can have (1 to :data:`JOB_ID_MAX`)."""
    return [i for i in job_ids if 1 <= i <= JOB_ID_MAX]


class LeaseLost(QueueUnavailable):
    """The job's lease expired and another worker took it over."""


@dataclass(frozen=True)
class Ack:
    """What the ingest edge answers: whether the object is new, and (HL7) the stored ACK."""

    new: bool
    envelope_id: str
    ack: bytes | None = None


@dataclass(frozen=True)
class StudyInfo:
    study_key: str
    state: str
    instances: int
    generation: int
    reopened: bool
    last_at: float
    complete_due: float


@dataclass
class PurgedRows:
    """What :meth:`Queue.purge_rows` deleted (or, in a dry run, would delete)."""

    studies: list[str]  # study keys
    messages: list[str]  # HL7 envelope ids
    kept: int  # old enough, but a job is still waiting, running or dead
    envelopes: int = 0
    #: the spool files of what is deleted: instances, results, masks, crosswalks, built objects
    spool_keys: list[str] = field(default_factory=list)
    #: (envelope id, sealed attributes) of one instance per deleted study, for the audit
    study_attrs: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class PurgePlan:
    """What a retention pass found to delete, before it deletes anything: the same for
    every engine (:func:`plan_purge`); each engine then deletes in its own transactions."""

    rows: PurgedRows  # the studies and messages to delete, and how many are kept
    jobs: dict[str, list[int]]  # per study key or message id: its done jobs
    keys: dict[str, list[str]]  # per study key or message id: spool keys its jobs name

    def dry_run(
        self,
        first_attrs: Callable[[str], tuple[str, bytes]],
        study_envelopes: Callable[[str], list[Envelope]],
    ) -> PurgedRows:
        """The rows as a dry run reports them: what a real pass would delete."""
        out = self.rows
        out.study_attrs = [first_attrs(s) for s in out.studies]
        for target in out.studies:
            out.spool_keys += [e.spool_key for e in study_envelopes(target) if e.spool_key]
        for target in [*out.studies, *out.messages]:
            out.spool_keys += self.keys.get(target, [])
        return out


def job_target(subject: str) -> str:
    """The study key or message id a job works on (``dest|model|target`` -> ``target``)."""
    return subject.rsplit("|", 1)[-1]


def plan_purge(
    busy_subjects: Iterable[str],
    studies: list[str],
    messages: list[str],
    done_jobs: Iterable[tuple[int, str, str]],
) -> PurgePlan:
    """Which of the old enough *studies* and *messages* a pass may delete: those with no
    job that is not done (*busy_subjects*); with the (id, subject, payload) of the
    *done_jobs*, each target's jobs and the spool keys their payloads name."""
    busy = {job_target(s) for s in busy_subjects}
    targets = {t for t in [*studies, *messages] if t not in busy}
    jobs: dict[str, list[int]] = {}
    keys: dict[str, list[str]] = {}
    for job_id, subject, payload in done_jobs:
        target = job_target(subject)
        if target in targets:
            jobs.setdefault(target, []).append(job_id)
            keys.setdefault(target, []).extend(SPOOL_KEY.findall(payload))
    rows = PurgedRows(
        studies=[s for s in studies if s in targets],
        messages=[m for m in messages if m in targets],
        kept=len(studies) + len(messages) - len(targets),
    )
    return PurgePlan(rows, jobs, keys)


@dataclass(frozen=True)
class JobGroup:
    """The jobs of one (stage, lane, state): how many, how many failed at least once, the
    oldest one's creation and the newest one's last change (``gateway.dashboard``)."""

    stage: str
    lane: str  # the destination of a delivery; "" for the other stages
    state: str
    jobs: int
    retried: int  # with attempts > 0
    oldest_created: float
    newest_updated: float


# what the dashboard reads, the same on both engines (:name parameters; PostgreSQL
# takes them through gateway.store.findings.pg)
JOB_GROUPS = (
    "SELECT stage, lane, state, COUNT(*) AS jobs,"
    " SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END) AS retried,"
    " MIN(created_at) AS oldest_created, MAX(updated_at) AS newest_updated"
    " FROM jobs GROUP BY stage, lane, state ORDER BY stage, lane, state"
)
RECENT_STUDIES = (
    "SELECT study_key, state, instances, generation, first_at, completed_at FROM studies"
    " ORDER BY first_at DESC, study_key LIMIT :limit"
)
# a study's jobs are all made after its first instance; their subjects end in its key
JOBS_SINCE = "SELECT stage, subject, state, updated_at FROM jobs WHERE created_at >= :since"


#: A study's stages after completion, as the dashboard's timeline shows them.
TIMELINE_STAGES = ("route", "infer", "build", "deliver")


@dataclass(frozen=True)
class StageMark:
    """A study's jobs of one stage: how many, how many done or dead, the last done."""

    jobs: int = 0
    done: int = 0
    dead: int = 0
    done_at: float | None = None  # when the last of them was done (all done: the stage's end)

    @property
    def finished(self) -> bool:
        return self.jobs > 0 and self.done == self.jobs


@dataclass(frozen=True)
class StudyTimeline:
    """One study from its first instance to its deliveries: the study's row and, per stage
    (:data:`TIMELINE_STAGES`), its jobs.  Named by its study key only."""

    study_key: str
    state: str
    instances: int
    generation: int
    received_at: float  # its first instance
    complete_at: float | None  # its quiet period ended
    stages: dict[str, StageMark] = field(default_factory=dict)


def study_timelines(
    studies: Iterable[tuple[str, str, int, int, float, float | None]],
    jobs: Iterable[tuple[str, str, str, float]],
) -> list[StudyTimeline]:
    """The timelines of *studies* ((key, state, instances, generation, first_at,
    completed_at), in the order given) from *jobs* ((stage, subject, state, updated_at));
    a job counts for the study its subject targets (:func:`job_target`), others are
    ignored.  The same for every engine: each reads the rows its own way."""
    marks: dict[str, dict[str, list[float]]] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    for stage, subject, state, updated_at in jobs:
        target = job_target(subject)
        row = counts.setdefault((target, stage), [0, 0, 0])
        row[0] += 1
        if state == "done":
            row[1] += 1
            marks.setdefault(target, {}).setdefault(stage, []).append(updated_at)
        elif state == "dead":
            row[2] += 1
    out = []
    for key, state, instances, generation, first_at, completed_at in studies:
        stages = {}
        for stage in TIMELINE_STAGES:
            n, done, dead = counts.get((key, stage), (0, 0, 0))
            times = marks.get(key, {}).get(stage)
            stages[stage] = StageMark(n, done, dead, max(times) if times else None)
        out.append(StudyTimeline(key, state, instances, generation, first_at, completed_at, stages))
    return out


class Queue(Protocol):
    """What the gateway asks of its queue engine (see the module docstring for the
    guarantees).  Times are seconds since the epoch, passed in: an engine reads no clock."""

    # --- ingest: one durable transaction each, committed before the edge answers ------

    def record_instance(
        self, env: Envelope, sealed_attrs: bytes, quiet: float, inline: bytes | None = None
    ) -> Ack:
        """Record a received DICOM instance and (re)start its study's quiet period.  A small
        instance comes *inline*, sealed, to be kept in its row (``env.spool_key`` is None);
        a larger one is in the spool already."""
        ...

    def touch_study(self, study_key: str, now: float, quiet: float) -> None:
        """A stored instance arrived again: restart the quiet period, reopen the study."""
        ...

    def record_message(
        self, env: Envelope, sealed_message: bytes, sealed_attrs: bytes, ack: bytes
    ) -> Ack:
        """Record an HL7 message (sealed in its row) with its ACK and its route job."""
        ...

    def find(self, dedup_key: str) -> str | None:
        """The envelope id stored under *dedup_key*, if any."""
        ...

    # --- study assembly -----------------------------------------------------------------

    def complete_due_studies(self, now: float) -> list[str]:
        """Complete the studies whose quiet period has passed; queue each for routing.
        An open study last written after *now* (the clock stepped back) first has its
        quiet period moved back by the step."""
        ...

    def study(self, study_key: str) -> StudyInfo | None: ...

    def next_study_due(self) -> float | None:
        """When the next open study's quiet period ends (None: no open study)."""
        ...

    def record_study_refs(self, study_key: str, refs: list[str]) -> None:
        """Other identifiers of a study (keyed hashes of accession numbers)."""
        ...

    def study_for_ref(self, ref: str) -> str | None: ...

    def study_envelopes(self, study_key: str) -> list[Envelope]:
        """A study's instances, in arrival order."""
        ...

    # --- jobs ---------------------------------------------------------------------------

    def enqueue(
        self, stage: Stage, subject: str, run_at: float, payload: Payload, *, lane: str = ""
    ) -> int: ...

    def lease(
        self,
        stages: list[Stage],
        worker: str,
        seconds: float,
        now: float,
        *,
        lane: str | None = None,
        alone: bool = False,
    ) -> Job | None:
        """The next due job of *stages* (in *lane* when given), leased to *worker*.
        *alone* (with a lane): only while no other job of the lane is leased, by any
        process of any node (a destination that takes one delivery at a time)."""
        ...

    def heartbeat(self, job: Job, seconds: float, now: float) -> Job: ...

    def complete(
        self,
        job: Job,
        now: float,
        then: Sequence[NextJob] = (),
        *,
        run: ModelRun | None = None,
        delivered: tuple[str, str] | None = None,
    ) -> None:
        """Done, with the jobs that follow, in one transaction; and there too, a model
        *run* written to the findings store, or the newest run of *delivered* ((model,
        subject)) marked delivered unless it was already."""
        ...

    def fail(self, job: Job, error: str, retry_at: float, now: float) -> None:
        """Back to ready at *retry_at*, the error kept (at most 2,000 characters)."""
        ...

    def dead(self, job: Job, error: str, now: float) -> None: ...

    def replay(self, job_ids: list[int] | None, now: float) -> int:
        """Dead jobs (all when None) back to ready, attempts reset; how many went back."""
        ...

    def sweep_expired(self, now: float) -> int:
        """Jobs whose lease expired back to ready (to run now); how many.  Waiting and
        leased jobs last written after *now* (the clock stepped back) first have their
        run times and lease expiries moved back by the step."""
        ...

    def release_dead_workers(self, alive: Callable[[str], bool], now: float) -> int:
        """Jobs leased by workers that *alive* says are gone back to ready, to run now."""
        ...

    # --- deliveries ---------------------------------------------------------------------

    def record_delivery(
        self, envelope_id: str, destination: str, status: int, now: float
    ) -> None: ...

    def record_deliveries(
        self, destination: str, delivered: Sequence[tuple[str, int]], now: float
    ) -> None: ...

    def delivered(self, destination: str, envelope_ids: Sequence[str]) -> set[str]:
        """Which of *envelope_ids* reached *destination* already."""
        ...

    # --- reading (status, the CLI, the stages) ----------------------------------------

    def envelope(self, envelope_id: str) -> tuple[Envelope, bytes, bytes | None]:
        """An envelope with its sealed attributes and (HL7) sealed message; KeyError."""
        ...

    def envelopes(self, kind: Kind | None = None) -> list[Envelope]: ...

    def job(self, job_id: int) -> Job | None: ...

    def dead_jobs(self) -> list[Job]: ...

    def counts(self) -> dict[str, dict[str, int]]:
        """``received`` by kind, ``studies`` by state, ``jobs:STAGE`` by job state."""
        ...

    def oldest_ready_age(self, now: float) -> float | None: ...

    def oldest_waiting_by_lane(self, now: float) -> dict[str, float]: ...

    def job_groups(self) -> list[JobGroup]:
        """The jobs by (stage, lane, state), ordered so: the dashboard's queue depth and
        destinations' health."""
        ...

    def study_timelines(self, limit: int) -> list[StudyTimeline]:
        """The *limit* studies received last, newest first, each with its jobs by stage."""
        ...

    # --- retention ----------------------------------------------------------------------

    def purge_rows(
        self, cutoff: float, *, dry_run: bool = False, chunk: int = 200
    ) -> PurgedRows: ...

    def referenced_spool_keys(self) -> set[str]:
        """Every spool key a row still names (envelopes, and job payloads)."""
        ...

    def sealed_blobs(self) -> Iterator[bytes]:
        """The first bytes of every sealed value kept in rows (which data keys are used)."""
        ...

    # --- the findings store (gateway/store/findings.py) ----------------------------------

    def findings_runs(self, flt: RunFilter) -> list[ModelRun]:
        """The model runs *flt* selects, oldest first, each with its findings."""
        ...

    def findings_mark(self, since: float) -> tuple[int, float | None, float | None]:
        """How many runs were inferred since *since*, the oldest and the newest time: what
        changes when one is added or purged (a cache of what they add up to keeps it)."""
        ...

    def purge_findings(self, cutoff: float, *, dry_run: bool = False) -> int:
        """Delete the runs inferred before *cutoff* with their findings; how many runs
        (a dry run counts them)."""
        ...

    # --- coordination -------------------------------------------------------------------

    def exclusive(self, name: str) -> AbstractContextManager[bool]:
        """For a ``with`` block: True inside when this caller holds the site-wide lock
        *name* (until the block ends), False when another process or node holds it (the
        block should then skip its work).  Never waits."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class JobNotifications(Protocol):
    """An engine that tells idle workers at once when a job becomes ready anywhere (so
    they need not poll): PostgreSQL's LISTEN/NOTIFY."""

    def listen(self) -> None: ...

    def wait_for_jobs(self, timeout: float) -> bool: ...
