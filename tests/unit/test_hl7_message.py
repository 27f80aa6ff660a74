"""The one HL7 reader: separators, MSH-18, escapes, segments, fields, files of messages."""

from __future__ import annotations

import pytest

from gateway.errors import MalformedInput
from gateway.hl7.message import (
    MAX_COUNT,
    Message,
    Separators,
    decode,
    field_at,
    hl7_in,
    segment_fields,
    split_messages,
    split_segments,
    strip_framing,
    unescape,
)
from gateway.hl7.msh import HeaderError, parse_header
from gateway.route.attributes import from_hl7
from tests.hl7msgs import oru_r01

MSH = "MSH|^~\\&|RIS|HOSP|AI_GATEWAY|AI|20261125101500||ORU^R01^ORU_R01|C1|P|2.5.1"


def message(*segments: str, msh: str = MSH, sep: str = "\r", encoding: str = "utf-8") -> bytes:
    return (sep.join([msh, *segments]) + sep).encode(encoding)


# --- separators --------------------------------------------------------------------------


def test_separators_of_msh_1_and_msh_2() -> None:
    assert Separators.from_msh(MSH) == Separators()
    seps = Separators.from_msh("MSH#*$!@%#RIS")
    assert seps == Separators("#", "*", "$", "!", "@", "%")
    assert seps.encoding == "*$!@%"
    assert Separators().encoding == "^~\\&"


def test_separators_are_read_from_the_first_line_only() -> None:
    assert Separators.from_msh("MSH|^~\\&\rPID|1") == Separators()
    with pytest.raises(MalformedInput, match="too short"):
        Separators.from_msh("MSH|^~\rPID|1||X")


@pytest.mark.parametrize(
    ("msh", "why"),
    [
        ("PID|1", "must start with an MSH segment"),
        ("MSH|^~\\|EHR|HOSP", "4 encoding characters"),
        ("MSH|^~|EHR|HOSP|||2024", "found 2"),  # routing used to accept 2
        ("MSH|^~\\&#!|EHR", "4 encoding characters"),
        ("MSH|^^\\&|EHR", "must all be different"),
        ("MSH|^|\\&|EHR|HOSP", "4 encoding characters"),
        ("MSHA^~\\&AEHR", "not usable"),
        ("MSH ^~\\& EHR", "not usable"),
        ("MSH|^~ &|EHR", "letters, digits or white space"),
    ],
)
def test_one_separator_rule_for_every_reader(msh: str, why: str) -> None:
    with pytest.raises(MalformedInput, match=why):
        Separators.from_msh(msh)
    data = (msh + "|2024||ORU^R01|C1|P|2.5\rPID|1\r").encode()
    with pytest.raises(HeaderError, match=why):
        parse_header(data)
    with pytest.raises(MalformedInput, match=why):
        Message.parse(data)
    with pytest.raises(MalformedInput, match=why):
        from_hl7(data)


# --- character set -----------------------------------------------------------------------


def test_msh_18_names_the_character_set() -> None:
    latin1 = MSH + "||||||8859/1"
    parsed = Message.parse(message("NTE|1||H\u00e4matom", msh=latin1, encoding="latin-1"))
    assert parsed.charset == "latin-1"
    assert parsed.segments[1] == "NTE|1||H\u00e4matom"
    greek = MSH + "||||||8859/7~UNICODE UTF-8"  # the first repetition counts
    parsed = Message.parse(message("NTE|1||\u03b1", msh=greek, encoding="iso8859-7"))
    assert (parsed.charset, parsed.segments[1]) == ("iso8859-7", "NTE|1||\u03b1")
    assert Message.parse(message(msh=MSH + "||||||unicode utf-8 ")).charset == "utf-8"


def test_without_msh_18_utf_8_else_latin_1() -> None:
    assert Message.parse(message("NTE|1||caf\u00e9")).segments[1] == "NTE|1||caf\u00e9"
    latin1 = message("NTE|1||caf\u00e9", encoding="latin-1")
    parsed = Message.parse(latin1)
    assert (parsed.charset, parsed.segments[1]) == ("", "NTE|1||caf\u00e9")
    unknown = message("NTE|1||caf\u00e9", msh=MSH + "||||||KLINGON")
    assert Message.parse(unknown).charset == ""


