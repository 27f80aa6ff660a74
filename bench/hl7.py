"""HL7 v2 / MLLP ingest: the gateway vs a minimal fsync-ing reference sink, over one and
several concurrent connections.

    python -m bench.hl7 [--rounds 3] [--messages 2000] [--connections 1,4]
                        [--ingest-processes 1] [--route forward|model|none]
                        [--engine sqlite|postgresql] [--reference-only]

The reference is the least a durable MLLP receiver can do: an asyncio server (run as a
subprocess, like the gateway) that appends each message to a file, ``os.fsync``s it, and
only then answers a minimal ``MSA|AA`` ACK. It serves any number of connections at once
(one asyncio task each); the write and the fsync run on its event loop, so concurrent
connections' fsyncs take turns, and every ACK still follows the fsync of its own message.
The gateway (``gateway run -c <temp config>``, fresh data dir per send) must do the same
durably (one commit: SQLite, or ``--engine postgresql``, a new schema per send on one
private server made by initdb + pg_ctl) before its AA; it runs with ``ingest.processes:
--ingest-processes`` listener processes (SO_REUSEPORT: they share the port),
``workers.processes: 1``, and a route that gives every ORU^R01 work in the worker process
(``--route``): ``forward`` (default) to an HL7 destination that is a second reference sink,
``model`` through ``report-findings`` (results kept nowhere), ``none`` (no routes).

Per round, for each N in ``--connections``, each peer (fresh) gets: N MLLP connections
at once; ``--warmup`` messages on each (not timed), then ``--messages`` ORU^R01 messages
(unique MSH-10, sender EHR/HOSP) split among the N connections, each connection
stop-and-wait (its next message only after the ACK of its previous one, checked: MSA-1 =
AA, MSA-2 = the MSH-10 sent). Timed from the moment all connections are warmed up until
the last ACK. Reported per N: messages/s, p50/p99 round-trip latency, and the
gateway/reference throughput ratio (issue 14: >= 0.6 for one connection, routing in other
processes). After the last ACK the bench waits until the worker has routed every message
(forwarded to the sink / run through the model, read from the gateway's /metrics): not
timed, it checks the route worked. Rounds alternate reference and gateway.
Results: printed, and bench/out/hl7.json.

``python -m bench.hl7 --sink PORT FILE`` runs the reference sink alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    HL7_APPLICATION,
    HL7_FACILITY,
    REPO,
    GatewayProcess,
    Postgres,
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
#: Issue 14: gateway/reference messages/s (median of rounds), stop-and-wait, routing in other
#: processes, per number of connections.
RATIO_TARGETS: dict[int, float] = {1: 0.6}
ROUTES = ("forward", "model", "none")
ROUTE_MODEL = "report-findings"
FORWARD_DESTINATION = "hl7-sink"
ROUTED_TIMEOUT_S = 300.0
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
    connections: int
    messages: int
    seconds: float
    acked: int
    failures: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    first_failure: str | None = None
    # the gateway: messages the worker routed (forwarded / through the model) by the end
    # of the wait, out of ``sent`` (warm-up included), and how long after the last ACK
    sent: int = 0
    routed: int | None = None
    routed_after_s: float | None = None

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.failures == 0

    def row(self) -> list[Any]:
        routed = "-"
        if self.routed is not None:
            routed = f"{self.routed}/{self.sent}"
            if self.routed_after_s is not None:
                routed += f" +{self.routed_after_s:.1f}s"
        return [self.peer, self.connections, self.messages, f"{self.seconds:.2f}",
                self.per_second, f"{self.p50_ms:.2f}", f"{self.p99_ms:.2f}",
                f"{self.max_ms:.2f}", "all AA" if self.failures == 0
                else f"{self.failures} not AA", routed]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "messages_per_s": round(self.per_second, 1)}


HEADERS = ["peer", "conn", "messages", "seconds", "msg/s", "p50 ms", "p99 ms", "max ms",
           "ACKs", "routed"]


def _ack_code(ack: bytes, control_id: str) -> str | None:
    """None if ``ack`` is an AA for ``control_id``, else a short description."""
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA"):
            fields = segment.decode("latin-1").split(segment.decode("latin-1")[3])
            code = fields[1] if len(fields) > 1 else ""
            ref = fields[2] if len(fields) > 2 else ""
            if code == "AA" and ref == control_id:
                return None
            return f"MSA {code} for {ref!r} (sent {control_id!r}): {ack[:300]!r}"
    return f"no MSA segment: {ack[:300]!r}"


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` nearly equal counts."""
    size, extra = divmod(total, parts)
    return [size + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class Sent:
    seconds: float
    latencies: list[float]
    failures: int
    first_failure: str | None


async def send_messages(port: int, count: int, warmup: int, tag: str,
                        connections: int, ssl_context: ssl.SSLContext | None = None) -> Sent:
    """``connections`` connections at once; ``warmup`` messages on each, then ``count``
    messages split among them, each connection stop-and-wait. The time runs from when
    every connection is warmed up until the last ACK. *ssl_context*: over TLS."""
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    latencies: list[float] = []
    problems: list[str] = []

    async def one(c: int, i: int) -> tuple[float, str | None]:
        reader, writer = opened[c]
        control_id = f"{tag}{c:02d}{i:06d}"
        t0 = time.perf_counter()
        writer.write(frame(oru_message(control_id, i)))
        await writer.drain()
        ack = unframe(await asyncio.wait_for(reader.readuntil(END_BLOCK), ACK_TIMEOUT_S))
        return time.perf_counter() - t0, _ack_code(ack, control_id)

    async def stream(c: int, first: int, n: int, timed: bool) -> None:
        for i in range(first, first + n):
            latency, problem = await one(c, i)
            if timed:
                latencies.append(latency)
                if problem is not None:
                    problems.append(problem)

    try:
        for _ in range(connections):
            tls: dict[str, Any] = (
                {"ssl": ssl_context, "server_hostname": "localhost"} if ssl_context else {}
            )
            opened.append(await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, limit=MAX_FRAME, **tls), timeout=10))
        await asyncio.gather(*(stream(c, 0, warmup, False) for c in range(connections)))
        start = time.perf_counter()
        await asyncio.gather(*(stream(c, warmup, n, True)
                               for c, n in enumerate(shares(count, connections))))
        seconds = time.perf_counter() - start
    finally:
        for _, writer in opened:
            writer.close()
        for _, writer in opened:
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
    return Sent(seconds, latencies, len(problems), problems[0] if problems else None)


