"""The HL7 MLLP edge over real sockets: the listener runs in a background event loop,
clients are python-hl7's MLLP client.  All patients here are synthetic."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hl7.mllp
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hl7apy.parser import parse_message

from gateway.config import HL7Section, ServerTLS
from gateway.envelope import Kind
from gateway.errors import QueueUnavailable
from gateway.ingest.hl7_listener import HL7Listener
from gateway.security.tls import server_context
from gateway.store.queue import Ack
from gateway.store.store import Store

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

SENDERS: list[dict[str, Any]] = [
    {"application": "EHR", "facility": "HOSP", "hosts": ["127.0.0.1"]},
    {"application": "ris", "hosts": ["localhost"]},  # any facility, name case-insensitive
    {"application": "LAB", "hosts": ["10.20.30.0/24"]},  # never our test peer
]

# --- synthetic messages (written by hand; '|^~\&' only as separators) --------------------

ORU = (
    "MSH|^~\\&|{app}|{fac}|AI_GATEWAY|RAD|20240501120000||ORU^R01{structure}|{cid}|P|{ver}{tail}\r"
    "PID|1||MRN900001^^^HOSP^MR||TESTPATIENT^ALPHA^Q||19700101|F\r"
    "OBR|1|ORD1001|ACC2001|71020^CHEST XRAY 2 VIEWS^CPT|||20240501110000\r"
    "OBX|1|TX|IMP^Impression^L||No acute cardiopulmonary process.||||||F\r"
)
ORM = (
    "MSH|^~\\&|{app}|{fac}|AI_GATEWAY|RAD|20240501120500||ORM^O01{structure}|{cid}|P|{ver}{tail}\r"
    "PID|1||MRN900002^^^HOSP^MR||TESTPATIENT^BRAVO||19820315|M\r"
    "PV1|1|O|RADCLINIC^^^HOSP\r"
    "ORC|NW|ORD1002|||SC\r"
    "OBR|1|ORD1002||CTCHEST^CT CHEST WITHOUT CONTRAST^L|||20240501120000\r"
)
ADT = (
    "MSH|^~\\&|{app}|{fac}|AI_GATEWAY|RAD|20240501121000||ADT^A01{structure}|{cid}|P|{ver}{tail}\r"
    "EVN|A01|20240501121000\r"
    "PID|1||MRN900003^^^HOSP^MR||TESTPATIENT^CHARLIE||19551224|U\r"
    "PV1|1|I|WARD7^701^1^HOSP\r"
)
TEMPLATES = {"ORU^R01": ORU, "ORM^O01": ORM, "ADT^A01": ADT}
STRUCTURES = {"ORU^R01": "ORU_R01", "ORM^O01": "ORM_O01", "ADT^A01": "ADT_A01"}


def message(
    kind: str = "ORU^R01", *, cid: str = "CTRL0001", ver: str = "2.5.1", app: str = "EHR",
    fac: str = "HOSP", tail: str = "", seps: str = "|^~\\&",
) -> bytes:
    structure = "" if ver == "2.3" else "^" + STRUCTURES[kind]
    text = TEMPLATES[kind].format(app=app, fac=fac, cid=cid, ver=ver, tail=tail,
                                  structure=structure)
    if seps != "|^~\\&":
        text = text.replace("MSH|^~\\&", "MSH" + seps, 1)
        text = text.translate(str.maketrans("|^~\\&", seps[:5]))
    return text.encode("latin-1")


def fields(ack: bytes, segment: str) -> list[str]:
    text = ack.decode("latin-1")
    sep = text[3]
    for line in text.replace("\n", "\r").split("\r"):
        if line.startswith(segment + sep):
            return line.split(sep)
    raise AssertionError(f"no {segment} segment in {ack!r}")


def msa(ack: bytes) -> tuple[str, str]:
    f = fields(ack, "MSA")
    return f[1], f[2]


def hl7apy_parse(ack: bytes) -> Any:
    return parse_message(ack.replace(b"\n", b"\r").decode(), find_groups=False)


# --- a listener in a background event loop ----------------------------------------------


@dataclass
class Gateway:
    listener: HL7Listener
    store: Store
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.listener.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def received(self) -> int:
        return self.store.queue.counts()["received"].get("hl7", 0)

    def envelope_for(self, ack: bytes) -> str:
        """The envelope id whose first 20 characters are the ACK's MSH-10."""
        prefix = fields(ack, "MSH")[9]
        ids = [e.id for e in self.store.queue.envelopes(Kind.HL7) if e.id.startswith(prefix)]
        assert len(ids) == 1, ids
        return ids[0]


