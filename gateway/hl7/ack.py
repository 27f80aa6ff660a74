"""A pure builder of HL7 v2 acknowledgements (ACK) for received messages.

Original mode answers AA / AE / AR; enhanced mode's accept (commit) ACK answers
CA / CE / CR.  The ACK uses the incoming message's separators, swaps sender and receiver,
echoes MSH-11 / MSH-12 (or answers in 2.5 when the version is unusable) and carries an
ERR segment with an HL7 table 0357 code whenever it is not a success.
"""

from __future__ import annotations

from datetime import datetime

from gateway.hl7.msh import ERR_APPLICATION_INTERNAL, SUPPORTED_VERSIONS, Header

OUR_APPLICATION = "AI_GATEWAY"
FALLBACK_VERSION = "2.5"
MAX_CONTROL_ID = 20  # the v2.5 length of MSH-10 (ours, in ACKs and ORUs)
MAX_MSA_TEXT = 80
MAX_ERR_TEXT = 199

SUCCESS_CODES = frozenset({"AA", "CA"})
ERROR_CODES = frozenset({"AE", "AR", "CE", "CR"})
COMMIT_CODE = {"AA": "CA", "AE": "CE", "AR": "CR"}
"""Original-mode code -> the enhanced-mode accept ACK code with the same meaning."""

TABLE_0357 = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

_DEFAULT_HEADER = Header()


def escape(value: str, field_sep: str, encoding_chars: str) -> str:
    """Escape separators in a value (``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``, and ``\\P\\`` when the
    message declares a truncation character); line breaks become spaces."""
    specials = field_sep + encoding_chars + "\r\n"
    if not any(c in specials for c in value):
        return value
    esc = encoding_chars[2]
    names = "SRET" + ("P" if len(encoding_chars) > 4 else "")
    table = {field_sep: f"{esc}F{esc}", "\r": " ", "\n": " "}
    table.update({c: f"{esc}{n}{esc}" for c, n in zip(encoding_chars, names, strict=False)})
    return "".join(table.get(c, c) for c in value)


def _version_at_least(version: str, minimum: tuple[int, int]) -> bool:
    try:
        numbers = tuple(int(p) for p in version.split("."))
    except ValueError:
        return True
    return numbers[:2] >= minimum


def _timestamp(now: datetime) -> str:
    stamp = now.strftime("%Y%m%d%H%M%S")
    return stamp + now.strftime("%z") if now.tzinfo is not None else stamp


def build_ack(
    header: Header | None,
    code: str,
    *,
    control_id: str,
    text: str = "",
    error_code: int | None = None,
    error_location: tuple[str, int, int] | None = None,
    now: datetime,
) -> bytes:
    """The ACK for a message whose header is *header* (``None``: it could not be read).

    *control_id* becomes the ACK's own MSH-10 (cut to 20 characters); MSA-2 echoes the
    incoming MSH-10.  *text* goes to MSA-3 and the ERR segment and only appears on an
    error (AE/AR/CE/CR), whose ERR code is *error_code* (default 207, application internal
    error) at *error_location* (segment, sequence, field), e.g. ``("MSH", 1, 12)``.
    """
    if code not in SUCCESS_CODES and code not in ERROR_CODES:
        raise ValueError(f"unknown acknowledgement code {code!r}")
    h = header or _DEFAULT_HEADER
    fs, enc = h.field_sep, h.encoding_chars
    comp = enc[0]

    def e(value: str) -> str:
        return escape(value, fs, enc)

    version = h.version if h.version in SUPPORTED_VERSIONS else FALLBACK_VERSION
    if not h.trigger:
        msg_type = "ACK"
    elif version == "2.3":  # MSH-9 has no message structure component before 2.3.1
        msg_type = f"ACK{comp}{e(h.trigger)}"
    else:
        msg_type = f"ACK{comp}{e(h.trigger)}{comp}ACK"
    msh = [
        "MSH",
        enc,
        e(h.receiving_application or OUR_APPLICATION),
        e(h.receiving_facility),
        e(h.sending_application),
        e(h.sending_facility),
        e(_timestamp(now)),  # "+" / "-" of the time zone can be a message's separators
        "",
        msg_type,
        e(control_id[:MAX_CONTROL_ID]),
        e(h.processing_id or "P"),
        e(version),  # "." can be a message's component separator
    ]
    if h.charset:
        msh += ["", "", "", "", "", e(h.charset)]
    msa = ["MSA", code, e(h.control_id)]
    segments = [fs.join(msh)]
    if code in ERROR_CODES:
        number = ERR_APPLICATION_INTERNAL if error_code is None else error_code
        message = text or TABLE_0357.get(number, TABLE_0357[ERR_APPLICATION_INTERNAL])
        msa.append(e(message[:MAX_MSA_TEXT]))
        segments.append(fs.join(msa))
        segments.append(_err(number, message[:MAX_ERR_TEXT], error_location, version, fs, enc))
    else:
        segments.append(fs.join(msa))
    return ("\r".join(segments) + "\r").encode("latin-1", "replace")


def _err(
    number: int,
    message: str,
    location: tuple[str, int, int] | None,
    version: str,
    fs: str,
    enc: str,
) -> str:
    comp, sub = enc[0], enc[3]
    where = (
        [location[0], str(location[1]), str(location[2]) if location[2] else ""]
        if location
        else ["", "", ""]
    )
    text = escape(message, fs, enc)
    if _version_at_least(version, (2, 5)):
        # ERR-2 location (ERL), ERR-3 HL7 error code (CWE), ERR-4 severity
        loc = comp.join(where).rstrip(comp) if location else ""
        return fs.join(["ERR", "", loc, comp.join([str(number), text, "HL70357"]), "E"])
    # Before 2.5: ERR-1 error code and location (ELD), its 4th component a CE in subcomponents
    return "ERR" + fs + comp.join([*where, sub.join([str(number), text, "HL70357"])])
