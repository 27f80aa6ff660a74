"""What the edges call to audit: :class:`Auditor` writes the entries that the
constructors in :mod:`gateway.security.audit.records` make, and never raises."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from gateway.security.audit.records import AuditEntry
from gateway.security.audit.writer import AuditLog

__all__ = ["NO_AUDIT", "Auditor"]

log = structlog.get_logger(__name__)


class Auditor:
    """What the edges call: ``auditor(records.association_accepted(...))``.

    An observer: it never raises and never changes a status or an ACK.  A failed write is
    logged (``audit.failed``) and counted through *on_error*.  :meth:`later` hands the
    write to a small thread pool, for callers that must not wait for an fsync (the MLLP
    event loop); :meth:`__call__` writes before it returns.
    """

    def __init__(
        self, trail: AuditLog | None, *, on_error: Callable[[], None] = lambda: None
    ) -> None:
        self.trail = trail
        self._on_error = on_error
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, entry: AuditEntry) -> None:
        if self.trail is None:
            return
        try:
            self.trail.write(entry)
        except Exception as exc:  # an audit failure must not break the caller
            log.error(
                "audit.failed", audit_event=entry.event, error=f"{type(exc).__name__}: {exc}"[:300]
            )
            self._on_error()

    def later(self, entry: AuditEntry) -> None:
        if self.trail is None:
            return
        if self._pool is None:
            # several threads, so concurrent records share fsyncs (group commit)
            self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="audit")
        self._pool.submit(self, entry)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self.trail is not None:
            self.trail.close()


NO_AUDIT = Auditor(None)