def measure(peer: str, round_no: int, port: int, count: int, warmup: int,
            connections: int, ssl_context: ssl.SSLContext | None = None) -> Run:
    tag = f"B{uuid.uuid4().hex[:8].upper()}"
    sent = asyncio.run(send_messages(port, count, warmup, tag, connections, ssl_context))
    ms = [x * 1000 for x in sent.latencies]
    if sent.first_failure:
        log(f"  first non-AA answer: {sent.first_failure}")
    return Run(peer, round_no, connections, count, sent.seconds, count - sent.failures,
               sent.failures, percentile(ms, 50), percentile(ms, 99),
               max(ms) if ms else float("nan"), sent.first_failure,
               sent=count + warmup * connections)


@contextlib.contextmanager
def sink(prefix: str) -> Iterator[int]:
    """The reference sink as a subprocess on a free port, with its own folder."""
    folder = scratch_dir(prefix)
    port = free_port()
    try:
        cmd = [sys.executable, "-m", "bench.hl7", "--sink", str(port), str(folder / "sink.hl7")]
        with running(cmd, stdout=None):
            wait_for_port(port)
            yield port
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sink_round(round_no: int, count: int, warmup: int, connections: int) -> Run:
    with sink("hl7-sink-") as port:
        return measure("reference", round_no, port, count, warmup, connections)


def route_sections(route: str, forward_port: int | None) -> dict[str, Any]:
    """The gateway's config for ``--route``: every ORU^R01 gets work in the worker."""
    when = {"hl7": {"MSH-9": "ORU^R01"}}
    if route == "forward":
        assert forward_port is not None
        return {
            "destinations": {FORWARD_DESTINATION: {"hl7": {
                "host": "127.0.0.1", "port": forward_port,
                "application": HL7_APPLICATION, "facility": HL7_FACILITY}}},
            "routes": [{"name": "reports", "when": when, "forward": [FORWARD_DESTINATION]}],
        }
    if route == "model":
        return {
            "models": {ROUTE_MODEL: {"bundle": str(REPO / "models" / "report_findings")}},
            "routes": [{"name": "reports", "when": when, "run": [ROUTE_MODEL]}],
        }
    return {}


def routed(gw: GatewayProcess, route: str) -> float | None:
    """Messages the gateway's worker has routed all the way (None: cannot tell)."""
    if route == "forward":
        return gw.metric("gateway_deliveries_total", destination=FORWARD_DESTINATION,
                         outcome="delivered")
    if route == "model":
        return gw.metric("gateway_model_runs_total", model=ROUTE_MODEL, outcome="ok")
    return None


