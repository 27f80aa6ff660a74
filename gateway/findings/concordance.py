"""AI against the radiologist: the image model's findings on a study compared, concept by
concept, with the note model's findings on the final report of the same study.

Which runs are compared (:func:`compare`):

- per study, the newest run of each image model (a study re-run after a late instance
  replaces its earlier result), and the newest *final* report run of each note model on
  that study (the study the report named when it was read, or, for a report read before
  its study arrived, the study with its accession number): OBR-25 ``F`` (final) or
  ``C`` (corrected final); preliminary reports are not the radiologist's last word and
  are left out;
- each concept the image model looks for (its ``concepts``), when the note model reads it
  too (a note model that cannot say "pneumothorax" is no judge of a pneumothorax model).

Statuses: the image model's status for a concept is ``present`` when one of its findings
of that concept is present, ``uncertain`` when one is uncertain, else ``absent`` (it looked
and found nothing).  The report's is the note model's status for the concept; a concept
the report does not mention counts as ``absent`` (radiologists report what they see).

Outcomes: ``agree`` (both present: a true positive; or both absent: a true negative),
``ai-only`` (AI present, report absent: a false positive against the report),
``report-only`` (AI absent, report present: a false negative), and ``indeterminate``
(either side uncertain), which is listed but kept out of sensitivity, PPV and agreement.

The report is the reference here, not ground truth: "sensitivity" is sensitivity against
the reports.  Intervals are Wilson score intervals at 95 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.store.findings import ModelRun, Status

Outcome = Literal["agree", "ai-only", "report-only", "indeterminate"]
FINAL = ("F", "C")  # OBR-25: final, corrected final
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Comparison:
    """One concept of one study: the image model's status against the report's."""

    study_key: str
    concept: str
    image_model: str
    image_version: str
    note_model: str
    note_version: str
    ai: Status
    report: Status
    reported_mention: bool  # False: the report did not name the concept (counted absent)
    outcome: Outcome
    inferred_at: float  # the image model's run
    reported_at: float  # the note model's run on the report


@dataclass(frozen=True)
class Interval:
    value: float | None  # None when the denominator is 0
    low: float | None
    high: float | None
    numerator: int
    denominator: int


@dataclass(frozen=True)
class Summary:
    """Concordance of one image model version on one concept, against the reports."""

    image_model: str
    image_version: str
    concept: str
    studies: int
    true_positive: int  # both present
    false_positive: int  # ai-only
    false_negative: int  # report-only
    true_negative: int  # both absent
    indeterminate: int
    sensitivity: Interval  # TP / (TP + FN)
    ppv: Interval  # TP / (TP + FP)
    agreement: Interval  # (TP + TN) / (TP + TN + FP + FN)


def wilson(successes: int, total: int, z: float = Z95) -> Interval:
    """The proportion *successes* / *total* with its Wilson score interval."""
    if total <= 0:
        return Interval(None, None, None, successes, total)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), successes, total)


def concept_status(run: ModelRun, concept: str) -> tuple[Status, bool]:
    """(status, mentioned) of *concept* in *run*: present beats uncertain beats absent."""
    statuses = {f.status for f in run.findings if f.concept == concept}
    if not statuses:
        return "absent", False
    if "present" in statuses:
        return "present", True
    if "uncertain" in statuses:
        return "uncertain", True
    return "absent", True


def outcome(ai: Status, report: Status) -> Outcome:
    if "uncertain" in (ai, report):
        return "indeterminate"
    if ai == report:
        return "agree"
    return "ai-only" if ai == "present" else "report-only"


def _newest(
    runs: Iterable[ModelRun], by_accession: dict[str, str] | None = None
) -> dict[tuple[str, str], ModelRun]:
    """The newest run per (study key, model).  A run without a study key (a report that
    arrived before its study) takes the study of its accession in *by_accession*."""
    newest: dict[tuple[str, str], ModelRun] = {}
    for run in runs:
        study = run.study_key
        if study is None and by_accession and run.accession_ref:
            study = by_accession.get(run.accession_ref)
        if study is None:
            continue
        key = (study, run.model)
        held = newest.get(key)
        if held is None or (run.inferred_at, run.id) > (held.inferred_at, held.id):
            newest[key] = run
    return newest


def compare(runs: Sequence[ModelRun]) -> list[Comparison]:
    """Every (study, concept, image model, note model) comparison *runs* allow, by study
    and concept (see the module docstring for which runs count)."""
    images = _newest(r for r in runs if r.kind == "dicom")
    by_accession = {
        run.accession_ref: study for (study, _), run in images.items() if run.accession_ref
    }
    reports = _newest(
        (r for r in runs if r.kind == "hl7" and r.report_status in FINAL), by_accession
    )
    by_study: dict[str, list[ModelRun]] = {}
    for (study, _), report in reports.items():
        by_study.setdefault(study, []).append(report)
    out: list[Comparison] = []
    for (study, _), image in sorted(images.items()):
        for report in sorted(by_study.get(study, []), key=lambda r: r.model):
            for concept in image.concepts:
                if concept not in report.concepts:
                    continue
                ai, _ = concept_status(image, concept)
                said, mentioned = concept_status(report, concept)
                out.append(
                    Comparison(
                        study_key=study,
                        concept=concept,
                        image_model=image.model,
                        image_version=image.model_version,
                        note_model=report.model,
                        note_version=report.model_version,
                        ai=ai,
                        report=said,
                        reported_mention=mentioned,
                        outcome=outcome(ai, said),
                        inferred_at=image.inferred_at,
                        reported_at=report.inferred_at,
                    )
                )
    return out


def summarise(comparisons: Iterable[Comparison]) -> list[Summary]:
    """Per (image model, version, concept): the 2x2 table and its proportions."""
    tables: dict[tuple[str, str, str], list[int]] = {}
    for c in comparisons:
        row = tables.setdefault((c.image_model, c.image_version, c.concept), [0] * 5)
        if c.outcome == "indeterminate":
            row[4] += 1
        elif c.outcome == "ai-only":
            row[1] += 1
        elif c.outcome == "report-only":
            row[2] += 1
        elif c.ai == "present":
            row[0] += 1
        else:
            row[3] += 1
    out = []
    for (model, version, concept), (tp, fp, fn, tn, ind) in sorted(tables.items()):
        out.append(
            Summary(
                image_model=model,
                image_version=version,
                concept=concept,
                studies=tp + fp + fn + tn + ind,
                true_positive=tp,
                false_positive=fp,
                false_negative=fn,
                true_negative=tn,
                indeterminate=ind,
                sensitivity=wilson(tp, tp + fn),
                ppv=wilson(tp, tp + fp),
                agreement=wilson(tp + tn, tp + tn + fp + fn),
            )
        )
    return out


def discordant(comparisons: Iterable[Comparison]) -> list[Comparison]:
    """The comparisons for quality review: AI-only and report-only, newest first."""
    return sorted(
        (c for c in comparisons if c.outcome in ("ai-only", "report-only")),
        key=lambda c: -c.reported_at,
    )
