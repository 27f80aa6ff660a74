"""The findings store's pure parts: a model result as rows, concordance arithmetic, the
statistics, and ``gateway findings`` on a queue filled here."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from gateway.cli import main
from gateway.envelope import Stage
from gateway.findings.concordance import compare, discordant, outcome, summarise, wilson
from gateway.findings.records import finding_record, model_run
from gateway.findings.stats import histograms, prevalence
from gateway.store.findings import FindingRecord, Measurement, ModelRun
from gateway.store.sqlite import SQLiteQueue
from tests.queues import any_payload

# --- a model result as rows ------------------------------------------------------------

NODULE: dict[str, Any] = {
    "label": 1,
    "finding": "lung nodule",
    "concept": "lung-nodule",
    "code": {"system": "SCT", "value": "786838002", "meaning": "Nodule of lung"},
    "centre_voxel": [10.0, 12.0, 30.0],
    "centre_mm": [-20.5, 31.0, -100.0],
    "diameter_mm": 8.25,
    "volume_mm3": 294.1,
    "probability": 0.93,
    "referenced_sop_instance_uid": "1.2.3.4",
}
IMAGE_RESULT: dict[str, Any] = {
    "findings": [NODULE],
    "classification": {"nodule_present": True, "probability": 0.93},
    "input": {"kind": "image", "modality": "CT", "study_uid": "1.2.3"},
    "concepts": ["lung-nodule"],
    "model": {"name": "lung-nodules", "version": "0.2.0", "weights_sha256": "ab" * 32},
}
NOTE_NODULE: dict[str, Any] = {
    "finding": "nodule",
    "status": "present",
    "code": "27925004",
    "meaning": "Nodule",
    "concept": "lung-nodule",
    "text_span": [3, 9],
}
NOTE_PNEUMOTHORAX: dict[str, Any] = {
    "finding": "pneumothorax",
    "status": "absent",
    "code": "36118008",
    "meaning": "Pneumothorax",
    "concept": "SCT:36118008",
}
TEXT_RESULT: dict[str, Any] = {
    "findings": [NOTE_NODULE, NOTE_PNEUMOTHORAX],
    "concepts": ["SCT:36118008", "lung-nodule"],
    "model": {"name": "report-findings", "version": "0.1.0", "weights_sha256": "cd" * 32},
}


def test_an_image_finding_keeps_its_code_probability_and_measurements_but_no_uid() -> None:
    record = finding_record(NODULE)
    assert record == FindingRecord(
        finding="lung nodule",
        concept="lung-nodule",
        code_scheme="SCT",
        code_value="786838002",
        code_meaning="Nodule of lung",
        status="present",  # an image model reports what it found
        probability=0.93,
        measurements=(
            Measurement("diameter_mm", 8.25, "mm"),
            Measurement("volume_mm3", 294.1, "mm3"),
        ),
    )
    assert "1.2.3.4" not in repr(record)  # the referenced image's UID is not a column


def test_a_note_finding_has_its_status_and_a_bare_snomed_code() -> None:
    record = finding_record(NOTE_PNEUMOTHORAX)
    assert (record.code_scheme, record.code_value, record.code_meaning) == (
        "SCT",
        "36118008",
        "Pneumothorax",
    )
    assert (record.status, record.probability, record.measurements) == ("absent", None, ())


def test_a_finding_without_concept_is_compared_by_its_code_and_nan_is_no_probability() -> None:
    record = finding_record(
        {
            "finding": "x",
            "code": {"system": "RADLEX", "value": "RID1"},
            "probability": math.nan,
            "size_mm": True,
        }
    )
    assert record.concept == "RADLEX:RID1"
    assert record.probability is None and record.measurements == ()


def test_a_model_run_row_says_what_was_looked_for_and_where_it_came_from() -> None:
    run = model_run(
        IMAGE_RESULT,
        run_id="r",
        kind="dicom",
        subject="sk",
        model="lung-nodules",
        inferred_at=50.0,
        study_key="sk",
        accession_ref="ar",
        body_part="CHEST",
        received_at=10.0,
        complete_at=20.0,
        route="chest-ct",
    )
    assert (run.model_version, run.weights_sha256, run.modality) == ("0.2.0", "ab" * 32, "CT")
    assert run.concepts == ("lung-nodule",) and run.positive
    empty = model_run(
        {**IMAGE_RESULT, "findings": []},
        run_id="e",
        kind="dicom",
        subject="sk",
        model="lung-nodules",
        inferred_at=60.0,
    )
    assert empty.concepts == ("lung-nodule",) and not empty.positive


# --- concordance ----------------------------------------------------------------------


def _image(study: str, found: bool, *, at: float = 100.0, version: str = "0.2.0") -> ModelRun:
    result = IMAGE_RESULT if found else {**IMAGE_RESULT, "findings": []}
    run = model_run(
        result,
        run_id=f"i-{study}-{at}",
        kind="dicom",
        subject=study,
        model="lung-nodules",
        inferred_at=at,
        study_key=study,
    )
    return replace(run, model_version=version)


def _report(
    study: str | None, nodule: str | None, *, status: str = "F", at: float = 200.0
) -> ModelRun:
    findings = [NOTE_PNEUMOTHORAX]
    if nodule is not None:
        findings.append({**NOTE_NODULE, "status": nodule})
    return model_run(
        {**TEXT_RESULT, "findings": findings},
        run_id=f"t-{study}-{at}",
        kind="hl7",
        subject=f"msg-{study}-{at}",
        model="report-findings",
        inferred_at=at,
        study_key=study,
        report_status=status,
    )


def test_outcomes_of_the_two_by_two_table() -> None:
    assert outcome("present", "present") == "agree"
    assert outcome("absent", "absent") == "agree"
    assert outcome("present", "absent") == "ai-only"
    assert outcome("absent", "present") == "report-only"
    assert outcome("uncertain", "present") == "indeterminate"
    assert outcome("absent", "uncertain") == "indeterminate"


def test_each_study_is_compared_with_its_final_report_on_the_concepts_both_models_read() -> None:
    runs = [
        *(_image("s1", True), _report("s1", "present")),  # agree, positive
        *(_image("s2", False), _report("s2", None)),  # agree, negative (not mentioned)
        *(_image("s3", True, at=110.0), _report("s3", "absent", at=210.0)),  # AI only
        *(_image("s4", False, at=120.0), _report("s4", "present", at=220.0)),  # report only
        *(_image("s5", False), _report("s5", "uncertain")),  # indeterminate
        *(_image("s6", True), _report("s6", "present", status="P")),  # preliminary: left out
        _image("s7", True),  # no report yet
        _report(None, "present"),  # a report of no stored study
    ]
    comparisons = compare(runs)
    got = {(c.study_key, c.outcome, c.reported_mention) for c in comparisons}
    assert got == {
        ("s1", "agree", True),
        ("s2", "agree", False),
        ("s3", "ai-only", True),
        ("s4", "report-only", True),
        ("s5", "indeterminate", True),
    }
    # pneumothorax: the note model reads it, but no image model looks for it
    assert {c.concept for c in comparisons} == {"lung-nodule"}
    (summary,) = summarise(comparisons)
    table = (
        summary.true_positive,
        summary.false_positive,
        summary.false_negative,
        summary.true_negative,
        summary.indeterminate,
        summary.studies,
    )
    assert table == (1, 1, 1, 1, 1, 5)
    assert summary.sensitivity.value == 0.5 and summary.ppv.value == 0.5
    assert summary.agreement.value == 0.5
    assert [c.study_key for c in discordant(comparisons)] == ["s4", "s3"]  # newest report first


def test_the_newest_image_run_and_the_newest_final_report_count() -> None:
    runs = [
        _image("s1", False, at=100.0),
        _image("s1", True, at=150.0),  # run again after a late instance
        _report("s1", "absent", at=200.0),
        _report("s1", "present", status="C", at=300.0),  # a corrected final report
    ]
    (c,) = compare(runs)
    assert (c.ai, c.report, c.outcome) == ("present", "present", "agree")


def test_a_report_read_before_its_study_arrived_is_matched_by_accession() -> None:
    image = replace(_image("s1", True), accession_ref="acc-1")
    early = replace(_report(None, "present", at=50.0), accession_ref="acc-1")
    other = replace(_report(None, "absent", at=60.0), accession_ref="acc-2")
    (c,) = compare([early, other, image])
    assert (c.study_key, c.outcome) == ("s1", "agree")


def test_each_model_version_has_its_own_concordance() -> None:
    runs = [
        *(_image("a", True, version="0.1.0"), _report("a", "absent")),
        *(_image("b", True, version="0.2.0"), _report("b", "present")),
    ]
    by_version = {s.image_version: s.ppv.value for s in summarise(compare(runs))}
    assert by_version == {"0.1.0": 0.0, "0.2.0": 1.0}


def test_wilson_interval_matches_the_textbook_values() -> None:
    i = wilson(8, 10)
    assert i.value == 0.8
    assert i.low == pytest.approx(0.4902, abs=1e-4)
    assert i.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0).value is None
    assert wilson(0, 5).low == 0.0 and wilson(5, 5).high == pytest.approx(1.0)


# --- statistics -----------------------------------------------------------------------


def test_prevalence_by_month_version_and_modality_and_probability_histograms() -> None:
    jan, feb = 1_704_067_200.0, 1_706_745_600.0  # 2024-01-01, 2024-02-01 UTC
    runs = [
        _image("a", True, at=jan),
        _image("b", False, at=jan + 10),
        _image("c", True, at=feb, version="0.3.0"),
    ]
    rates = [(p.month, p.version, p.modality, p.runs, p.positive, p.rate) for p in prevalence(runs)]
    assert rates == [("2024-01", "0.2.0", "CT", 2, 1, 0.5), ("2024-02", "0.3.0", "CT", 1, 1, 1.0)]
    hist = {h.version: h.counts for h in histograms(runs)}
    assert hist["0.2.0"][9] == 1 and sum(hist["0.2.0"]) == 1  # p = 0.93: the last bin
    zero = replace(runs[0], findings=(replace(runs[0].findings[0], probability=0.0),))
    assert histograms([zero])[0].counts[0] == 1


# --- the command --------------------------------------------------------------------------


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "gateway: {data_dir: var}\n"
        "dicom: {allowed_callers: [{ae_title: PACS, hosts: [127.0.0.1]}]}\n"
        "hl7: {allowed_senders: [{application: EHR, facility: HOSP, hosts: [127.0.0.1]}]}\n"
    )
    return cfg


def _fill(cfg: Path, runs: list[ModelRun]) -> None:
    queue = SQLiteQueue(cfg.parent / "var" / "queue.sqlite3")
    try:
        for run in runs:
            queue.enqueue(Stage.INFER, f"{run.model}|{run.subject}", 1.0, any_payload(Stage.INFER))
            job = queue.lease([Stage.INFER], "w", 30, now=10.0)
            assert job is not None
            queue.complete(job, now=11.0, run=run)
    finally:
        queue.close()


RUNS = [
    _image("s1", True, at=1_704_067_200.0),
    _report("s1", "present", at=1_704_067_300.0),
    _image("s3", True, at=1_704_067_400.0),
    _report("s3", "absent", at=1_704_067_500.0),
    _image("s2", False, at=1_706_745_600.0),
]


def test_query_lists_one_row_per_finding_and_a_run_that_found_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    _fill(cfg, RUNS)
    assert main(["findings", "query", "-c", str(cfg), "--model", "lung-nodules", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["study_key"], r["finding"], r["status"]) for r in rows] == [
        ("s1", "lung nodule", "present"),
        ("s3", "lung nodule", "present"),
        ("s2", None, None),
    ]
    assert rows[0]["measurements"] == {"diameter_mm": [8.25, "mm"], "volume_mm3": [294.1, "mm3"]}
    assert rows[0]["inferred_at"] == "2024-01-01T00:00:00Z"
    args = ["findings", "query", "-c", str(cfg), "--status", "absent", "--code", "lung-nodule"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "report-findings" in out and "1 rows from 1 model runs" in out
    assert main(["findings", "query", "-c", str(cfg), "--since", "2024-02-01"]) == 0
    assert "(none found)" in capsys.readouterr().out


def test_stats_shows_rates_histograms_concordance_and_the_discordant_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    _fill(cfg, RUNS)
    assert main(["findings", "stats", "-c", str(cfg), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    (conc,) = figures["concordance"]
    assert (conc["true_positive"], conc["false_positive"], conc["studies"]) == (1, 1, 2)
    assert conc["ppv"]["value"] == 0.5
    assert [d["study_key"] for d in figures["discordant"]] == ["s3"]
    assert figures["histograms"][0]["counts"][9] == 2
    assert main(["findings", "stats", "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "lung-nodules 0.2.0 on lung-nodule: 2 studies" in text
    assert "PPV 50% [" in text and "s3" in text


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_writes_every_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    cfg = _config(tmp_path)
    _fill(cfg, RUNS)
    target = tmp_path / f"findings.{fmt}"
    assert main(["findings", "export", "-c", str(cfg), "--format", fmt, str(target)]) == 0
    # 1 + 2 + 1 + 2 findings, and the run of s2 that found nothing
    assert "wrote 7 rows (5 model runs)" in capsys.readouterr().out
    if fmt == "csv":
        with target.open(newline="") as f:
            rows: list[dict[str, Any]] = list(csv.DictReader(f))
    else:
        rows = pq.read_table(target).to_pylist()
    assert len(rows) == 7
    assert {r["model"] for r in rows} == {"lung-nodules", "report-findings"}
    assert json.loads(rows[0]["measurements"])["diameter_mm"] == [8.25, "mm"]


def test_a_bad_date_is_refused_with_what_to_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["findings", "query", "-c", str(_config(tmp_path)), "--since", "last week"])
    assert "use YYYY-MM-DD" in capsys.readouterr().err
