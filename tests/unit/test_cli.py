"""The `gateway` command, in-process: exit codes, what goes to stdout and to stderr."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import main
from gateway.envelope import JobState, Stage
from gateway.security.crypto import KeyStore, Sealer
from gateway.store.sqlite import SCHEMA_VERSION, SQLiteQueue
from gateway.store.store import Store
from gateway.supervisor import metrics_dir
from tests.queues import any_payload

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
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def ingest_one_of_each(data_dir: Path, key_file: Path) -> tuple[str, str]:
    store = Store(data_dir, key_file)
    try:
        inst = store.ingest_instance(
            b"dicom bytes",
            sop_instance_uid="1.2.3.4",
            study_instance_uid="1.2.3",
            attrs={"Modality": "CT"},
            source="PACS@127.0.0.1",
            quiet=5.0,
            now=1000.0,
        )
        msg = store.ingest_message(
            b"MSH|^~\\&|EHR|HOSP|||20240101||ORU^R01|C1|P|2.5\r",
            sender=("EHR", "HOSP"),
            control_id="C1",
            attrs={},
            source="EHR@127.0.0.1",
            build_ack=lambda env_id: b"ACK",
            now=1000.0,
        )
    finally:
        store.close()
    return inst.envelope_id, msg.envelope_id


def make_dead_job(db: Path, error: str = "AR: unknown patient") -> int:
    queue = SQLiteQueue(db)
    try:
        job_id = queue.enqueue(
            Stage.DELIVER, "0123456789abcdef0123", 1.0, any_payload(Stage.DELIVER)
        )
        job = queue.lease([Stage.DELIVER], "w", 30, now=2.0)
        assert job is not None and job.id == job_id
        queue.dead(job, error, now=3.0)
    finally:
        queue.close()
    return job_id


def job_state(db: Path, job_id: int) -> tuple[str, int]:
    queue = SQLiteQueue(db)
    try:
        row = queue._db.execute(
            "SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return row["state"], row["attempts"]
    finally:
        queue.close()


# --- usage --------------------------------------------------------------------------------


def test_unknown_command_is_a_usage_error_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_no_command_is_a_usage_error_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"gateway {__version__}\n"


def test_queue_retry_needs_ids_or_all(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["queue", "retry", "-c", str(config)])
    assert info.value.code == 2
    assert "one of the arguments ID --all is required" in capsys.readouterr().err


def test_queue_retry_refuses_ids_together_with_all(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["queue", "retry", "-c", str(config), "1", "--all"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- check-config / config-schema ---------------------------------------------------------


def test_check_config_on_a_good_file_exits_0_with_a_summary(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    rc, out, err = run(capsys, "check-config", "-c", str(config))
    assert rc == 0
    assert out == (
        f"{config}: OK (1 DICOM callers, 1 HL7 senders, 0 destinations, 0 models, 0 routes)\n"
    )
    assert err == ""


def test_check_config_accepts_the_shipped_default(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = REPO / "config" / "gateway.yaml"
    rc, out, _ = run(capsys, "check-config", "--config", str(shipped))
    assert rc == 0
    assert out == (
        f"{shipped}: OK (3 DICOM callers, 1 HL7 senders, 0 destinations, 2 models, 2 routes)\n"
    )


def test_check_config_on_a_bad_file_exits_1_with_one_error_line_each_on_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("data_dir: data", "data_dri: data") + "  port: 99999\n")
    rc, out, err = run(capsys, "check-config", "-c", str(bad))
    assert rc == 1
    assert out == ""
    assert sorted(err.splitlines()) == [
        f"{bad}:10: hl7.port: Input should be less than or equal to 65535",
        f"{bad}:2: gateway.data_dri: unknown key (did you mean 'data_dir'?)",
    ]


def test_check_config_on_a_missing_file_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.yaml"
    rc, _, err = run(capsys, "check-config", "-c", str(missing))
    assert rc == 1
    assert err == f"{missing}:0: cannot read the config file: No such file or directory\n"


def test_config_schema_prints_a_strict_json_schema_of_the_sections(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = run(capsys, "config-schema")
    assert rc == 0
    schema = json.loads(out)
    assert list(schema["properties"]) == [
        "gateway",
        "dicom",
        "hl7",
        "ingest",
        "workers",
        "findings",
        "dashboard",
        "destinations",
        "models",
        "routes",
    ]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["dicom", "hl7"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "AI gateway configuration"


# --- queue --------------------------------------------------------------------------------


def test_queue_status_without_a_queue_yet_says_so_and_exits_0(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    rc, out, _ = run(capsys, "queue", "status", "-c", str(config))
    assert rc == 0
    db = tmp_path / "data" / "queue.sqlite3"
    assert out == f"no queue yet at {db} (the gateway has not run with this config)\n"
    assert not db.exists()  # looking does not create it


def test_queue_dead_without_a_queue_yet_says_so_and_exits_0(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    rc, out, _ = run(capsys, "queue", "dead", "-c", str(config))
    assert rc == 0  # nothing dead is not a failure (monitoring scripts call this)
    assert out.startswith("no queue yet at ")


def test_queue_json_without_a_queue_yet_is_still_json(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    assert run(capsys, "queue", "status", "--json", "-c", str(config))[:2] == (0, "{}\n")
    assert run(capsys, "queue", "dead", "--json", "-c", str(config))[:2] == (0, "[]\n")


def test_queue_status_json_shows_what_was_received(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    ingest_one_of_each(tmp_path / "data", tmp_path / "data" / "keys.json")
    rc, out, _ = run(capsys, "queue", "status", "--json", "-c", str(config))
    assert rc == 0
    assert json.loads(out) == {
        "received": {"dicom": 1, "hl7": 1},
        "studies": {"open": 1},
        "jobs:route": {"ready": 1},
    }


def test_queue_status_table_shows_counts_per_stage(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    ingest_one_of_each(tmp_path / "data", tmp_path / "data" / "keys.json")
    rc, out, _ = run(capsys, "queue", "status", "-c", str(config))
    assert rc == 0
    table = out.splitlines()
    assert table[0].split() == ["received", "dicom", "instances:", "1", "hl7", "messages:", "1"]
    assert table[1].split() == ["studies", "open", "(assembling):", "1", "complete:", "0"]
    assert table[2].split() == ["stage", "ready", "leased", "done", "dead"]
    assert table[3].split() == ["route", "1", "0", "0", "0"]
    assert re.fullmatch(r"oldest waiting job: \d+ s", table[4])
    assert re.fullmatch(
        r"free space data: \d+\.\d GB   spool: \d+\.\d GB   "
        r"\(floor 1\.0 GB: below it new data is refused\)",
        table[5],
    )


def test_queue_status_of_an_empty_queue_says_no_jobs_yet(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    SQLiteQueue(tmp_path / "data" / "queue.sqlite3").close()
    rc, out, _ = run(capsys, "queue", "status", "-c", str(config))
    assert rc == 0
    assert out.splitlines()[-2] == "(no jobs yet)"


def test_queue_status_flags_a_volume_below_the_floor(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    SQLiteQueue(tmp_path / "data" / "queue.sqlite3").close()
    config.write_text(
        config.read_text().replace("gateway:\n", "gateway:\n  min_free_mb: 1000000000\n")
    )
    _, out, _ = run(capsys, "queue", "status", "-c", str(config))
    assert out.splitlines()[-1].count("BELOW THE FLOOR") == 2


def test_queue_dead_with_none_says_no_dead_letters(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    ingest_one_of_each(tmp_path / "data", tmp_path / "data" / "keys.json")
    rc, out, _ = run(capsys, "queue", "dead", "-c", str(config))
    assert (rc, out) == (0, "no dead letters\n")


def test_queue_dead_lists_id_stage_subject_attempts_and_last_error(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    job_id = make_dead_job(tmp_path / "data" / "queue.sqlite3")
    rc, out, _ = run(capsys, "queue", "dead", "-c", str(config))
    assert rc == 0
    assert out == f"{job_id:>8}  deliver  0123456789ab  attempts=1  AR: unknown patient\n"


def test_queue_dead_json_is_machine_readable(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    job_id = make_dead_job(tmp_path / "data" / "queue.sqlite3")
    rc, out, _ = run(capsys, "queue", "dead", "--json", "-c", str(config))
    assert rc == 0
    assert json.loads(out) == [
        {
            "id": job_id,
            "stage": "deliver",
            "subject": "0123456789abcdef0123",
            "attempts": 1,
            "last_error": "AR: unknown patient",
        }
    ]


def test_queue_retry_id_returns_the_job_to_ready(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "queue.sqlite3"
    job_id = make_dead_job(db)
    rc, out, _ = run(capsys, "queue", "retry", str(job_id), "-c", str(config))
    assert (rc, out) == (0, "1 job(s) returned to the queue\n")
    assert job_state(db, job_id) == (JobState.READY.value, 0)
    rc, out, _ = run(capsys, "queue", "dead", "-c", str(config))
    assert out == "no dead letters\n"


def test_queue_retry_all_returns_every_dead_job(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "queue.sqlite3"
    first = make_dead_job(db, "one")
    queue = SQLiteQueue(db)
    try:
        second_id = queue.enqueue(Stage.INFER, "study-x", 1.0, any_payload(Stage.INFER))
        job = queue.lease([Stage.INFER], "w", 30, now=2.0)
        assert job is not None
        queue.dead(job, "two", now=3.0)
    finally:
        queue.close()
    rc, out, _ = run(capsys, "queue", "retry", "--all", "-c", str(config))
    assert (rc, out) == (0, "2 job(s) returned to the queue\n")
    assert job_state(db, first)[0] == job_state(db, second_id)[0] == "ready"


def test_queue_retry_all_when_the_subject_is_already_waiting_again_does_not_crash(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "queue.sqlite3"
    make_dead_job(db)
    queue = SQLiteQueue(db)
    try:
        queue.enqueue(Stage.DELIVER, "0123456789abcdef0123", 4.0, any_payload(Stage.DELIVER))
    finally:
        queue.close()
    rc, out, _ = run(capsys, "queue", "retry", "--all", "-c", str(config))
    assert (rc, out) == (0, "0 job(s) returned to the queue\n")


def test_queue_retry_all_with_nothing_dead_still_exits_0(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    SQLiteQueue(tmp_path / "data" / "queue.sqlite3").close()
    rc, out, _ = run(capsys, "queue", "retry", "--all", "-c", str(config))
    assert (rc, out) == (0, "0 job(s) returned to the queue\n")


def test_queue_retry_of_an_unknown_id_exits_1(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    make_dead_job(tmp_path / "data" / "queue.sqlite3")
    rc, out, _ = run(capsys, "queue", "retry", "999", "-c", str(config))
    assert (rc, out) == (1, "0 job(s) returned to the queue\n")


# --- keys ---------------------------------------------------------------------------------


def test_keys_rotate_adds_a_current_key_and_old_data_stays_readable(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "data" / "keys.json"
    instance_id, _ = ingest_one_of_each(tmp_path / "data", key_file)
    before = KeyStore.open(key_file, create=False)
    old_id = before.current
    blob = Sealer(before).seal(b"sealed before rotation", b"ctx")

    rc, out, _ = run(capsys, "keys", "rotate", "-c", str(config))

    assert rc == 0
    match = re.fullmatch(
        rf"new data key (\S+) is current; 2 keys in {re.escape(str(key_file))} "
        r"\(back this file up\)\n",
        out,
    )
    assert match is not None
    new_id = match.group(1)
    assert new_id != old_id
    doc = json.loads(key_file.read_text())
    assert doc["current"] == new_id
    assert [k["id"] for k in doc["data_keys"]] == [old_id, new_id]

    after = KeyStore.open(key_file, create=False)
    assert Sealer(after).open(blob, b"ctx") == b"sealed before rotation"
    store = Store(tmp_path / "data", key_file, create=False)
    try:
        assert store.read(instance_id)[1] == b"dicom bytes"
    finally:
        store.close()


def test_keys_rotate_on_a_fresh_install_creates_the_file_then_rotates(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    rc, out, _ = run(capsys, "keys", "rotate", "-c", str(config))
    assert rc == 0
    assert "; 2 keys in " in out
    assert len(json.loads((tmp_path / "data" / "keys.json").read_text())["data_keys"]) == 2


def test_keys_rotate_with_an_unsafe_key_file_mode_exits_1_with_the_fix(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "data" / "keys.json"
    KeyStore.open(key_file)
    key_file.chmod(0o640)
    rc, out, err = run(capsys, "keys", "rotate", "-c", str(config))
    assert (rc, out) == (1, "")
    assert err == (
        f"gateway: error: encryption key file '{key_file}' has mode 640; it must be readable "
        f"by the gateway's user only (chmod 600 '{key_file}')\n"
    )


# --- gateway db -------------------------------------------------------------------------


def test_db_status_says_what_migrate_would_do_and_migrate_does_it_once(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "queue.sqlite3"
    rc, out, _ = run(capsys, "db", "status", "-c", str(config))
    assert rc == 1 and "none (not created yet)" in out and not db.exists()
    rc, out, _ = run(capsys, "db", "migrate", "-c", str(config))
    assert rc == 0 and out.startswith(f"applied {SCHEMA_VERSION}: sqlite {db}")
    rc, out, _ = run(capsys, "db", "status", "-c", str(config), "--json")
    assert rc == 0 and json.loads(out) == {
        "engine": "sqlite",
        "database": str(db),
        "schema": SCHEMA_VERSION,
        "gateway_schema": SCHEMA_VERSION,
        "pending": [],
        "newer_than_gateway": False,
    }
    rc, out, _ = run(capsys, "db", "migrate", "-c", str(config))
    assert rc == 0 and out.startswith("nothing to do")


def test_a_database_made_by_a_newer_gateway_is_refused_naming_both_versions(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    db = tmp_path / "data" / "queue.sqlite3"
    SQLiteQueue(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),))
    rc, out, _ = run(capsys, "db", "status", "-c", str(config))
    assert rc == 1 and f"made by a newer gateway (schema {SCHEMA_VERSION + 1})" in out
    rc, _, err = run(capsys, "db", "migrate", "-c", str(config))
    assert rc == 1
    assert f"has schema {SCHEMA_VERSION + 1}, newer than this gateway's {SCHEMA_VERSION}" in err


def test_the_metrics_folder_of_a_supervisor_that_is_gone_is_removed(tmp_path: Path) -> None:
    """A kill -9 leaves a supervisor's metrics folder behind: the next start removes it,
    and leaves the folder of a gateway still running on the same data dir."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    root = tmp_path / "metrics"
    (root / str(gone.pid)).mkdir(parents=True)
    (root / str(gone.pid) / "counter_1.db").write_bytes(b"x")
    (root / str(os.getppid())).mkdir()  # alive: another gateway's
    mine = Path(metrics_dir(tmp_path))
    assert mine == root / str(os.getpid()) and mine.is_dir()
    assert not (root / str(gone.pid)).exists() and (root / str(os.getppid())).exists()


