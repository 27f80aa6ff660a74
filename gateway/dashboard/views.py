"""What each dashboard view shows, as typed records (the OpenAPI schema's responses),
built by pure functions from what the queue, the findings store and the certificate
watch say.

No patient data reaches a view: studies are named by the first :data:`KEY_CHARS`
characters of their study key (a keyed hash of the Study Instance UID, never the UID),
messages by their envelope id likewise, and a dead letter's error goes through the log
redaction (person names, HL7 segments with patient data, dates) before it is shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from gateway.envelope import Job
from gateway.findings.concordance import Comparison, Interval, Summary
from gateway.findings.stats import stats
from gateway.observability.logging import redact_text
from gateway.store.findings import ModelRun
from gateway.store.queue import TIMELINE_STAGES, JobGroup, StageMark, StudyTimeline, job_target
from gateway.store.space import Volume

KEY_CHARS = 12  # characters of a study key or envelope id shown
ERROR_CHARS = 300  # characters of a dead letter's last error shown
COMPARISONS = 50  # newest comparisons listed

StepState = Literal["done", "waiting", "dead", "skipped"]


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


def short(key: str) -> str:
    """A study key or envelope id as the dashboard shows it."""
    return key[:KEY_CHARS]


# --- who asks --------------------------------------------------------------------------


class WhoAmI(_View):
    name: str
    role: Literal["viewer", "operator"]
    via: Literal["token", "certificate"]


# --- queue depth -----------------------------------------------------------------------


class StageDepth(_View):
    stage: str
    lane: str  # the destination of deliveries; "" for the other stages
    ready: int
    leased: int
    dead: int
    done: int
    retrying: int  # waiting or running after a failed attempt
    oldest_waiting_seconds: float | None


class VolumeRow(_View):
    volume: str  # "data" (queue file, audit trail) or "spool"
    free_bytes: int | None  # None: it could not be read
    min_free_bytes: int  # gateway.min_free_mb (0: no floor)
    low: bool  # below the floor: new data is refused until space returns


class QueueView(_View):
    generated_at: float
    received: dict[str, int]  # objects by kind
    studies: dict[str, int]  # by assembly state
    depth: list[StageDepth]
    dead_letters: int
    volumes: list[VolumeRow] = []


def queue_view(
    counts: Mapping[str, Mapping[str, int]],
    groups: Iterable[JobGroup],
    now: float,
    *,
    volumes: Iterable[Volume] = (),
    min_free: int = 0,
) -> QueueView:
    table: dict[tuple[str, str], dict[str, float]] = {}
    for g in groups:
        row = table.setdefault((g.stage, g.lane), {"retrying": 0})
        row[g.state] = row.get(g.state, 0) + g.jobs
        if g.state in ("ready", "leased"):
            row["retrying"] += g.retried
            row["oldest"] = min(row.get("oldest", g.oldest_created), g.oldest_created)
    depth = [
        StageDepth(
            stage=stage,
            lane=lane,
            ready=int(row.get("ready", 0)),
            leased=int(row.get("leased", 0)),
            dead=int(row.get("dead", 0)),
            done=int(row.get("done", 0)),
            retrying=int(row["retrying"]),
            oldest_waiting_seconds=round(now - row["oldest"], 1) if "oldest" in row else None,
        )
        for (stage, lane), row in sorted(table.items())
    ]
    return QueueView(
        generated_at=now,
        received=dict(counts.get("received", {})),
        studies=dict(counts.get("studies", {})),
        depth=depth,
        dead_letters=sum(d.dead for d in depth),
        volumes=[
            VolumeRow(
                volume=v.name,
                free_bytes=v.free if v.free >= 0 else None,
                min_free_bytes=min_free,
                low=v.below(min_free),
            )
            for v in volumes
        ],
    )


# --- study timelines -------------------------------------------------------------------

#: The steps of a study's timeline: the queue stage behind each (None: the study's row).
STEPS: tuple[tuple[str, str | None], ...] = (
    ("received", None),
    ("complete", None),
    ("routed", "route"),
    ("inferred", "infer"),
    ("results built", "build"),
    ("delivered", "deliver"),
)
assert {stage for _, stage in STEPS if stage} == set(TIMELINE_STAGES)


class Step(_View):
    step: str
    state: StepState
    at: float | None
    seconds: float | None  # since the step before that was done


class StudyRow(_View):
    study: str  # the study key's first characters
    state: str
    instances: int
    generation: int
    steps: list[Step]
    total_seconds: float | None  # received to the last step done


class StudiesView(_View):
    generated_at: float
    studies: list[StudyRow]


def _stage_step(mark: StageMark, before_done: bool, later: bool) -> tuple[StepState, float | None]:
    if mark.finished:
        return "done", mark.done_at
    if mark.dead:
        return "dead", None
    if mark.jobs == 0 and before_done and later:
        return "skipped", None  # no job of this stage, and a later stage has started
    return "waiting", None


def study_row(t: StudyTimeline) -> StudyRow:
    marks = [t.stages.get(stage or "", StageMark()) for _, stage in STEPS]
    steps: list[Step] = []
    last_at: float | None = None
    before_done = True
    for i, (name, stage) in enumerate(STEPS):
        state: StepState
        if stage is None:
            at = t.received_at if name == "received" else t.complete_at
            state = "done" if at is not None else "waiting"
        else:
            later = any(m.jobs for m in marks[i + 1 :])
            state, at = _stage_step(marks[i], before_done, later)
            if state == "skipped" and stage == "deliver":
                state = "waiting"
        seconds = round(at - last_at, 3) if at is not None and last_at is not None else None
        steps.append(Step(step=name, state=state, at=at, seconds=seconds))
        before_done = before_done and state in ("done", "skipped")
        if at is not None:
            last_at = at
    done_at = [s.at for s in steps if s.state == "done" and s.at is not None]
    return StudyRow(
        study=short(t.study_key),
        state=t.state,
        instances=t.instances,
        generation=t.generation,
        steps=steps,
        total_seconds=round(max(done_at) - t.received_at, 3) if done_at else None,
    )


def studies_view(timelines: Sequence[StudyTimeline], now: float) -> StudiesView:
    return StudiesView(generated_at=now, studies=[study_row(t) for t in timelines])


# --- dead letters ----------------------------------------------------------------------


class DeadLetter(_View):
    id: int
    stage: str
    lane: str
    target: str  # the study key's or message id's first characters
    attempts: int
    last_error: str
    first_failed_at: float | None


class DeadView(_View):
    generated_at: float
    can_replay: bool  # the caller is an operator
    dead: list[DeadLetter]


def dead_view(jobs: Iterable[Job], now: float, can_replay: bool) -> DeadView:
    dead = []
    for job in jobs:
        error = redact_text(job.last_error or "")
        dead.append(
            DeadLetter(
                id=job.id,
                stage=job.stage.value,
                lane=job.lane,
                target=short(job_target(job.subject)),
                attempts=job.attempts,
                last_error=error if len(error) <= ERROR_CHARS else error[: ERROR_CHARS - 1] + "…",
                first_failed_at=job.first_failed_at,
            )
        )
    return DeadView(generated_at=now, can_replay=can_replay, dead=dead)


class Replayed(_View):
    job_id: int
    replayed: bool


# --- destinations ----------------------------------------------------------------------


class DestinationHealth(_View):
    name: str
    kind: Literal["dicom", "hl7", "?"]
    last_success: float | None  # the last delivery job done
    waiting: int
    retrying: int  # waiting or running after a failed attempt
    dead: int
    oldest_undelivered_seconds: float | None


class DestinationsView(_View):
    generated_at: float
    destinations: list[DestinationHealth]


def destinations_view(
    configured: Mapping[str, Literal["dicom", "hl7"]], groups: Iterable[JobGroup], now: float
) -> DestinationsView:
    table: dict[str, dict[str, float]] = {name: {} for name in configured}
    for g in groups:
        if g.stage != "deliver":
            continue
        row = table.setdefault(g.lane, {})
        if g.state == "done":
            row["last"] = max(row.get("last", g.newest_updated), g.newest_updated)
        elif g.state == "dead":
            row["dead"] = row.get("dead", 0) + g.jobs
        else:
            row["waiting"] = row.get("waiting", 0) + g.jobs
            row["retrying"] = row.get("retrying", 0) + g.retried
            row["oldest"] = min(row.get("oldest", g.oldest_created), g.oldest_created)
    return DestinationsView(
        generated_at=now,
        destinations=[
            DestinationHealth(
                name=name,
                kind=configured.get(name, "?"),
                last_success=row.get("last"),
                waiting=int(row.get("waiting", 0)),
                retrying=int(row.get("retrying", 0)),
                dead=int(row.get("dead", 0)),
                oldest_undelivered_seconds=(
                    round(now - row["oldest"], 1) if "oldest" in row else None
                ),
            )
            for name, row in sorted(table.items())
        ],
    )


# --- certificates ----------------------------------------------------------------------


class CertificateRow(_View):
    name: str  # where the configuration names it, e.g. dicom.tls.cert
    days_left: float | None  # None: unreadable
    expires_soon: bool


class CertificatesView(_View):
    generated_at: float
    warn_days: int
    certificates: list[CertificateRow]


def certificates_view(
    days: Mapping[str, float | None], warn_days: int, now: float
) -> CertificatesView:
    return CertificatesView(
        generated_at=now,
        warn_days=warn_days,
        certificates=[
            CertificateRow(name=name, days_left=d, expires_soon=d is None or d < warn_days)
            for name, d in sorted(days.items())
        ],
    )


# --- findings --------------------------------------------------------------------------


class Proportion(_View):
    value: float | None
    low: float | None
    high: float | None
    numerator: int
    denominator: int


class PrevalenceRow(_View):
    month: str
    model: str
    version: str
    modality: str
    runs: int
    positive: int
    rate: float


class HistogramRow(_View):
    model: str
    version: str
    edges: list[float]
    counts: list[int]


class ConcordanceRow(_View):
    image_model: str
    image_version: str
    concept: str
    studies: int
    true_positive: int
    false_positive: int
    false_negative: int
    true_negative: int
    indeterminate: int
    sensitivity: Proportion
    ppv: Proportion
    agreement: Proportion


class ComparisonRow(_View):
    study: str  # the study key's first characters
    concept: str
    image_model: str
    note_model: str
    ai: str
    report: str
    outcome: str
    reported_at: float


class FindingsView(_View):
    generated_at: float
    days: float
    runs: int
    prevalence: list[PrevalenceRow]
    histograms: list[HistogramRow]
    concordance: list[ConcordanceRow]
    comparisons: list[ComparisonRow]  # newest first


def _proportion(i: Interval) -> Proportion:
    return Proportion(
        value=i.value, low=i.low, high=i.high, numerator=i.numerator, denominator=i.denominator
    )


def _concordance(s: Summary) -> ConcordanceRow:
    return ConcordanceRow(
        image_model=s.image_model,
        image_version=s.image_version,
        concept=s.concept,
        studies=s.studies,
        true_positive=s.true_positive,
        false_positive=s.false_positive,
        false_negative=s.false_negative,
        true_negative=s.true_negative,
        indeterminate=s.indeterminate,
        sensitivity=_proportion(s.sensitivity),
        ppv=_proportion(s.ppv),
        agreement=_proportion(s.agreement),
    )


def _comparison(c: Comparison) -> ComparisonRow:
    return ComparisonRow(
        study=short(c.study_key),
        concept=c.concept,
        image_model=c.image_model,
        note_model=c.note_model,
        ai=c.ai,
        report=c.report,
        outcome=c.outcome,
        reported_at=c.reported_at,
    )


def findings_view(runs: Sequence[ModelRun], days: float, now: float) -> FindingsView:
    found = stats(runs)
    newest = sorted(found.comparisons, key=lambda c: -c.reported_at)[:COMPARISONS]
    return FindingsView(
        generated_at=now,
        days=days,
        runs=len(runs),
        prevalence=[
            PrevalenceRow(
                month=p.month,
                model=p.model,
                version=p.version,
                modality=p.modality,
                runs=p.runs,
                positive=p.positive,
                rate=p.rate,
            )
            for p in found.prevalence
        ],
        histograms=[
            HistogramRow(
                model=h.model, version=h.version, edges=list(h.edges), counts=list(h.counts)
            )
            for h in found.histograms
        ],
        concordance=[_concordance(s) for s in found.concordance],
        comparisons=[_comparison(c) for c in newest],
    )
