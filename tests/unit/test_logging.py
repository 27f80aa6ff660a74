"""PHI redaction: the processor as a plain function, then the whole configured chain."""

from __future__ import annotations

import datetime as dt
import enum
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom import Dataset

from gateway.observability.logging import REDACTED, configure_logging, redact_phi, redact_text


def redact(**fields: Any) -> dict[str, Any]:
    return dict(redact_phi(None, "info", {"event": "test.event", **fields}))


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "PatientName",
        "patientname",
        "PATIENTID",
        "patient_id",
        "AccessionNumber",
        "accession_number",
        "StudyInstanceUID",
        "mrn",
        "dob",
        "text",
        "report",
        "payload",
        "dataset",
        "control_id",
    ],
)
def test_phi_keys_are_redacted_whatever_their_case(key: str) -> None:
    assert redact(**{key: "MRN-0042"})[key] == REDACTED


def test_phi_key_with_a_non_string_value_is_still_redacted() -> None:
    assert redact(PatientID=12345, report={"findings": ["nodule"]}) == {
        "event": "test.event",
        "PatientID": REDACTED,
        "report": REDACTED,
    }


def test_event_name_is_kept_although_it_is_not_a_phi_key() -> None:
    assert redact()["event"] == "test.event"


# --- values -------------------------------------------------------------------------------


def test_dicom_person_name_inside_another_value_is_scrubbed() -> None:
    out = redact(error="cannot store instance for DOE^JANE: disk full")
    assert out["error"] == f"cannot store instance for {REDACTED}: disk full"


def test_person_name_with_middle_name_and_suffix_is_scrubbed_whole() -> None:
    assert redact_text("x O'BRIEN^MARY-ANN^Q^^JR y") == f"x {REDACTED} y"


def test_mixed_case_person_name_is_scrubbed() -> None:
    assert redact_text("from Doe^Jane") == f"from {REDACTED}"


def test_person_name_with_an_initial_as_given_name_is_scrubbed() -> None:
    assert redact_text("failed for SMITH^J") == f"failed for {REDACTED}"


def test_hl7_message_types_are_not_mistaken_for_person_names() -> None:
    text = "routed ORU^R01^ORU_R01 and ADT^A08, acked ACK^R01"
    assert redact_text(text) == text


def test_hl7_pid_segment_text_is_scrubbed_to_the_end_of_the_segment() -> None:
    raw = "parse error in MSH|^~\\&|EHR|HOSP\rPID|1||MRN1^^^HOSP||SMITH^J||19700101|F\rPV1|1|I"
    assert redact_text(raw) == f"parse error in MSH|^~\\&|EHR|HOSP\r{REDACTED}\r{REDACTED}"


def test_obx_and_nte_segments_are_scrubbed() -> None:
    assert redact_text("OBX|1|TX|||Nodule 8 mm") == REDACTED
    assert redact_text("NTE|1||called Dr at home") == REDACTED


def test_dicom_date_is_scrubbed() -> None:
    assert redact(detail="born 19700101, seen 20240229")["detail"] == (
        f"born {REDACTED}, seen {REDACTED}"
    )


def test_digit_runs_that_are_not_calendar_dates_pass() -> None:
    assert redact_text("size 19701301 and 20241232 and 123456789") == (
        "size 19701301 and 20241232 and 123456789"
    )


def test_dataset_bytes_and_other_rich_objects_are_replaced_by_their_type_name() -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    out = redact(
        ds=ds,
        element=ds["PatientName"],
        blob=b"DOE^JANE",
        buf=bytearray(b"DOE^JANE"),
        names={"DOE^JANE"},
    )
    assert out == {
        "event": "test.event",
        "ds": "<Dataset>",
        "element": "<DataElement>",
        "blob": "<bytes>",
        "buf": "<bytearray>",
        "names": "<set>",
    }


