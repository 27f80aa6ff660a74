"""Fuzz target: data set bytes, as a C-STORE delivers them, into the SCP's decision.

Input: one selector byte, then the data set (without file meta).  The selector's low bits
pick the presentation context's transfer syntax (:data:`~tests.fuzz.dicomscp.SYNTAXES`);
its high bit sends the data set through the received-to-disk path (``dicom.
receive_to_disk``: a Part 10 file, memory-mapped) instead of memory.  The C-STORE request
names the UIDs the gateway's own header reader finds, as an honest sender would, so that
every data set that passes the checks reaches the success path; the oracle
(:func:`~tests.fuzz.dicomscp.judge`) then says whether it was whole.
"""

from __future__ import annotations

from tests.fuzz.dicomscp import SYNTAXES, Received, claimed_uids, judge


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, body = data[0], data[1:]
    syntax = SYNTAXES[(selector & 0x7F) % len(SYNTAXES)]
    sop_class, sop_instance = claimed_uids(body, syntax)
    judge(Received(body, syntax, sop_class, sop_instance, on_disk=bool(selector & 0x80)))
