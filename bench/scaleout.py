"""DICOM ingest over one and several associations: the gateway (SQLite and PostgreSQL) vs
Orthanc and dcmtk storescp.

    python -m bench.scaleout [--rounds 2] [--ct 300] [--mr 1000] [--associations 1,4]
                             [--engines sqlite,postgresql] [--ingest-processes 2] [--quick]

1. Data, generated once and cached in bench/out/: a CT series of ``--ct`` 512x512 16-bit
   slices (about 526 KB each; bench.ingest's ``ct-<count>/`` cache) and an MR series of
   ``--mr`` 64x64 16-bit instances (about 10 KB each, ``mr-<count>/``). Both Explicit VR
   Little Endian, sent as stored (``storescu -R -xe``).
2. ``--rounds`` interleaved rounds. In each, for each data set and each association count
   N in ``--associations``, every peer receives the whole data set, each peer FRESH (new
   output dir / data dir / database) for that one send, the peer order rotated by one
   per round:

   - ``storescp``: dcmtk ``storescp +xa -dhl -od DIR`` (with ``--fork`` when N > 1, one
     child process per association); writes files, no fsync;
   - ``orthanc``: Debian's ``Orthanc`` with its defaults (``SyncStorageArea``: it
     fdatasyncs every instance; SQLite index; ``DicomThreadsCount`` 4), no plugins, no
     compression;
   - ``gateway-<engine>``: ``gateway run -c CONFIG`` as a subprocess, no routes,
     ``ingest.processes: --ingest-processes`` (SO_REUSEPORT listeners),
     ``workers.processes: 1``; engine ``sqlite`` (the default: a file in the data dir) or
     ``postgresql`` (``gateway.database``: a new schema, per send, on one private
     throwaway PostgreSQL server from ``tests.pg.start_private()``, fsync on).

   ``TCP_NODELAY=1`` is in the environment of every dcmtk program, of Orthanc (which is
   built on dcmtk) and of the gateway. Readiness is polled before timing starts.
3. Client: the files are split into N contiguous parts and N dcmtk ``storescu`` processes
   (one association each) start at once; the time runs from the first start to the last
   exit; instances/s = files / time. A send counts only if every storescu exited 0 (it
   halts at the first non-success status) and the receiver holds every instance
   (storescp: files written; Orthanc: ``/statistics`` CountInstances; gateway:
   ``gateway queue status --json`` received.dicom).
4. Summary per (data, N, engine): medians over rounds of each peer's instances/s and the
   ratios gateway/Orthanc and gateway/storescp, against the targets of issue 14: CT
   gateway/Orthanc >= 1.0 and MR gateway/Orthanc >= 0.6, over 1 and 4 associations.

One uncounted storescp send per data set first, so every peer reads the files from the
page cache. ``--quick``: CT 40, MR 100, one round (a smoke run). Everything runs on
127.0.0.1; every process it starts is stopped at the end, also on errors and Ctrl-C.
Results: printed, and bench/out/scaleout.json. Compare ratios, not absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    GatewayProcess,
    Postgres,
    cached_data,
    log,
    machine,
    median,
    running,
    scratch_dir,
    table,
    write_gateway_config,
    write_json,
)
from bench.ingest import cached_series, gateway_received, megabytes
from tests.dicomgen import (
    SeriesSpec,
    dcmtk_env,
    free_port,
    make_study,
    storescp_args,
    storescu_args,
    wait_for_port,
)

SEND_TIMEOUT_S = 600
START_TIMEOUT_S = 120.0
QUICK = {"ct": 40, "mr": 100, "rounds": 1}

#: Issue 14: gateway/Orthanc instances/s (median of rounds) per data set, for these
#: association counts.
TARGETS: dict[str, float] = {"CT": 1.0, "MR": 0.6}
TARGET_ASSOCIATIONS = (1, 4)

ENGINES = ("sqlite", "postgresql")


@dataclass
class Send:
    """One timed send of a whole data set to one fresh peer over N associations."""

    data: str
    associations: int
    peer: str
    round: int
    instances: int
    megabytes: float
    seconds: float
    returncodes: list[int]
    stored: int | None = None  # what the receiver says it holds
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and bool(self.returncodes)
                and all(rc == 0 for rc in self.returncodes) and self.stored == self.instances)

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> list[Any]:
        if self.error is not None:
            client = "error"
        elif all(rc == 0 for rc in self.returncodes):
            client = "ok"
        else:
            client = "rc=" + ",".join(str(rc) for rc in self.returncodes)
        return [self.data, self.associations, self.peer, self.instances, f"{self.seconds:.2f}",
                self.per_second, self.megabytes / self.seconds if self.seconds > 0 else 0.0,
                client, "?" if self.stored is None else self.stored,
                "yes" if self.ok else "NO"]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "instances_per_s": round(self.per_second, 1), "ok": self.ok}


HEADERS = ["data", "assoc", "peer", "instances", "seconds", "inst/s", "MB/s", "storescu",
           "stored", "counted"]


# --- data ------------------------------------------------------------------------------


def cached_mr(count: int) -> list[Path]:
    """An MR series of ``count`` 64x64 instances, generated once into bench/out/mr-<count>/."""
    spec = SeriesSpec("MR", count, 64, 64, body_part="BRAIN", description="MR BENCH 64x64")
    return cached_data(
        f"mr-{count}",
        count,
        "MR instances 64x64",
        lambda f: make_study(f, patient_id="PID-BENCH-MR", accession="ACCBENCHMR", series=[spec]),
    )


def split(paths: Sequence[Path], parts: int) -> list[list[Path]]:
    """``paths`` in ``parts`` contiguous, nearly equal, non-empty parts."""
    parts = max(1, min(parts, len(paths)))
    size, extra = divmod(len(paths), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(paths[start:end]))
        start = end
    return out


def cleanly(*steps: Callable[[], object]) -> None:
    """Run every clean-up step even when Ctrl-C or SIGTERM arrives meanwhile (Orthanc and
    the gateway take seconds to stop): an interrupted step is run once more, and the
    interrupt is raised again at the end."""
    interrupted: KeyboardInterrupt | None = None
    for step in steps:
        for _ in range(2):
            try:
                step()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted


def remover(folder: Path) -> Callable[[], None]:
    return lambda: shutil.rmtree(folder, ignore_errors=True)


# --- the client ------------------------------------------------------------------------


def send(paths: Sequence[Path], port: int, associations: int, aec: str) -> tuple[float, list[int]]:
    """N storescu processes at once, one association each; (seconds from the first start
    to the last exit, their exit codes). Each one's stderr tail is logged if it failed."""
    parts = split(paths, associations)
    argvs = [storescu_args(part, port=port, aet=CALLING_AE, aec=aec) for part in parts]
    env = dcmtk_env()
    procs: list[tuple[subprocess.Popen[bytes], Any]] = []
    with contextlib.ExitStack() as stack:
        try:
            t0 = time.perf_counter()
            for argv in argvs:
                err = stack.enter_context(tempfile.TemporaryFile())
                procs.append((subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                               stderr=err), err))
            deadline = t0 + SEND_TIMEOUT_S
            codes: list[int] = []
            for proc, _ in procs:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.perf_counter())))
            seconds = time.perf_counter() - t0
            for (_, err), rc in zip(procs, codes, strict=True):
                if rc != 0:
                    err.seek(0)
                    tail = err.read().decode(errors="replace").strip()[-600:]
                    log(f"  storescu exited {rc}: {tail}")
            return seconds, codes
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)


