"""The HL7 edge out: an MLLP client with one persistent connection per destination.

:class:`HL7Sender` is synchronous for its caller (one delivery worker thread per
destination) and runs the byte-level MLLP code of :mod:`gateway.hl7.mllp` on a private
event loop, so framing exists once in the project.  Each :meth:`HL7Sender.send` writes one
framed message, waits for one ACK frame and reads it truthfully:

- MSA-2 must echo the message's MSH-10, or the connection is out of step: retry.
- MSA-1 is classified by :func:`classify_ack`, the one place that maps an ACK code to an
  :class:`~gateway.deliver.Outcome`.
- no ACK within the timeout, a refused / reset / closed connection, an unreadable ACK:
  retry, and the connection is dropped so that the next send reconnects.

The message bytes are sent exactly as given (MSH-10 stays stable across retries) and
never appear in an error message: errors name the destination (host:port) and what the
peer said (MSA-1, MSA-3, ERR).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from dataclasses import dataclass
from types import TracebackType

import structlog

from gateway.config import HL7Destination
from gateway.deliver import DeliveryRefused, DeliveryRetry, Outcome
from gateway.errors import GatewayError
from gateway.hl7.message import Separators, split_segments, unescape
from gateway.hl7.mllp import FramingError, frame, read_frame
from gateway.hl7.msh import Header, HeaderError, parse_header

__all__ = ["AckOutcome", "HL7Sender", "UnreadableAck", "classify_ack", "parse_ack"]

log = structlog.get_logger(__name__)

DELIVERED_CODES = frozenset({"AA", "CA"})
RETRY_CODES = frozenset({"AE", "CE"})
REFUSED_CODES = frozenset({"AR", "CR"})

MAX_ACK_BYTES = 1024 * 1024
ACK_TIMEOUT = 30.0  # seconds for connect + send + ACK, unless the caller says otherwise
MAX_PEER_TEXT = 200  # characters of MSA-3 / ERR text kept in an error message
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


def classify_ack(code: str) -> Outcome:
    """MSA-1 -> outcome: AA/CA delivered, AE/CE transient (retried up to the policy),
    AR/CR permanent (dead letter).  Anything else is not a confirmation: transient."""
    code = code.strip().upper()
    if code in DELIVERED_CODES:
        return Outcome.DELIVERED
    if code in REFUSED_CODES:
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


@dataclass(frozen=True)
class AckOutcome:
    """What the destination answered: MSA-1 ``code``, MSA-2 ``control_id`` (the MSH-10 it
    acknowledges), MSA-3 ``text`` and the ERR segments' texts, unescaped."""

    code: str
    control_id: str
    text: str = ""
    errors: tuple[str, ...] = ()

    @property
    def outcome(self) -> Outcome:
        return classify_ack(self.code)

    def describe(self) -> str:
        """``AE: <MSA-3>; ERR: <code text (location)>`` with the peer's texts shortened."""
        said = [self.code or "(no MSA-1)"]
        if self.text:
            said.append(f": {_shorten(self.text)}")
        if self.errors:
            said.append(f"; ERR: {_shorten(' | '.join(self.errors))}")
        return "".join(said)


class UnreadableAck(ValueError):
    """The answer is not an ACK that can be read (no MSH separators, no MSA)."""