GatewayFactory = Callable[..., Gateway]


def hl7_config(**settings: Any) -> HL7Section:
    """The hl7 section on 127.0.0.1, port 0 (a free port: the listener reports it)."""
    section = HL7Section.model_validate({"allowed_senders": SENDERS, **settings})
    # The config's Port type starts at 1; port 0 is for tests only, so bypass validation.
    return section.model_copy(update={"host": "127.0.0.1", "port": 0})


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    started: list[tuple[Gateway, threading.Thread]] = []

    def make(store_class: type[Store] = Store, **hl7: Any) -> Gateway:
        store = store_class(tmp_path / "var", tmp_path / "var" / "keys.json")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="hl7-test-loop", daemon=True)
        thread.start()
        gw = Gateway(HL7Listener(hl7_config(**hl7), store), store, loop)
        gw.call(gw.listener.start())
        started.append((gw, thread))
        return gw

    yield make
    for gw, thread in started:
        gw.call(gw.listener.stop())
        gw.loop.call_soon_threadsafe(gw.loop.stop)
        thread.join(10)
        gw.loop.close()
        gw.store.close()


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> Gateway:
    return make_gateway()


# --- clients ------------------------------------------------------------------------------


async def _exchange(port: int, messages: list[bytes]) -> list[bytes]:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    try:
        acks = []
        for m in messages:
            writer.writeblock(m)
            await writer.drain()
            acks.append(await asyncio.wait_for(reader.readblock(), 10))
        return acks
    finally:
        writer.close()
        await writer.wait_closed()


def send(port: int, *messages: bytes) -> list[bytes]:
    """Send each message on one connection, waiting for each ACK."""
    return asyncio.run(_exchange(port, list(messages)))


async def _closed_by_server(reader: Any) -> bool:
    try:
        data: bytes = await asyncio.wait_for(reader.read(1), 10)
    except ConnectionError:
        return True
    return data == b""


# --- the happy path ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.3", "2.5.1", "2.8"])
@pytest.mark.parametrize("kind", ["ORU^R01", "ORM^O01", "ADT^A01"])
def test_message_is_stored_as_received_and_acked_aa(
    gateway: Gateway, kind: str, version: str
) -> None:
    raw = message(kind, cid=f"C-{kind[:3]}-{version}", ver=version)
    (ack,) = send(gateway.port, raw)

    assert msa(ack) == ("AA", f"C-{kind[:3]}-{version}")
    parsed = hl7apy_parse(ack)
    assert parsed.msa.msa_1.value == "AA"
    assert parsed.msa.msa_2.value == f"C-{kind[:3]}-{version}"
    assert parsed.msh.msh_12.to_er7() == version
    msh = fields(ack, "MSH")
    assert msh[2:6] == ["AI_GATEWAY", "RAD", "EHR", "HOSP"]
    assert msh[8] == ("ACK^" + kind[4:] if version == "2.3" else f"ACK^{kind[4:]}^ACK")

    envelope_id = gateway.envelope_for(ack)
    env, stored = gateway.store.read(envelope_id)
    assert stored == raw
    assert env.source == "EHR^HOSP@127.0.0.1"
    attrs = gateway.store.attrs(envelope_id)
    assert attrs["message_type"] == kind
    assert attrs["version"] == version
    assert attrs["segments"][0] == "MSH"
    assert gateway.received() == 1


@pytest.mark.parametrize(
    ("seps", "version"),
    [("#^~\\&", "2.5.1"), ("|*!/$", "2.3"), ("#*!/$%", "2.8"), ("|^~\\&#", "2.8")],
)
def test_custom_separators_are_honoured_and_echoed(
    gateway: Gateway, seps: str, version: str
) -> None:
    raw = message("ORU^R01", cid="CUSTOM1", ver=version, seps=seps)
    assert raw.startswith(b"MSH" + seps.encode())
    (ack,) = send(gateway.port, raw)

    assert ack.startswith(f"MSH{seps}{seps[0]}AI_GATEWAY{seps[0]}RAD".encode())
    assert msa(ack) == ("AA", "CUSTOM1")
    assert hl7apy_parse(ack).msa.msa_2.value == "CUSTOM1"
    assert gateway.store.read(gateway.envelope_for(ack))[1] == raw


