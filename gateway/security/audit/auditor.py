"""What the edges call to audit: :class:`Auditor` writes the entries that the
constructors in :mod:`gateway.security.audit.records` make, and never raises."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from gateway.security.audit import records
from gateway.security.audit.records import AuditEntry, canonical_json
from gateway.security.audit.writer import AuditLog

__all__ = ["NO_AUDIT", "REPEAT_WINDOW", "Auditor"]

log = structlog.get_logger(__name__)

#: Seconds in which a refusal repeated exactly (same peer, same reason) is counted, not
#: written again: written once at once, then once more with the count when the window ends.
REPEAT_WINDOW = 60.0
#: Refusals held for counting at most; past that a new one is written as it comes.
MAX_HELD = 1024


@dataclass
class _Held:
    entry: AuditEntry
    since: float  # when it was written (the audit's clock)
    more: int = 0  # refusals like it since then, not written


class Auditor:
    """What the edges call: ``auditor(records.association_accepted(...))``.

    An observer: it never raises and never changes a status or an ACK.  A failed write is
    logged (``audit.failed``) and counted through *on_error*.  :meth:`later` hands the
    write to a small thread pool, for callers that must not wait for an fsync (the MLLP
    event loop); :meth:`__call__` writes before it returns.

    Refusals (:func:`~gateway.security.audit.records.is_refusal`) repeated exactly within
    *repeat_window* seconds are folded: the first is written at once, the repeats are
    counted, and when the window ends one more record says how many came (object
    ``repeats``).  A modality retrying from an AE title that is not allowed, or a scanner
    hammering a TLS port, costs two records a minute instead of one fsync'd record per
    attempt, and the audit trail still says who, what and how often.  ``0`` writes every
    one.
    """

    def __init__(
        self,
        trail: AuditLog | None,
        *,
        on_error: Callable[[], None] = lambda: None,
        repeat_window: float = REPEAT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trail = trail
        self._on_error = on_error
        self._pool: ThreadPoolExecutor | None = None
        self.repeat_window = repeat_window
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()

    def __call__(self, entry: AuditEntry) -> None:
        if self.trail is None:
            return
        for each in self._admit(entry):
            self._write(each)

    def later(self, entry: AuditEntry) -> None:
        if self.trail is None:
            return
        admitted = self._admit(entry)  # a repeat queues nothing
        if not admitted:
            return
        if self._pool is None:
            # several threads, so concurrent records share fsyncs (group commit)
            self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="audit")
        for each in admitted:
            self._pool.submit(self._write, each)

    def flush(self, *, everything: bool = False) -> None:
        """Write the counts of the repeat windows that have ended (*everything*: of all)."""
        for each in self._ended(everything=everything):
            self._write(each)

    def close(self) -> None:
        self._closing.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.flush(everything=True)  # after the pool: a count follows the record it counts
        if self.trail is not None:
            self.trail.close()

    def _write(self, entry: AuditEntry) -> None:
        assert self.trail is not None
        try:
            self.trail.write(entry)
        except Exception as exc:  # an audit failure must not break the caller
            log.error(
                "audit.failed", audit_event=entry.event, error=f"{type(exc).__name__}: {exc}"[:300]
            )
            self._on_error()

    def _admit(self, entry: AuditEntry) -> list[AuditEntry]:
        """What to write for *entry*, in order: nothing when it repeats a refusal written
        less than the window ago (it is counted); else the counts of ended windows, then
        *entry*."""
        if self.repeat_window <= 0 or not records.is_refusal(entry):
            return [entry]
        parts = (entry.event, entry.outcome, entry.actor, entry.destination, entry.objects)
        key = canonical_json([*parts, entry.detail])
        now = self._clock()
        with self._lock:
            held = self._held.get(key)
            if held is not None and now - held.since < self.repeat_window:
                held.more += 1
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_ended, name="audit-repeats", daemon=True
                    )
                    self._flusher.start()
                return []
            full = len(self._held) >= MAX_HELD
        # its own window ended (or there is no room): ended windows give their places up
        first = self._ended() if held is not None or full else []
        with self._lock:
            if len(self._held) < MAX_HELD:  # else too many peers at once: written, not held
                self._held[key] = _Held(entry, now)
        return [*first, entry]

    def _ended(self, *, everything: bool = False) -> list[AuditEntry]:
        """Take the windows that have ended (*everything*: all) out; the records that say
        how many repeats each had."""
        now = self._clock()
        with self._lock:
            due = [
                key
                for key, held in self._held.items()
                if everything or now - held.since >= self.repeat_window
            ]
            ended = [self._held.pop(key) for key in due]
        return [records.repeated(h.entry, h.more, now - h.since) for h in ended if h.more]

    def _flush_ended(self) -> None:
        while not self._closing.wait(min(1.0, self.repeat_window / 4)):
            try:
                self.flush()
            except Exception as exc:  # keep counting; the next round writes them
                log.error("audit.failed", error=f"{type(exc).__name__}: {exc}"[:300])


NO_AUDIT = Auditor(None)
