"""The DICOM edge out: a C-STORE SCU that sends one study's instances over one association.

:meth:`DicomSender.send_study` reads each instance's SOP class and transfer syntax,
proposes the presentation contexts they need (:func:`plan_contexts`), and sends every
instance in its own transfer syntax where the peer accepted it.  Such an instance goes out
byte for byte as it was received: its encoded data set is streamed from the Part 10 bytes
without being decoded (pynetdicom's chunked send), from an anonymous memory file when the
bytes came from memory, so the plaintext never lands on disk.  (A deflated data set of odd
length gains the NUL pad byte of PS3.5 A.5 on the way: :func:`_needs_pad`.)  Only when
the peer accepted no context with that syntax is the instance converted, with pydicom:
compressed data is decompressed, uncompressed data re-encoded (Explicit VR Little Endian
preferred, then Implicit).  Every status is read by :func:`classify_status`, the one classifier:

- 0x0000, and the warnings 0xB000 / 0xB006 / 0xB007 (any 0xBxxx, 0x0001, 0x0107, 0x0116):
  delivered (warnings are logged);
- 0xA7xx out of resources, 0xFE00 cancel, 0x0210 duplicate invocation, no response
  (timeout, abort): transient; the association stops there, and the instances not yet
  sent are reported transient too, so a retry sends exactly what is missing;
- 0xA9xx, 0xCxxx and the other failures: permanent for that instance; the others go on.

Association failures raise before any instance is sent: a refused connection, a timeout,
an abort or an A-ASSOCIATE-RJ "rejected-transient" raise :class:`DeliveryRetry`; a
"rejected-permanent" (e.g. unknown called AE title) or no accepted presentation context
raises :class:`DeliveryRefused`.  UIDs never appear raw in logs or messages: log fields
carry the caller's ``uid_hash``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.presentation import PresentationContext, build_context

from gateway.config import DicomDestination
from gateway.deliver import DeliveryRefused, DeliveryRetry, Outcome
from gateway.dicom.header import read_dataset, read_header
from gateway.dicom.network import DUL_POLL_SECONDS, SUCCESS
from gateway.dicom.part10 import DEFLATED, has_explicit_vr
from gateway.errors import MalformedInput

__all__ = [
    "DicomSender",
    "InstanceResult",
    "Sendable",
    "classify_status",
    "plan_contexts",
    "study_outcome",
]

log = structlog.get_logger(__name__)

Sendable = Path | bytes | Callable[[], bytes]
"""A Part 10 instance (preamble, file meta, data set): a file, the bytes, or a function
returning the bytes (called once to read the header and once to send, so that only one
instance at a time is held in memory)."""

# Anonymous memory files (Linux): the plaintext of an instance sent as it is encoded.
# Without them, instances given as bytes or loaders take the pydicom path instead.
_HAVE_MEMFD = hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()
_COPY_CHUNK = 1 << 20  # a file copied into a memory file (to pad it), this much at a time

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: at most 128 presentation contexts per association
UNCOMPRESSED_FALLBACK: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
_TRANSIENT = frozenset({0xFE00, 0x0210})  # cancel, duplicate invocation


# pynetdicom's standard event handlers: INFO/DEBUG lines (with identifiers) that the gateway
# silences anyway, at a cost per P-DATA PDU (an Event object and a lock).
_LOGGING_EVENTS = (evt.EVT_PDU_SENT, evt.EVT_PDU_RECV, evt.EVT_DIMSE_SENT, evt.EVT_DIMSE_RECV)

# Byte-swap unit per VR of binary values, for a big endian data set sent as little endian.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def classify_status(status: int) -> Outcome:
    """A C-STORE response status -> outcome, by the categories of pynetdicom's
    ``status.code_to_category`` (PS3.4 B.2.3, PS3.7 C): success and warnings are
    delivered; 0xA7xx (out of resources), cancel and duplicate invocation are transient;
    every other failure (0xA9xx, 0xCxxx, 0x01xx/0x02xx) and unknown codes are permanent.
    """
    if status == SUCCESS or 0xB000 <= status <= 0xBFFF or status in _WARNINGS:
        return Outcome.DELIVERED
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


@dataclass(frozen=True)
class InstanceResult:
    """What happened to one instance: the caller's ``key`` for it (e.g. an envelope id),
    its SOP Instance UID ("" if unreadable), the outcome, the C-STORE status (``None``
    when no status came back or the instance was not sent) and a message without UIDs."""

    key: str
    sop_instance_uid: str
    outcome: Outcome
    status: int | None
    message: str

    @property
    def delivered(self) -> bool:
        return self.outcome is Outcome.DELIVERED

    @property
    def transient(self) -> bool:
        return self.outcome is Outcome.TRANSIENT

    @property
    def permanent(self) -> bool:
        return self.outcome is Outcome.PERMANENT

    @property
    def status_text(self) -> str:
        return "no status" if self.status is None else f"0x{self.status:04X}"


def study_outcome(results: Sequence[InstanceResult]) -> Outcome:
    """All delivered -> delivered; any transient -> transient (retry the rest);
    otherwise (some refused for good) -> permanent."""
    if all(r.delivered for r in results):
        return Outcome.DELIVERED
    if any(r.transient for r in results):
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def plan_contexts(needs: Mapping[str, Sequence[str]]) -> list[PresentationContext]:
    """The presentation contexts to propose for SOP classes and the transfer syntaxes of
    their instances (*needs*, most important SOP class first).

    Preferred, per SOP class: one context per transfer syntax of its instances, each
    proposing only that syntax (so the peer cannot pick another one for them), plus one
    fallback context proposing Explicit then Implicit VR Little Endian.  When that would
    exceed 128 contexts, SOP classes beyond the budget get one context proposing their
    syntaxes and the fallbacks together (the peer picks one; the other instances are
    converted).  More than 128 SOP classes cannot go over one association: ValueError.
    """
    if len(needs) > MAX_CONTEXTS:
        raise ValueError(
            f"{len(needs)} SOP classes in one study; one association carries at most "
            f"{MAX_CONTEXTS} presentation contexts"
        )
    budget = MAX_CONTEXTS - len(needs)
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in needs.items():
        own = list(dict.fromkeys(UID(ts) for ts in syntaxes))
        if len(own) <= budget:
            budget -= len(own)
            contexts += [build_context(sop_class, ts) for ts in own]
            contexts.append(build_context(sop_class, list(UNCOMPRESSED_FALLBACK)))
        else:
            merged: list[str | UID] = list(dict.fromkeys([*own, *UNCOMPRESSED_FALLBACK]))
            contexts.append(build_context(sop_class, merged))
    return contexts


@dataclass(frozen=True)
class _Item:
    key: str
    sop_class: str
    sop_instance: str
    transfer_syntax: UID
    # preamble + file meta when the instance can be sent as it is encoded (the file meta
    # names the same SOP class and instance as the data set, which is encoded as its
    # transfer syntax says), else b"": sent only if the bytes loaded to send start so too
    prefix: bytes


class _NotSent(Exception):
    """An instance that cannot be sent (unreadable, not convertible, not accepted)."""


class DicomSender:
    """A C-STORE SCU for one destination.  Each :meth:`send_study` call opens one
    association, sends, and releases it.  One sender per destination and worker thread.

    *calling_ae* is our AE title (``dicom.ae_title``); the called AE title, host and port
    come from *destination*.  *ssl_context* (from
    :func:`gateway.security.tls.client_context`) turns on TLS, with *server_hostname*
    (default: the destination host) checked against the peer's certificate.
    *uid_hash* turns a UID into the form log lines carry.
    """

    def __init__(
        self,
        destination: DicomDestination,
        *,
        calling_ae: str,
        uid_hash: Callable[[str], str],
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 120.0,
        network_timeout: float = 120.0,
    ) -> None:
        self.destination = destination
        self._uid_hash = uid_hash
        self._tls = (
            (ssl_context, server_hostname or destination.host) if ssl_context is not None else None
        )
        self._ae = AE(ae_title=calling_ae)
        self._ae.connection_timeout = connect_timeout
        self._ae.acse_timeout = acse_timeout
        self._ae.dimse_timeout = dimse_timeout
        self._ae.network_timeout = network_timeout
        # A path given to ``Association.send_c_store`` is then sent as it is encoded:
        # pynetdicom reads the file meta only and streams the data set PDU by PDU, instead
        # of decoding it with pydicom and re-encoding it.  It is a pynetdicom module global;
        # this sender is the gateway's only C-STORE SCU, and a Dataset given to
        # send_c_store (the conversion path) is sent as before whatever its value.
        _config.STORE_SEND_CHUNKED_DATASET = True

    @property
    def peer(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"

    def send_study(
        self,
        instances: Iterable[tuple[str, Sendable]],
        on_result: Callable[[InstanceResult], None] | None = None,
    ) -> list[InstanceResult]:
        """C-STORE every instance over one association; one result per instance, in order.
        *on_result* hears each instance's result as the peer answers it (to record
        progress while a long association runs).

        Each item is ``(key, source)``: *key* is the caller's name for the instance and
        comes back in its :class:`InstanceResult`.  The iterable is read completely before
        the association opens (the contexts to propose depend on every instance); pass
        paths or loader functions rather than bytes to keep one instance in memory at a
        time.  Raises :class:`DeliveryRetry` / :class:`DeliveryRefused` when the
        association cannot be established (nothing was sent).
        """
        items: list[_Item | InstanceResult] = []
        sources: dict[int, Sendable] = {}
        for key, source in instances:
            try:
                item = _read_header(key, source)
            except _NotSent as exc:
                items.append(InstanceResult(key, "", Outcome.PERMANENT, None, str(exc)))
                continue
            sources[len(items)] = source
            items.append(item)
        sendable = [i for i in items if isinstance(i, _Item)]
        if not sendable:
            return [i for i in items if isinstance(i, InstanceResult)]

        needs: dict[str, list[str]] = {}
        for it in sorted(sendable, key=lambda i: i.sop_class):
            needs.setdefault(it.sop_class, []).append(it.transfer_syntax)
        # most instances first: those keep their own syntaxes if the budget runs out
        needs = dict(sorted(needs.items(), key=lambda kv: -len(kv[1])))
        try:
            contexts = plan_contexts({k: list(dict.fromkeys(v)) for k, v in needs.items()})
        except ValueError as exc:
            raise DeliveryRefused(f"DICOM destination {self.peer}: {exc}") from None

        assoc = self._associate(contexts)
        try:
            results = self._send_all(assoc, items, sources, on_result)
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def _associate(self, contexts: list[PresentationContext]) -> Any:
        d = self.destination
        assoc = self._ae.associate(
            d.host, d.port, contexts=contexts, ae_title=d.ae_title, tls_args=self._tls
        )
        if assoc.is_established:
            _tune(assoc)
            return assoc
        rsp = assoc.acceptor.primitive
        if assoc.is_rejected and rsp is not None:
            why = f"({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
            if rsp.result == 0x01:
                raise DeliveryRefused(
                    f"DICOM destination {self.peer} rejected the association {why}; "
                    "check the destination's AE title and the peer's configuration"
                )
            raise DeliveryRetry(f"DICOM destination {self.peer} rejected the association {why}")
        if rsp is not None and rsp.result == 0x00:
            classes = ", ".join(sorted({str(c.abstract_syntax) for c in contexts}))
            raise DeliveryRefused(
                f"DICOM destination {self.peer} accepted none of the proposed presentation "
                f"contexts (SOP classes {classes})"
            )
        if rsp is None:
            what = "TLS handshake failed or " if self._tls is not None else ""
            raise DeliveryRetry(
                f"no association with DICOM destination {self.peer}: {what}connection "
                "refused, unreachable or no answer"
            )
        raise DeliveryRetry(f"DICOM destination {self.peer} aborted the association")

    def _send_all(
        self,
        assoc: Any,
        items: list[_Item | InstanceResult],
        sources: dict[int, Sendable],
        on_result: Callable[[InstanceResult], None] | None,
    ) -> list[InstanceResult]:
        accepted: dict[str, set[UID]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(UID(cx.transfer_syntax[0]))
        results: list[InstanceResult] = []
        stopped: str | None = None
        for index, item in enumerate(items):
            if isinstance(item, InstanceResult):
                results.append(item)
                continue
            source = sources.pop(index)
            if stopped is not None:
                results.append(self._result(item, Outcome.TRANSIENT, None, stopped))
                continue
            result = self._send_one(assoc, item, source, accepted.get(item.sop_class, set()))
            results.append(result)
            if on_result is not None:
                on_result(result)
            if result.transient:
                stopped = "not sent: the association stopped after a transient failure"
            elif not assoc.is_established:
                stopped = "not sent: the association ended early"
        return results

    def _send_one(
        self, assoc: Any, item: _Item, source: Sendable, accepted: set[UID]
    ) -> InstanceResult:
        try:
            target = _choose_syntax(item.transfer_syntax, accepted)
            data = _bytes_of(source)  # the one load of this instance for sending
            with _prepared(data, item, target) as payload:
                return self._store(assoc, item, target, payload)
        except _NotSent as exc:
            return self._result(item, Outcome.PERMANENT, None, str(exc))

    def _store(
        self, assoc: Any, item: _Item, target: UID, payload: Dataset | Path
    ) -> InstanceResult:
        started = time.monotonic()
        try:
            rsp = assoc.send_c_store(payload)
        except (ValueError, AttributeError) as exc:  # pynetdicom: no context / cannot encode
            return self._result(item, Outcome.PERMANENT, None, f"cannot send: {type(exc).__name__}")
        except RuntimeError:  # the association ended under us
            return self._result(
                item, Outcome.TRANSIENT, None, "the association ended before this instance"
            )
        if "Status" not in rsp:
            return self._result(
                item,
                Outcome.TRANSIENT,
                None,
                f"no C-STORE response: {_no_response(assoc, time.monotonic() - started)}",
            )
        status = int(rsp.Status)
        outcome = classify_status(status)
        comment = str(rsp.get("ErrorComment", "") or "").strip()[:200]
        converted = "" if target == item.transfer_syntax else f" (sent as {target.name})"
        message = {
            Outcome.DELIVERED: "stored" if status == SUCCESS else "stored with a warning",
            Outcome.TRANSIENT: "not stored, the peer asks to try again later",
            Outcome.PERMANENT: "refused by the peer",
        }[outcome]
        message = f"{message}: status 0x{status:04X}{converted}" + (
            f": {comment}" if comment else ""
        )
        return self._result(item, outcome, status, message)

    def _result(
        self, item: _Item, outcome: Outcome, status: int | None, message: str
    ) -> InstanceResult:
        fields = {
            "destination": self.peer,
            "sop_instance": self._uid_hash(item.sop_instance),
            "status": None if status is None else f"0x{status:04X}",
            "detail": message,
        }
        if outcome is Outcome.DELIVERED and status == SUCCESS:
            log.debug("deliver.dicom.stored", **fields)
        elif outcome is Outcome.DELIVERED:
            log.warning("deliver.dicom.stored_with_warning", **fields)
        else:
            log.warning(f"deliver.dicom.{outcome.value}", **fields)
        return InstanceResult(item.key, item.sop_instance, outcome, status, message)


def _no_response(assoc: Any, waited: float) -> str:
    """Why ``send_c_store`` came back without a status, for the log and the dead letter.
    pynetdicom says only "no response": a peer that reset or closed the connection comes
    back at once, with the association not yet marked aborted, so the time waited tells
    a timeout from a connection that went away."""
    timeout = assoc.dimse_timeout
    if timeout is not None and waited >= timeout - 0.5:
        return f"the peer did not answer within {waited:.0f} s (DIMSE timeout)"
    if assoc.is_aborted:
        return f"the association was aborted after {waited:.1f} s"
    return (
        f"the connection closed after {waited:.1f} s (reset or closed by the peer, "
        "or an invalid response)"
    )


def _tune(assoc: Any) -> None:
    """Latency settings pynetdicom has no option for.  TCP_NODELAY: pynetdicom leaves
    Nagle's algorithm on, so every P-DATA PDU smaller than the segment size waits for the
    peer's ACK of the previous one (24 ms -> 2.3 ms per 512 KiB instance with 16 KiB PDUs
    on loopback).  The DUL poll delay: see :data:`DUL_POLL_SECONDS`."""
    assoc.dul._run_loop_delay = DUL_POLL_SECONDS
    for event in _LOGGING_EVENTS:  # public API: unbind the standard logging handlers only
        for handler, _args in list(assoc.get_handlers(event)):
            if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                assoc.unbind(event, handler)
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bytes_of(source: Sendable) -> bytes | Path:
    if isinstance(source, bytes | Path):
        return source
    return source()


def _read_header(key: str, source: Sendable) -> _Item:
    """SOP class, SOP instance and transfer syntax of one instance, read from the file
    meta and the first elements of the data set (the rest is not parsed)."""
    data = _bytes_of(source)
    try:
        header = read_header(data, ())
        meta = header.file_meta
        if isinstance(data, bytes):
            head = data[: meta.offset + 6]
        else:
            with data.open("rb") as f:
                head = f.read(meta.offset + 6)
    except (MalformedInput, OSError) as exc:
        reason = exc.message if isinstance(exc, MalformedInput) else type(exc).__name__
        raise _NotSent(f"not a readable DICOM Part 10 object ({reason})") from None
    ts = meta.transfer_syntax
    sop_class = header.sop_class_uid or meta.sop_class_uid
    sop_instance = header.sop_instance_uid or meta.sop_instance_uid
    if not ts or not sop_class or not sop_instance:
        raise _NotSent(
            "the file meta information or data set lacks the transfer syntax, SOP class "
            "or SOP instance UID"
        )
    uid = UID(ts)
    same_uids = meta.sop_class_uid == sop_class and meta.sop_instance_uid == sop_instance
    prefix = _encoded_prefix(head, meta.offset, uid) if same_uids else b""
    return _Item(key, sop_class, sop_instance, uid, prefix)


def _choose_syntax(own: UID, accepted: set[UID]) -> UID:
    """The instance's own syntax when accepted, else an accepted uncompressed fallback."""
    if own in accepted:
        return own
    for fallback in UNCOMPRESSED_FALLBACK:
        if fallback in accepted:
            return fallback
    raise _NotSent(
        "the peer accepted no presentation context for this SOP class"
        if not accepted
        else f"the peer accepted neither {own.name} nor an uncompressed transfer syntax"
    )