def test_lf_segment_endings_are_accepted_and_stored_unchanged(gateway: Gateway) -> None:
    raw = message(cid="LF1").replace(b"\r", b"\n")
    (ack,) = send(gateway.port, raw)
    assert msa(ack) == ("AA", "LF1")
    assert gateway.store.read(gateway.envelope_for(ack))[1] == raw


def test_sender_matching_is_case_insensitive_and_facility_optional(gateway: Gateway) -> None:
    acks = send(
        gateway.port,
        message(app="ehr", fac="hosp", cid="CASE1"),
        message(app="RIS", fac="ANYWHERE", cid="RIS1"),
    )
    assert [msa(a) for a in acks] == [("AA", "CASE1"), ("AA", "RIS1")]


def test_several_messages_on_one_connection_each_get_their_ack(gateway: Gateway) -> None:
    msgs = [message(k, cid=f"SEQ{i}") for i, k in enumerate(TEMPLATES)]
    acks = send(gateway.port, *msgs)
    assert [msa(a) for a in acks] == [("AA", f"SEQ{i}") for i in range(3)]
    assert gateway.received() == 3


# --- duplicates ----------------------------------------------------------------------------


def test_resent_control_id_gets_the_same_ack_and_is_stored_once(gateway: Gateway) -> None:
    raw = message(cid="RESEND1")
    (first,) = send(gateway.port, raw)
    second, third = send(gateway.port, raw, raw)
    assert first == second == third
    assert msa(first) == ("AA", "RESEND1")
    assert gateway.received() == 1


def test_same_control_id_from_another_sender_is_another_message(gateway: Gateway) -> None:
    a, b = send(gateway.port, message(cid="SHARED"), message(cid="SHARED", app="RIS"))
    assert msa(a) == msa(b) == ("AA", "SHARED")
    assert a != b
    assert gateway.received() == 2


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "fac", "why"),
    [("INTRUDER", "HOSP", "unknown application"), ("EHR", "OTHER", "wrong facility"),
     ("LAB", "HOSP", "host not in its networks")],
)
def test_sender_not_allowed_gets_ar_with_err_and_nothing_is_stored(
    gateway: Gateway, app: str, fac: str, why: str
) -> None:
    (ack,) = send(gateway.port, message(app=app, fac=fac, cid="NOPE1"))
    code, control = msa(ack)
    assert (code, control) == ("AR", "NOPE1"), why
    assert "not allowed" in fields(ack, "MSA")[3]
    assert fields(ack, "ERR")[3].startswith("207^sender ")
    assert hl7apy_parse(ack).err.err_3.err_3_1.value == "207"
    assert gateway.received() == 0


@pytest.mark.parametrize("version", ["2.9", "2.1"])
def test_unsupported_version_gets_ar_203(gateway: Gateway, version: str) -> None:
    (ack,) = send(gateway.port, message(cid="VER1", ver=version))
    assert msa(ack) == ("AR", "VER1")
    assert "unsupported HL7 version" in fields(ack, "MSA")[3]
    assert fields(ack, "ERR")[2:4][1].startswith("203^")
    assert fields(ack, "ERR")[2] == "MSH^1^12"
    assert hl7apy_parse(ack).msh.msh_12.to_er7() == "2.5"
    assert gateway.received() == 0


def test_message_without_msh_gets_ar_with_empty_msa_2(gateway: Gateway) -> None:
    (ack,) = send(gateway.port, b"PID|1||MRN900009^^^HOSP||TESTPATIENT^DELTA\r")
    assert msa(ack) == ("AR", "")
    assert fields(ack, "ERR")[3].startswith("100^")
    assert hl7apy_parse(ack).msa.msa_1.value == "AR"
    assert gateway.received() == 0


def test_missing_control_id_gets_ar_101(gateway: Gateway) -> None:
    (ack,) = send(gateway.port, message(cid=""))
    assert msa(ack) == ("AR", "")
    assert fields(ack, "ERR")[2:4] == [
        "MSH^1^10", "101^MSH-10 (message control id) is missing^HL70357"
    ]