def wait_routed(gw: GatewayProcess, route: str, expected: int) -> tuple[int | None, float]:
    """Until the worker routed ``expected`` messages or ``ROUTED_TIMEOUT_S`` passed:
    (how many it routed, seconds waited)."""
    t0 = time.monotonic()
    done = routed(gw, route)
    while done is not None and done < expected and time.monotonic() - t0 < ROUTED_TIMEOUT_S:
        time.sleep(0.25)
        done = routed(gw, route)
    return (None if done is None else int(done)), time.monotonic() - t0


def gateway_round(round_no: int, count: int, warmup: int, connections: int,
                  args: argparse.Namespace, pg: Postgres | None) -> Run:
    with contextlib.ExitStack() as stack:
        forward_port = stack.enter_context(sink("hl7-fwd-")) if args.route == "forward" else None
        database = {"gateway": {"database": pg.new_dsn()}} if pg is not None else {}
        gw = stack.enter_context(running_gateway(
            "hl7-gw-", start_timeout=120.0,
            ingest={"processes": args.ingest_processes}, workers={"processes": 1},
            **database, **route_sections(args.route, forward_port)))
        if args.route == "model":  # the runner loads torch: not while we measure
            gw.wait_for_log(1, '"model.loaded"', ROUTE_MODEL, timeout=300)
        run = measure("gateway", round_no, gw.cfg.hl7_port, count, warmup, connections)
        if args.route != "none":
            run.routed, waited = wait_routed(gw, args.route, run.sent)
            if run.routed == run.sent:
                run.routed_after_s = round(waited, 2)
            else:
                log(f"  the worker routed {run.routed} of {run.sent} messages "
                    f"({ROUTED_TIMEOUT_S:.0f}s after the last ACK); log tail:\n"
                    f"{gw.log_tail(1500)}")
        return run


# --- main ------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 or v > 99 for v in values):
        raise argparse.ArgumentTypeError(f"integers 1..99, comma-separated: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hl7", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--messages", type=int, default=2000,
                   help="timed messages per round and peer, split among the connections "
                        "(default 2000)")
    p.add_argument("--warmup", type=int, default=50,
                   help="untimed messages first, on each connection (default 50)")
    p.add_argument("--connections", type=_int_list, default=[1, 4],
                   help="concurrent MLLP connections, comma-separated (default 1,4)")
    p.add_argument("--ingest-processes", type=int, default=1,
                   help="the gateway's ingest.processes (default 1)")
    p.add_argument("--route", choices=ROUTES, default="forward",
                   help="what the gateway's worker does with each ORU: forward it to a "
                        "second sink (default), run report-findings on it, or nothing "
                        "(no routes)")
    p.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite",
                   help="the gateway's queue database (default sqlite; postgresql: a private "
                        "server started for the run, a new schema per gateway)")
    p.add_argument("--reference-only", action="store_true", help="only the reference sink")
    p.add_argument("--sink", nargs=2, metavar=("PORT", "FILE"),
                   help="run the reference sink on 127.0.0.1:PORT appending to FILE, and exit "
                        "on SIGTERM")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.messages < 1 or args.warmup < 0 \
            or not 1 <= args.ingest_processes <= 64:
        p.error("--rounds >= 1, --messages >= 1, --warmup >= 0, --ingest-processes 1..64")
    return args


