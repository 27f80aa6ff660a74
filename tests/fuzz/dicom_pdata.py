"""Fuzz target: P-DATA-TF PDUs, reassembled by pynetdicom as the SCP receives them.

Input: a run of PDUs (type, reserved byte, 4-byte big-endian length, body), as they come
off the socket.  Each P-DATA-TF is decoded and its fragments (PDVs) added to the DIMSE
message by pynetdicom's own code; a PDU of another type ends the association, and so does
anything pynetdicom cannot decode (it answers with an A-ABORT, never a status).  Each
complete C-STORE request goes to the SCP's decision with the data set and UIDs it carries,
in the transfer syntax of its presentation context: 1, 3, 5, 7, 9 are the syntaxes of
:data:`~tests.fuzz.dicomscp.SYNTAXES`; pynetdicom aborts on any other.
"""

from __future__ import annotations

import struct

from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from tests.fuzz.dicomscp import SYNTAXES, Received, judge

_CONTEXTS = {2 * i + 1: syntax for i, syntax in enumerate(SYNTAXES)}
_P_DATA_TF = 0x04


def TestOneInput(data: bytes) -> None:
    message = DIMSEMessage()
    pos = 0
    while pos + 6 <= len(data):
        pdu_type, _reserved, length = struct.unpack_from(">BBL", data, pos)
        pdu = data[pos : pos + 6 + length]
        pos += 6 + length
        if pdu_type != _P_DATA_TF or len(pdu) != 6 + length:
            return  # release, abort, association PDUs, or the connection ends mid-PDU
        try:
            decoded = P_DATA_TF()
            decoded.decode(pdu)
            if not message.decode_msg(decoded.to_primitive()):
                continue
            request = message.message_to_primitive()
        except Exception:  # pynetdicom's DUL aborts the association: no status is sent
            return
        message = DIMSEMessage()
        syntax = _CONTEXTS.get(message_context(request))
        if not isinstance(request, C_STORE) or syntax is None:
            continue  # C-ECHO and the like; an unknown context is aborted by pynetdicom
        body = request.DataSet.getvalue() if request.DataSet is not None else b""
        judge(
            Received(
                body,
                syntax,
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
            )
        )


def message_context(request: object) -> int:
    context = getattr(request, "_context_id", None)
    return context if isinstance(context, int) else -1