@contextlib.contextmanager
def _prepared(data: bytes | Path, item: _Item, target: UID) -> Iterator[Dataset | Path]:
    """What to give ``send_c_store`` for one instance: a Part 10 file whose data set goes
    out as it is encoded (pynetdicom's chunked send, see ``STORE_SEND_CHUNKED_DATASET``)
    when the peer accepted the instance's own syntax, else a data set decoded (and
    converted to *target*) by pydicom.

    Bytes are sent from an anonymous memory file (``memfd_create``), closed on exit: the
    decrypted instance is never written to a file system.  A deflated data set of odd
    length gets its trailing NUL there (:func:`_needs_pad`), from a file too."""
    as_encoded = target == item.transfer_syntax and _starts_with(data, item.prefix)
    pad = as_encoded and _needs_pad(data, item)
    if not as_encoded:
        yield _load(data, item, target)
    elif isinstance(data, Path) and not pad:
        yield data
    elif not _HAVE_MEMFD:
        yield _load(data, item, target)  # pynetdicom pads a deflated data set it encodes
    else:
        fd = os.memfd_create("dicom-scu", os.MFD_CLOEXEC)
        try:
            if isinstance(data, Path):
                with data.open("rb") as f:
                    while chunk := f.read(_COPY_CHUNK):
                        _write_all(fd, chunk)
            else:
                _write_all(fd, data)
            if pad:
                _write_all(fd, b"\x00")
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _needs_pad(data: bytes | Path, item: _Item) -> bool:
    """Whether *data* is a deflated data set of odd length.  PS3.5 A.5 pads the deflated
    stream with a trailing NUL to an even length (pydicom and pynetdicom write it so); a
    stream received without it is sent with it, as the one byte a forward adds: a peer may
    refuse an odd-length P-DATA fragment and abort (dcmtk: "Odd Fragment Length"), and
    inflating ignores what follows the end of the deflated stream."""
    if item.transfer_syntax not in DEFLATED:
        return False
    try:
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
    except OSError:
        return False
    return (size - len(item.prefix)) % 2 == 1


