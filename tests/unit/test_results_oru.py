"""The pure ORU^R01 builder: model results -> HL7 v2.5 result messages."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator
from pydicom import Dataset

from gateway.errors import Permanent
from gateway.hl7.message import Separators
from gateway.hl7.message import unescape as decode_escapes
from gateway.results.oru import ResultInvalid, build_oru, control_id, validate

NOW = datetime(2026, 11, 25, 10, 20, 0, tzinfo=UTC)
STAMP = "20261125102000+0000"
NOTE = "(AI, preliminary, not reviewed)"

SOURCE_ORU = (
    b"MSH|^~\\&|EHR|HOSP|AI_GATEWAY|AI|20261125101500||ORU^R01^ORU_R01|MSG0001|P|2.5.1\r"
    b"PID|7||12345^^^HOSP^MR~99^^^NHS||O\\T\\BRIEN^JANE^^^MS||19700101|F\r"
    b"PV1|1|O|RAD^^^HOSP\r"
    b"ORC|RE|PLC1|ACC1\r"
    b"OBR|1|PLC1|ACC1|71250^CT CHEST^CPT|||20261125100000\r"
    b"OBX|1|TX|18782-3^Study observation^LN||No pneumothorax. Small right pleural effusion."
    b"~Possible RLL consolidation.||||||F\r"
)

MODEL = {
    "name": "lung-nodules",
    "bundle": "lung_nodules",
    "version": "0.1.0",
    "weights_sha256": "c17d8f8d",
}
TEXT_MODEL = {
    "name": "report-findings",
    "bundle": "report_findings",
    "version": "0.1.0",
    "weights_sha256": "463292a1",
}
NODULE = {"system": "SCT", "value": "786838002", "meaning": "Nodule of lung"}


def image_result(**changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": dict(MODEL),
        "input": {
            "kind": "image",
            "study_uid": "1.2.3",
            "series_uid": "1.2.3.4",
            "modality": "CT",
            "sop_instance_uids": ["1.2.3.4.5"],
        },
        "findings": [
            {
                "label": 1,
                "finding": "lung nodule",
                "code": dict(NODULE),
                "centre_mm": [-54.8, -25.0, 60.2],
                "diameter_mm": 13.380709465989323,
                "volume_mm3": 1254.3999999999999,
                "probability": 0.9812,
                "referenced_sop_instance_uid": "1.2.3.4.5",
            },
            {
                "label": 2,
                "finding": "lung nodule",
                "code": dict(NODULE),
                "centre_mm": [10.0, 20.0, 30.0],
                "diameter_mm": 6.04,
                "volume_mm3": 98.5,
                "probability": None,
                "referenced_sop_instance_uid": "1.2.3.4.5",
            },
        ],
        "classification": {
            "finding": "lung nodule present",
            "code": dict(NODULE),
            "nodule_present": True,
            "probability": 0.976,
        },
    }
    result.update(changes)
    return result


def text_result(**changes: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model": dict(TEXT_MODEL),
        "input": {"kind": "text", "characters": 74},
        "classification": None,
        "findings": [
            {
                "finding": "pneumothorax",
                "status": "absent",
                "code": "36118008",
                "meaning": "Pneumothorax",
                "text": "pneumothorax",
                "sentence": 0,
            },
            {
                "finding": "pleural_effusion",
                "status": "present",
                "code": "60046008",
                "meaning": "Pleural effusion",
                "text": "pleural effusion",
                "sentence": 1,
            },
            {
                "finding": "consolidation",
                "status": "uncertain",
                "code": "95436008",
                "meaning": "Lung consolidation",
                "text": "consolidation",
                "sentence": 2,
            },
        ],
    }
    result.update(changes)
    return result


def ct_header(**changes: Any) -> Dataset:
    ds = Dataset()
    ds.PatientID = "PID0042"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientName = "DOE^JOHN^Q"
    ds.PatientBirthDate = "19610203"
    ds.PatientSex = "M"
    ds.AccessionNumber = "ACC777"
    ds.StudyInstanceUID = "1.2.3"
    ds.StudyDate = "20261124"
    ds.StudyTime = "093015.250"
    ds.StudyDescription = "CT THORAX W/O"
    ds.Modality = "CT"
    item = Dataset()
    item.CodeValue = "24627-2"
    item.CodingSchemeDesignator = "LN"
    item.CodeMeaning = "CT Chest"
    ds.ProcedureCodeSequence = [item]
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def oru(result: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    if "source_message" not in kwargs and "source_dicom" not in kwargs:
        kwargs["source_dicom"] = ct_header()
    kwargs.setdefault("subject_key", "1.2.3")
    return build_oru(result or image_result(), now=NOW, **kwargs)


def segments(message: bytes) -> list[list[str]]:
    assert message.endswith(b"\r") and b"\n" not in message
    return [s.split("|") for s in message.decode("utf-8").split("\r") if s]


def segment(message: bytes, segment_id: str) -> list[str]:
    (found,) = [s for s in segments(message) if s[0] == segment_id]
    return found


def obx(message: bytes) -> list[list[str]]:
    return [s for s in segments(message) if s[0] == "OBX"]


def field(fields: list[str], number: int) -> str:
    return fields[number] if number < len(fields) else ""


def strict(message: bytes) -> Any:
    parsed = parse_message(
        message.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
    )
    assert Validator.validate(parsed)
    return parsed


# --- validity --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [image_result, text_result])
@pytest.mark.parametrize("source", ["oru", "dicom", "both"])
def test_the_message_validates_strict_for_each_result_and_source_kind(
    make: Any, source: str
) -> None:
    kwargs: dict[str, Any] = {}
    if source in ("oru", "both"):
        kwargs["source_message"] = SOURCE_ORU
    if source in ("dicom", "both"):
        kwargs["source_dicom"] = ct_header()
    message = oru(make(), **kwargs)
    parsed = strict(message)
    assert parsed.name == "ORU_R01"
    assert parsed.msh.msh_12.to_er7() == "2.5"
    assert str(hl7.parse(message.decode("utf-8")).segment("MSH")[9]) == "ORU^R01^ORU_R01"


def test_the_header_names_sender_receiver_time_type_and_charset() -> None:
    message = oru(sending=("AI_GW", "RADAI"), receiving=("EPIC", "MAIN"))
    msh = segment(message, "MSH")
    assert msh[:12] == [
        "MSH",
        "^~\\&",
        "AI_GW",
        "RADAI",
        "EPIC",
        "MAIN",
        STAMP,
        "",
        "ORU^R01^ORU_R01",
        control_id("1.2.3", "lung-nodules", "0.1.0"),
        "P",
        "2.5",
    ]
    assert field(msh, 17) == "UNICODE UTF-8"
    assert field(msh, 14) == field(msh, 15) == ""  # original acknowledgement mode


def test_msh_10_is_stable_across_retries_and_differs_per_subject_model_and_version() -> None:
    first = segment(oru(), "MSH")[9]
    assert segment(oru(), "MSH")[9] == first
    assert len(first) <= 20
    other_version = image_result(model={**MODEL, "version": "0.2.0"})
    other_model = image_result(model={**MODEL, "name": "lung-nodules-xl"})
    assert segment(oru(other_version), "MSH")[9] != first
    assert segment(oru(other_model), "MSH")[9] != first
    assert segment(oru(subject_key="1.2.4"), "MSH")[9] != first
    # what the result says, or when it is sent, does not change the identity
    later = build_oru(
        image_result(findings=[]),
        source_dicom=ct_header(),
        subject_key="1.2.3",
        now=datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert segment(later, "MSH")[9] == first


# --- patient ---------------------------------------------------------------------------


def test_pid_and_pv1_are_copied_from_the_source_message_with_their_escapes() -> None:
    message = oru(text_result(), source_message=SOURCE_ORU)
    pid = segment(message, "PID")
    assert "|".join(pid) == "PID|1||12345^^^HOSP^MR~99^^^NHS||O\\T\\BRIEN^JANE^^^MS||19700101|F"
    assert "|".join(segment(message, "PV1")) == "PV1|1|O|RAD^^^HOSP"
    parsed = hl7.parse(message.decode("utf-8"))
    assert parsed.unescape(str(parsed.segment("PID")[5][0][0])) == "O&BRIEN"
    seps = Separators()
    hl7apy_pid = strict(message).oru_r01_patient_result.oru_r01_patient.pid
    assert decode_escapes(hl7apy_pid.pid_5.pid_5_1.to_er7(), seps) == "O&BRIEN"


def test_a_source_with_other_separators_and_hex_escapes_is_re_encoded() -> None:
    source = (
        "MSH|#~\\&|EHR|HOSP|AI_GATEWAY|AI|20261125101500||ORU#R01|M2|P|2.5||||||8859/1\r"
        "PID|1||77#^^HOSP||M\\XFC\\LLER A^B#ANNA||19800101|F\r"
        "OBR|1|P2|A2|71250#CT CHEST#CPT\r"
    ).encode("latin-1")
    message = oru(text_result(), source_message=source)
    pid = segment(message, "PID")
    assert pid[3] == "77^\\S\\\\S\\HOSP"  # the literal ^^ of the source, escaped for us
    assert pid[5] == "MüLLER A\\S\\B^ANNA"  # \XFC\ in the source's 8859/1, a literal ^
    assert segment(message, "OBR")[4] == "71250^CT CHEST^CPT"
    strict(message)


def test_fields_v2_5_does_not_define_are_left_out_of_a_copied_pid() -> None:
    source = SOURCE_ORU.replace(b"19700101|F", b"19700101|F" + b"|" * 31 + b"x|y")
    pid = segment(oru(text_result(), source_message=source), "PID")
    assert len(pid) == 40 and pid[39] == "x"  # PID-39 kept, PID-40 (v2.7) left out


def test_pid_is_built_from_the_dicom_patient_module() -> None:
    message = oru(source_dicom=ct_header())
    pid = segment(message, "PID")
    assert pid == ["PID", "1", "", "PID0042^^^HOSP", "", "DOE^JOHN^Q", "", "19610203", "M"]
    assert not [s for s in segments(message) if s[0] == "PV1"]  # the visit group is optional


def test_dicom_name_prefix_and_suffix_take_their_xpn_places() -> None:
    header = ct_header(PatientName="O'NEIL&SMITH^MARY^ANN^DR^JR", PatientSex="X")
    issuer = Dataset()
    issuer.UniversalEntityID = "1.2.826.0.1"
    issuer.UniversalEntityIDType = "ISO"
    issuer.IdentifierTypeCode = "MR"
    header.IssuerOfPatientIDQualifiersSequence = [issuer]
    pid = segment(oru(source_dicom=header), "PID")
    assert pid[3] == "PID0042^^^HOSP&1.2.826.0.1&ISO^MR"
    assert pid[5] == "O'NEIL\\T\\SMITH^MARY^ANN^JR^DR"  # XPN: family^given^middle^suffix^prefix
    assert pid[8] == "U"


def test_a_dicom_source_without_patient_id_or_name_is_refused() -> None:
    with pytest.raises(ResultInvalid, match="PatientID"):
        oru(source_dicom=ct_header(PatientID=None))
    with pytest.raises(ResultInvalid, match="PatientName"):
        oru(source_dicom=ct_header(PatientName=""))


def test_no_patient_source_is_refused_as_permanent() -> None:
    with pytest.raises(ResultInvalid, match="no patient") as info:
        build_oru(image_result(), subject_key="x", now=NOW)
    assert isinstance(info.value, Permanent)
    no_pid = b"MSH|^~\\&|EHR|HOSP|AI|AI|2026||ORU^R01|M|P|2.5\rOBR|1|A|B|X^Y^L\r"
    with pytest.raises(ResultInvalid, match="no patient"):
        build_oru(text_result(), source_message=no_pid, subject_key="x", now=NOW)


# --- order -----------------------------------------------------------------------------


def test_order_from_dicom_accession_procedure_and_study_time() -> None:
    message = oru(source_dicom=ct_header(TimezoneOffsetFromUTC="+0100"))
    orc, obr = segment(message, "ORC"), segment(message, "OBR")
    assert orc == ["ORC", "RE", "", "ACC777"]
    assert obr[1:5] == ["1", "", "ACC777", "24627-2^CT Chest^LN"]
    assert obr[7] == "20261124093015+0100"
    assert obr[22] == STAMP
    assert obr[24] == "CT"
    assert obr[25] == "P"


def test_obr_4_falls_back_to_the_study_description_then_the_modality() -> None:
    described = oru(source_dicom=ct_header(ProcedureCodeSequence=None))
    assert segment(described, "OBR")[4] == "^CT THORAX W/O"
    bare = oru(source_dicom=ct_header(ProcedureCodeSequence=None, StudyDescription=None))
    assert segment(bare, "OBR")[4] == "25045-6^CT unspecified body region^LN"
    strict(bare)


def test_order_is_copied_from_the_source_message() -> None:
    message = oru(text_result(), source_message=SOURCE_ORU)
    assert segment(message, "ORC") == ["ORC", "RE", "PLC1", "ACC1"]
    obr = segment(message, "OBR")
    assert obr[1:5] == ["1", "PLC1", "ACC1", "71250^CT CHEST^CPT"]
    assert obr[7] == "20261125100000"
    assert obr[22] == STAMP and obr[25] == "P"


# --- observations ----------------------------------------------------------------------


@pytest.mark.parametrize("make", [image_result, text_result])
def test_every_obx_is_preliminary_timed_now_and_names_the_model(make: Any) -> None:
    result = make()
    rows = obx(oru(result))
    assert [r[1] for r in rows] == [str(n) for n in range(1, len(rows) + 1)]
    equipment = f"{result['model']['name']}^{result['model']['version']}"
    for row in rows:
        assert row[11] == "P"
        assert row[14] == STAMP
        assert row[18] == equipment


def test_text_findings_are_coded_present_absent_or_undetermined_in_snomed_ct() -> None:
    rows = obx(oru(text_result(), source_message=SOURCE_ORU))
    coded = [(r[3], r[4], r[5]) for r in rows if r[2] == "CE"]
    assert coded == [
        ("36118008^Pneumothorax^SCT", "1", "272519000^Absent^SCT"),
        ("60046008^Pleural effusion^SCT", "2", "52101004^Present^SCT"),
        ("95436008^Lung consolidation^SCT", "3", "373068000^Undetermined^SCT"),
    ]


def test_the_note_model_gives_one_obx_per_concept_of_a_sectioned_report() -> None:
    from models.report_findings.engine import load

    report = (
        "CLINICAL HISTORY: Rule out pneumothorax. Evaluate for pulmonary embolism.\n"
        "FINDINGS: Small right pleural effusion. No pneumothorax.\n"
        "IMPRESSION: Small right pleural effusion. No pneumothorax."
    )
    message = oru(text_result(findings=load()(report)), source_message=SOURCE_ORU)
    strict(message)
    coded = [(r[3], r[4], r[5]) for r in obx(message) if r[2] == "CE"]
    # once each, with the impression's status; nothing from the history
    assert coded == [
        ("60046008^Pleural effusion^SCT", "1", "52101004^Present^SCT"),
        ("36118008^Pneumothorax^SCT", "2", "272519000^Absent^SCT"),
    ]


def test_image_findings_are_coded_with_their_measurements_in_ucum() -> None:
    rows = obx(oru())
    body = [(r[2], r[3], r[4], r[5], field(r, 6)) for r in rows[1:]]
    assert body == [
        ("CE", "786838002^Nodule of lung^SCT", "1", "52101004^Present^SCT", ""),
        ("NM", "81827009^Diameter^SCT", "1", "13.4", "mm^millimeter^UCUM"),
        ("NM", "118565006^Volume^SCT", "1", "1254", "mm3^cubic millimeter^UCUM"),
        ("NM", "122157^Probability^DCM", "1", "0.98", "1^no units^UCUM"),
        ("CE", "786838002^Nodule of lung^SCT", "2", "52101004^Present^SCT", ""),
        ("NM", "81827009^Diameter^SCT", "2", "6.0", "mm^millimeter^UCUM"),
        ("NM", "118565006^Volume^SCT", "2", "99", "mm3^cubic millimeter^UCUM"),
        # the study classification: its own sub-ID, after the findings
        ("CE", "786838002^Nodule of lung^SCT", "3", "52101004^Present^SCT", ""),
        ("NM", "122157^Probability^DCM", "3", "0.98", "1^no units^UCUM"),
    ]


def test_a_tx_summary_comes_first_with_one_line_per_finding() -> None:
    summary = obx(oru())[0]
    assert summary[2:5] == ["TX", "AISUMMARY^AI findings summary^99AIGW", ""]
    assert summary[5].split("~") == [
        f"lung nodule: 13.4 mm, 1254 mm3, p=0.98 {NOTE}",
        f"lung nodule: 6.0 mm, 99 mm3 {NOTE}",
        f"lung nodule present: yes, p=0.98 {NOTE}",
    ]
    text = obx(oru(text_result(), source_message=SOURCE_ORU))[0][5]
    assert text.split("~") == [
        f"pneumothorax: absent {NOTE}",
        f"pleural effusion: present {NOTE}",
        f"consolidation: uncertain {NOTE}",
    ]


def test_no_findings_says_so_and_keeps_the_classification() -> None:
    result = image_result(
        findings=[],
        classification={
            "finding": "lung nodule present",
            "code": dict(NODULE),
            "nodule_present": False,
            "probability": 0.0312,
        },
    )
    message = oru(result)
    rows = obx(message)
    assert rows[0][2] == "TX"
    assert rows[0][5].split("~") == [
        f"No findings were detected by lung-nodules 0.1.0 {NOTE}.",
        f"lung nodule present: no, p=0.03 {NOTE}",
    ]
    assert [(r[2], r[4], r[5]) for r in rows[1:]] == [
        ("CE", "1", "272519000^Absent^SCT"),
        ("NM", "1", "0.03"),
    ]
    strict(message)
    only_text = obx(oru(text_result(findings=[]), source_message=SOURCE_ORU))
    assert [r[2] for r in only_text] == ["TX"]


def test_separators_in_values_are_escaped_and_read_back_unchanged() -> None:
    name = "a|b^c&d~e\\f"
    result = text_result(
        findings=[{"finding": name, "status": "present", "code": "60046008", "meaning": name}]
    )
    message = oru(result, source_message=SOURCE_ORU)
    escaped = "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    rows = obx(message)
    assert rows[1][3] == f"60046008^{escaped}^SCT"
    assert rows[0][5] == f"{escaped}: present {NOTE}"
    # python-hl7 reads the text back
    parsed = hl7.parse(message.decode("utf-8"))
    ce = parsed.segments("OBX")[1]
    assert parsed.unescape(str(ce[3][0][1])) == name
    assert parsed.unescape(str(parsed.segments("OBX")[0][5])) == f"{name}: present {NOTE}"
    # hl7apy keeps values escaped; decoding them gives the text back
    observation = strict(message).oru_r01_patient_result.oru_r01_order_observation
    obx_2 = observation.oru_r01_observation[1].obx
    assert decode_escapes(obx_2.obx_3.obx_3_2.to_er7(), Separators()) == name


def test_non_ascii_text_is_sent_as_utf_8() -> None:
    result = image_result()
    result["findings"][0]["finding"] = "nódulo pulmonar"
    message = oru(result, source_dicom=ct_header(PatientName="MÜLLER^JÖRG"))
    assert "nódulo pulmonar: 13.4 mm" in message.decode("utf-8")
    assert segment(message, "PID")[5] == "MÜLLER^JÖRG"
    strict(message)


def test_a_long_summary_line_is_wrapped_within_the_limits() -> None:
    result = text_result()
    result["findings"][0]["finding"] = "very long finding name " * 20
    message = oru(result, source_message=SOURCE_ORU)
    lines = obx(message)[0][5].split("~")
    assert len(lines) > 3 and all(len(line) <= 199 for line in lines)
    strict(message)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.update(model={"name": "x"}), "name and a version"),
        (lambda r: r["findings"][0].update(status="maybe"), "status must be one of"),
        (lambda r: r["findings"][0].update(code=None), "finding 1 has no code"),
        (lambda r: r["findings"][0].update(diameter_mm=float("nan")), "not finite"),
        (lambda r: r["findings"][0].update(volume_mm3="big"), "not a number"),
        (lambda r: r["classification"].pop("nodule_present"), "neither present nor absent"),
    ],
)
def test_a_malformed_result_is_refused_with_a_reason(change: Any, reason: str) -> None:
    result = copy.deepcopy(image_result())
    result["findings"][0]["status"] = "present"
    change(result)
    with pytest.raises(ResultInvalid, match=reason):
        oru(result)


def test_validate_rejects_what_hl7apy_lets_through() -> None:
    good = oru().decode("utf-8")
    validate(good)
    nan = good.replace("|13.4|", "|nan|")
    with pytest.raises(ResultInvalid, match="not an HL7 NM number"):
        validate(nan)
    status = good.replace("||P|||" + STAMP, "||Q|||" + STAMP, 1)
    with pytest.raises(ResultInvalid, match="HL70085"):
        validate(status)
    lines = good.split("\r")
    reordered = "\r".join([lines[0], lines[1], lines[4], lines[2], lines[3], *lines[5:]])
    with pytest.raises(ResultInvalid, match="out of order"):
        validate(reordered)
    no_status = "\r".join(
        "|".join(s.split("|")[:11]) if s.startswith("OBX|2|") else s for s in lines
    )
    with pytest.raises(ResultInvalid, match="OBX_11"):
        validate(no_status)
