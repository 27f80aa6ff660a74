"""The fuzzing corpus, replayed in process: every seed of every target
(``tests/fuzz/corpus/``) and every reproducer the fuzzer left (``tests/fuzz/crashes/``) goes
through every target's ``TestOneInput``, so that a bug found by ``make fuzz`` fails
``make test`` until it is fixed, and a fixed one stays fixed.  The fuzzing itself is
``python -m tests.fuzz run`` (``make fuzz``; docs/reliability.md, "Fuzzing")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import CORPUS, HERE, TARGETS, AcceptedInvalid, function, inputs, quiet

INPUTS = inputs()


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_input_through_the_target(target: str) -> None:
    fn = function(target)
    failures = []
    with quiet():
        for path in INPUTS:
            try:
                fn(path.read_bytes())
            except Exception as exc:
                where = path.relative_to(HERE)
                failures.append(f"{where}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


def test_the_committed_corpus_is_minimized() -> None:
    """Seeds and regressions, not what the fuzzer's corpus grows to (that stays in
    var/fuzz/)."""
    for target in TARGETS:
        files = [p for p in (CORPUS / target).iterdir() if p.is_file()]
        assert 1 <= len(files) <= 40, f"{target}: {len(files)} files"
        assert sum(p.stat().st_size for p in files) < 256 * 1024, target


def _seed(target: str, name: str) -> bytes:
    return Path(CORPUS / target / name).read_bytes()


def test_the_dicom_oracle_finds_what_a_lax_check_lets_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The oracle is not vacuous: with the SCP's structural check switched off, a data set
    whose sequence item runs past its end is answered 0x0000, and the target says so."""
    data = _seed("dicom_dataset", "regress-implicit-sequence-item-overrun")
    monkeypatch.setattr("gateway.ingest.dicom_scp.check_dataset", lambda *a, **k: None)
    with quiet(), pytest.raises(AcceptedInvalid, match="holds 34 bytes, its length says"):
        function("dicom_dataset")(data)


def test_the_hl7_oracle_finds_a_version_the_edge_should_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.hl7.msh.SUPPORTED_VERSIONS", frozenset({"9.9"}))
    with pytest.raises(AcceptedInvalid, match="not a supported version"):
        function("hl7_ack")(_seed("hl7_ack", "bad-version"))