def _starts_with(data: bytes | Path, prefix: bytes) -> bool:
    """Whether the instance loaded to send still starts with the preamble and file meta
    read by :func:`_read_header` (what pynetdicom's chunked send puts in the request)."""
    if not prefix:
        return False
    if isinstance(data, bytes):
        return len(data) > len(prefix) and data.startswith(prefix)
    try:
        with data.open("rb") as f:
            head = f.read(len(prefix) + 1)
    except OSError:
        return False
    return len(head) > len(prefix) and head.startswith(prefix)


def _encoded_prefix(head: bytes, offset: int, ts: UID) -> bytes:
    """Preamble + file meta of *head* (the data set starts at *offset*) if its data set is
    encoded with the explicit or implicit VR that *ts* says (the check pydicom makes on
    the first element), else b""."""
    if len(head) < offset + 6:
        return b""
    if ts not in DEFLATED and has_explicit_vr(head, offset) == ts.is_implicit_VR:
        return b""
    return head[:offset]


def _load(data: bytes | Path, item: _Item, target: UID) -> Dataset:
    """The data set to send, converted to *target* when that is not its own syntax."""
    try:
        ds = read_dataset(data, pixels=True)
    except MalformedInput as exc:
        raise _NotSent(f"not a readable DICOM Part 10 object ({exc.message})") from None
    if target == item.transfer_syntax:
        return ds
    converted = _convert(ds, item.transfer_syntax, target)
    if str(converted.get("SOPInstanceUID", "")) != item.sop_instance:  # never a new identity
        raise _NotSent("conversion changed the SOP Instance UID; not sent")
    return converted


def _convert(ds: Dataset, own: UID, target: UID) -> Dataset:
    """Re-encode an instance in an uncompressed *target* syntax: decompress compressed
    pixel data, swap big endian binary values, then write and re-read it with pydicom so
    the data set is encoded exactly as the target syntax says."""
    try:
        if own.is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif not own.is_little_endian:
            _swap_binary_values(ds)
        ds.file_meta.TransferSyntaxUID = target
        buffer = BytesIO()
        # dcmwrite, not save_as: only dcmwrite converts between byte orders
        dcmwrite(buffer, ds, enforce_file_format=True)
        return read_dataset(buffer.getvalue(), pixels=True)
    except Exception as exc:  # pydicom: missing codec, corrupt data, unencodable value
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise _NotSent(
            f"the peer does not accept {own.name} for this SOP class and conversion to "
            f"{target.name} failed: {reason}"
        ) from None


def _swap_binary_values(ds: Dataset) -> None:
    """Big endian -> little endian for OW/OF/OL/OD/OV values, which pydicom keeps as bytes
    (numbers in other VRs are decoded and re-encoded by pydicom itself)."""
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(str(elem.VR))
        value = elem.value
        if width and isinstance(value, bytes) and len(value) % width == 0:
            elem.value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