def summarize(runs: list[Run], connections: list[int]) -> list[dict[str, Any]]:
    """Per connection count: medians over good rounds of each peer, the ratio, the target."""
    rows: list[dict[str, Any]] = []
    for n in connections:
        row: dict[str, Any] = {"connections": n}
        for peer in ("reference", "gateway"):
            good = [x for x in runs if x.peer == peer and x.connections == n and x.ok]
            row[peer] = {
                "median_messages_per_s": round(median([x.per_second for x in good]), 1),
                "median_p50_ms": round(median([x.p50_ms for x in good]), 3),
                "median_p99_ms": round(median([x.p99_ms for x in good]), 3),
                "messages_per_s_by_round": [round(x.per_second, 1) for x in good],
                "good_rounds": len(good),
            } if good else None
        ratio = None
        if row["reference"] and row["gateway"]:
            ratio = round(row["gateway"]["median_messages_per_s"]
                          / row["reference"]["median_messages_per_s"], 3)
        target = RATIO_TARGETS.get(n)
        row["ratio_gateway_over_reference"] = ratio
        row["target_ratio"] = target
        row["verdict"] = ("-" if target is None else "no data" if ratio is None
                          else verdict(ratio, target))
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    def cell(peer: dict[str, Any] | None, key: str, fmt: str) -> str:
        return "-" if peer is None else format(peer[key], fmt)

    return table(
        ["conn", "sink msg/s", "p50 ms", "p99 ms", "gateway msg/s", "p50 ms", "p99 ms",
         "gw/sink", "target", "verdict"],
        [[r["connections"],
          cell(r["reference"], "median_messages_per_s", ",.1f"),
          cell(r["reference"], "median_p50_ms", ".2f"),
          cell(r["reference"], "median_p99_ms", ".2f"),
          cell(r["gateway"], "median_messages_per_s", ",.1f"),
          cell(r["gateway"], "median_p50_ms", ".2f"),
          cell(r["gateway"], "median_p99_ms", ".2f"),
          "-" if r["ratio_gateway_over_reference"] is None
          else f"{r['ratio_gateway_over_reference']:.3f}",
          "-" if r["target_ratio"] is None else f">= {r['target_ratio']}",
          r["verdict"]] for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink:
        asyncio.run(serve_sink(int(args.sink[0]), Path(args.sink[1])))
        return 0

    log(f"{args.rounds} interleaved rounds x {args.messages} ORU^R01 per peer over "
        f"{', '.join(map(str, args.connections))} MLLP connection(s), each stop-and-wait "
        f"(next message after the ACK), {args.warmup} warm-up per connection; gateway: "
        f"ingest.processes {args.ingest_processes}, workers.processes 1, route "
        f"{args.route}, {args.engine}\n")
    runs: list[Run] = []
    gateway_error: str | None = None
    pg: Postgres | None = None
    if args.engine == "postgresql" and not args.reference_only:
        log("starting a private PostgreSQL server (tests.pg.start_private) ...")
        pg = Postgres()
        log(f"  ready in {pg.server.started_in:.1f}s on port {pg.server.port}")
    try:
        for r in range(1, args.rounds + 1):
            rows: list[Run] = []
            for n in args.connections:
                log(f"round {r}/{args.rounds}: {n} connection(s), reference sink "
                    "(append + fsync + ACK) ...")
                rows.append(sink_round(r, args.messages, args.warmup, n))
                if not args.reference_only and gateway_error is None:
                    log(f"round {r}/{args.rounds}: {n} connection(s), gateway ...")
                    try:
                        rows.append(gateway_round(r, args.messages, args.warmup, n, args, pg))
                    except (RuntimeError, OSError, TimeoutError, asyncio.IncompleteReadError,
                            subprocess.SubprocessError) as exc:
                        gateway_error = f"{type(exc).__name__}: {exc}"
                        log(f"  gateway round failed, skipping the gateway from now on: "
                            f"{gateway_error}")
            runs += rows
            log(table(HEADERS, [x.row() for x in rows]) + "\n")
    finally:
        if pg is not None:
            pg.remove()

    summary = summarize(runs, args.connections)
    log("summary: medians over good rounds (every ACK AA); ratio gateway/reference msg/s; "
        "target (issue 14) for stop-and-wait on one connection")
    log(summary_table(summary))
    if gateway_error:
        log(f"gateway: {gateway_error}")
    incomplete = [x for x in runs if x.routed is not None and x.routed != x.sent]
    if incomplete:
        log(f"{len(incomplete)} gateway round(s) where the worker did not route every "
            "message: " + ", ".join(f"round {x.round} x{x.connections}: {x.routed}/{x.sent}"
                                    for x in incomplete))

    path = write_json("hl7.json", {
        "benchmark": "hl7",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "method": "N MLLP connections at once per round and peer, each stop-and-wait, "
                  "messages split among them, timed from the end of the warm-up to the "
                  "last ACK; fresh sink / gateway per send, rounds interleaved; reference = "
                  "append + fsync + AA; the gateway routes every message in a worker process",
        "messages_per_round": args.messages,
        "warmup_per_connection": args.warmup,
        "connections": args.connections,
        "ingest_processes": args.ingest_processes,
        "workers_processes": 1,
        "route": args.route,
        "engine": args.engine,
        "target_ratios": {str(k): v for k, v in RATIO_TARGETS.items()},
        "rounds": [x.as_json() for x in runs],
        "summary": summary,
        "gateway_error": gateway_error,
    })
    log(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