def test_bytes_the_declared_character_set_cannot_decode_are_replaced() -> None:
    assert decode(b"caf\xc3", "utf-8") == "caf\ufffd"
    assert decode(b"caf\xe9") == "caf\u00e9"


def test_routing_honours_msh_18() -> None:
    latin1 = MSH + "||||||8859/1"
    data = message("PID|1||X||K\u00e8RE^ANNA", msh=latin1, encoding="latin-1")
    assert from_hl7(data, ["PID-5.1"]).get("PID-5.1") == ["K\u00e8RE"]
    # the same bytes declared 8859/2 are another letter, as every reader sees them
    latin2 = data.replace(b"8859/1", b"8859/2")
    assert from_hl7(latin2, ["PID-5.1"]).get("PID-5.1") == ["K\u010dRE"]
    ascii_text = data.replace(b"8859/1", b"ASCII")
    assert from_hl7(ascii_text, ["PID-5.1"]).get("PID-5.1") == ["K\ufffdRE"]


# --- escapes -----------------------------------------------------------------------------


def test_separator_escapes_in_both_modes() -> None:
    seps = Separators()
    for formatting in (True, False):
        text = unescape(r"a\F\b\S\c\T\d\R\e\E\f", seps, formatting=formatting)
        assert text == "a|b^c&d~e\\f"


def test_formatting_escapes_only_in_formatting_mode() -> None:
    seps = Separators()
    value = r"\H\Lungs\N\ clear.\.br\Small\.sk 2\nodule \X41\\Zlocal" + "\\"
    assert unescape(value, seps) == "Lungs clear.\nSmall  nodule A"
    assert unescape(value, seps, formatting=False) == value
    assert unescape(r"\.sp 3\x\.ce\y\.in +4\z", seps) == "\n\n\nx\ny" + "z"


def test_hex_escapes_in_the_message_character_set() -> None:
    seps = Separators()
    assert unescape(r"caf\XC3A9\.", seps, "utf-8") == "caf\u00e9."
    assert unescape(r"caf\XE9\.", seps, "latin-1") == "caf\u00e9."
    assert unescape(r"caf\XE9\.", seps) == "caf\u00e9."  # not UTF-8: Latin-1


def test_line_break_and_space_counts_are_ascii_digits_and_bounded() -> None:
    # found by fuzzing (tests/fuzz/corpus/hl7_message/regress-superscript-count): "¹" is a
    # digit to str.isdigit, not to int(); and 15 bytes must not become 100 MB of text
    seps = Separators()
    assert unescape("\\.sp \u00b9\\x", seps) == "\nx"
    assert unescape(r"a\.sp 99999999\b", seps) == "a" + "\n" * MAX_COUNT + "b"
    assert unescape(r"a\.sk 99999999\b", seps) == "a" + " " * MAX_COUNT + "b"


def test_truncation_escape_only_when_msh_2_declares_one() -> None:
    assert unescape(r"x\P\y", Separators.from_msh("MSH|^~\\&#|A")) == "x#y"
    assert unescape(r"x\P\y", Separators()) == r"x\P\y"
    assert unescape(r"x\P\y", Separators(), formatting=False) == r"x\P\y"


def test_other_escape_characters_and_what_is_not_an_escape() -> None:
    seps = Separators.from_msh("MSH#*$!@#")
    assert unescape("a!F!b!S!c!E!d!.br!e", seps) == "a#b*c!d\ne"
    assert unescape("a\\F\\b", seps) == "a\\F\\b"
    assert unescape(r"C:\temp\Q\ x", Separators()) == r"C:\temp\Q\ x"
    assert unescape("a\\", Separators()) == "a\\"
    assert unescape("\\\\F\\", Separators()) == "\\|"


