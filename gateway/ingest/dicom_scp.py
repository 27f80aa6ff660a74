"""The DICOM edge: a pynetdicom SCP for C-ECHO and C-STORE of every storage SOP class.

Handlers are small; the one decision point is :func:`StoreHandler.__call__`, which answers
0x0000 only after :meth:`Store.ingest_instance` returned (spool fsync'd + queue committed).
Instances are stored exactly as received (compressed data is never decoded); only the
routing attributes are read, with pixel data skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    VerificationPresentationContexts,
    _config,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import ThreadedAssociationServer

from gateway.config import AllowedCaller, DicomSection, parse_subject
from gateway.dicom import reactor
from gateway.dicom.header import SEQUENCE_TAGS, read_header
from gateway.dicom.network import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUL_POLL_SECONDS,
    MISSING_IDENTIFIER,
    OUT_OF_RESOURCES,
    PIXEL_DATA_MISMATCH,
    PROCESSING_FAILURE,
    SUCCESS,
)
from gateway.dicom.part10 import (
    Buffer,
    PixelDataMismatch,
    check_dataset,
    encode_file_meta,
    mapped,
    read_file_meta,
)
from gateway.errors import MalformedInput, Permanent, Transient
from gateway.observability.logging import exception_fields
from gateway.observability.metrics import Metrics
from gateway.security.allowlist import IPNetwork, peer_in, resolve_hosts
from gateway.security.audit import NO_AUDIT, Auditor, records
from gateway.security.tls import peer_subject, subject_text
from gateway.store.store import Store

log = structlog.get_logger(__name__)


NETWORK_TIMEOUT = 120  # seconds of silence after which pynetdicom drops a connection


def configure_pynetdicom(incoming: Path | None) -> None:
    """pynetdicom's switches are module globals: set them once, here, for our SCP.

    Identifiers are never logged, context variables follow association threads, and a
    storage SOP class that pynetdicom does not know is still accepted.  With *incoming*
    (``dicom.receive_to_disk``), received data sets are written to a file as they arrive
    instead of being held in memory; pynetdicom puts those files in
    :func:`tempfile.gettempdir`, so that is pointed at *incoming* (inside the data
    directory, mode 0700): plaintext never lands in a shared /tmp.
    """
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.PASS_CONTEXTVARS = True
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.STORE_RECV_CHUNKED_DATASET = incoming is not None
    if incoming is not None:
        incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
        incoming.chmod(0o700)
        tempfile.tempdir = str(incoming)


CertSubject = frozenset[tuple[str, str]]
ResolvedCaller = tuple[str, tuple[IPNetwork, ...], CertSubject | None]


def resolve_callers(callers: list[AllowedCaller]) -> list[ResolvedCaller]:
    """(AE title, networks, required certificate subject) per allowed caller; host names
    resolved now, not per association."""
    resolved = []
    for caller in callers:
        networks, unresolved = resolve_hosts(caller.hosts)
        for host in unresolved:
            log.warning("dicom.allowlist.unresolved", host=host, ae_title=caller.ae_title)
        subject = parse_subject(caller.cert_subject) if caller.cert_subject else None
        resolved.append((caller.ae_title.strip(), networks, subject))
    return resolved


def caller_allowed(
    ae_title: str, peer: str, callers: list[ResolvedCaller], cert: CertSubject | None = None
) -> bool:
    """Whether (calling AE, peer address) is allowed; an entry with ``cert_subject`` also
    needs a verified client certificate whose subject has those attributes."""
    ae = ae_title.strip()
    return any(
        title == ae
        and peer_in(peer, networks)
        and (subject is None or (cert is not None and subject <= cert))
        for title, networks, subject in callers
    )


class StoreHandler:
    """EVT_C_STORE: the only place that decides a C-STORE status."""

    def __init__(
        self,
        store: Store,
        quiet: float,
        metrics: Metrics,
        *,
        on_disk: bool,
        keywords: Iterable[str],
    ) -> None:
        self.store = store
        self.keywords = tuple(keywords)
        self.on_disk = on_disk
        self.quiet = quiet
        self.metrics = metrics
        # per-association outcome counts, logged once when the association ends
        self.tallies: dict[int, Counter[str]] = {}
        # per-association Study Instance UIDs stored, for the audit record at its end
        self.studies: dict[int, set[str]] = {}

    def _count(self, event: evt.Event, outcome: str, nbytes: int = 0) -> None:
        self.metrics.instances.labels(outcome=outcome).inc()
        tally = self.tallies.setdefault(id(event.assoc), Counter())
        tally[outcome] += 1
        tally["bytes"] += nbytes

    def __call__(self, event: evt.Event) -> int | Dataset:
        assoc = event.assoc
        source = f"{assoc.requestor.ae_title.strip()}@{assoc.requestor.address}"
        try:
            status = self._store(event, source)
        except Transient as exc:
            self.metrics.spool_errors.labels(kind=type(exc).__name__).inc()
            self._count(event, "out_of_resources")
            log.error("dicom.instance.not_stored", reason=exc.message, source=source, status="A700")
            return _status(OUT_OF_RESOURCES, f"Gateway cannot store now: {exc.message}")
        except Permanent as exc:
            self._count(event, "refused")
            code = getattr(exc, "status", CANNOT_UNDERSTAND)
            detail = getattr(exc, "detail", "")  # more than the Error Comment's 64 characters
            log.warning(
                "dicom.instance.refused",
                reason=exc.message,
                source=source,
                status=f"{code:04X}",
                **({"detail": detail} if detail else {}),
            )
            return _status(code, exc.message)
        except Exception as exc:  # a bug must never answer success
            self._count(event, "error")
            log.error("dicom.instance.failed", source=source, **exception_fields(exc))
            return _status(PROCESSING_FAILURE, "Gateway internal error; see gateway log")
        return status

    def _store(self, event: evt.Event, source: str) -> int | Dataset:
        data: bytes | Path
        syntax = str(event.context.transfer_syntax)
        request = cast(C_STORE, event.request)
        request_uid = str(request.AffectedSOPInstanceUID)
        request_class = str(request.AffectedSOPClassUID)
        if self.on_disk:
            # pynetdicom wrote the instance, as received, to a Part 10 file in the incoming
            # directory while the fragments arrived: memory stays small whatever its size.
            # pynetdicom deletes the file after we answer.  One memory map serves the check
            # and the header read.
            data = event.dataset_path
            with mapped(data) as view:
                meta = read_file_meta(view)
                with view[meta.offset :] as body_view:
                    _check(body_view, syntax)
                header = read_header(view, self.keywords)
                size = len(view)
        else:
            body: bytes = event.encoded_dataset(include_meta=False)
            _check(body, syntax)
            # the file meta pynetdicom would write (``event.file_meta``), made directly
            meta_bytes = encode_file_meta(
                request_class,
                request_uid,
                syntax,
                PYNETDICOM_IMPLEMENTATION_UID,
                PYNETDICOM_IMPLEMENTATION_VERSION,
            )
            data = b"".join((b"\x00" * 128, b"DICM", meta_bytes, body))
            size = len(data)
            header = read_header(data, self.keywords)
        if not header.sop_instance_uid:
            raise _refusal(MISSING_IDENTIFIER, "SOP Instance UID (0008,0018) is missing")
        if header.sop_instance_uid != request_uid:
            raise _refusal(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Instance UID in the data set differs from the C-STORE request",
            )
        if header.sop_class_uid and header.sop_class_uid != request_class:
            raise _refusal(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class UID in the data set differs from the C-STORE request",
            )
        if not header.study_instance_uid:
            raise _refusal(MISSING_IDENTIFIER, "Study Instance UID (0020,000D) is missing")
        started = time.perf_counter()
        ack = self.store.ingest_instance(
            data,
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            attrs=header.attrs,
            source=source,
            quiet=self.quiet,
        )
        self._count(event, "stored" if ack.new else "duplicate", size if ack.new else 0)
        self.studies.setdefault(id(event.assoc), set()).add(header.study_instance_uid)
        if ack.new:
            self.metrics.instance_bytes.inc(size)
        if not log.isEnabledFor(logging.DEBUG):  # the keyed hashes below cost a little
            return SUCCESS
        log.debug(
            "dicom.instance.stored" if ack.new else "dicom.instance.duplicate",
            envelope_id=ack.envelope_id,
            source=source,
            bytes=size,
            sop=self.store.keys.index("log", header.sop_instance_uid)[:12],
            study=self.store.keys.index("log", header.study_instance_uid)[:12],
            modality=header.attrs.get("Modality"),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return SUCCESS


def _check(body: Buffer, syntax: str) -> None:
    """:func:`check_dataset`: a malformed data set is 0xC210 (the default); pixel data that
    cannot be the image it claims to be is 0xC213 (:data:`PIXEL_DATA_MISMATCH`, where the
    network module says why that code), the attributes it was measured against logged."""
    try:
        check_dataset(body, syntax, sequences=SEQUENCE_TAGS)
    except PixelDataMismatch as exc:
        raise _refusal(PIXEL_DATA_MISMATCH, exc.message, exc.detail) from None


class _Refusal(MalformedInput):
    status = CANNOT_UNDERSTAND
    detail = ""  # logged with the reason, not sent


def _refusal(status: int, message: str, detail: str = "") -> _Refusal:
    exc = _Refusal(message)
    exc.status = status
    exc.detail = detail
    return exc


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


HANDSHAKE_TIMEOUT = 30.0  # seconds a TLS client gets to complete its handshake


class _AssociationServer(ThreadedAssociationServer):
    """A listener of ours: with *reuse_port*, bound with ``SO_REUSEPORT`` so that several
    ingest processes share the port (the kernel spreads the connections among them).
    It is stopped by :meth:`shutdown`, outside pynetdicom's list of the servers that
    ``AE.start_server`` made."""

    def __init__(self, *args: Any, reuse_port: bool = False, **kwargs: Any) -> None:
        self.reuse_port = reuse_port  # read by server_bind, which the base __init__ calls
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _TLSAssociationServer(_AssociationServer):
    """pynetdicom's server runs the TLS handshake inside its accept loop with no deadline,
    so one silent client (a port scanner, a half-open peer) stalls the TLS port for every
    other client and blocks shutdown.  Here the handshake runs in the connection's own
    thread, within :data:`HANDSHAKE_TIMEOUT`; the accept loop never waits on a peer."""

    daemon_threads = True  # a handshake still waiting must not hold up shutdown

    def __init__(
        self, *args: Any, tls: ssl.SSLContext, audit: Auditor = NO_AUDIT, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._tls = tls
        self.audit = audit

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(HANDSHAKE_TIMEOUT)
            secured = self._tls.wrap_socket(request, server_side=True)
            secured.settimeout(None)  # pynetdicom expects a blocking socket from here on
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            peer = str(client_address[0]) if isinstance(client_address, tuple) else None
            log.warning(
                "dicom.tls.handshake_failed",
                peer=peer,
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )
            self.audit(
                records.tls_refused("DICOM", peer or "?", f"{type(exc).__name__}: {str(exc)[:200]}")
            )
            self.shutdown_request(request)
            return
        super().process_request_thread(secured, client_address)


def purge_incoming(incoming: Path, older_than: float = 0.0) -> int:
    """Delete partial receptions: files of associations that aborted mid-instance, or
    of a gateway that was killed.  Nothing in them was acknowledged.  A live transfer
    touches its file with every fragment, so *older_than* seconds of silence mean dead.
    """
    removed = 0
    if not incoming.is_dir():
        return 0
    cutoff = time.time() - older_than
    for entry in os.scandir(incoming):
        with contextlib.suppress(OSError):
            if entry.is_file() and entry.stat().st_mtime <= cutoff:
                os.unlink(entry.path)
                removed += 1
    if removed:
        log.info("dicom.incoming.purged", files=removed)
    return removed


class DicomSCP:
    """The DICOM listener(s): plain on ``port``, TLS on ``tls.port`` when configured."""

    def __init__(
        self,
        cfg: DicomSection,
        store: Store,
        metrics: Metrics,
        *,
        incoming: Path,
        keywords: Iterable[str],
        ssl_context: ssl.SSLContext | None = None,
        audit: Auditor = NO_AUDIT,
        reuse_port: bool = False,
        purge_older_than: float = 0.0,
    ) -> None:
        configure_pynetdicom(incoming if cfg.receive_to_disk else None)
        self.incoming = incoming
        # several ingest processes: the port is shared, and incoming/ holds the partial
        # files of the others' live transfers (only silent ones are purged at start)
        self.reuse_port = reuse_port
        self.purge_older_than = purge_older_than
        self.audit = audit
        self.cfg = cfg
        self.metrics = metrics
        self.ssl_context = ssl_context
        self._callers = resolve_callers(cfg.allowed_callers)
        ae = AE(ae_title=cfg.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.network_timeout = NETWORK_TIMEOUT
        # Storage: UNRESTRICTED_STORAGE_SERVICE (configure_pynetdicom) accepts every storage
        # (and private or unknown) SOP class with the first transfer syntax proposed and
        # ignores supported storage contexts, so none are added: pynetdicom deep-copies the
        # supported contexts for every association, and the 130 storage classes x 35
        # syntaxes it used to copy cost about 0.2 s of CPU per association.
        for cx in VerificationPresentationContexts:
            ae.add_supported_context(cast(str, cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self.store_handler = StoreHandler(
            store, cfg.study_complete_after, metrics, on_disk=cfg.receive_to_disk, keywords=keywords
        )
        self.handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self.store_handler),
        ]
        self.servers: list[ThreadedAssociationServer] = []
        self._open: dict[int, float] = {}

    def reconfigure(self, cfg: DicomSection, keywords: Iterable[str]) -> None:
        """Apply a reloaded config's allow-list, quiet period and routing keywords; running
        associations are not touched.  (Ports, AE title and TLS need a restart.)"""
        self._callers = resolve_callers(cfg.allowed_callers)
        self.store_handler.quiet = cfg.study_complete_after
        self.store_handler.keywords = tuple(keywords)

    def purge_incoming(self, older_than: float = 0.0) -> int:
        """:func:`purge_incoming` of this SCP's folder."""
        return purge_incoming(self.incoming, older_than)

    def start(self) -> None:
        self.purge_incoming(self.purge_older_than)
        if self.cfg.port is not None:  # null: TLS only
            plain = cast(
                _AssociationServer,
                self.ae.make_server(
                    (self.cfg.host, self.cfg.port),
                    evt_handlers=self.handlers,
                    server_class=_AssociationServer,
                    reuse_port=self.reuse_port,
                ),
            )
            threading.Thread(target=plain.serve_forever, name="dicom-acceptor", daemon=True).start()
            self.servers.append(plain)
        if self.cfg.tls is not None and self.ssl_context is not None:
            server = cast(
                _TLSAssociationServer,
                self.ae.make_server(
                    (self.cfg.host, self.cfg.tls.port),
                    evt_handlers=self.handlers,
                    server_class=_TLSAssociationServer,
                    tls=self.ssl_context,
                    audit=self.audit,
                    reuse_port=self.reuse_port,
                ),
            )
            threading.Thread(
                target=server.serve_forever, name="dicom-tls-acceptor", daemon=True
            ).start()
            self.servers.append(server)
        log.info("dicom.listening", ae_title=self.cfg.ae_title, ports=self.ports)

    @property
    def ports(self) -> list[int]:
        return [int(s.server_address[1]) for s in self.servers]

    def stop(self, drain: float = 10.0) -> None:
        """Stop accepting; give running associations *drain* seconds to finish, then abort
        the rest (their unacknowledged instances are resent by the peer)."""
        for server in self.servers:
            server.shutdown()
        self.servers.clear()
        deadline = time.monotonic() + drain
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            log.warning("dicom.associations_aborted", count=len(self.ae.active_associations))
        self.ae.shutdown()

    # --- observers and the association decider -------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS
        reactor.install(event.assoc)  # serve each message as soon as it is decoded

    def _on_connection_closed(self, event: evt.Event) -> None:
        """A connection closed before its A-ASSOCIATE-RQ (a port scanner, a TLS probe, a
        load balancer's health check): pynetdicom's acceptor would go on waiting
        ``acse_timeout`` for the request, holding one of ``max_associations`` slots, so a
        burst of such connections locked real peers out for 30 s.  An empty item in the
        queue it waits on ends that wait at once (pynetdicom reads it as the timeout)."""
        assoc = event.assoc
        if assoc.is_established or assoc.requestor.primitive is not None:
            return
        if assoc.dul.to_user_queue.empty():
            assoc.dul.to_user_queue.put(None)

    def _on_requested(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        ae_title = str(cast(A_ASSOCIATE, req.primitive).calling_ae_title).strip()
        cert = peer_subject(getattr(event.assoc.dul.socket, "socket", None))
        if not caller_allowed(ae_title, req.address, self._callers, cert):
            self.metrics.associations.labels(outcome="rejected").inc()
            log.warning(
                "dicom.association.rejected",
                reason="calling AE title, host (and certificate subject, where the "
                "allow-list binds one) are not on the allow-list",
                cert_subject=subject_text(cert) or None,
                calling_ae=ae_title,
                peer=req.address,
                hint="add them under dicom.allowed_callers",
            )
            self.audit(
                records.dicom_caller_refused(
                    ae_title,
                    req.address,
                    self.cfg.ae_title,
                    cert_subject=subject_text(cert) if cert else None,
                )
            )
            # 0x01 rejected-permanent, 0x01 service-user, 0x03 calling AE not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # as pynetdicom does after its own rejections: flush, then close

    def _on_established(self, event: evt.Event) -> None:
        self.metrics.associations.labels(outcome="accepted").inc()
        self.metrics.active_associations.inc()
        self._open[id(event.assoc)] = time.monotonic()
        log.info(
            "dicom.association.accepted",
            calling_ae=event.assoc.requestor.ae_title.strip(),
            peer=event.assoc.requestor.address,
        )
        self.audit(
            records.association_accepted(
                event.assoc.requestor.ae_title.strip(),
                event.assoc.requestor.address,
                self.cfg.ae_title,
            )
        )

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections: wrong called AE title, too many associations.
        prim = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
        self.metrics.associations.labels(outcome="rejected").inc()
        log.warning(
            "dicom.association.rejected",
            calling_ae=str(prim.calling_ae_title).strip(),
            called_ae=str(prim.called_ae_title).strip(),
            peer=event.assoc.requestor.address,
            expected_called_ae=self.cfg.ae_title,
            max_associations=self.cfg.max_associations,
        )
        self.audit(
            records.association_rejected(
                str(prim.calling_ae_title).strip(),
                event.assoc.requestor.address,
                str(prim.called_ae_title).strip(),
            )
        )

    def _on_closed(self, event: evt.Event) -> None:
        if event.event is evt.EVT_ABORTED:
            # Its partial file, if any, goes once no live transfer could still be writing it.
            timer = threading.Timer(
                2 * NETWORK_TIMEOUT + 1, self.purge_incoming, kwargs={"older_than": NETWORK_TIMEOUT}
            )
            timer.daemon = True
            timer.start()
        started = self._open.pop(id(event.assoc), None)
        if started is None:
            return
        self.metrics.active_associations.dec()
        tally = self.store_handler.tallies.pop(id(event.assoc), Counter())
        studies = self.store_handler.studies.pop(id(event.assoc), set())
        if tally.get("stored") or tally.get("duplicate") or tally.get("refused"):
            failed = tally.get("refused", 0) + tally.get("out_of_resources", 0)
            aborted = event.event is not evt.EVT_RELEASED
            self.audit(
                records.instances_received(
                    event.assoc.requestor.ae_title.strip(),
                    event.assoc.requestor.address,
                    self.cfg.ae_title,
                    studies=studies,
                    stored=int(tally.get("stored", 0)),
                    duplicates=int(tally.get("duplicate", 0)),
                    refused=failed,
                    aborted=aborted,
                )
            )
        log.info(
            "dicom.association.released"
            if event.event is evt.EVT_RELEASED
            else "dicom.association.aborted",
            calling_ae=event.assoc.requestor.ae_title.strip(),
            peer=event.assoc.requestor.address,
            seconds=round(time.monotonic() - started, 3),
            **{k: v for k, v in sorted(tally.items())},
        )

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS
