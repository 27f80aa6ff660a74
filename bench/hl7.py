"""HL7 v2 / MLLP ingest: the gateway vs a minimal fsync-ing reference sink.

    python -m bench.hl7 [--rounds 3] [--messages 2000] [--reference-only]

The reference is the least a durable MLLP receiver can do: an asyncio server (run as a
subprocess, like the gateway) that appends each message to a file, ``os.fsync``s it, and
only then answers a minimal ``MSA|AA`` ACK. The gateway (``gateway run -c <temp config>``,
fresh data dir per round) must do the same durably (one SQLite commit) before its AA.

Per round and peer: one MLLP connection; ``--warmup`` messages (not timed), then
``--messages`` ORU^R01 messages (unique MSH-10, sender EHR/HOSP), each sent only after the
previous ACK arrived (stop-and-wait, as real interface engines do). Reported: messages/s,
p50/p99 round-trip latency, and the gateway/reference throughput ratio (target >= 0.9).
Rounds alternate reference and gateway. Results: printed, and bench/out/hl7.json.

``python -m bench.hl7 --sink PORT FILE`` runs the reference sink alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    HL7_APPLICATION,
    HL7_FACILITY,
    log,
    machine,
    median,
    percentile,
    running,
    running_gateway,
    scratch_dir,
    table,
    verdict,
    write_json,
)
from tests.dicomgen import free_port, wait_for_port

START_BLOCK, END_BLOCK = b"\x0b", b"\x1c\x0d"
RATIO_TARGET = 0.9
ACK_TIMEOUT_S = 30.0
MAX_FRAME = 16 * 1024 * 1024

# A handwritten ORU^R01 v2.5 radiology report; {id} = MSH-10, {n} = a sequence number.
ORU_TEMPLATE = "\r".join([
    "MSH|^~\\&|{app}|{fac}|AI_GATEWAY|AI|20240102101500||ORU^R01^ORU_R01|{id}|P|2.5",
    "PID|1||PID{n:07d}^^^HOSP^MR||DOE^JANE^Q||19700101|F|||1 MAIN ST^^SPRINGFIELD^IL^62701",
    "PV1|1|O|RAD^^^HOSP||||1234^REFERRER^ROB",
    "ORC|RE|ORD{n:07d}|FIL{n:07d}||CM",
    "OBR|1|ORD{n:07d}|FIL{n:07d}|71250^CT CHEST W/O CONTRAST^CPT|||20240102100000|||||||||"
    "1234^REFERRER^ROB||||||20240102101000|||F",
    "OBX|1|TX|18782-3^RADIOLOGY STUDY OBSERVATION^LN||FINDINGS: 6 mm solid nodule in the "
    "right upper lobe. No pleural effusion. No lymphadenopathy.||||||F",
    "OBX|2|TX|19005-8^RADIOLOGY IMPRESSION^LN||IMPRESSION: Indeterminate 6 mm pulmonary "
    "nodule; follow-up CT in 6-12 months.||||||F",
]) + "\r"


def oru_message(control_id: str, n: int) -> bytes:
    return ORU_TEMPLATE.format(app=HL7_APPLICATION, fac=HL7_FACILITY, id=control_id,
                               n=n).encode("ascii")


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK


def unframe(data: bytes) -> bytes:
    start = data.find(START_BLOCK)
    return data[start + 1 : -len(END_BLOCK)] if start >= 0 else data[: -len(END_BLOCK)]


# --- the reference sink ----------------------------------------------------------------


def minimal_ack(message: bytes) -> bytes:
    """MSH + MSA|AA echoing MSH-10, sender and receiver swapped."""
    msh = message.split(b"\r", 1)[0].decode("latin-1")
    sep = msh[3] if len(msh) > 3 else "|"
    f = msh.split(sep)

    def get(i: int) -> str:
        return f[i] if len(f) > i else ""

    stamp = time.strftime("%Y%m%d%H%M%S")
    return (
        f"MSH{sep}{get(1)}{sep}{get(4)}{sep}{get(5)}{sep}{get(2)}{sep}{get(3)}{sep}{stamp}"
        f"{sep}{sep}ACK{sep}A{get(9)}{sep}P{sep}{get(11) or '2.5'}\r"
        f"MSA{sep}AA{sep}{get(9)}\r"
    ).encode("latin-1")


async def serve_sink(port: int, path: Path) -> None:
    """Append each message to ``path``, fsync, then ACK; until SIGTERM/SIGINT."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                message = unframe(await reader.readuntil(END_BLOCK))
                os.write(fd, message + b"\n")
                os.fsync(fd)
                writer.write(frame(minimal_ack(message)))
                await writer.drain()
        writer.close()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=MAX_FRAME)
    async with server:
        await stop.wait()
    os.close(fd)


# --- the client ------------------------------------------------------------------------


@dataclass
class Run:
    peer: str
    round: int
    messages: int
    seconds: float
    acked: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    first_failure: str | None = None

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> list[Any]:
        return [self.peer, self.messages, f"{self.seconds:.2f}", self.per_second,
                f"{self.p50_ms:.2f}", f"{self.p99_ms:.2f}", f"{self.max_ms:.2f}",
                "all AA" if self.failures == 0 else f"{self.failures} not AA"]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "messages_per_s": round(self.per_second, 1)}


HEADERS = ["peer", "messages", "seconds", "msg/s", "p50 ms", "p99 ms", "max ms", "ACKs"]


def _ack_code(ack: bytes, control_id: str) -> str | None:
    """None if ``ack`` is an AA/CA for ``control_id``, else a short description."""
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            fields = segment.decode("latin-1").split(segment.decode("latin-1")[3])
            code = fields[1] if len(fields) > 1 else ""
            ref = fields[2] if len(fields) > 2 else ""
            if code in ("AA", "CA") and ref == control_id:
                return None
            return f"MSA {code} for {ref!r} (sent {control_id!r}): {ack[:300]!r}"
    return f"no MSA segment: {ack[:300]!r}"


async def send_messages(port: int, count: int, warmup: int, tag: str) -> tuple[
        float, list[float], int, str | None]:
    """One connection; warm-up, then ``count`` stop-and-wait messages.
    Returns (seconds, latencies in s, failures, first failure)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=MAX_FRAME), timeout=10)
    latencies: list[float] = []
    failures = 0
    first_failure: str | None = None
    try:
        async def one(i: int) -> tuple[float, str | None]:
            control_id = f"{tag}{i:06d}"
            t0 = time.perf_counter()
            writer.write(frame(oru_message(control_id, i)))
            await writer.drain()
            ack = unframe(await asyncio.wait_for(reader.readuntil(END_BLOCK), ACK_TIMEOUT_S))
            return time.perf_counter() - t0, _ack_code(ack, control_id)

        for i in range(warmup):
            await one(i)
        start = time.perf_counter()
        for i in range(warmup, warmup + count):
            latency, problem = await one(i)
            latencies.append(latency)
            if problem is not None:
                failures += 1
                first_failure = first_failure or problem
        seconds = time.perf_counter() - start
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return seconds, latencies, failures, first_failure


def measure(peer: str, round_no: int, port: int, count: int, warmup: int) -> Run:
    tag = f"B{uuid.uuid4().hex[:8].upper()}"
    seconds, lat, failures, first = asyncio.run(send_messages(port, count, warmup, tag))
    ms = [x * 1000 for x in lat]
    if first:
        log(f"  first non-AA answer: {first}")
    return Run(peer, round_no, count, seconds, count - failures, failures,
               percentile(ms, 50), percentile(ms, 99), max(ms) if ms else float("nan"), first)


def sink_round(round_no: int, count: int, warmup: int) -> Run:
    folder = scratch_dir("hl7-sink-")
    port = free_port()
    try:
        cmd = [sys.executable, "-m", "bench.hl7", "--sink", str(port), str(folder / "sink.hl7")]
        with running(cmd, stdout=None):
            wait_for_port(port)
            return measure("reference", round_no, port, count, warmup)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def gateway_round(round_no: int, count: int, warmup: int) -> Run:
    with running_gateway("hl7-gw-") as gw:
        return measure("gateway", round_no, gw.cfg.hl7_port, count, warmup)


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hl7", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--messages", type=int, default=2000,
                   help="timed messages per round and peer (default 2000)")
    p.add_argument("--warmup", type=int, default=50, help="untimed messages first (default 50)")
    p.add_argument("--reference-only", action="store_true", help="only the reference sink")
    p.add_argument("--sink", nargs=2, metavar=("PORT", "FILE"),
                   help="run the reference sink on 127.0.0.1:PORT appending to FILE, and exit "
                        "on SIGTERM")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink:
        asyncio.run(serve_sink(int(args.sink[0]), Path(args.sink[1])))
        return 0

    log(f"{args.rounds} interleaved rounds x {args.messages} ORU^R01 per peer, one MLLP "
        f"connection each, stop-and-wait (next message after the ACK), {args.warmup} warm-up\n")
    runs: list[Run] = []
    gateway_error: str | None = None
    for r in range(1, args.rounds + 1):
        log(f"round {r}/{args.rounds}: reference sink (append + fsync + ACK) ...")
        rows = [sink_round(r, args.messages, args.warmup)]
        if not args.reference_only and gateway_error is None:
            log(f"round {r}/{args.rounds}: gateway ...")
            try:
                rows.append(gateway_round(r, args.messages, args.warmup))
            except (RuntimeError, OSError, TimeoutError, asyncio.IncompleteReadError,
                    subprocess.SubprocessError) as exc:
                gateway_error = f"{type(exc).__name__}: {exc}"
                log(f"  gateway round failed, skipping the gateway from now on: {gateway_error}")
        runs += rows
        log(table(HEADERS, [x.row() for x in rows]) + "\n")

    def good(peer: str) -> list[Run]:
        return [x for x in runs if x.peer == peer and x.failures == 0]

    ref, gw = good("reference"), good("gateway")
    summary: dict[str, Any] = {}
    for name, rs in (("reference", ref), ("gateway", gw)):
        if rs:
            summary[name] = {
                "median_messages_per_s": round(median([x.per_second for x in rs]), 1),
                "median_p50_ms": round(median([x.p50_ms for x in rs]), 3),
                "median_p99_ms": round(median([x.p99_ms for x in rs]), 3),
                "good_rounds": len(rs),
            }
            s = summary[name]
            log(f"median {name:9}: {s['median_messages_per_s']:,.1f} msg/s, "
                f"p50 {s['median_p50_ms']:.2f} ms, p99 {s['median_p99_ms']:.2f} ms "
                f"({len(rs)} good rounds)")
    if ref and gw:
        ratio = summary["gateway"]["median_messages_per_s"] / summary["reference"][
            "median_messages_per_s"]
        summary["ratio_gateway_over_reference"] = round(ratio, 3)
        summary["verdict"] = verdict(ratio, RATIO_TARGET)
        log(f"ratio gateway/reference = {ratio:.2f}   target >= {RATIO_TARGET}: "
            f"{summary['verdict']}")
    elif not args.reference_only:
        log("gateway: no clean round" + (f" ({gateway_error})" if gateway_error else ""))

    path = write_json("hl7.json", {
        "benchmark": "hl7",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "method": "one MLLP connection per round and peer, stop-and-wait, fresh sink / "
                  "gateway per round, rounds interleaved; reference = append + fsync + AA",
        "messages_per_round": args.messages,
        "warmup": args.warmup,
        "target_ratio": RATIO_TARGET,
        "rounds": [x.as_json() for x in runs],
        "summary": summary,
        "gateway_error": gateway_error,
    })
    log(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
