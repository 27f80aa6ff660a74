"""The HL7 v2 ingest edge: an asyncio MLLP server that stores each message, then ACKs it.

Per connection: read a frame, decide, answer, repeat.  The decision, in order:

1. the MSH segment cannot be read or names an unsupported version -> AR with its ERR code;
2. the sender (MSH-3, MSH-4 when configured, peer address) is not allowed -> AR, ERR 207;
3. the store keeps it durably (one SQLite commit, in a dedicated thread so the event loop
   keeps serving other connections) -> AA, *after* the commit; a resent MSH-10 from the
   same sender gets the ACK stored with the first copy and is not stored again;
4. the store cannot write now (:class:`~gateway.errors.Transient`) -> AE, ERR 207, nothing
   stored, the sender resends later; anything unexpected -> AE, ERR 207, logged.

Enhanced acknowledgement mode (MSH-15 valued) answers with the accept ACK instead:
CA / CE / CR for AA / AE / AR, sent according to MSH-15 (AL always, ER on error only,
SU on success only, NE never).  Application-level ACKs (MSH-16) are not sent here: they
come from later stages, once the message has been processed.

A framing error closes that connection (others keep running); so does a connection idle
for ``hl7.idle_timeout``.  Logs carry ids only: envelope id, sender application/facility,
peer address, message type, ACK code, sizes, and a keyed hash of MSH-10, never content.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import structlog

from gateway.config import AllowedSender, HL7Section, parse_subject
from gateway.errors import SpaceLow, Transient
from gateway.hl7.ack import COMMIT_CODE, ERROR_CODES, build_ack
from gateway.hl7.mllp import FramingError, frame, read_frame
from gateway.hl7.msh import ERR_APPLICATION_INTERNAL, Header, HeaderError, parse_header
from gateway.observability.logging import exception_fields
from gateway.security.allowlist import IPNetwork, peer_in, resolve_hosts
from gateway.security.audit import NO_AUDIT, Auditor, records
from gateway.security.tls import peer_subject, subject_text
from gateway.store.store import Store

log = structlog.get_logger(__name__)

AUDIT_BATCH = 200  # received messages named in one audit record, at most
AUDIT_SECONDS = 1.0  # how long a received message waits for its audit record, at most
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds a client on the TLS port gets for its handshake

OnMessage = Callable[[str, str], None]
"""Metrics hook: called once per message with (message type, ACK code) e.g. ("ORU^R01", "AA");
the code is the one decided even when MSH-15 says not to send it."""

OnConnection = Callable[[str], None]
"""Metrics hook: called once per closed connection with its outcome: closed_by_peer,
idle_timeout, framing_error, gateway_stopping, connection_lost or internal_error."""

STORE_FAILED_TEXT = "gateway cannot store the message now (disk full?); resend later"
INTERNAL_ERROR_TEXT = "gateway internal error; the message was not stored, resend later"


@dataclass(frozen=True)
class _Sender:
    application: str
    facility: str | None
    networks: tuple[IPNetwork, ...]
    subject: frozenset[tuple[str, str]] | None = None  # the TLS client certificate's

    def allows(
        self, header: Header, peer: str, cert: frozenset[tuple[str, str]] | None = None
    ) -> bool:
        if header.sending_application.casefold() != self.application:
            return False
        if self.facility is not None and header.sending_facility.casefold() != self.facility:
            return False
        if self.subject is not None and (cert is None or not self.subject <= cert):
            return False
        return peer_in(peer, self.networks)


@dataclass(eq=False)  # compared and hashed by identity: kept in a set
class _Connection:
    peer: str
    task: asyncio.Task[None] | None = None
    busy: bool = False
    messages: int = 0


def _peer_host(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return str(peername[0]) if isinstance(peername, tuple) and peername else "unknown"


class HL7Listener:
    """MLLP listener on ``hl7.host:hl7.port`` (plain) and, when ``hl7.tls`` is set, on
    ``hl7.tls.port`` with *ssl_context*.  Port 0 binds a free port: see :attr:`port`."""

    def __init__(
        self,
        config: HL7Section,
        store: Store,
        ssl_context: ssl.SSLContext | None = None,
        *,
        on_message: OnMessage | None = None,
        on_connection: OnConnection | None = None,
        clock: Callable[[], datetime] | None = None,
        audit: Auditor = NO_AUDIT,
        reuse_port: bool = False,
    ) -> None:
        if (config.tls is None) != (ssl_context is None):
            raise ValueError("hl7.tls and the ssl context go together: give both or neither")
        self.config = config
        self.store = store
        self.ssl_context = ssl_context
        self.on_message = on_message
        self.on_connection = on_connection
        self.audit = audit  # records are written off the event loop (Auditor.later)
        # SO_REUSEPORT: several ingest processes listen on the same ports
        self.reuse_port = reuse_port or None
        # received messages are audited in batches: one record per sender and host for
        # up to AUDIT_BATCH messages or AUDIT_SECONDS, so the ACK path pays no fsync
        self._received: dict[tuple[str, str, str], list[str]] = {}
        self._audit_flush: asyncio.TimerHandle | None = None
        self._clock = clock or (lambda: datetime.now().astimezone())
        self._executor: ThreadPoolExecutor | None = None
        self._servers: list[asyncio.Server] = []
        self._ports: dict[str, int] = {}
        self._senders: list[_Sender] = []
        self._connections: set[_Connection] = set()
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the allow-list and start listening."""
        self._stopping = False
        self._senders = [await self._resolve(s) for s in self.config.allowed_senders]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hl7-store")
        if self.config.port is not None:  # null: TLS only
            plain = await asyncio.start_server(
                self._serve,
                self.config.host,
                self.config.port,
                limit=_reader_limit(self.config.max_frame_bytes),
                reuse_port=self.reuse_port,
            )
            self._servers.append(plain)
            self._ports["mllp"] = _bound_port(plain)
        if self.config.tls is not None and self.ssl_context is not None:
            # TCP first, then our own handshake (_serve_tls): asyncio's ssl= server drops a
            # failed handshake without telling us, and a refused peer must be audited
            secure = await asyncio.start_server(
                self._serve_tls,
                self.config.host,
                self.config.tls.port,
                limit=_reader_limit(self.config.max_frame_bytes),
                reuse_port=self.reuse_port,
            )
            self._servers.append(secure)
            self._ports["mllp+tls"] = _bound_port(secure)
        log.info("hl7.listening", host=self.config.host, ports=dict(self._ports))

    async def update_allowed_senders(self, senders: list[AllowedSender]) -> None:
        """Apply a reloaded allow-list; open connections keep running under the new one."""
        self._senders = [await self._resolve(s) for s in senders]

    async def stop(self) -> None:
        """Stop accepting, let each connection finish (and ACK) the message it is handling,
        then close every connection."""
        self._stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()  # waiting for a frame: nothing to finish
        tasks = [c.task for c in self._connections if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._flush_received()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        log.info("hl7.stopped")

    @property
    def port(self) -> int | None:
        """The bound plain MLLP port (the real one when the config says 0); ``None`` when
        the plain port is switched off (``hl7.port: null``)."""
        return self._ports.get("mllp")

    @property
    def tls_port(self) -> int | None:
        """The bound MLLP-over-TLS port, or ``None`` when TLS is not configured."""
        return self._ports.get("mllp+tls")

    @property
    def ports(self) -> dict[str, int]:
        """All bound ports by name: ``mllp`` and, with TLS, ``mllp+tls``."""
        return dict(self._ports)

    async def _resolve(self, sender: AllowedSender) -> _Sender:
        loop = asyncio.get_running_loop()
        # DNS for host names runs off the event loop: a reload must not stall connections
        networks, unresolved = await loop.run_in_executor(None, resolve_hosts, sender.hosts)
        for host in unresolved:
            log.warning("hl7.allowlist.unresolved", host=host)
        return _Sender(
            application=sender.application.casefold(),
            facility=sender.facility.casefold() if sender.facility is not None else None,
            networks=networks,
            subject=parse_subject(sender.cert_subject) if sender.cert_subject else None,
        )

    # --- connections --------------------------------------------------------------------

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection on the TLS port: the handshake (client certificate verified against
        hl7.tls.ca, TLS 1.2+), within :data:`TLS_HANDSHAKE_TIMEOUT`; a refusal is logged and
        audited as a security alert, and the connection closed."""
        host = _peer_host(writer)
        assert self.ssl_context is not None
        try:
            await writer.start_tls(self.ssl_context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:  # ssl.SSLError is an OSError
            # e.g. "CERTIFICATE_VERIFY_FAILED (certificate has expired)"
            reason = getattr(exc, "reason", None) or str(exc)[:200] or "no handshake"
            if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
                reason = f"{reason} ({exc.verify_message})"
            log.warning(
                "hl7.tls.handshake_failed", peer=host, error=type(exc).__name__, reason=reason
            )
            self.audit.later(records.tls_refused("MLLP", host, f"{type(exc).__name__}: {reason}"))
            writer.close()
            return
        await self._serve(reader, writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = _peer_host(writer)
        conn = _Connection(peer=host, task=asyncio.current_task())
        cert = peer_subject(writer.get_extra_info("ssl_object"))
        if self._stopping:
            writer.close()
            return
        self._connections.add(conn)
        bound = log.bind(peer=host, tls=writer.get_extra_info("sslcontext") is not None)
        bound.info("hl7.connection.open")
        reason = "closed_by_peer"
        error_type: str | None = None
        try:
            while not self._stopping:
                try:
                    async with asyncio.timeout(self.config.idle_timeout):
                        payload = await read_frame(reader, self.config.max_frame_bytes)
                except TimeoutError:
                    reason = "idle_timeout"
                    break
                if payload is None:
                    break
                conn.busy = True
                reply = await self._handle(payload, host, cert)
                if reply is not None:
                    writer.write(frame(reply))
                    async with asyncio.timeout(self.config.idle_timeout):
                        await writer.drain()
                conn.messages += 1
                conn.busy = False
            else:
                reason = "gateway_stopping"
        except FramingError as exc:
            reason = "framing_error"
            bound.warning("hl7.framing_error", error=exc.message)
        except asyncio.CancelledError:
            reason = "gateway_stopping"
            if not self._stopping:
                raise
            if conn.task is not None:
                conn.task.uncancel()  # our own stop(): end quietly
        except (OSError, TimeoutError) as exc:  # reset, broken pipe, TLS error, stuck writer
            reason = "connection_lost"
            error_type = type(exc).__name__
        except Exception as exc:
            reason = "internal_error"
            error_type = type(exc).__name__
            bound.error("hl7.connection.failed", **exception_fields(exc))
        finally:
            self._connections.discard(conn)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await writer.wait_closed()
            bound.info(
                "hl7.connection.closed",
                reason=reason,
                messages=conn.messages,
                error_type=error_type,
            )
            self._hook(self.on_connection, reason)

    async def _handle(
        self, raw: bytes, host: str, cert: frozenset[tuple[str, str]] | None = None
    ) -> bytes | None:
        """Decide and build the reply to one message; ``None`` when MSH-15 says no reply."""
        started = time.perf_counter()
        try:
            header = parse_header(raw)
        except HeaderError as exc:
            partial = exc.partial
            reply = self._refuse(partial, "AR", exc.message, exc.code, exc.location)
            log.warning(
                "hl7.message.rejected",
                peer=host,
                size=len(raw),
                error_code=exc.code,
                error=exc.message,
                ack_code=_code(partial, "AR"),
                sender_app=partial.sending_application if partial else None,
                sender_facility=partial.sending_facility if partial else None,
            )
            self._count(partial.message_type if partial else "", _code(partial, "AR"))
            return _send_policy(partial, "AR", reply)
        fields = {
            "peer": host,
            "sender_app": header.sending_application,
            "sender_facility": header.sending_facility,
            "message_type": header.message_type,
            "version": header.version,
            "size": len(raw),
        }
        if not self._allowed(header, host, cert):
            text = (
                f"sender {header.sending_application}^{header.sending_facility} "
                f"from {host} is not allowed"
            )
            reply = self._refuse(header, "AR", text, ERR_APPLICATION_INTERNAL, ("MSH", 1, 3))
            log.warning(
                "hl7.message.rejected",
                **fields,
                ack_code=_code(header, "AR"),
                error="sender not allowed",
            )
            self.audit.later(
                records.hl7_sender_refused(
                    header.sending_application,
                    header.sending_facility,
                    host,
                    header.control_id,
                    cert_subject=subject_text(cert) if cert else None,
                )
            )
            self._count(header.message_type, _code(header, "AR"))
            return _send_policy(header, "AR", reply)

        success = _code(header, "AA")
        now = self._clock()

        def accept(envelope_id: str) -> bytes:
            return build_ack(header, success, control_id=envelope_id[:20], now=now)

        ingest = functools.partial(
            self.store.ingest_message,
            raw,
            sender=(header.sending_application, header.sending_facility),
            control_id=header.control_id,
            attrs={
                "message_type": header.message_type,
                "trigger": header.trigger,
                "structure": header.structure,
                "version": header.version,
                "segments": list(header.segment_ids),
                "sending_application": header.sending_application,
                "sending_facility": header.sending_facility,
                "processing_id": header.processing_id,
                "charset": header.charset,
            },
            source=f"{header.sending_application}^{header.sending_facility}@{host}",
            build_ack=accept,
        )
        try:
            assert self._executor is not None, "HL7Listener.start() was not called"
            result = await asyncio.get_running_loop().run_in_executor(self._executor, ingest)
        except Transient as exc:
            # the floor's reason is the sender's to know (no path, no patient data in it)
            text = (
                f"gateway cannot store the message now ({exc.message}); resend later"
                if isinstance(exc, SpaceLow)
                else STORE_FAILED_TEXT
            )
            reply = self._refuse(header, "AE", text, ERR_APPLICATION_INTERNAL, None)
            log.error(
                "hl7.message.not_stored",
                **fields,
                ack_code=_code(header, "AE"),
                error=f"{type(exc).__name__}: {exc.message}",
            )
            self._count(header.message_type, _code(header, "AE"))
            return _send_policy(header, "AE", reply)
        except Exception as exc:
            reply = self._refuse(header, "AE", INTERNAL_ERROR_TEXT, ERR_APPLICATION_INTERNAL, None)
            log.error(
                "hl7.message.failed",
                **fields,
                ack_code=_code(header, "AE"),
                **exception_fields(exc),
            )
            self._count(header.message_type, _code(header, "AE"))
            return _send_policy(header, "AE", reply)
        assert result.ack is not None
        log.info(
            "hl7.message.stored" if result.new else "hl7.message.duplicate",
            **fields,
            envelope_id=result.envelope_id,
            ack_code=success,
            control_id_hash=self.store.keys.index("log", header.control_id)[:12],
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        self._count(header.message_type, success)
        if result.new:
            self._audit_received(header, host)
        return _send_policy(header, "AA", result.ack)

    def _audit_received(self, header: Header, host: str) -> None:
        key = (header.sending_application[:64], header.sending_facility[:64], host)
        ids = self._received.setdefault(key, [])
        ids.append(header.control_id[:64] or "?")
        if len(ids) >= AUDIT_BATCH:
            self._flush_received(key)
        elif self._audit_flush is None:
            self._audit_flush = asyncio.get_running_loop().call_later(
                AUDIT_SECONDS, self._flush_received
            )

    def _flush_received(self, only: tuple[str, str, str] | None = None) -> None:
        """One ``message-received`` record per sender and host, naming each MSH-10."""
        keys = [only] if only is not None else list(self._received)
        for key in keys:
            ids = self._received.pop(key, [])
            if ids:
                application, facility, host = key
                self.audit.later(records.messages_received(application, facility, host, ids))
        if only is None or not self._received:
            if self._audit_flush is not None:
                self._audit_flush.cancel()
            self._audit_flush = None

    def _allowed(
        self, header: Header, host: str, cert: frozenset[tuple[str, str]] | None = None
    ) -> bool:
        return any(s.allows(header, host, cert) for s in self._senders)

    def _refuse(
        self,
        header: Header | None,
        code: str,
        text: str,
        error_code: int,
        location: tuple[str, int, int] | None,
    ) -> bytes:
        return build_ack(
            header,
            _code(header, code),
            control_id=uuid.uuid4().hex[:20],
            text=text,
            error_code=error_code,
            error_location=location,
            now=self._clock(),
        )

    def _count(self, message_type: str, code: str) -> None:
        self._hook(self.on_message, message_type, code)

    @staticmethod
    def _hook(hook: Callable[..., None] | None, *args: str) -> None:
        if hook is not None:
            try:
                hook(*args)
            except Exception as exc:  # a metrics problem must not cost an ACK
                log.error("hl7.metrics_hook_failed", error_type=type(exc).__name__)


def _code(header: Header | None, original: str) -> str:
    """The ACK code to send: the original-mode code, or its commit code in enhanced mode."""
    return COMMIT_CODE[original] if header is not None and header.enhanced_mode else original


def _send_policy(header: Header | None, original: str, reply: bytes) -> bytes | None:
    """Apply MSH-15 (accept acknowledgement type) in enhanced mode."""
    if header is None or not header.enhanced_mode:
        return reply
    wanted = header.accept_ack_type.upper()
    error = COMMIT_CODE[original] in ERROR_CODES
    if wanted == "NE" or (wanted == "ER" and not error) or (wanted == "SU" and error):
        return None
    return reply  # AL, or a value we do not know: always answer


def _reader_limit(max_frame_bytes: int) -> int:
    # The reader buffers up to this much while looking for the end block, so an oversized
    # frame is noticed early; read_frame copes with frames longer than the limit.
    return min(max_frame_bytes + 2, 1024 * 1024)


def _bound_port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port
