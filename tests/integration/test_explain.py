"""`gateway explain` as a user runs it: a subprocess on generated DICOM studies and
hand-written HL7 files, against a config with the routes of the interface example."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicomgen import SeriesSpec, make_study
from tests.hl7msgs import oru_r01

REPO = Path(__file__).resolve().parents[2]

CONFIG = """\
gateway:
  data_dir: data
  encryption_key_file: data/keys.json
dicom:
  allowed_callers:
    - {ae_title: PACS, hosts: [127.0.0.1]}
hl7:
  allowed_senders:
    - {application: EHR, facility: HOSP, hosts: [127.0.0.1]}
destinations:
  pacs:
    dicom: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}
  ehr:
    hl7: {host: 127.0.0.1, port: 2576, application: EHR, facility: HOSP}
models:
  lung-nodules: {bundle: REPO/models/lung_nodules}
  report-findings: {bundle: REPO/models/report_findings}
routes:
  - name: chest-ct
    when:
      dicom: {Modality: CT, BodyPartExamined: [CHEST, LUNG]}
    run: [lung-nodules]
    send: [pacs, ehr]
  - name: radiology-reports
    when:
      hl7: {MSH-9: ORU^R01}
    run: [report-findings]
    send: [ehr]
  - name: mr-archive
    when:
      dicom: {Modality: MR, calling_ae: PACS}
    forward: [pacs]
  - name: adt-feed
    when:
      hl7: {MSH-9: {regex: "^ADT"}}
    forward: [ehr]