def write_trail(data_dir: Path) -> None:
    """A small trail: a study from the PACS forwarded, a report, a refused caller."""
    from gateway.security.audit import AuditLog, records, trail_path

    with AuditLog.open(trail_path(data_dir)) as trail:
        trail.write(records.association_accepted("PACS", "10.0.0.5", "AI_GATEWAY"))
        trail.write(
            records.instances_received(
                "PACS", "10.0.0.5", "AI_GATEWAY",
                studies=["1.2.3"], stored=4, duplicates=0, refused=0, aborted=False,
            )
        )  # fmt: skip
        trail.write(records.dicom_caller_refused("INTRUDER", "10.6.6.6", "AI_GATEWAY"))
        trail.write(
            records.AuditEntry(
                "message-received",
                actor={"application": "EHR", "facility": "HOSP", "host": "10.0.0.7"},
                objects=({"type": "message", "id": "MSG00042"},),
            )
        )
        trail.write(
            records.AuditEntry(
                "instances-transferred",
                destination={"node": "pacs", "ae_title": "ARCHIVE", "host": "10.0.0.9"},
                objects=({"type": "study", "id": "1.2.3"}, {"type": "sop-instance", "count": 4}),
            )
        )


def test_audit_show_filters_the_trail_and_records_the_reading(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trail(tmp_path / "data")
    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--study", "1.2.3")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["seq", "time", "(UTC)", "event"]
    assert [line.split()[3] for line in lines[1:-1]] == [
        "instances-received",
        "instances-transferred",
    ]
    assert "PACS@10.0.0.5" in lines[1] and "pacs: ARCHIVE@10.0.0.9" in lines[2]
    assert "study 1.2.3; 4 sop-instance" in lines[2]
    assert lines[-1] == "2 of 5 records"

    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--peer", "intruder", "--json")
    (refused,) = [json.loads(line) for line in out.splitlines()]
    assert refused["event"] == "security-alert" and refused["actor"]["host"] == "10.6.6.6"

    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--failures", "--limit", "0")
    assert out.splitlines()[-1] == "1 of 7 records"  # the two readings before are records too
    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--message", "MSG00042")
    assert "EHR/HOSP@10.0.0.7" in out and out.splitlines()[-1] == "1 of 8 records"
    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--since", "2999-01-01")
    assert out.splitlines()[-1] == "0 of 9 records"

    rc, out, _ = run(capsys, "audit", "show", "-c", str(config), "--event", "query", "--json")
    readings = [json.loads(line) for line in out.splitlines()]
    assert [r["detail"] for r in readings] == [
        "audit trail read; filters: --study 1.2.3",
        "audit trail read; filters: --peer intruder",
        "audit trail read; filters: --failures",
        "audit trail read; filters: --message MSG00042",
        "audit trail read; filters: --since 2999-01-01T00:00:00+00:00",
    ]
    assert readings[0]["actor"]["application"] == "gateway-cli"
    rc, out, _ = run(capsys, "audit", "verify", "-c", str(config))
    assert rc == 0, out


def test_audit_show_keeps_the_newest_matches_and_says_so(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trail(tmp_path / "data")
    _, out, _ = run(capsys, "audit", "show", "-c", str(config), "--limit", "2")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["4", "5"]
    assert lines[-1] == "2 of 5 records (the newest 2)"


def test_audit_show_without_a_trail_says_where_it_looked(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "audit", "show", "-c", str(config))
    assert rc == 1 and "no audit trail" in out
