"""Handwritten synthetic HL7 v2 messages and a python-hl7 MLLP client for tests."""

from __future__ import annotations

import asyncio

import hl7.mllp


def oru_r01(
    *,
    control_id: str = "MSG00001",
    sender: str = "EHR",
    facility: str = "HOSP",
    version: str = "2.5.1",
    patient: str = "DOE^JANE",
    mrn: str = "PID12345",
    text: str = "No acute findings.",
    accession: str = "ACC0001",
) -> bytes:
    segments = [
        f"MSH|^~\\&|{sender}|{facility}|AI_GATEWAY|AI|20261125101500||ORU^R01^ORU_R01|"
        f"{control_id}|P|{version}",
        f"PID|1||{mrn}^^^HOSP^MR||{patient}||19700101|F",
        "PV1|1|O|RAD^^^HOSP",
        f"ORC|RE|{accession}|{accession}",
        f"OBR|1|{accession}|{accession}|71250^CT CHEST^CPT|||20261125100000",
        f"OBX|1|TX|18782-3^Radiology Study observation^LN||{text}||||||F",
    ]
    return ("\r".join(segments) + "\r").encode()


def send_mllp(
    port: int, messages: list[bytes], host: str = "127.0.0.1", timeout: float = 30.0
) -> list[bytes]:
    """Send messages over one MLLP connection with python-hl7's client; return the ACKs."""

    async def run() -> list[bytes]:
        reader, writer = await hl7.mllp.open_hl7_connection(host, port, encoding="latin-1")
        acks = []
        try:
            for m in messages:
                writer.writemessage(m.decode("latin-1"))
                await writer.drain()
                ack = await asyncio.wait_for(reader.readmessage(), timeout)
                acks.append(str(ack).encode("latin-1"))
        finally:
            writer.close()
        return acks

    return asyncio.run(run())
