"""Session-wide checks.

After the whole suite, every log a gateway subprocess wrote and every audit trail it kept
is scanned for the synthetic patients' names and identifiers the tests send: one hit
fails the run, naming the file and the line. (Single tests check their own logs and
spool files too; this catches what a test did not think to look for.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg
from tests.gatewayproc import STARTED

# names and identifiers that tests put into DICOM and HL7 data; none may reach a log
PHI_MARKERS = (
    "DOE^JANE", "DOE^JOHN", "SMITH^JOHN", "ROE^RICHARD", "SECRET^PATIENT", "AUDIT^PATIENT",
    "TEST^NODULE", "NODULE^TEST", "MÜLLER", "O'NEIL",
    "PRIVACY^PRUDENCE", "MRN4455667",
    "PID12345", "MRN998877", "MRN0042", "PIDNOD1", "PIDNOD777", "PIDAUDIT9", "PID-BENCH",
)


def _files(gw: object) -> list[Path]:
    paths = [Path(gw.log_path)]  # type: ignore[attr-defined]
    with_trail = Path(gw.data_dir) / "audit" / "audit.jsonl"  # type: ignore[attr-defined]
    if with_trail.exists():
        paths.append(with_trail)
    return [p for p in paths if p.exists()]


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[Callable[[], str]]:
    """A factory of DSNs, each a new empty database on the session's throwaway PostgreSQL
    server (tests/pg.py: started on first use, stopped at the end of the session).  Skips
    the test when PostgreSQL is not installed, and fails it under CI."""
    pg.server()
    yield pg.new_dsn


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pg.stop()
    hits: list[str] = []
    seen: set[Path] = set()
    for gw in STARTED:
        for path in _files(gw):
            if path in seen:
                continue
            seen.add(path)
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                found = [m for m in PHI_MARKERS if m in line]
                if found:
                    hits.append(f"{path}:{number}: {', '.join(found)}")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (
        f"PHI scan: {len(seen)} gateway logs and audit trails, {len(hits)} lines with a "
        "test patient's name or identifier"
    )
    if reporter is not None:
        reporter.write_line(summary)
        for hit in hits[:20]:
            reporter.write_line(f"  {hit}")
    if hits and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
