"""The MLLP client against a real MLLP sink on 127.0.0.1: what the EHR answers decides
delivered / retry / refused, and the client reconnects on its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import HL7Destination
from gateway.deliver import DeliveryRefused, DeliveryRetry, Outcome
from gateway.deliver.hl7_client import HL7Sender, classify_ack, parse_ack
from gateway.errors import Permanent, Transient
from tests.dicomgen import free_port
from tests.hl7msgs import oru_r01
from tests.mllpsink import MLLPSink


@pytest.fixture
def sink() -> Iterator[MLLPSink]:
    with MLLPSink() as s:
        yield s


@pytest.fixture
def sender(sink: MLLPSink) -> Iterator[HL7Sender]:
    with HL7Sender(HL7Destination(host="127.0.0.1", port=sink.port)) as s:
        yield s


def test_aa_is_delivered_and_the_bytes_arrive_unchanged(sink: MLLPSink, sender: HL7Sender) -> None:
    message = oru_r01(control_id="C1")
    ack = sender.send(message, timeout=5)
    assert ack.code == "AA" and ack.control_id == "C1"
    assert ack.outcome is Outcome.DELIVERED
    assert sink.received == [message]


def test_ca_is_delivered(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply = "CA"
    assert sender.send(oru_r01(control_id="C2"), timeout=5).code == "CA"


def test_one_connection_carries_many_messages(sink: MLLPSink, sender: HL7Sender) -> None:
    for i in range(5):
        sender.send(oru_r01(control_id=f"M{i}"), timeout=5)
    assert sink.connections == 1
    assert len(sink.received) == 5


def test_ae_is_a_retry_that_says_what_the_peer_said(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply, sink.text = "AE", "Database busy"
    message = oru_r01(control_id="C3", patient="SECRET^PATIENT")
    with pytest.raises(DeliveryRetry) as caught:
        sender.send(message, timeout=5)
    text = str(caught.value)
    assert isinstance(caught.value, Transient)
    assert "AE" in text and "Database busy" in text and f"127.0.0.1:{sink.port}" in text
    assert "207" in text  # the ERR segment's code
    assert "SECRET" not in text and "C3" not in text


def test_the_retry_sends_the_same_msh10(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply = "AE"
    message = oru_r01(control_id="STABLE-10")
    with pytest.raises(DeliveryRetry):
        sender.send(message, timeout=5)
    sink.reply = "AA"
    sender.send(message, timeout=5)
    first, second = sink.received
    assert first == second == message
    assert b"|STABLE-10|" in second


def test_ar_is_refused_for_good(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply, sink.text = "AR", "Unknown patient class"
    with pytest.raises(DeliveryRefused) as caught:
        sender.send(oru_r01(control_id="C4"), timeout=5)
    assert isinstance(caught.value, Permanent)
    assert "AR" in str(caught.value) and "Unknown patient class" in str(caught.value)


def test_ce_retries_and_cr_refuses(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply = "CE"
    with pytest.raises(DeliveryRetry):
        sender.send(oru_r01(control_id="C5"), timeout=5)
    sink.reply = "CR"
    with pytest.raises(DeliveryRefused):
        sender.send(oru_r01(control_id="C6"), timeout=5)


def test_no_answer_is_a_retry_after_the_timeout_and_the_next_send_reconnects(
    sink: MLLPSink, sender: HL7Sender
) -> None:
    sink.reply = "NONE"
    start = time.monotonic()
    with pytest.raises(DeliveryRetry, match=r"no ACK .* within 0\.5 s"):
        sender.send(oru_r01(control_id="C7"), timeout=0.5)
    assert 0.5 <= time.monotonic() - start < 3
    assert not sender.connected
    sink.reply = "AA"
    sender.send(oru_r01(control_id="C7"), timeout=5)
    assert sink.connections == 2


def test_ack_for_another_message_is_a_retry_on_a_fresh_connection(
    sink: MLLPSink, sender: HL7Sender
) -> None:
    sink.reply = "WRONG_ID"
    with pytest.raises(DeliveryRetry, match="MSA-2 does not match"):
        sender.send(oru_r01(control_id="C8"), timeout=5)
    assert not sender.connected
    sink.reply = "AA"
    sender.send(oru_r01(control_id="C8"), timeout=5)
    assert sink.connections == 2


def test_peer_closing_without_ack_is_a_retry(sink: MLLPSink, sender: HL7Sender) -> None:
    sink.reply = "CLOSE"
    with pytest.raises(DeliveryRetry, match="closed the connection"):
        sender.send(oru_r01(control_id="C9"), timeout=5)


def test_sink_down_is_a_retry_and_a_restarted_sink_gets_the_message() -> None:
    port = free_port()
    with HL7Sender(HL7Destination(host="127.0.0.1", port=port)) as sender:
        with pytest.raises(DeliveryRetry, match="refused the connection"):
            sender.send(oru_r01(control_id="D1"), timeout=5)
        with MLLPSink(port=port) as sink:
            sender.send(oru_r01(control_id="D1"), timeout=5)
            assert [m for m in sink.received] == [oru_r01(control_id="D1")]


def test_restarted_sink_the_kept_connection_is_replaced_transparently(
    sink: MLLPSink, sender: HL7Sender
) -> None:
    sender.send(oru_r01(control_id="R1"), timeout=5)
    sink.stop()
    with pytest.raises(DeliveryRetry):
        sender.send(oru_r01(control_id="R2"), timeout=5)
    sink.start()
    sender.send(oru_r01(control_id="R3"), timeout=5)
    # the idle connection from before the restart was dead: R3 went over a new one
    sender.send(oru_r01(control_id="R4"), timeout=5)
    assert [parse_header_id(m) for m in sink.received] == ["R1", "R3", "R4"]


def test_sink_restart_while_connected_is_handled_on_the_next_send(
    sink: MLLPSink, sender: HL7Sender
) -> None:
    sender.send(oru_r01(control_id="S1"), timeout=5)
    sink.stop()
    sink.start()
    # no failure in between: the stale connection is detected and replaced on this send
    sender.send(oru_r01(control_id="S2"), timeout=5)
    assert [parse_header_id(m) for m in sink.received] == ["S1", "S2"]


def test_unreadable_message_is_refused_before_sending(sink: MLLPSink, sender: HL7Sender) -> None:
    with pytest.raises(DeliveryRefused, match="MSH cannot be read"):
        sender.send(b"PID|1||X\r", timeout=5)
    assert sink.received == []


def test_tls_delivery_with_client_certificate(tmp_path: Path) -> None:
    certs = pytest.importorskip("tests.certs")
    pki = certs.make_pki(tmp_path / "pki")
    with MLLPSink(ssl_context=pki.server_context()) as sink:
        dest = HL7Destination(host="127.0.0.1", port=sink.port)
        with HL7Sender(dest, ssl_context=pki.client_context()) as sender:
            ack = sender.send(oru_r01(control_id="T1"), timeout=5)
            sender.send(oru_r01(control_id="T2"), timeout=5)
        assert ack.code == "AA"
        assert len(sink.received) == 2 and sink.connections == 1


def test_tls_with_an_untrusted_server_is_a_retry_naming_tls(tmp_path: Path) -> None:
    certs = pytest.importorskip("tests.certs")
    pki = certs.make_pki(tmp_path / "pki")
    other = certs.make_pki(tmp_path / "other")
    with MLLPSink(ssl_context=pki.server_context(require_client_cert=False)) as sink:
        dest = HL7Destination(host="127.0.0.1", port=sink.port)
        with (
            HL7Sender(dest, ssl_context=other.client_context()) as sender,
            pytest.raises(DeliveryRetry, match="TLS"),
        ):
            sender.send(oru_r01(control_id="T3"), timeout=5)
        assert sink.received == []


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        ("AA", Outcome.DELIVERED),
        ("CA", Outcome.DELIVERED),
        ("AE", Outcome.TRANSIENT),
        ("CE", Outcome.TRANSIENT),
        ("AR", Outcome.PERMANENT),
        ("CR", Outcome.PERMANENT),
        ("aa", Outcome.DELIVERED),
        ("", Outcome.TRANSIENT),
        ("XX", Outcome.TRANSIENT),
    ],
)
def test_classify_ack(code: str, outcome: Outcome) -> None:
    assert classify_ack(code) is outcome


def test_parse_ack_reads_msa_and_err_of_v23_and_v25() -> None:
    v25 = (
        b"MSH|^~\\&|EHR|HOSP|GW||20260101||ACK^R01^ACK|A1|P|2.5\r"
        b"MSA|AE|MSG1|Bad \\F\\ field\r"
        b"ERR||PID^1^3|101^Required field missing^HL70357|E||||Patient id missing\r"
    )
    ack = parse_ack(v25)
    assert (ack.code, ack.control_id, ack.text) == ("AE", "MSG1", "Bad | field")
    assert ack.errors == ("101 Required field missing (at PID-3) Patient id missing",)
    v23 = (
        b"MSH|^~\\&|EHR|HOSP|GW||20260101||ACK|A1|P|2.3\r"
        b"MSA|AR|MSG2|Nope\r"
        b"ERR|MSH^1^12^203&Unsupported version id&HL70357\r"
    )
    ack = parse_ack(v23)
    assert (ack.code, ack.control_id) == ("AR", "MSG2")
    assert ack.errors == ("203 Unsupported version id (at MSH-12)",)


def parse_header_id(message: bytes) -> str:
    return message.split(b"\r", 1)[0].split(b"|")[9].decode()