# --- segments and fields -----------------------------------------------------------------


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segments_end_with_cr_lf_or_crlf(sep: str) -> None:
    text = sep.join([MSH, "PID|1", "OBX|1|TX|X||text", ""])
    assert [s[:3] for s in split_segments(text)] == ["MSH", "PID", "OBX"]


def test_a_line_that_does_not_start_a_segment_continues_the_previous_one() -> None:
    text = "\n".join([MSH, "OBX|1|TX|X||first", "second||||||F", "", "  third", "obx|2", "ZDS|1"])
    assert split_segments(text) == [
        MSH,
        "OBX|1|TX|X||first\nsecond||||||F\n  third\nobx|2",
        "ZDS|1",
    ]
    text = "MSH#*$!@\rPID|1\rPID#1\rEVN"
    assert split_segments(text, "#") == ["MSH#*$!@\nPID|1", "PID#1", "EVN"]


def test_blank_lines_are_dropped() -> None:
    assert split_segments(MSH + "\r\r \t\rPID|1\r\r") == [MSH, "PID|1"]


def test_fields_are_numbered_as_the_standard() -> None:
    seps = Separators()
    msh = segment_fields(MSH, seps)
    assert (msh[0], msh[1], msh[2], msh[3], msh[9], msh[12]) == (
        "MSH", "|", "^~\\&", "RIS", "ORU^R01^ORU_R01", "2.5.1"
    )  # fmt: skip
    pid = segment_fields("PID|1||X^^^HOSP", seps)
    assert (pid[1], pid[3], field_at(pid, 3), field_at(pid, 30)) == (
        "1",
        "X^^^HOSP",
        "X^^^HOSP",
        "",
    )


def test_the_fast_header_and_the_full_reader_agree() -> None:
    data = b"\x0b" + oru_r01().replace(b"\r", b"\n") + b"OBX|2|TX|X||more\ntext\n\x1c\r"
    header = parse_header(data)
    parsed = Message.parse(data)
    assert header.separators == parsed.separators
    assert header.segment_ids == tuple(s[:3] for s in parsed.segments)
    assert header.segment_ids[-1] == "OBX" and parsed.segments[-1].endswith("more\ntext")


# --- framing and files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "framed",
    [
        b"\x0b" + b"MSH|^~\\&|A\r" + b"\x1c\r",
        b"\xef\xbb\xbf\x0bMSH|^~\\&|A\r",
        b"\x0b\xef\xbb\xbfMSH|^~\\&|A\r\n \x00",
        b"\r\n  MSH|^~\\&|A",
    ],
)
def test_framing_and_a_byte_order_mark_are_stripped(framed: bytes) -> None:
    assert strip_framing(framed) == b"MSH|^~\\&|A"
    assert Message.parse(framed).segments == ("MSH|^~\\&|A",)
    assert Message.parse(framed.decode("latin-1").replace("\xef\xbb\xbf", "\ufeff")).segments == (
        "MSH|^~\\&|A",
    )


def test_several_messages_in_a_file() -> None:
    one, two = oru_r01(control_id="A"), oru_r01(control_id="B")
    data = b"\xef\xbb\xbf" + one + b"\n\n\x0b" + two.replace(b"\r", b"\r\n") + b"\x1c\r\n"
    assert split_messages(data) == [one, two]
    assert [parse_header(m).control_id for m in split_messages(data)] == ["A", "B"]


def test_hl7_in_a_file() -> None:
    assert hl7_in(b"Plain report text.\n") is None
    assert hl7_in(b"\xef\xbb\xbf\n" + oru_r01()) == oru_r01().rstrip(b"\r")
    batch = b"FHS|^~\\&|RIS\rBHS|^~\\&|RIS\r" + oru_r01() + b"BTS|1\rFTS|1\r"
    found = hl7_in(batch)
    assert found is not None and found.startswith(b"MSH|")


def test_a_message_must_start_with_msh() -> None:
    for data in (b"", b"PID|1||X\r", b"  \r\n"):
        with pytest.raises(MalformedInput, match="must start with an MSH segment"):
            Message.parse(data)
