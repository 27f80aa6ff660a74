"""The pure ACK builder."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hl7apy.parser import parse_message

from gateway.hl7.ack import build_ack, escape
from gateway.hl7.msh import SUPPORTED_VERSIONS, HeaderError, parse_header

NOW = datetime(2024, 5, 1, 12, 30, 45, tzinfo=UTC)


def msg(version: str = "2.5.1", *, extra: str = "") -> bytes:
    return (
        f"MSH|^~\\&|EHR|HOSP|AI_GATEWAY|RAD|20240501120000||ORU^R01^ORU_R01|CTRL0001|P|{version}"
        f"{extra}\rPID|1||MRN1^^^HOSP||TESTPATIENT^ALPHA\r"
    ).encode()


def segments(ack: bytes) -> list[list[str]]:
    assert ack.endswith(b"\r")
    return [s.split("|") for s in ack.decode("latin-1").split("\r") if s]


def parsed(ack: bytes) -> Any:
    return parse_message(ack.replace(b"\n", b"\r").decode("latin-1"), find_groups=False)


def test_aa_ack_swaps_sender_and_receiver_and_echoes_the_control_id() -> None:
    ack = build_ack(parse_header(msg()), "AA", control_id="0123456789abcdef0123456789", now=NOW)
    msh, msa = segments(ack)
    assert msh[:12] == [
        "MSH", "^~\\&", "AI_GATEWAY", "RAD", "EHR", "HOSP", "20240501123045+0000", "",
        "ACK^R01^ACK", "0123456789abcdef0123", "P", "2.5.1",
    ]
    assert msa == ["MSA", "AA", "CTRL0001"]  # no MSA-3 text on success
    m = parsed(ack)
    assert m.msa.msa_1.value == "AA"
    assert m.msa.msa_2.value == "CTRL0001"


def test_our_application_is_ai_gateway_when_msh_5_is_empty() -> None:
    h = parse_header(b"MSH|^~\\&|EHR|HOSP|||2024||ADT^A01|C1|T|2.4\r")
    msh = segments(build_ack(h, "AA", control_id="x", now=NOW))[0]
    assert msh[2:6] == ["AI_GATEWAY", "", "EHR", "HOSP"]
    assert msh[10] == "T"


def test_error_ack_has_msa_3_text_and_a_v25_err_segment() -> None:
    ack = build_ack(
        parse_header(msg()), "AE", control_id="x", text="cannot store now; resend later",
        error_code=207, now=NOW,
    )
    _, msa, err = segments(ack)
    assert msa == ["MSA", "AE", "CTRL0001", "cannot store now; resend later"]
    assert err == ["ERR", "", "", "207^cannot store now; resend later^HL70357", "E"]
    assert parsed(ack).err.err_3.err_3_1.value == "207"


def test_err_location_is_written_as_erl_components() -> None:
    ack = build_ack(
        parse_header(msg("2.8")), "AR", control_id="x", text="unsupported", error_code=203,
        error_location=("MSH", 1, 12), now=NOW,
    )
    err = segments(ack)[2]
    assert err == ["ERR", "", "MSH^1^12", "203^unsupported^HL70357", "E"]


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4"])
def test_versions_before_2_5_get_the_err_1_form(version: str) -> None:
    ack = build_ack(
        parse_header(msg(version)), "AR", control_id="x", text="not allowed",
        error_code=207, error_location=("MSH", 1, 3), now=NOW,
    )
    assert segments(ack)[2] == ["ERR", "MSH^1^3^207&not allowed&HL70357"]
    assert parsed(ack).err.err_1.value == "MSH^1^3^207&not allowed&HL70357"


def test_err_without_location_before_2_5() -> None:
    ack = build_ack(parse_header(msg("2.4")), "AE", control_id="x", text="t", now=NOW)
    assert segments(ack)[2] == ["ERR", "^^^207&t&HL70357"]


def test_error_text_defaults_to_the_table_0357_text() -> None:
    ack = build_ack(parse_header(msg()), "AR", control_id="x", error_code=203, now=NOW)
    _, msa, err = segments(ack)
    assert msa[3] == "Unsupported version id"
    assert err[3] == "203^Unsupported version id^HL70357"


def test_error_code_defaults_to_207() -> None:
    ack = build_ack(parse_header(msg()), "AE", control_id="x", text="boom", now=NOW)
    assert segments(ack)[2][3].startswith("207^")


def test_values_are_escaped_with_the_message_separators() -> None:
    text = "a|b^c~d\\e&f\rg"
    ack = build_ack(parse_header(msg()), "AE", control_id="x", text=text, now=NOW)
    msa = segments(ack)[1]
    assert msa[3] == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g"
    assert parsed(ack).msa.msa_3.value == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f g"


def test_escape_leaves_plain_values_alone_and_knows_the_truncation_character() -> None:
    assert escape("plain value", "|", "^~\\&") == "plain value"
    assert escape("50#", "|", "^~\\&#") == "50\\P\\"
    assert escape("50#", "|", "^~\\&") == "50#"


def test_custom_separators_are_used_throughout_the_ack() -> None:
    h = parse_header(b"MSH#*!/$#EHR#HOSP#AI#RAD#2024##ORU*R01#C1#P#2.5\rPID#1\r")
    ack = build_ack(h, "AE", control_id="x", text="a#b*c", error_code=207, now=NOW)
    lines = ack.decode().split("\r")
    assert lines[0].startswith("MSH#*!/$#AI#RAD#EHR#HOSP#")
    assert "#ACK*R01*ACK#x#P#2.5" in lines[0]
    assert lines[1] == "MSA#AE#C1#a/F/b/S/c"
    assert lines[2] == "ERR###207*a/F/b/S/c*HL70357#E"
    m = parsed(ack)
    assert m.msa.msa_2.value == "C1"
    assert m.msa.msa_1.value == "AE"


def test_enhanced_mode_codes_are_accepted() -> None:
    h = parse_header(msg(extra="|||AL|NE"))
    for code in ("CA", "CE", "CR"):
        ack = build_ack(h, code, control_id="x", text="t", now=NOW)
        assert segments(ack)[1][1] == code
    assert len(segments(build_ack(h, "CA", control_id="x", now=NOW))) == 2
    assert len(segments(build_ack(h, "CE", control_id="x", now=NOW))) == 3


def test_an_unknown_code_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown acknowledgement code"):
        build_ack(None, "OK", control_id="x", now=NOW)


def test_unreadable_header_still_gets_a_minimal_valid_ar() -> None:
    ack = build_ack(None, "AR", control_id="abc", text="not HL7", error_code=100, now=NOW)
    msh, msa, err = segments(ack)
    assert msh[2] == "AI_GATEWAY"
    assert msh[8:12] == ["ACK", "abc", "P", "2.5"]
    assert msa == ["MSA", "AR", "", "not HL7"]
    assert err == ["ERR", "", "", "100^not HL7^HL70357", "E"]
    m = parsed(ack)
    assert m.msa.msa_1.value == "AR"


def test_an_unsupported_version_is_answered_in_2_5() -> None:
    with pytest.raises(HeaderError) as info:
        parse_header(msg("2.9"))
    ack = build_ack(info.value.partial, "AR", control_id="x", error_code=203, now=NOW)
    assert segments(ack)[0][11] == "2.5"
    assert segments(ack)[1][2] == "CTRL0001"


def test_v2_3_message_type_has_two_components() -> None:
    ack = build_ack(parse_header(msg("2.3")), "AA", control_id="x", now=NOW)
    assert segments(ack)[0][8] == "ACK^R01"


def test_charset_is_echoed_in_msh_18() -> None:
    ack = build_ack(parse_header(msg(extra="||||||8859/1")), "AA", control_id="x", now=NOW)
    msh = segments(ack)[0]
    assert len(msh) == 18
    assert msh[17] == "8859/1"


def test_a_naive_clock_gives_a_timestamp_without_offset() -> None:
    ack = build_ack(parse_header(msg()), "AA", control_id="x", now=datetime(2024, 1, 2, 3, 4, 5))
    assert segments(ack)[0][6] == "20240102030405"


def test_msa_text_is_cut_to_80_characters() -> None:
    ack = build_ack(parse_header(msg()), "AE", control_id="x", text="x" * 300, now=NOW)
    assert len(segments(ack)[1][3]) == 80


@pytest.mark.parametrize("version", sorted(SUPPORTED_VERSIONS - {"2.7.1"}))  # hl7apy lacks 2.7.1
@pytest.mark.parametrize("code", ["AA", "AE", "AR", "CA", "CE", "CR"])
def test_every_ack_parses_with_hl7apy(version: str, code: str) -> None:
    ack = build_ack(
        parse_header(msg(version)), code, control_id="abc", text="why", error_code=101,
        error_location=("MSH", 1, 10), now=NOW,
    )
    m = parsed(ack)
    assert m.msa.msa_1.value == code
    assert m.msa.msa_2.value == "CTRL0001"
    assert m.msh.msh_12.to_er7() == version
    assert [s.name for s in m.children] == (["MSH", "MSA"] if code in ("AA", "CA") else
                                             ["MSH", "MSA", "ERR"])


def test_the_version_is_escaped_when_a_separator_is_a_dot() -> None:
    # found by fuzzing (tests/fuzz/corpus/hl7_ack/regress-dot-component-separator): with "."
    # as the component separator, MSH-12 "2.5" was read back as "2"
    header = parse_header(b"MSH#.!?;#EHR#HOSP#GW#AI#2024##ADT.A01#C1#P#2?S?5\r")
    assert header.version == "2.5"
    ack = build_ack(header, "AA", control_id="x", now=NOW)
    assert ack.split(b"\r")[0].split(b"#")[11] == b"2?S?5"
    assert parse_header(ack).version == "2.5"
    with pytest.raises(HeaderError) as info:  # no MSH-9: answered AR in the fallback version
        parse_header(b"MSH#.!?;#")
    refusal = build_ack(info.value.partial, "AR", control_id="x", now=NOW)
    assert parse_header(refusal).version == "2.5"


def test_the_timestamp_is_escaped_when_a_separator_is_its_sign() -> None:
    # regress-plus-separator: "+" as the subcomponent separator split MSH-7's time zone off
    header = parse_header(b"MSH|^~\\+|EHR|HOSP|GW|AI|2024||ADT^A01|C1|P|2.5\r")
    msh = segments(build_ack(header, "AA", control_id="x", now=NOW))[0]
    assert msh[6] == "20240501123045\\T\\0000"
