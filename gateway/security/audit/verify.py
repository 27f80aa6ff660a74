"""Checking an audit trail: :func:`verify` reads it line by line and reports the first
edited, missing, reordered, inserted or torn record (see the package docstring)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gateway.security.audit.records import GENESIS, REQUIRED, record_hash

__all__ = ["VerifyReport", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`.  ``records`` counts the records that verified (all
    of them when ``ok``); ``first_bad`` is the 1-based line number of the first bad one."""

    ok: bool
    records: int
    first_bad: int | None
    reason: str


def _seq_of(line: bytes) -> int | None:
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _lines(f: BinaryIO, size: int) -> Iterator[bytes]:
    pos = 0
    while pos < size:
        line = f.readline(size - pos)
        if not line:
            return
        pos += len(line)
        yield line


def verify(path: Path, *, anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Check every line of the trail at *path*: it parses, its hash matches its content,
    its seq follows the previous one by 1 and its prev is the previous record's hash.
    Stops at the first bad record and says what is wrong with it.  With *anchor* (a
    ``(seq, hash)`` from :attr:`AuditLog.head` kept elsewhere), also checks that the
    trail still holds that record unchanged, so cutting records off the end shows."""

    def bad(n: int, good: int, reason: str) -> VerifyReport:
        return VerifyReport(False, good, n, f"record {n}: {reason}")

    prev_seq, prev_hash = 0, GENESIS
    anchored = False
    with open(path, "rb") as f:
        # Writers append whole lines under an exclusive flock: the size seen under a shared
        # one ends at a line boundary, so a live trail is read up to there, writers blocked
        # only for the fstat.
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            size = os.fstat(f.fileno()).st_size
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        lines = _lines(f, size)
        for n, raw in enumerate(lines, start=1):
            good = n - 1
            if not raw.endswith(b"\n"):
                return bad(n, good, "the last line is incomplete (torn write after a crash?)")
            try:
                rec = json.loads(raw)
            except ValueError:
                return bad(n, good, "not valid JSON (truncated or edited?)")
            if not isinstance(rec, dict):
                return bad(n, good, "not a JSON object (edited?)")
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                return bad(n, good, f"fields {missing} are missing (edited?)")
            seq = rec["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int):
                return bad(n, good, f"seq {seq!r} is not a number (edited?)")
            if record_hash(rec) != rec["hash"]:
                return bad(n, good, "hash does not match its content (edited?)")
            expected = prev_seq + 1
            if rec["prev"] != prev_hash:
                # A gap whose missing seq never shows up later is a deletion; otherwise
                # the line is out of place.
                if seq > expected and all(_seq_of(later) != expected for later in lines):
                    if n == 1:
                        return bad(n, good, f"seq {seq} begins the trail (records are missing)")
                    return bad(n, good, f"seq {seq} follows {prev_seq} (a record is missing)")
                if n == 1:
                    return bad(n, good, "prev is not the start of a trail (inserted?)")
                return bad(
                    n, good, f"prev does not match record {n - 1}'s hash (reordered or inserted?)"
                )
            if seq != expected:
                return bad(n, good, f"seq {seq} follows {prev_seq} (edited?)")
            if anchor is not None and seq == anchor[0]:
                if rec["hash"] != anchor[1]:
                    return bad(n, good, "hash differs from the anchor (the trail was rewritten)")
                anchored = True
            prev_seq, prev_hash = seq, rec["hash"]
    if anchor is not None and anchor[0] > 0 and not anchored:
        return VerifyReport(
            False,
            prev_seq,
            prev_seq + 1,
            f"record {prev_seq + 1}: missing; the trail ends at seq {prev_seq} but seq "
            f"{anchor[0]} was anchored (records cut off the end?)",
        )
    return VerifyReport(True, prev_seq, None, f"{prev_seq} records, chain intact")
