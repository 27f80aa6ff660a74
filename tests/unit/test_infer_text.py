"""Report text for note models: OBX extraction from HL7 v2 messages, and plain files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import MalformedInput
from gateway.hl7.message import Separators
from gateway.hl7.message import unescape as decode_escapes
from gateway.infer.text import report_text_from_file, report_text_from_hl7
from tests.hl7msgs import oru_r01

MSH = "MSH|^~\\&|RIS|HOSP|AI_GATEWAY|AI|20261125101500||ORU^R01^ORU_R01|C1|P|2.5.1"


def message(*segments: str, sep: str = "\r", msh: str = MSH) -> bytes:
    return (sep.join([msh, "PID|1||MRN1^^^HOSP^MR||DOE^JANE", *segments]) + sep).encode()


def test_text_of_a_tx_observation() -> None:
    msg = oru_r01(text="No acute cardiopulmonary process.")
    assert report_text_from_hl7(msg) == "No acute cardiopulmonary process."


def test_repetitions_and_successive_obx_segments_are_lines() -> None:
    msg = message(
        "OBX|1|TX|18782-3^Study observation^LN||FINDINGS:~Lungs are clear.~||||||F",
        "OBX|2|TX|19005-8^Impression^LN||IMPRESSION: normal chest.||||||F",
    )
    assert report_text_from_hl7(msg) == "FINDINGS:\nLungs are clear.\n\nIMPRESSION: normal chest."


def test_separator_escapes_are_decoded() -> None:
    msg = message(
        r"OBX|1|TX|X^Report^L||a\F\b \S\ c\T\d \R\ e\E\f||||||F",
    )
    assert report_text_from_hl7(msg) == "a|b ^ c&d ~ e\\f"


def test_formatted_text_line_breaks_and_highlighting() -> None:
    msg = message(
        r"OBX|1|FT|X^Report^L||\H\FINDINGS\N\:\.br\No pneumothorax.\.sp 2\Small\.sk 2\effusion."
        r"\.in +4\\.ce\End.||||||F",
    )
    assert report_text_from_hl7(msg) == "FINDINGS:\nNo pneumothorax.\n\nSmall  effusion.\nEnd."


def test_hex_escapes_use_the_message_character_set() -> None:
    utf8 = MSH + "|||||UNICODE UTF-8"
    msg = message(r"OBX|1|ST|X^Note^L||caf\XC3A9\ \X41\||||||F", msh=utf8)
    assert report_text_from_hl7(msg) == "café A"
    latin1 = MSH + "|||||8859/1"
    msg = message(r"OBX|1|ST|X^Note^L||caf\XE9\||||||F", msh=latin1)
    assert report_text_from_hl7(msg) == "café"


def test_raw_utf8_text_is_decoded() -> None:
    msg = message("OBX|1|TX|X^Report^L||Hämatom, 5 mm||||||F")
    assert report_text_from_hl7(msg) == "Hämatom, 5 mm"


def test_custom_separators_from_msh_1_and_msh_2() -> None:
    msh = "MSH#*$!@#RIS#HOSP#GW#AI#20261125##ORU*R01#C2#P#2.5.1"
    msg = message(
        "OBX#1#TX#X*Report*L##Line one: a!F!b!S!c!.br!d$Line two!E!##F",
        msh=msh,
    ).replace(b"PID|1||MRN1^^^HOSP^MR||DOE^JANE", b"PID#1##MRN1")
    assert report_text_from_hl7(msg) == "Line one: a#b*c\nd\nLine two!"
    assert Separators.from_msh(msh) == Separators("#", "*", "$", "!", "@", "")


def test_truncation_character_escape() -> None:
    seps = Separators.from_msh("MSH|^~\\&#|A")
    assert seps.truncation == "#"
    assert decode_escapes(r"x\P\y", seps) == "x#y"


def test_non_text_and_withdrawn_observations_are_ignored() -> None:
    msg = message(
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F",
        "OBX|2|CE|X^Code^L||123^Something^L||||||F",
        "OBX|3|ED|X^PDF^L||^application^pdf^Base64^JVBERi0=||||||F",
        "OBX|4|TX|X^Report^L||Posted in error.||||||W",
        "OBX|5|TX|X^Report^L||Deleted.||||||D",
        "OBX|6|TX|X^Report^L||Kept.||||||C",
        "NTE|1||not an observation",
    )
    assert report_text_from_hl7(msg) == "Kept."


def test_a_message_without_text_gives_empty_text() -> None:
    assert report_text_from_hl7(message("OBX|1|NM|X^Y^L||1||||||F")) == ""


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_separators_are_tolerated(sep: str) -> None:
    msg = message("OBX|1|TX|X^R^L||one||||||F", "OBX|2|TX|X^R^L||two||||||F", sep=sep)
    assert report_text_from_hl7(msg) == "one\ntwo"


def test_a_line_that_is_not_a_segment_continues_the_previous_one() -> None:
    msg = message("OBX|1|TX|X^R^L||first line", "second line||||||F", sep="\n")
    assert report_text_from_hl7(msg) == "first line\nsecond line"


def test_mllp_framing_and_bom_are_stripped() -> None:
    msg = b"\x0b\xef\xbb\xbf" + oru_r01(text="Framed.") + b"\x1c\r"
    assert report_text_from_hl7(msg.replace(b"\x0b\xef\xbb\xbf", b"\xef\xbb\xbf\x0b")) == "Framed."


def test_unknown_escapes_and_lone_escape_characters_stay_as_text() -> None:
    seps = Separators()
    assert decode_escapes(r"C:\temp\Q\ x", seps) == r"C:\temp\Q\ x"
    assert decode_escapes("a\\", seps) == "a\\"
    assert decode_escapes(r"\XZZ\ and \X4\ ", seps) == r"\XZZ\ and \X4\ "


def test_a_message_must_start_with_msh() -> None:
    with pytest.raises(MalformedInput):
        report_text_from_hl7(b"PID|1||X\rOBX|1|TX|X||text\r")
    with pytest.raises(MalformedInput):
        report_text_from_hl7(b"MSH|^~\r")


def test_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    path.write_bytes(b"\xef\xbb\xbfFINDINGS:\r\nNo pneumothorax.\r\n\r\nIMPRESSION: normal.\r\n")
    assert report_text_from_file(path) == "FINDINGS:\nNo pneumothorax.\n\nIMPRESSION: normal."


def test_latin1_plain_text_file(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    path.write_bytes("Hämatom.".encode("latin-1"))
    assert report_text_from_file(path) == "Hämatom."


def test_hl7_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "oru.hl7"
    # \.br\ is decoded in TX too: senders use it there although it is defined for FT
    text = oru_r01(text=r"No effusion.\.br\Small nodule.").replace(b"\r", b"\r\n")
    path.write_bytes(b"\n" + text)
    assert report_text_from_file(str(path)) == "No effusion.\nSmall nodule."
    path.write_bytes(message(r"OBX|1|FT|X^R^L||No effusion.\.br\Small nodule.||||||F"))
    assert report_text_from_file(path) == "No effusion.\nSmall nodule."