def test_garbage_closes_the_connection_and_a_new_connection_still_gets_aa(
    gateway: Gateway,
) -> None:
    async def garbage() -> bool:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gateway.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        closed = await _closed_by_server(reader)
        writer.close()
        return closed

    assert asyncio.run(garbage())
    (ack,) = send(gateway.port, message(cid="AFTER1"))
    assert msa(ack) == ("AA", "AFTER1")


def test_oversized_frame_closes_the_connection(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(max_frame_bytes=2048)

    async def oversized() -> bool:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gw.port)
        big = message(cid="BIG1") + b"NTE|1||" + b"x" * 4096 + b"\r"
        writer.writeblock(big)
        await writer.drain()
        closed = await _closed_by_server(reader)
        writer.close()
        return closed

    assert asyncio.run(oversized())
    assert gw.received() == 0
    (ack,) = send(gw.port, message(cid="SMALL1"))
    assert msa(ack) == ("AA", "SMALL1")


def test_connection_closed_mid_frame_stores_nothing(gateway: Gateway) -> None:
    async def half() -> None:
        _, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gateway.port)
        writer.write(b"\x0b" + message(cid="HALF1")[:40])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    asyncio.run(half())
    (ack,) = send(gateway.port, message(cid="WHOLE1"))
    assert msa(ack) == ("AA", "WHOLE1")
    assert gateway.received() == 1


def test_idle_connection_is_closed(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(idle_timeout=0.3)

    async def idle() -> tuple[bool, float]:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gw.port)
        writer.writeblock(message(cid="IDLE1"))
        await writer.drain()
        await reader.readblock()
        t0 = time.monotonic()
        closed = await _closed_by_server(reader)
        writer.close()
        return closed, time.monotonic() - t0

    closed, waited = asyncio.run(idle())
    assert closed
    assert 0.1 < waited < 5


# --- load ----------------------------------------------------------------------------------


def test_many_concurrent_connections_are_all_acked_and_stored(gateway: Gateway) -> None:
    clients, per_client = 20, 20

    async def one(client: int) -> list[bytes]:
        msgs = [
            message(list(TEMPLATES)[(client + i) % 3], cid=f"L{client:02d}-{i:03d}")
            for i in range(per_client)
        ]
        return await _exchange(gateway.port, msgs)

    async def everyone() -> list[list[bytes]]:
        return await asyncio.gather(*(one(c) for c in range(clients)))

    results = asyncio.run(everyone())
    for client, acks in enumerate(results):
        expected = [("AA", f"L{client:02d}-{i:03d}") for i in range(per_client)]
        assert [msa(a) for a in acks] == expected
    assert gateway.received() == clients * per_client


# --- enhanced mode -------------------------------------------------------------------------


def test_enhanced_mode_al_gets_a_commit_accept(gateway: Gateway) -> None:
    (ack,) = send(gateway.port, message(cid="ENH1", tail="|||AL|AL"))
    assert msa(ack) == ("CA", "ENH1")
    assert hl7apy_parse(ack).msa.msa_1.value == "CA"
    assert gateway.received() == 1


def test_enhanced_mode_al_refusal_gets_cr(gateway: Gateway) -> None:
    (ack,) = send(gateway.port, message(cid="ENH2", app="INTRUDER", tail="|||AL|NE"))
    assert msa(ack) == ("CR", "ENH2")


def test_enhanced_mode_ne_and_er_send_no_ack_on_success_but_store(gateway: Gateway) -> None:
    async def run() -> bytes:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gateway.port)
        writer.writeblock(message(cid="ENH-NE", tail="|||NE|AL"))
        writer.writeblock(message(cid="ENH-ER", tail="|||ER|AL"))
        writer.writeblock(message(cid="ENH-SU-BAD", app="INTRUDER", tail="|||SU|AL"))
        writer.writeblock(message(cid="ENH-SU", tail="|||SU|AL"))
        await writer.drain()
        ack: bytes = await asyncio.wait_for(reader.readblock(), 10)
        writer.close()
        return ack

    ack = asyncio.run(run())
    assert msa(ack) == ("CA", "ENH-SU")  # the first reply sent is the fourth message's
    assert gateway.received() == 3