def test_nested_dicts_and_lists_are_cleaned() -> None:
    out = redact(
        context={
            "peer": "PACS",
            "tags": [{"PatientID": "123"}, "for DOE^JANE", 7],
            "when": ("19991231", 3),
        }
    )
    assert out["context"] == {
        "peer": "PACS",
        "tags": [{"PatientID": REDACTED}, f"for {REDACTED}", 7],
        "when": [REDACTED, 3],
    }


def test_nesting_deeper_than_three_levels_is_not_rendered() -> None:
    assert redact(deep=[[[["DOE^JANE"]]]])["deep"] == [[["<list>"]]]


class Color(enum.Enum):
    RED = "red"


def test_safe_values_pass_unchanged() -> None:
    fields: dict[str, Any] = {
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "missing": None,
        "envelope_id": "0123456789abcdef20240101abcdef01",
        "calling_ae": "PACS",
        "status": "A700",
        "dedup": "9f86d081884c7d659a2feaa0c55ad015",
    }
    assert redact(**fields) == {"event": "test.event", **fields}


def test_paths_enums_and_datetimes_are_rendered_as_text() -> None:
    out = redact(
        file=Path("/var/spool/x.blob"),
        color=Color.RED,
        at=dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
    )
    assert (out["file"], out["color"], out["at"]) == (
        "/var/spool/x.blob",
        "red",
        "2024-05-01T12:00:00+00:00",
    )


# --- through the configured chain ---------------------------------------------------------


_LEVELS = ("", "pynetdicom", "hl7apy", "pydicom", "py.warnings")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    saved_levels = {name: logging.getLogger(name).level for name in _LEVELS}
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers[:] = saved_handlers
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


PHI = ("DOE^JANE", "MRN0042", "19700101", "ACC-77")


def assert_no_phi(stream: io.StringIO) -> None:
    text = stream.getvalue()
    for value in PHI:
        assert value not in text


def test_structlog_lines_are_json_without_phi(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("gateway.test")
    log.info(
        "dicom.instance.stored",
        envelope_id="e1",
        PatientName="DOE^JANE",
        patient_id="MRN0042",
        AccessionNumber="ACC-77",
        detail="born 19700101",
    )
    assert_no_phi(log_stream)
    (line,) = lines(log_stream)
    assert line["event"] == "dicom.instance.stored"
    assert line["envelope_id"] == "e1"
    assert (line["PatientName"], line["patient_id"], line["AccessionNumber"]) == (REDACTED,) * 3
    assert line["detail"] == f"born {REDACTED}"
    assert (line["level"], line["logger"]) == ("info", "gateway.test")
    assert line["timestamp"].endswith("Z")


def test_library_log_records_go_through_the_same_redaction(log_stream: io.StringIO) -> None:
    logging.getLogger("pynetdicom").warning(
        "association from %s rejected for DOE^JANE born 19700101", "PACS"
    )
    assert_no_phi(log_stream)
    (line,) = lines(log_stream)
    assert line["event"] == f"association from PACS rejected for {REDACTED} born {REDACTED}"
    assert (line["level"], line["logger"]) == ("warning", "pynetdicom")


def test_pynetdicom_info_lines_are_dropped(log_stream: io.StringIO) -> None:
    logging.getLogger("pynetdicom").info("Received Store Request: DOE^JANE")
    assert log_stream.getvalue() == ""


def test_exception_tracebacks_are_scrubbed(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("gateway.test")
    try:
        raise ValueError("bad PN DOE^JANE in PID|1||MRN0042||DOE^JANE")
    except ValueError:
        log.exception("hl7.message.failed")
    assert_no_phi(log_stream)
    (line,) = lines(log_stream)
    assert "ValueError: bad PN [redacted] in [redacted]" in line["exception"]


def test_a_dataset_logged_by_mistake_is_never_rendered(log_stream: io.StringIO) -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN0042"
    structlog.get_logger("gateway.test").warning("oops", obj=ds, raw_bytes=b"MRN0042")
    assert_no_phi(log_stream)
    (line,) = lines(log_stream)
    assert (line["obj"], line["raw_bytes"]) == ("<Dataset>", "<bytes>")