"""

CHEST_UID = "1.2.826.0.1.3680043.8.498.1"
HEAD_UID = "1.2.826.0.1.3680043.8.498.2"
MR_UID = "1.2.826.0.1.3680043.8.498.3"
NO_ROUTE = "no route matches: stored, logged, not processed"
PACS = "pacs (DICOM ORTHANC@127.0.0.1:4242)"
EHR = "ehr (HL7 EHR^HOSP@127.0.0.1:2576)"


def adt_a01(control_id: str = "ADT00001") -> bytes:
    return (
        "MSH|^~\\&|EHR|HOSP|AI_GATEWAY|AI|20261125101500||ADT^A01^ADT_A01|"
        f"{control_id}|P|2.5\r"
        "EVN|A01|20261125101500\r"
        "PID|1||PID12345^^^HOSP^MR||DOE^JANE||19700101|F\r"
        "PV1|1|I|WARD^1^2^HOSP\r"
    ).encode()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "gw.yaml").write_text(CONFIG.replace("REPO/", f"{REPO}/"))
    make_study(tmp_path / "chest", study_uid=CHEST_UID,
               series=[SeriesSpec("CT", count=2, body_part="CHEST", rows=16, cols=16)])
    make_study(tmp_path / "two" / "head", study_uid=HEAD_UID,
               series=[SeriesSpec("CT", count=1, body_part="HEAD", rows=16, cols=16)])
    make_study(tmp_path / "two" / "mr", study_uid=MR_UID,
               series=[SeriesSpec("MR", count=1, body_part="HEAD", rows=16, cols=16)])
    (tmp_path / "two" / "README.txt").write_text("not DICOM, skipped")
    (tmp_path / "oru.hl7").write_bytes(oru_r01())
    # Two messages, LF separated, with a blank line between them.
    (tmp_path / "feed.hl7").write_bytes(
        adt_a01().replace(b"\r", b"\n") + b"\n" + oru_r01(control_id="MSG00002")
    )
    (tmp_path / "notes.txt").write_text("hello, not a study\n")
    return tmp_path


def explain(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "explain", "-c", str(site / "gw.yaml"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )


def test_explain_prints_route_models_and_destinations(site: Path) -> None:
    chest = site / "chest"
    one_file = sorted(chest.iterdir())[0]
    result = explain(site, str(chest), str(one_file), str(site / "oru.hl7"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"{chest}: DICOM study {CHEST_UID} (2 instances, CT) → route 'chest-ct'",
        "  run: lung-nodules",
        f"  send results to: {PACS}, {EHR}",
        f"{one_file}: DICOM study {CHEST_UID} (1 instance, CT) → route 'chest-ct'",
        "  run: lung-nodules",
        f"  send results to: {PACS}, {EHR}",
        f"{site / 'oru.hl7'}: HL7 ORU^R01 message MSG00001 → route 'radiology-reports'",
        "  run: report-findings",
        f"  send results to: {EHR}",
    ]
    assert not (site / "data").exists(), "explain must not create the data dir or key file"


def test_explain_folder_is_one_study_per_uid_and_hl7_file_one_line_per_message(
    site: Path,
) -> None:
    result = explain(site, str(site / "two"), str(site / "feed.hl7"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{site / 'two'}: DICOM study {HEAD_UID} (1 instance, CT) → {NO_ROUTE}",
        f"{site / 'two'}: DICOM study {MR_UID} (1 instance, MR) → {NO_ROUTE}",
        f"{site / 'feed.hl7'} #1: HL7 ADT^A01 message ADT00001 → route 'adt-feed'",
        f"  forward as received to: {EHR}",
        f"{site / 'feed.hl7'} #2: HL7 ORU^R01 message MSG00002 → route 'radiology-reports'",
        "  run: report-findings",
        f"  send results to: {EHR}",
    ]


def test_explain_verbose_gives_the_reason_for_each_route_tried(site: Path) -> None:
    mr = site / "two" / "mr"
    result = explain(site, "-v", "--calling-ae", "PACS", str(mr), str(site / "two" / "head"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{mr}: DICOM study {MR_UID} (1 instance, MR) → route 'mr-archive'",
        "  route 'chest-ct': Modality MR is not CT; BodyPartExamined HEAD not in [CHEST, LUNG]"
        " → no",
        "  route 'radiology-reports': HL7 conditions only, this is DICOM → no",
        "  route 'mr-archive': Modality MR matches; calling_ae PACS matches → yes",
        f"  forward as received to: {PACS}",
        f"{site / 'two' / 'head'}: DICOM study {HEAD_UID} (1 instance, CT) → {NO_ROUTE}",
        "  route 'chest-ct': Modality CT matches; BodyPartExamined HEAD not in [CHEST, LUNG]"
        " → no",
        "  route 'radiology-reports': HL7 conditions only, this is DICOM → no",
        "  route 'mr-archive': Modality CT is not MR; calling_ae PACS matches → no",
        "  route 'adt-feed': HL7 conditions only, this is DICOM → no",
    ]


def test_explain_without_calling_ae_cannot_match_a_calling_ae_route(site: Path) -> None:
    result = explain(site, "-v", str(site / "two" / "mr"))
    assert result.returncode == 0, result.stderr
    assert (
        "  route 'mr-archive': Modality MR matches; calling_ae absent (calling AE unknown) → no"
        in result.stdout.splitlines()
    )


def test_explain_json(site: Path) -> None:
    result = explain(site, "--json", str(site / "chest"), str(site / "feed.hl7"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report[0] == {
        "input": str(site / "chest"),
        "kind": "dicom",
        "study_instance_uid": CHEST_UID,
        "instances": 2,
        "route": "chest-ct",
        "run": ["lung-nodules"],
        "send": [
            {"name": "pacs", "kind": "dicom", "address": "ORTHANC@127.0.0.1:4242"},
            {"name": "ehr", "kind": "hl7", "address": "EHR^HOSP@127.0.0.1:2576"},
        ],
        "forward": [],
        "reasons": [
            "route 'chest-ct': Modality CT matches; BodyPartExamined CHEST in [CHEST, LUNG] → yes"
        ],
    }
    assert [(r["input"], r["message_type"], r["control_id"], r["route"]) for r in report[1:]] == [
        (f"{site / 'feed.hl7'} #1", "ADT^A01", "ADT00001", "adt-feed"),
        (f"{site / 'feed.hl7'} #2", "ORU^R01", "MSG00002", "radiology-reports"),
    ]
    assert report[1]["forward"] == [
        {"name": "ehr", "kind": "hl7", "address": "EHR^HOSP@127.0.0.1:2576"}
    ]


def test_explain_bad_input_names_the_file_and_exits_1(site: Path) -> None:
    """Readable inputs are still explained; each bad one gets its own message."""
    bad = site / "notes.txt"
    missing = site / "missing.dcm"
    broken = site / "broken.dcm"
    broken.write_bytes(sorted((site / "chest").iterdir())[0].read_bytes()[:300])  # truncated
    wrong_version = site / "old.hl7"
    wrong_version.write_bytes(oru_r01(version="2.1"))
    result = explain(
        site, str(bad), str(missing), str(broken), str(wrong_version), str(site / "oru.hl7")
    )
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"{site / 'oru.hl7'}: HL7 ORU^R01")
    assert result.stderr.splitlines() == [
        f"gateway: error: {bad}: neither a DICOM file ('DICM' at offset 128) nor an HL7 "
        "message (starting with MSH)",
        f"gateway: error: {missing}: no such file or folder",
        f"gateway: error: {broken}: Study Instance UID (0020,000D) is missing",
        f"gateway: error: {wrong_version}: the HL7 listener would refuse it: unsupported HL7 "
        "version '2.1'; supported: 2.3 to 2.8.2",
    ]
    assert not (site / "data").exists()


def test_explain_folder_without_dicom_files_is_an_error(site: Path) -> None:
    empty = site / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    result = explain(site, str(empty))
    assert result.returncode == 1
    assert result.stderr == (
        f"gateway: error: {empty}: no DICOM files ('DICM' at offset 128) in this folder\n"
    )
