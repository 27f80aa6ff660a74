"""The audit trail's writer: :class:`AuditLog` appends records to one file, hash-chained,
each fsync'd before it returns (threads share fsyncs), under ``flock`` so that several
processes may append; it repairs a torn last line on open.  See the package docstring."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.security.audit.records import (
    GENESIS,
    HEX64,
    AuditEntry,
    AuditError,
    AuditEvent,
    EventOutcome,
    canonical_json,
    record_hash,
    torn_line_set_aside,
    validate,
)
from gateway.security.audit.syslog import SyslogForwarder
from gateway.security.crypto import fsync_dir

__all__ = ["AuditLog", "trail_path"]

log = structlog.get_logger(__name__)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso_ms(when: dt.datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("the audit clock must return timezone-aware datetimes")
    when = when.astimezone(dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class _Tail:
    end: int  # offset just after the last complete line
    line: bytes | None  # that line without its newline; None when there is none
    fragment: bytes  # bytes after it (an incomplete line), usually empty


def _read_tail(fd: int, size: int, block: int = 65536) -> _Tail:
    """The last complete line of the file and anything after it, read backwards."""
    data = b""
    pos = size
    while pos > 0 and data.count(b"\n") < 2:
        step = min(block, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
    last_nl = data.rfind(b"\n")
    if last_nl < 0:
        return _Tail(0, None, data)
    fragment = data[last_nl + 1 :]
    start = data.rfind(b"\n", 0, last_nl) + 1
    return _Tail(size - len(fragment), data[start:last_nl], fragment)


class AuditLog:
    """An open audit trail.  Use :meth:`open`; :meth:`record` is thread-safe.

    Writes are serialised (a thread lock, and ``flock`` against other processes); the
    fsync that follows is shared: a thread whose line was already covered by another
    thread's fsync returns without one of its own (group commit), so concurrent callers
    each wait about one fsync, and the file sees fewer of them.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        *,
        forward: SyslogForwarder | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        self.path = path
        self._fd: int | None = fd
        self._forward = forward
        self._clock = clock
        self._lock = threading.Lock()  # seq, prev, end, the write itself, _unsent
        self._sync_lock = threading.Lock()  # one fsync at a time; taken before _lock
        self._seq = 0
        self._prev = GENESIS
        self._end = 0  # the file size after the last write we know of
        self._synced = 0  # the file is durable up to here
        self._unsent: list[tuple[int, dict[str, Any]]] = []  # (end, record) to forward

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        forward: SyslogForwarder | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
    ) -> AuditLog:
        """Open (or create: file 0600, directory 0700) the trail at *path* and continue its
        chain.  An existing file or directory keeps its mode (a log shipper may need group
        read).  An incomplete last line is moved aside and recorded (see the module doc);
        a complete last line that is not a record raises :class:`AuditError`.
        *forward*, when given, is started and receives every record; :meth:`close` closes it.
        """
        path = Path(path)
        created_dir = not path.parent.exists()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        existed = path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit trail '{path}': {exc.strerror or exc}") from None
        trail = cls(path, fd, forward=forward, clock=clock)
        try:
            if not existed:
                fsync_dir(path.parent)
                if created_dir:
                    fsync_dir(path.parent.parent)
            with trail._lock, trail._file_lock():
                trail._catch_up()
            trail._sync(trail._end)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot open audit trail '{path}': {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise
        if forward is not None:
            forward.start()
        return trail

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record this process knows of: an anchor for
        :func:`verify` to keep elsewhere (``(0, GENESIS)`` for an empty trail)."""
        with self._lock:
            return self._seq, self._prev

    def record(
        self,
        event: AuditEvent,
        outcome: EventOutcome = "success",
        *,
        actor: Mapping[str, Any] | None = None,
        destination: Mapping[str, Any] | None = None,
        objects: Iterable[Mapping[str, Any]] = (),
        detail: str = "",
    ) -> dict[str, Any]:
        """Append one record and return it once it is on disk (write + fsync).

        Raises ValueError for an unknown event, outcome, object type or party key (a
        caller's bug: nothing is written), :class:`AuditError` when the trail is closed or
        the disk refuses (nothing half-written stays in the file).
        """
        return self.write(AuditEntry(event, outcome, actor, destination, tuple(objects), detail))

    def write(self, entry: AuditEntry) -> dict[str, Any]:
        """:meth:`record` for an entry made by a constructor in
        :mod:`gateway.security.audit.records`."""
        body = validate(entry)
        with self._lock:
            if self._fd is None:
                raise AuditError(f"audit trail '{self.path}' is closed")
            try:
                with self._file_lock():
                    if os.fstat(self._fd).st_size != self._end:
                        self._catch_up()  # another process appended (or crashed mid-write)
                    rec = self._append(body)
            except OSError as exc:
                raise AuditError(
                    f"cannot write audit trail '{self.path}': {exc.strerror or exc}"
                ) from None
            end = self._end
        self._sync(end)
        return copy.deepcopy(rec)  # the caller's copy: the forwarder may still hold ours

    def close(self) -> None:
        """Sync and close the file, then close the forwarder (which gets a moment to send
        what it holds)."""
        with self._sync_lock, self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.fsync(fd)
                    self._synced = self._end
                    self._hand_over()
                finally:
                    os.close(fd)
        if self._forward is not None:
            self._forward.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------

    def _sync(self, end: int) -> None:
        """Return once the file is durable up to *end*: by our fsync or by another's."""
        with self._sync_lock:
            if self._synced >= end:
                return  # another thread's fsync covered our line (or close() did)
            with self._lock:
                fd, target = self._fd, self._end
            if fd is None:
                raise AuditError(f"audit trail '{self.path}' was closed while writing")
            try:
                os.fsync(fd)  # everything written so far, ours and the lines after it
            except OSError as exc:
                raise AuditError(
                    f"cannot sync audit trail '{self.path}': {exc.strerror or exc}"
                ) from None
            self._synced = target
            with self._lock:
                self._hand_over()

    def _hand_over(self) -> None:
        """Give the forwarder the records that are durable now, in seq order (holding
        _sync_lock and _lock): the remote copy never holds a record the file may lose."""
        if self._forward is None or not self._unsent:
            return
        ready = [rec for end, rec in self._unsent if end <= self._synced]
        self._unsent = [(end, rec) for end, rec in self._unsent if end > self._synced]
        for rec in ready:
            self._forward.submit(rec)  # never blocks

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _append(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write one record (holding _lock and the file lock); the caller syncs."""
        assert self._fd is not None
        rec = {"seq": self._seq + 1, "time": _iso_ms(self._clock()), **body, "prev": self._prev}
        rec["hash"] = record_hash(rec)
        line = (canonical_json(rec) + "\n").encode("utf-8")
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # Leave no half line behind: the chain must go on from the last whole record.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            raise
        self._seq, self._prev = rec["seq"], rec["hash"]
        self._end += len(line)
        if self._forward is not None:
            self._unsent.append((self._end, rec))
        return rec

    def _catch_up(self) -> None:
        """Read the last record to continue seq and prev; repair a torn last line."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        tail = _read_tail(self._fd, size)
        if tail.line is None:
            self._seq, self._prev = 0, GENESIS
        else:
            self._seq, self._prev = self._parse_last(tail.line)
        self._end = tail.end
        if tail.fragment:
            self._set_aside(tail)

    def _parse_last(self, line: bytes) -> tuple[int, str]:
        try:
            rec = json.loads(line)
            seq, digest = rec["seq"], rec["hash"]
            if isinstance(seq, bool) or not isinstance(seq, int) or not HEX64.fullmatch(digest):
                raise ValueError("seq or hash malformed")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"audit trail '{self.path}': its last line is not an audit record ({exc}), "
                "so its chain cannot be continued. Run the audit verification to find the "
                "first bad record, then move the file aside to start a new trail."
            ) from None
        return seq, digest

    def _set_aside(self, tail: _Tail) -> None:
        """Move an incomplete last line to a side file, cut it off, and record that."""
        assert self._fd is not None
        n = 1
        while (aside := self.path.with_name(f"{self.path.name}.torn-{n}")).exists():
            n += 1
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, tail.fragment)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)
        os.ftruncate(self._fd, tail.end)
        os.fsync(self._fd)
        log.warning(
            "audit.torn_line_set_aside",
            trail=str(self.path),
            after_seq=self._seq,
            size=len(tail.fragment),
            moved_to=str(aside),
        )
        self._append(
            _unchecked(
                torn_line_set_aside(self.path.name, len(tail.fragment), self._seq, aside.name)
            )
        )


def _unchecked(entry: AuditEntry) -> dict[str, Any]:
    """The body of a record the writer makes itself, as it is (not :func:`validate`d)."""
    return {
        "event": entry.event,
        "outcome": entry.outcome,
        "actor": dict(entry.actor or {}),
        "destination": dict(entry.destination) if entry.destination is not None else None,
        "objects": [dict(o) for o in entry.objects],
        "detail": entry.detail,
    }


def trail_path(data_dir: Path) -> Path:
    """Where the gateway keeps its audit trail: ``<data_dir>/audit/audit.jsonl``."""
    return Path(data_dir) / "audit" / "audit.jsonl"
