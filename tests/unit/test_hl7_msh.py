"""The fast MSH reader used on the ACK path."""

from __future__ import annotations

import pytest

from gateway.errors import Permanent
from gateway.hl7.msh import SUPPORTED_VERSIONS, HeaderError, parse_header

ORU = (
    b"MSH|^~\\&|EHR^1.2.3^ISO|HOSP^9.8^ISO|AI_GATEWAY|RAD|20240501120000||ORU^R01^ORU_R01|"
    b"CTRL0001|P^T|2.5.1^USA|||AL|NE||8859/1\r"
    b"PID|1||MRN12345^^^HOSP^MR||TESTPATIENT^ALPHA||19700101|F\r"
    b"OBR|1|ORD1001|ACC2001|71020^CHEST XRAY^CPT\r"
    b"OBX|1|TX|IMP^Impression^L||No acute process.||||||F\r"
)


def test_reads_the_header_fields_the_ack_path_needs() -> None:
    h = parse_header(ORU)
    assert h.field_sep == "|"
    assert h.encoding_chars == "^~\\&"
    assert (h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep) == (
        "^", "~", "\\", "&"
    )
    assert h.truncation_char == ""
    assert (h.sending_application, h.sending_facility) == ("EHR", "HOSP")
    assert (h.receiving_application, h.receiving_facility) == ("AI_GATEWAY", "RAD")
    assert h.message_type == "ORU^R01"
    assert (h.message_code, h.trigger, h.structure) == ("ORU", "R01", "ORU_R01")
    assert h.control_id == "CTRL0001"
    assert h.processing_id == "P"
    assert h.version == "2.5.1"
    assert (h.accept_ack_type, h.app_ack_type) == ("AL", "NE")
    assert h.enhanced_mode
    assert h.charset == "8859/1"
    assert h.segment_ids == ("MSH", "PID", "OBR", "OBX")


def test_original_mode_when_msh_15_is_empty() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|HOSP|||20240501||ADT^A01|C1|P|2.3\rEVN|A01\r")
    assert not h.enhanced_mode
    assert h.accept_ack_type == ""
    assert h.message_type == "ADT^A01"
    assert h.structure == ""


def test_custom_field_separator_and_encoding_characters_are_honoured() -> None:
    msg = b"MSH#*!/$%#EHR*X#HOSP#AI#RAD#20240501##ORM*O01*ORM_O01#C/F/2#P#2.8###SU\rPID#1\r"
    h = parse_header(msg)
    assert h.field_sep == "#"
    assert h.encoding_chars == "*!/$%"
    assert h.truncation_char == "%"
    assert h.sending_application == "EHR"
    assert h.message_type == "ORM^O01"
    assert h.structure == "ORM_O01"
    assert h.control_id == "C#2"  # \F\ escape (with '/' as escape character) undone
    assert h.accept_ack_type == "SU"
    assert h.segment_ids == ("MSH", "PID")