def test_enhanced_mode_er_sends_the_error(gateway: Gateway) -> None:
    (ack,) = send(gateway.port, message(cid="ENH3", ver="2.9", tail="|||ER|AL"))
    assert msa(ack) == ("CR", "ENH3")
    assert fields(ack, "ERR")[3].startswith("203^")


# --- store failures ------------------------------------------------------------------------


class UnwritableStore(Store):
    def ingest_message(self, raw: bytes, **kwargs: Any) -> Ack:
        raise QueueUnavailable("queue database cannot be written: disk I/O error")


class BrokenStore(Store):
    def ingest_message(self, raw: bytes, **kwargs: Any) -> Ack:
        raise RuntimeError(raw.decode("latin-1"))  # an error whose text is the content


class SlowStore(Store):
    def ingest_message(self, raw: bytes, **kwargs: Any) -> Ack:
        time.sleep(0.5)
        return super().ingest_message(raw, **kwargs)


def test_store_failure_gets_ae_and_nothing_is_stored(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(UnwritableStore)
    (ack,) = send(gw.port, message(cid="FAIL1"))
    assert msa(ack) == ("AE", "FAIL1")
    assert "resend later" in fields(ack, "MSA")[3]
    assert fields(ack, "ERR")[3].startswith("207^")
    assert gw.received() == 0


def test_unexpected_store_exception_gets_ae_never_aa(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(BrokenStore)
    with structlog.testing.capture_logs() as logs:
        acks = send(gw.port, message(cid="BUG1"), message(cid="BUG2"))
    assert [msa(a) for a in acks] == [("AE", "BUG1"), ("AE", "BUG2")]
    failed = [e for e in logs if e["event"] == "hl7.message.failed"]
    assert failed and failed[0]["error_type"] == "RuntimeError"
    assert "TESTPATIENT" not in repr(logs)


def test_stop_lets_the_message_in_flight_finish_and_be_acked(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(SlowStore)

    async def run() -> tuple[bytes, bool]:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gw.port)
        idle_reader, idle_writer = await hl7.mllp.open_hl7_connection("127.0.0.1", gw.port)
        writer.writeblock(message(cid="INFLIGHT1"))
        await writer.drain()
        await asyncio.sleep(0.2)  # the store is busy with it now
        stopping = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(gw.listener.stop(), gw.loop)
        )
        ack: bytes = await asyncio.wait_for(reader.readblock(), 10)
        await stopping
        closed = await _closed_by_server(reader) and await _closed_by_server(idle_reader)
        writer.close()
        idle_writer.close()
        return ack, closed

    ack, closed = asyncio.run(run())
    assert msa(ack) == ("AA", "INFLIGHT1")
    assert closed
    assert gw.received() == 1


# --- logs -----------------------------------------------------------------------------------


def test_logs_carry_ids_but_no_message_content(gateway: Gateway) -> None:
    with structlog.testing.capture_logs() as logs:
        send(gateway.port, message(cid="SECRETCTRL42"), message(cid="SECRETCTRL43", app="X"))
        send(gateway.port, b"PID|1||MRN900001^^^HOSP||TESTPATIENT^ALPHA\r")
    text = repr(logs)
    for phi in ("TESTPATIENT", "MRN900001", "19700101", "SECRETCTRL4", "acute"):
        assert phi not in text
    stored = [e for e in logs if e["event"] == "hl7.message.stored"]
    assert len(stored) == 1
    entry = stored[0]
    assert entry["sender_app"] == "EHR"
    assert entry["message_type"] == "ORU^R01"
    assert entry["ack_code"] == "AA"
    assert len(entry["control_id_hash"]) == 12
    assert entry["envelope_id"]


def test_metrics_hook_sees_each_message_type_and_ack_code(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    async def run() -> None:
        store = Store(tmp_path / "var", tmp_path / "var" / "keys.json")
        listener = HL7Listener(
            hl7_config(), store,
            on_message=lambda t, c: seen.append((t, c)),
        )
        await listener.start()
        try:
            for m in (message(cid="M1"), message("ADT^A01", cid="M2", app="X")):
                await _exchange(listener.port, [m])
        finally:
            await listener.stop()
            store.close()

    asyncio.run(run())
    assert seen == [("ORU^R01", "AA"), ("ADT^A01", "AR")]


# --- TLS ------------------------------------------------------------------------------------


def _issue(
    folder: Path, name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *, ca: bool = False,
) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return subject, key


def test_mllp_over_tls_with_client_certificates(tmp_path: Path) -> None:
    ca = _issue(tmp_path, "ca", None, ca=True)
    _issue(tmp_path, "server", ca)
    _issue(tmp_path, "client", ca)
    tls = ServerTLS(port=2577, cert=tmp_path / "server.pem", key=tmp_path / "server.key",
                    ca=tmp_path / "ca.pem", require_client_cert=True)
    config = hl7_config().model_copy(update={"tls": tls.model_copy(update={"port": 0})})
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")

    async def run() -> tuple[bytes, bool]:
        store = Store(tmp_path / "var", tmp_path / "var" / "keys.json")
        listener = HL7Listener(config, store, server_context(tls, lambda p: p))
        await listener.start()
        try:
            assert listener.tls_port is not None and listener.tls_port != listener.port
            reader, writer = await hl7.mllp.open_hl7_connection(
                "127.0.0.1", listener.tls_port, ssl=client, server_hostname="localhost"
            )
            writer.writeblock(message(cid="TLS1"))
            await writer.drain()
            ack: bytes = await asyncio.wait_for(reader.readblock(), 10)
            writer.close()
            # without a client certificate the handshake fails and nothing is stored
            anonymous = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            refused = False
            try:
                r2, w2 = await hl7.mllp.open_hl7_connection(
                    "127.0.0.1", listener.tls_port, ssl=anonymous, server_hostname="localhost"
                )
                w2.writeblock(message(cid="TLS2"))
                await w2.drain()
                refused = await _closed_by_server(r2)
            except (ssl.SSLError, ConnectionError):
                refused = True
            return ack, refused
        finally:
            await listener.stop()
            assert store.queue.counts()["received"].get("hl7") == 1
            store.close()

    ack, refused = asyncio.run(run())
    assert msa(ack) == ("AA", "TLS1")
    assert refused


def test_a_sender_bound_to_a_certificate_subject_needs_that_certificate(tmp_path: Path) -> None:
    """allowed_senders: [{application, facility, hosts, cert_subject}]: the same MSH-3/4
    from the same host with another certificate of the same CA gets AR."""
    ca = _issue(tmp_path, "ca", None, ca=True)
    _issue(tmp_path, "server", ca)
    _issue(tmp_path, "ehr-interface", ca)
    _issue(tmp_path, "workstation", ca)
    tls = ServerTLS(port=2577, cert=tmp_path / "server.pem", key=tmp_path / "server.key",
                    ca=tmp_path / "ca.pem", require_client_cert=True)
    senders = [{**SENDERS[0], "cert_subject": "CN=ehr-interface"}]
    config = hl7_config(allowed_senders=senders).model_copy(
        update={"tls": tls.model_copy(update={"port": 0})}
    )

    def client(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        ctx.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        return ctx

    async def send(port: int, name: str, cid: str) -> bytes:
        reader, writer = await hl7.mllp.open_hl7_connection(
            "127.0.0.1", port, ssl=client(name), server_hostname="localhost"
        )
        writer.writeblock(message(cid=cid))
        await writer.drain()
        ack: bytes = await asyncio.wait_for(reader.readblock(), 10)
        writer.close()
        return ack

    async def run() -> tuple[bytes, bytes, bytes]:
        store = Store(tmp_path / "var", tmp_path / "var" / "keys.json")
        listener = HL7Listener(config, store, server_context(tls, lambda p: p))
        await listener.start()
        try:
            assert listener.tls_port is not None
            bound = await send(listener.tls_port, "ehr-interface", "CERT1")
            other = await send(listener.tls_port, "workstation", "CERT2")
            # the plain port has no certificate at all
            reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", listener.port)
            writer.writeblock(message(cid="CERT3"))
            await writer.drain()
            plain: bytes = await asyncio.wait_for(reader.readblock(), 10)
            writer.close()
            return bound, other, plain
        finally:
            await listener.stop()
            assert store.queue.counts()["received"].get("hl7") == 1
            store.close()

    bound, other, plain = asyncio.run(run())
    assert msa(bound) == ("AA", "CERT1")
    assert msa(other)[0] == "AR" and msa(plain)[0] == "AR"