# --- the peers -------------------------------------------------------------------------


def storescp_send(paths: Sequence[Path], associations: int) -> tuple[float, list[int], int]:
    out = scratch_dir("scaleout-storescp-")
    port = free_port()
    try:
        argv = storescp_args(out, port=port, aet=GATEWAY_AE)
        if associations > 1:
            argv.insert(1, "--fork")
        with running(argv, env=dcmtk_env()):
            wait_for_port(port)
            seconds, codes = send(paths, port, associations, GATEWAY_AE)
        stored = sum(1 for p in out.iterdir() if p.is_file())
        return seconds, codes, stored
    finally:
        cleanly(remover(out))


class OrthancPeer:
    """Debian's Orthanc on free loopback ports, its own storage and index, its defaults
    otherwise (the config keys are those of tests/orthanc.py), with TCP_NODELAY=1."""

    AET = "ORTHANC"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> OrthancPeer:
        exe = shutil.which("Orthanc")
        if exe is None:
            raise RuntimeError("Orthanc is not installed (make system-deps)")
        (self.folder / "db").mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "BENCH_PACS", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "DicomAet": self.AET,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True, "Plugins": [],
            "StorageCompression": False, "UnknownSopClassAccepted": True,
            "DicomScpTimeout": 30, "HttpServerEnabled": True,
        }))
        with (self.folder / "orthanc.log").open("ab") as logf:
            self.proc = subprocess.Popen([exe, str(config)], stdout=logf,
                                         stderr=subprocess.STDOUT, env=dcmtk_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                self.get("/system")
                wait_for_port(self.dicom_port)
                return self
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start in {timeout}s:\n{self.log_tail()}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def instances(self) -> int | None:
        try:
            return int(self.get("/statistics")["CountInstances"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.folder / "orthanc.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def orthanc_send(paths: Sequence[Path], associations: int) -> tuple[float, list[int], int | None]:
    folder = scratch_dir("scaleout-orthanc-")
    peer = OrthancPeer(folder)
    try:
        peer.start()
        seconds, codes = send(paths, peer.dicom_port, associations, OrthancPeer.AET)
        return seconds, codes, peer.instances()
    finally:
        cleanly(peer.stop, remover(folder))


@contextlib.contextmanager
def gateway(engine: str, ingest_processes: int, pg: Postgres | None) -> Iterator[GatewayProcess]:
    """A fresh gateway: own config, ports, data dir and (PostgreSQL) schema; no routes."""
    folder = scratch_dir(f"scaleout-gw-{engine}-")
    settings: dict[str, Any] = {}
    if engine == "postgresql":
        assert pg is not None
        settings["database"] = pg.new_dsn()
    cfg = write_gateway_config(folder, gateway=settings,
                               ingest={"processes": ingest_processes},
                               workers={"processes": 1})
    gw = GatewayProcess(cfg)

    def stop() -> None:
        rc = gw.stop()
        if rc not in (0, None, -signal.SIGTERM):
            log(f"  note: gateway exited with {rc}; log tail:\n{gw.log_tail(1500)}")

    try:
        yield gw.start(timeout=START_TIMEOUT_S)
    finally:
        cleanly(stop, remover(folder))


def gateway_send(paths: Sequence[Path], associations: int, engine: str, ingest_processes: int,
                 pg: Postgres | None) -> tuple[float, list[int], int | None]:
    with gateway(engine, ingest_processes, pg) as gw:
        seconds, codes = send(paths, gw.cfg.dicom_port, associations, GATEWAY_AE)
        stored = gateway_received(gw.cfg.path)
    return seconds, codes, stored


# --- one measurement -------------------------------------------------------------------


def measure(peer: str, data: str, paths: Sequence[Path], associations: int, round_no: int,
            args: argparse.Namespace, pg: Postgres | None) -> Send:
    mb = megabytes(list(paths))
    stored: int | None
    try:
        if peer == "storescp":
            seconds, codes, stored = storescp_send(paths, associations)
        elif peer == "orthanc":
            seconds, codes, stored = orthanc_send(paths, associations)
        else:
            engine = peer.removeprefix("gateway-")
            seconds, codes, stored = gateway_send(paths, associations, engine,
                                                  args.ingest_processes, pg)
    except (RuntimeError, OSError, subprocess.SubprocessError, TimeoutError) as exc:
        log(f"  {peer} failed: {str(exc)[-1500:]}")
        return Send(data, associations, peer, round_no, len(paths), mb, 0.0, [], None,
                    str(exc)[-2000:])
    result = Send(data, associations, peer, round_no, len(paths), mb, seconds, codes, stored)
    if stored != len(paths):
        log(f"  {peer} holds {stored} of {len(paths)} instances")
    return result


# --- summary ---------------------------------------------------------------------------


def summarize(sends: list[Send], datasets: list[str], associations: list[int],
              engines: list[str]) -> list[dict[str, Any]]:
    def values(data: str, n: int, peer: str) -> list[float]:
        return [round(s.per_second, 1) for s in sends
                if s.data == data and s.associations == n and s.peer == peer and s.ok]

    def med(data: str, n: int, peer: str) -> tuple[float | None, int]:
        good = values(data, n, peer)
        return (median(good) if good else None), len(good)

    rows: list[dict[str, Any]] = []
    for data in datasets:
        for n in associations:
            ref_scp, good_scp = med(data, n, "storescp")
            ref_orthanc, good_orthanc = med(data, n, "orthanc")
            for engine in engines:
                gw, good_gw = med(data, n, f"gateway-{engine}")
                vs_orthanc = gw / ref_orthanc if gw and ref_orthanc else None
                vs_scp = gw / ref_scp if gw and ref_scp else None
                target = TARGETS.get(data) if n in TARGET_ASSOCIATIONS else None
                if target is None:
                    verdict = "-"
                elif vs_orthanc is None:
                    verdict = "no data"
                else:
                    verdict = "met" if vs_orthanc >= target else "MISSED"
                rows.append({
                    "data": data, "associations": n, "engine": engine,
                    "storescp_median_instances_per_s": _round(ref_scp, 1),
                    "orthanc_median_instances_per_s": _round(ref_orthanc, 1),
                    "gateway_median_instances_per_s": _round(gw, 1),
                    "good_rounds": {"storescp": good_scp, "orthanc": good_orthanc,
                                    "gateway": good_gw},
                    "instances_per_s_by_round": {
                        "storescp": values(data, n, "storescp"),
                        "orthanc": values(data, n, "orthanc"),
                        "gateway": values(data, n, f"gateway-{engine}")},
                    "ratio_gateway_over_orthanc": _round(vs_orthanc, 3),
                    "ratio_gateway_over_storescp": _round(vs_scp, 3),
                    "target_gateway_over_orthanc": target,
                    "verdict": verdict,
                })
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ["data", "assoc", "engine", "storescp/s", "orthanc/s", "gateway/s", "gw/orthanc",
         "gw/storescp", "target gw/orthanc", "verdict"],
        [[r["data"], r["associations"], r["engine"],
          _cell(r["storescp_median_instances_per_s"], ",.1f"),
          _cell(r["orthanc_median_instances_per_s"], ",.1f"),
          _cell(r["gateway_median_instances_per_s"], ",.1f"),
          _cell(r["ratio_gateway_over_orthanc"], ".3f"),
          _cell(r["ratio_gateway_over_storescp"], ".3f"),
          "-" if r["target_gateway_over_orthanc"] is None
          else f">= {r['target_gateway_over_orthanc']}",
          r["verdict"]] for r in rows])


# --- main ------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers, comma-separated: {text!r}")
    return values


def _engines(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ENGINES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"engines are {', '.join(ENGINES)}: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--ct", type=int, default=300, help="CT slices, 512x512 (default 300)")
    p.add_argument("--mr", type=int, default=1000, help="MR instances, 64x64 (default 1000)")
    p.add_argument("--associations", type=_int_list, default=[1, 4],
                   help="association counts, comma-separated (default 1,4)")
    p.add_argument("--engines", type=_engines, default=list(ENGINES),
                   help="gateway queue engines, comma-separated (default sqlite,postgresql)")
    p.add_argument("--ingest-processes", type=int, default=2,
                   help="the gateway's ingest.processes (default 2)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the uncounted storescp send per data set")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: CT {QUICK['ct']}, MR {QUICK['mr']}, {QUICK['rounds']} round")
    args = p.parse_args(argv)
    if args.quick:
        args.ct, args.mr, args.rounds = QUICK["ct"], QUICK["mr"], QUICK["rounds"]
    if args.rounds < 1 or args.ct < 0 or args.mr < 0 or not 1 <= args.ingest_processes <= 64:
        p.error("--rounds >= 1, --ct/--mr >= 0, --ingest-processes 1..64")
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None:
            log(f"{tool} not found: install dcmtk and orthanc (make system-deps)")
            return 2
    signal.signal(signal.SIGTERM, _terminate)  # stop what was started, as on Ctrl-C

    data: dict[str, list[Path]] = {}
    if args.ct:
        data["CT"] = cached_series(args.ct)
    if args.mr:
        data["MR"] = cached_mr(args.mr)
    if not data:
        log("nothing to send (--ct 0 --mr 0)")
        return 2
    peers = ["storescp", "orthanc", *(f"gateway-{e}" for e in args.engines)]
    for name, paths in data.items():
        log(f"{name}: {len(paths)} instances, {megabytes(paths):.1f} MB")
    log(f"{args.rounds} interleaved round(s); associations {args.associations}; peers "
        f"{', '.join(peers)} (fresh per send, order rotated per round); gateway "
        f"ingest.processes {args.ingest_processes}, workers.processes 1; TCP_NODELAY=1\n")

    pg: Postgres | None = None
    sends: list[Send] = []
    interrupted = False
    try:
        if "postgresql" in args.engines:
            log("starting a private PostgreSQL server (tests.pg.start_private) ...")
            pg = Postgres()
            log(f"  ready in {pg.server.started_in:.1f}s on port {pg.server.port}")
        if args.warmup:
            log("warm-up (not counted): one storescp send per data set")
            for name, paths in data.items():
                measure("storescp", name, paths, 1, 0, args, pg)
        for r in range(1, args.rounds + 1):
            shift = (r - 1) % len(peers)
            order = peers[shift:] + peers[:shift]
            rows: list[Send] = []
            for name, paths in data.items():
                for n in args.associations:
                    for peer in order:
                        log(f"round {r}/{args.rounds}: {name} x{len(paths)}, {n} "
                            f"association(s) -> {peer} ...")
                        rows.append(measure(peer, name, paths, n, r, args, pg))
                        sends.append(rows[-1])
            log(f"\nround {r}/{args.rounds} (peer order {', '.join(order)})")
            log(table(HEADERS, [s.row() for s in rows]) + "\n")
    except KeyboardInterrupt as exc:
        interrupted = True
        log(f"\ninterrupted ({exc or 'Ctrl-C'}): stopping, summary of what was measured")
    finally:
        if pg is not None:
            try:
                cleanly(pg.remove)
            except KeyboardInterrupt:
                interrupted = True

    summary = summarize(sends, list(data), args.associations, args.engines)
    log("summary: medians of instances/s over good rounds; ratios gateway/peer; targets "
        "(issue 14) gateway/Orthanc, 1 and 4 associations")
    log(summary_table(summary))
    failed = [s for s in sends if not s.ok]
    if failed:
        log(f"{len(failed)} send(s) not counted: " + "; ".join(
            f"{s.peer} {s.data} x{s.associations} round {s.round} "
            f"(rc {s.returncodes}, stored {s.stored}{', ' + s.error[:80] if s.error else ''})"
            for s in failed))

    path = write_json("scaleout.json", {
        "benchmark": "scaleout",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "data": {name: {"instances": len(paths), "megabytes": round(megabytes(paths), 1),
                        "rows": 512 if name == "CT" else 64,
                        "cols": 512 if name == "CT" else 64}
                 for name, paths in data.items()},
        "args": {"rounds": args.rounds, "associations": args.associations,
                 "engines": args.engines, "ingest_processes": args.ingest_processes,
                 "warmup": args.warmup, "quick": args.quick},
        "method": "N storescu processes at once (one association each, files split in N "
                  "contiguous parts), timed from the first start to the last exit; "
                  "TCP_NODELAY=1 for dcmtk, Orthanc and the gateway; a fresh peer per send; "
                  "rounds interleaved, peer order rotated per round; a send counts when "
                  "every storescu exited 0 and the receiver holds every instance",
        "targets": {"gateway_over_orthanc": TARGETS,
                    "associations": list(TARGET_ASSOCIATIONS)},
        "interrupted": interrupted,
        "rounds": [s.as_json() for s in sends],
        "summary": summary,
    })
    log(f"\nresults written to {path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