def parse_ack(payload: bytes) -> AckOutcome:
    """Read MSA and ERR from an ACK message (separators from its MSH).

    Raises :class:`UnreadableAck` when there is no readable MSH or no MSA segment.
    """
    try:
        header: Header = parse_header(payload)
    except HeaderError as exc:
        # An ACK need not satisfy what we require of incoming messages (a version we do
        # not accept, no MSH-9): its separators are all that is needed here.
        if exc.partial is None:
            raise UnreadableAck(f"no readable MSH: {exc.message}") from None
        header = exc.partial
    seps = header.separators
    fs = seps.field
    msa: list[str] | None = None
    errors: list[str] = []
    for segment in split_segments(payload.decode("latin-1"), fs):
        if segment.startswith("MSA" + fs) and msa is None:
            msa = segment.split(fs)
        elif segment.startswith("ERR" + fs):
            described = _describe_err(segment.split(fs), seps)
            if described:
                errors.append(described)
    if msa is None:
        raise UnreadableAck("the ACK has no MSA segment")

    def field(n: int) -> str:
        return _text(msa[n], seps) if n < len(msa) else ""

    return AckOutcome(
        code=field(1).strip().upper(),
        control_id=field(2),
        text=field(3),
        errors=tuple(errors),
    )


def _describe_err(fields: list[str], seps: Separators) -> str:
    """``code text (at SEG-n)`` from ERR-3 + ERR-2 (v2.5+) or ERR-1 (before 2.5), plus the
    ERR-8 user message when present."""
    comp, sub = seps.component, seps.subcomponent

    def at(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    code_text = ""
    location: list[str] = []
    if at(3):  # ERR-3 CWE: identifier ^ text ^ coding system
        parts = at(3).split(comp)
        code_text = " ".join(_text(p, seps) for p in parts[:2] if p)
        location = at(2).split(comp)[:3] if at(2) else []
    elif at(1):  # ERR-1 ELD: segment ^ sequence ^ field ^ code&text&system
        parts = at(1).split(comp)
        location = parts[:3]
        if len(parts) > 3:
            code_text = " ".join(_text(p, seps) for p in parts[3].split(sub)[:2] if p)
    where = ""
    if location and location[0]:
        field_no = location[2] if len(location) > 2 else ""
        where = f" (at {location[0]}-{field_no})" if field_no else f" (at {location[0]})"
    message = " ".join(p for p in (code_text + where, _text(at(8), seps)) if p)
    return message.strip()


def _text(value: str, seps: Separators) -> str:
    """A value the peer wrote, its separator escapes undone (as the ACK reader does)."""
    return unescape(value, seps, formatting=False)


def _shorten(value: str) -> str:
    value = _CONTROL_CHARS.sub(" ", value).strip()
    return value if len(value) <= MAX_PEER_TEXT else value[: MAX_PEER_TEXT - 3] + "..."


class _PeerClosed(Exception):
    """The peer closed the connection before any byte of an ACK arrived."""


class HL7Sender:
    """An MLLP client for one destination: a persistent connection, opened on the first
    :meth:`send` and reopened after any error.  Not for concurrent use by several threads
    (a lock serialises them); one sender per destination and worker thread.

    *ssl_context* (from :func:`gateway.security.tls.client_context`) turns on TLS, with
    *server_hostname* (default: the destination host) checked against the peer's
    certificate.
    """

    def __init__(
        self,
        destination: HL7Destination,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_ack_bytes: int = MAX_ACK_BYTES,
    ) -> None:
        self.host = destination.host
        self.port = destination.port
        self._ssl = ssl_context
        self._server_hostname = (
            (server_hostname or destination.host) if ssl_context is not None else None
        )
        self._max_ack_bytes = max_ack_bytes
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False

    @property
    def destination(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def send(self, message: bytes, *, timeout: float = ACK_TIMEOUT) -> AckOutcome:
        """Send one HL7 message and return the destination's ACK when it is AA or CA.

        Raises :class:`DeliveryRetry` (a :class:`~gateway.errors.Transient`) for AE/CE, an
        ACK for another message, no ACK within *timeout* seconds (connect + send + ACK),
        and connection failures; :class:`DeliveryRefused` (a
        :class:`~gateway.errors.Permanent`) for AR/CR and for a message whose MSH cannot
        be read.
        """
        try:
            control_id = parse_header(message).control_id
        except HeaderError as exc:
            raise DeliveryRefused(
                f"HL7 message for {self.destination} not sent: its MSH cannot be read "
                f"({exc.message})"
            ) from None
        with self._lock:
            if self._closed:
                raise RuntimeError("the HL7 sender is closed")
            try:
                ack = self._loop.run_until_complete(self._send(message, control_id, timeout))
            finally:
                if self._writer is None:
                    # let a dropped transport run its close callbacks (free the socket now)
                    self._loop.run_until_complete(asyncio.sleep(0))
        outcome = classify_ack(ack.code)
        if outcome is Outcome.DELIVERED:
            return ack
        if outcome is Outcome.PERMANENT:
            raise DeliveryRefused(
                f"HL7 destination {self.destination} refused the message: {ack.describe()}"
            )
        raise DeliveryRetry(
            f"HL7 destination {self.destination} did not accept the message: {ack.describe()}"
        )

    async def _send(self, message: bytes, control_id: str, timeout: float) -> AckOutcome:
        try:
            async with asyncio.timeout(timeout):
                reused = self._writer is not None
                try:
                    payload = await self._roundtrip(message)
                except (_PeerClosed, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    # The idle connection was closed by the peer (restart, idle timeout):
                    # the message did not get through on it, so send it on a fresh one.
                    self._drop()
                    log.info("deliver.hl7.reconnect", destination=self.destination)
                    payload = await self._roundtrip(message)
            ack = parse_ack(payload)
        except TimeoutError:
            self._drop()
            raise DeliveryRetry(
                f"no ACK from HL7 destination {self.destination} within {timeout:g} s; "
                "connection closed, will retry"
            ) from None
        except _PeerClosed:
            self._drop()
            raise DeliveryRetry(
                f"HL7 destination {self.destination} closed the connection without an ACK"
            ) from None
        except UnreadableAck as exc:
            self._drop()
            raise DeliveryRetry(
                f"HL7 destination {self.destination} sent an unreadable ACK: {exc}"
            ) from None
        except FramingError as exc:
            self._drop()
            raise DeliveryRetry(
                f"HL7 destination {self.destination} broke MLLP framing: {exc.message}"
            ) from None
        except ssl.SSLError as exc:
            self._drop()
            reason = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
            raise DeliveryRetry(
                f"TLS with HL7 destination {self.destination} failed: {reason}"
            ) from None
        except ConnectionRefusedError:
            self._drop()
            raise DeliveryRetry(
                f"HL7 destination {self.destination} refused the connection (not listening?)"
            ) from None
        except OSError as exc:
            self._drop()
            what = exc.strerror or type(exc).__name__
            raise DeliveryRetry(
                f"connection to HL7 destination {self.destination} failed: {what}"
            ) from None
        except GatewayError:
            self._drop()
            raise
        if ack.control_id != control_id:
            # An ACK for another message: the exchange is out of step; start afresh.
            self._drop()
            raise DeliveryRetry(
                f"HL7 destination {self.destination} acknowledged another message "
                "(MSA-2 does not match the sent MSH-10); connection reset, will retry"
            )
        return ack

    async def _roundtrip(self, message: bytes) -> bytes:
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self._server_hostname,
                limit=64 * 1024,
            )
            log.debug("deliver.hl7.connected", destination=self.destination)
        self._writer.write(frame(message))
        await self._writer.drain()
        payload = await read_frame(self._reader, self._max_ack_bytes)
        if payload is None:
            raise _PeerClosed
        return payload

    def _drop(self) -> None:
        """Forget the connection at once (no TLS close handshake with a broken peer)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.transport.abort()

    def close(self) -> None:
        """Close the connection (politely) and the sender; further sends raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer, self._reader, self._writer = self._writer, None, None
            if writer is not None:
                writer.close()
                try:
                    self._loop.run_until_complete(asyncio.wait_for(writer.wait_closed(), 2))
                except (OSError, TimeoutError, ssl.SSLError):
                    writer.transport.abort()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    def __enter__(self) -> HL7Sender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