@pytest.mark.parametrize("sep", [b"\r", b"\n", b"\r\n"])
def test_segments_may_end_with_cr_lf_or_crlf(sep: bytes) -> None:
    msg = sep.join([b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.4", b"PID|1", b"OBX|1", b""])
    assert parse_header(msg).segment_ids == ("MSH", "PID", "OBX")


def test_leading_line_breaks_and_a_byte_order_mark_are_tolerated() -> None:
    assert parse_header(b"\r\nMSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.4\r").control_id == "C1"
    bom = b"\xef\xbb\xbfMSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.4\r"
    assert parse_header(bom).sending_application == "EHR"


def test_latin1_bytes_are_read_without_error() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|H\xd4PITAL|||2024||ORU^R01|C1|P|2.5|||||8859/1\rPID|1\r")
    assert h.sending_facility == "H\u00d4PITAL"


@pytest.mark.parametrize("version", sorted(SUPPORTED_VERSIONS))
def test_versions_2_3_to_2_8_2_are_supported(version: str) -> None:
    msg = f"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|{version}\r".encode()
    assert parse_header(msg).version == version


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.9", "3.0", "2.5.9"])
def test_other_versions_are_refused_with_code_203(version: str) -> None:
    msg = f"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|{version}\r".encode()
    with pytest.raises(HeaderError, match="unsupported HL7 version") as info:
        parse_header(msg)
    assert info.value.code == 203
    assert info.value.location == ("MSH", 1, 12)
    assert info.value.partial is not None
    assert info.value.partial.control_id == "C1"


@pytest.mark.parametrize(
    "data",
    [b"", b"\r\n", b"PID|1||X\r", b"garbage", b"msh|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.5"],
)
def test_a_message_not_starting_with_msh_is_a_segment_sequence_error(data: bytes) -> None:
    with pytest.raises(HeaderError, match="must start with an MSH segment") as info:
        parse_header(data)
    assert info.value.code == 100
    assert info.value.partial is None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"MSH|^~\\|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\r", "4 encoding characters"),
        (b"MSH|^~\\&#!|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\r", "4 encoding characters"),
        (b"MSH|^^\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\r", "must all be different"),
        (b"MSH|^|\\&|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\r", "4 encoding characters"),
        (b"MSHA^~\\&AEHRAHOSPAAA2024AAORU^R01AC1APA2.5\r", "not usable"),
        (b"MSH|^~ &|EHR|HOSP|||2024||ORU^R01|C1|P|2.5\r", "letters, digits or white space"),
        (b"MSH|^~\r", "too short"),
    ],
)
def test_bad_separators_are_a_data_type_error(data: bytes, why: str) -> None:
    with pytest.raises(HeaderError, match=why) as info:
        parse_header(data)
    assert info.value.code == 102


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"MSH|^~\\&|EHR|HOSP|||2024|||C1|P|2.5\r", 9),
        (b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01||P|2.5\r", 10),
        (b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P\r", 12),
        (b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01|C1|P|\r", 12),
    ],
)
def test_missing_required_fields_are_code_101_with_their_location(data: bytes, field: int) -> None:
    with pytest.raises(HeaderError, match=f"MSH-{field} .* is missing") as info:
        parse_header(data)
    assert info.value.code == 101
    assert info.value.location == ("MSH", 1, field)


def test_a_malformed_message_code_is_an_unsupported_message_type() -> None:
    with pytest.raises(HeaderError) as info:
        parse_header(b"MSH|^~\\&|EHR|HOSP|||2024||OR-U^R01|C1|P|2.5\r")
    assert info.value.code == 200


def test_header_errors_are_permanent() -> None:
    assert issubclass(HeaderError, Permanent)


def test_message_type_without_trigger() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|HOSP|||2024||ACK|C1|P|2.5\rMSA|AA|X\r")
    assert h.message_type == "ACK"
    assert h.trigger == ""


def test_repeated_message_type_uses_the_first_repetition() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|HOSP|||2024||ORU^R01~ORU^R30|C1|P|2.5\r")
    assert h.message_type == "ORU^R01"


@pytest.mark.parametrize(
    "data",
    [
        # MSH-12 only on the next line: read as the continuation of MSH, it was accepted
        b"MSH|^~\\&|EHR|HOSP|GW|AI|20260101||ORU^R01|C1|P\n|2.5\rPID|1\r",
        b"MSH|^~\\&|EHR|HOSP|GW|AI|20260101||ORU^R01|C1|P\nQOBP|2.5\rPID|1\r",
        # a whole MSH, then a line that is no segment: MSH-12 read as "2.5\nX"
        b"MSH|^~\\&|EHR|HOSP|GW|AI|20260101||ORU^R01|C1|P|2.5\nX\rPID|1\r",
    ],
)
def test_an_msh_segment_running_on_past_its_line_is_refused(data: bytes) -> None:
    # found by fuzzing (tests/fuzz/corpus/hl7_ack/regress-msh-continuation*): MSH-1 and
    # MSH-2 were read from the first line, the other fields across the lines after it
    with pytest.raises(HeaderError) as info:
        parse_header(data)
    assert info.value.code == 100
    assert info.value.location == ("MSH", 1, 0)
    assert info.value.partial is not None and info.value.partial.control_id == "C1"


def test_a_line_that_starts_a_segment_after_msh_is_fine() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|HOSP|||2024||ADT^A01|C1|P|2.5\nEVN\nPID|1\n")
    assert h.segment_ids == ("MSH", "EVN", "PID")
