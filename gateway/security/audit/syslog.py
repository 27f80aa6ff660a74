"""The audit trail's external copy: records as RFC 5424 syslog messages, octet-framed
(RFC 5425), sent over TLS by :class:`SyslogForwarder`, a background thread that never
blocks the writer."""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from gateway.security.audit.records import canonical_json

__all__ = [
    "FACILITY_LOG_AUDIT",
    "ForwarderStats",
    "SyslogForwarder",
    "octet_frame",
    "rfc5424_message",
]

log = structlog.get_logger(__name__)

_SEVERITY = {"success": 6, "minor-failure": 4, "serious-failure": 3, "major-failure": 2}
FACILITY_LOG_AUDIT = 13
_PRINTUSASCII = re.compile(r"[^\x21-\x7e]")


def rfc5424_message(
    record: Mapping[str, Any],
    *,
    hostname: str,
    app_name: str = "ai-gateway",
    procid: str = "-",
    facility: int = FACILITY_LOG_AUDIT,
) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIME HOST APP PROCID MSGID - BOM{record JSON}``.

    MSGID is the event; severity follows the outcome (a security alert is at least a
    warning); the MSG is the whole record, hash included, as canonical JSON in UTF-8.
    """
    severity = _SEVERITY.get(str(record.get("outcome")), 5)
    if record.get("event") == "security-alert":
        severity = min(severity, 4)

    def field(value: str, limit: int) -> str:
        return _PRINTUSASCII.sub("", value)[:limit] or "-"

    header = " ".join(
        (
            f"<{facility * 8 + severity}>1",
            field(str(record.get("time", "")), 48) if record.get("time") else "-",
            field(hostname, 255),
            field(app_name, 48),
            field(procid, 128),
            field(str(record.get("event", "")), 32),
            "-",
        )
    )
    return header.encode("ascii") + b" \xef\xbb\xbf" + canonical_json(record).encode("utf-8")


def octet_frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return b"%d %s" % (len(message), message)


@dataclass(frozen=True)
class ForwarderStats:
    sent: int  # messages written to a TLS connection
    failures: int  # connection or send failures (each retried)
    dropped: int  # messages never sent: queue full, or still queued at close
    queued: int
    connected: bool
    last_error: str | None


class SyslogForwarder:
    """Sends audit records to a syslog server over TLS, best effort, never blocking.

    :meth:`submit` puts the framed message on a bounded queue; a background thread sends
    it, reconnecting with exponential backoff (with jitter) after a failure and retrying
    the message it was sending.  :class:`AuditLog` submits a record only once it is on
    disk, in seq order.  A full queue drops the new message; every drop and
    failure is counted (:meth:`stats`) and logged once per streak.  The local file stays
    the source of truth.  A message written just before the server closed an idle
    connection can still be lost in transit (TCP cannot tell); the connection is checked
    for a close before each send to make that rare.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        hostname: str | None = None,
        app_name: str = "ai-gateway",
        queue_size: int = 1000,
        timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.host, self.port = host, port
        self._ctx = ssl_context
        self._server_hostname = server_hostname or host
        self._hostname = hostname or socket.gethostname()
        self._app_name = app_name
        self._procid = str(os.getpid())
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._timeout = timeout
        self._backoff = (backoff_initial, backoff_max)
        self._sock: ssl.SSLSocket | None = None
        self._stats_lock = threading.Lock()
        self._sent = self._failures = self._dropped = 0
        self._last_error: str | None = None
        self._draining = threading.Event()  # close(): send what is queued, then stop
        self._abort = threading.Event()  # close() timed out: stop now
        self._thread: threading.Thread | None = None
        self._pending = 0  # submitted, not yet sent or dropped
        self._drop_logged = False  # a drop was logged; reset by the next successful send

    def start(self) -> None:
        """Start the sending thread (idempotent; :meth:`AuditLog.open` calls it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
            self._thread.start()

    def submit(self, record: Mapping[str, Any]) -> None:
        """Queue one record for sending; returns at once.  A full queue drops it (counted)."""
        message = rfc5424_message(
            record, hostname=self._hostname, app_name=self._app_name, procid=self._procid
        )
        with self._stats_lock:
            self._pending += 1
        try:
            self._queue.put_nowait(octet_frame(message))
        except queue.Full:
            with self._stats_lock:
                self._pending -= 1
                self._dropped += 1
                first, self._drop_logged = not self._drop_logged, True
            if first:
                log.warning(
                    "audit.syslog.dropped",
                    server=f"{self.host}:{self.port}",
                    reason="queue full; the record is in the local audit trail",
                )

    def stats(self) -> ForwarderStats:
        with self._stats_lock:
            return ForwarderStats(
                self._sent,
                self._failures,
                self._dropped,
                self._pending,
                self._sock is not None,
                self._last_error,
            )

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far has been sent; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats().queued == 0:
                return True
            time.sleep(0.01)
        return self.stats().queued == 0

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued within *timeout* seconds, then stop; the rest is counted as
        dropped.  A send that fails while closing ends it at once (no more backoff)."""
        self._draining.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join(self._timeout + 1)
        else:
            self._count_leftovers(None)

    # --- the sending thread ----------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        item: bytes | None = None
        failing = False
        while not self._abort.is_set():
            if item is None:
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._draining.is_set():
                        break
                    continue
            try:
                sock = self._connected()
                sock.sendall(item)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                self._disconnect()
                with self._stats_lock:
                    self._failures += 1
                    self._last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if not failing:
                    log.warning(
                        "audit.syslog.failed",
                        server=f"{self.host}:{self.port}",
                        error=self._last_error,
                        outcome="retrying with backoff; records stay in the local trail",
                    )
                failing = True
                if self._draining.is_set():
                    break  # closing, and the server is not there: do not wait for it
                if self._abort.wait(delay * random.uniform(0.5, 1.0)):
                    break
                delay = min(delay * 2, self._backoff[1])
                continue
            with self._stats_lock:
                self._sent += 1
                self._pending -= 1
                self._last_error = None
                self._drop_logged = False
            item = None
            delay = self._backoff[0]
            if failing:
                log.info("audit.syslog.reconnected", server=f"{self.host}:{self.port}")
                failing = False
        self._disconnect()
        self._count_leftovers(item)

    def _count_leftovers(self, item: bytes | None) -> None:
        left = 1 if item is not None else 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            left += 1
        with self._stats_lock:
            self._dropped += left
            self._pending -= left
        if left:
            log.warning(
                "audit.syslog.not_sent",
                server=f"{self.host}:{self.port}",
                records=left,
                reason="forwarder closed; the records are in the local audit trail",
            )

    def _connected(self) -> ssl.SSLSocket:
        sock = self._sock
        if sock is not None and not _peer_closed(sock):
            return sock
        self._disconnect()
        raw = socket.create_connection((self.host, self.port), timeout=self._timeout)
        try:
            sock = self._ctx.wrap_socket(raw, server_hostname=self._server_hostname)
        except BaseException:
            raw.close()
            raise
        with self._stats_lock:
            self._sock = sock
        return sock

    def _disconnect(self) -> None:
        with self._stats_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _peer_closed(sock: ssl.SSLSocket) -> bool:
    """A syslog server never writes to us: a readable socket means it closed (or failed)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
