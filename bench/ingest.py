"""DICOM ingest throughput and memory: the gateway vs dcmtk storescp.

    python -m bench.ingest [--rounds 3] [--count 300] [--gb 1.0] [--reference-only]

1. Generates (once, cached in bench/out/) a CT series of ``--count`` 512x512 16-bit slices.
2. ``--rounds`` interleaved rounds; in each, a fresh dcmtk ``storescp`` and then a fresh
   gateway (``gateway run -c <temp config>``, its own data dir) each receive the whole series
   from one ``storescu`` invocation = ONE association; the wall time of storescu gives
   instances/s. ``TCP_NODELAY=1`` is set for every dcmtk program (without it dcmtk's Nagle
   stalls dominate on loopback). The gateway's RSS is read before and after each send.
3. Streams ``--gb`` GB (the cached series re-sent with ``storescu +II --repeat N``: a new
   SOP Instance UID for every image, still one association) into one more fresh gateway,
   sampling its RSS (process tree) to report the growth.

Targets: gateway/storescp instances/s ratio >= 0.35 (aim 0.5); RSS growth < 200 MB.
Results: printed, and bench/out/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    cached_data,
    gateway_command,
    log,
    machine,
    median,
    rss_kib,
    running,
    running_gateway,
    scratch_dir,
    table,
    tree_rss_kib,
    verdict,
    write_json,
)
from tests.dicomgen import (
    dcmtk_env,
    free_port,
    make_ct_series,
    storescp_args,
    storescu_args,
    wait_for_port,
)

RATIO_TARGET = 0.35
RATIO_AIM = 0.5
RSS_GROWTH_TARGET_MB = 200.0
SEND_TIMEOUT_S = 600


@dataclass
class Send:
    """One storescu run: how long, how many, did every C-STORE succeed."""

    peer: str
    round: int
    instances: int
    megabytes: float
    seconds: float
    returncode: int
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    stored: int | None = None  # what the receiver says it has (storescp: files written)

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> list[Any]:
        rss = "-"
        if self.rss_before_mb is not None and self.rss_after_mb is not None:
            rss = f"{self.rss_before_mb:.0f} -> {self.rss_after_mb:.0f}"
        return [self.peer, self.instances, f"{self.seconds:.2f}", self.per_second,
                self.megabytes / self.seconds if self.seconds > 0 else 0.0,
                "ok" if self.returncode == 0 else f"rc={self.returncode}",
                "?" if self.stored is None else self.stored, rss]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "instances_per_s": round(self.per_second, 1)}


HEADERS = ["peer", "instances", "seconds", "inst/s", "MB/s", "storescu", "stored",
           "RSS MB before -> after"]


# --- data ------------------------------------------------------------------------------


def cached_series(count: int) -> list[Path]:
    """The benchmark series, generated once into bench/out/ct-<count>/ and reused."""
    return cached_data(
        f"ct-{count}", count, "CT slices 512x512", lambda f: make_ct_series(f, count=count)
    )


def megabytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


# --- one send --------------------------------------------------------------------------


def send(args: list[str], *, instances: int) -> tuple[float, int, str]:
    """Run storescu (already-built argv); return (seconds, returncode, stderr tail).

    A refused TCP connection (nothing was sent) is retried once after half a second."""
    for attempt in (1, 2):
        t0 = time.perf_counter()
        r = subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True,
                           timeout=SEND_TIMEOUT_S)
        seconds = time.perf_counter() - t0
        if attempt == 1 and r.returncode != 0 and "TCP Initialization Error" in r.stderr:
            log(f"  connection refused, retrying once: {r.stderr.strip()[-200:]}")
            time.sleep(0.5)
            continue
        break
    if r.returncode != 0:
        log(f"  storescu exited {r.returncode} after {seconds:.1f}s ({instances} planned): "
            f"{r.stderr.strip()[-600:]}")
    return seconds, r.returncode, r.stderr[-2000:]


def storescp_round(paths: list[Path], round_no: int) -> Send:
    out = scratch_dir("storescp-")
    port = free_port()
    try:
        with running(storescp_args(out, port=port, aet=GATEWAY_AE), env=dcmtk_env()):
            wait_for_port(port)
            args = storescu_args(paths, port=port, aet=CALLING_AE, aec=GATEWAY_AE)
            seconds, rc, _ = send(args, instances=len(paths))
        received = sum(1 for _ in out.iterdir())
        if received != len(paths):
            log(f"  storescp wrote {received} of {len(paths)} files")
            rc = rc or 1
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return Send("storescp", round_no, len(paths), megabytes(paths), seconds, rc,
                stored=received)


def noop_round(paths: list[Path], round_no: int) -> Send:
    """A bare pynetdicom SCP that stores nothing: the library's own floor."""
    port = free_port()
    with running([sys.executable, "-m", "bench.pynetdicom_noop", str(port), GATEWAY_AE]):
        wait_for_port(port)
        args = storescu_args(paths, port=port, aet=CALLING_AE, aec=GATEWAY_AE)
        seconds, rc, _ = send(args, instances=len(paths))
    return Send("pynetdicom (stores nothing)", round_no, len(paths), megabytes(paths), seconds,
                rc)


def gateway_round(paths: list[Path], round_no: int) -> Send:
    with running_gateway("ingest-gw-") as gw:
        before = tree_rss_kib(gw.pid) / 1024
        args = storescu_args(paths, port=gw.cfg.dicom_port, aet=CALLING_AE, aec=GATEWAY_AE)
        seconds, rc, _ = send(args, instances=len(paths))
        after = tree_rss_kib(gw.pid) / 1024
        stored = gateway_received(gw.cfg.path)
    if stored is not None and stored != len(paths):
        log(f"  the gateway reports {stored} of {len(paths)} instances received")
    return Send("gateway", round_no, len(paths), megabytes(paths), seconds, rc, before, after,
                stored)


def gateway_received(config: Path) -> int | None:
    """DICOM instances the gateway says it holds (``gateway queue status --json``), if it can
    tell."""
    try:
        r = subprocess.run([*gateway_command(), "queue", "status", "--json", "-c", str(config)],
                           capture_output=True, text=True, timeout=60)
        return int(json.loads(r.stdout)["received"]["dicom"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return None


# --- memory under a long stream ----------------------------------------------------------


class RssSampler:
    """Samples a process tree's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            kib = tree_rss_kib(self.pid)
            self.peak_kib = max(self.peak_kib, kib)
            self.samples.append((round(time.monotonic() - t0, 2), kib))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stream(paths: list[Path], gb: float) -> dict[str, Any]:
    per_pass = sum(p.stat().st_size for p in paths)
    repeat = max(1, math.ceil(gb * 1e9 / per_pass))
    instances = repeat * len(paths)
    total_mb = repeat * per_pass / 1e6
    log(f"\nstreaming {total_mb:,.0f} MB ({instances} instances, {len(paths)} files x "
        f"--repeat {repeat}, new UIDs per image) into a fresh gateway over one association")
    with running_gateway("stream-gw-") as gw:
        time.sleep(1.0)  # let start-up allocations settle before the baseline
        before = tree_rss_kib(gw.pid)
        main_before = rss_kib(gw.pid)
        args = storescu_args(paths, port=gw.cfg.dicom_port, aet=CALLING_AE, aec=GATEWAY_AE,
                             extra=["+II", "--repeat", str(repeat)])
        with RssSampler(gw.pid) as sampler:
            seconds, rc, _ = send(args, instances=instances)
        after = tree_rss_kib(gw.pid)
        time.sleep(2.0)
        settled = tree_rss_kib(gw.pid)
        main_after = rss_kib(gw.pid)
        stored = gateway_received(gw.cfg.path)
    growth_mb = (after - before) / 1024
    peak_growth_mb = (sampler.peak_kib - before) / 1024
    result = {
        "instances": instances,
        "megabytes": round(total_mb, 1),
        "seconds": round(seconds, 2),
        "instances_per_s": round(instances / seconds, 1) if seconds else 0.0,
        "storescu_returncode": rc,
        "stored": stored,
        "rss_before_mb": round(before / 1024, 1),
        "rss_peak_mb": round(sampler.peak_kib / 1024, 1),
        "rss_after_mb": round(after / 1024, 1),
        "rss_after_2s_mb": round(settled / 1024, 1),
        "rss_main_process_before_mb": round(main_before / 1024, 1),
        "rss_main_process_after_mb": round(main_after / 1024, 1),
        "rss_growth_mb": round(growth_mb, 1),
        "rss_peak_growth_mb": round(peak_growth_mb, 1),
        "target_growth_mb": RSS_GROWTH_TARGET_MB,
        "verdict": verdict(peak_growth_mb, RSS_GROWTH_TARGET_MB, below=True),
    }
    log(table(["instances", "MB", "seconds", "inst/s", "RSS before", "peak", "after",
               "growth (peak)", "storescu"],
              [[instances, total_mb, f"{seconds:.1f}", result["instances_per_s"],
                result["rss_before_mb"], result["rss_peak_mb"], result["rss_after_mb"],
                f"{growth_mb:.0f} ({peak_growth_mb:.0f})",
                "ok" if rc == 0 else f"rc={rc}"]]))
    log(f"RSS growth (peak - before) {peak_growth_mb:.0f} MB, target < "
        f"{RSS_GROWTH_TARGET_MB:.0f} MB: {result['verdict']}")
    return result


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--count", type=int, default=300, help="instances per round (default 300)")
    p.add_argument("--gb", type=float, default=1.0,
                   help="GB streamed for the memory check; 0 skips it (default 1.0)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the uncounted warm-up send")
    p.add_argument("--reference-only", action="store_true",
                   help="only the storescp half (no gateway)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            log(f"{tool} not found: install dcmtk (make system-deps)")
            return 2
    paths = cached_series(args.count)
    mb = megabytes(paths)
    log(f"series: {len(paths)} instances, {mb:.0f} MB; {args.rounds} interleaved rounds, "
        f"one association per send, TCP_NODELAY=1\n")

    if args.warmup:
        log("warm-up (not counted): one storescp send, so both peers read the files from "
            "the page cache")
        storescp_round(paths, 0)
    sends: list[Send] = []
    gateway_error: str | None = None
    for r in range(1, args.rounds + 1):
        log(f"round {r}/{args.rounds}: storescp ...")
        rows = [storescp_round(paths, r)]
        if not args.reference_only:
            log(f"round {r}/{args.rounds}: bare pynetdicom SCP ...")
            rows.append(noop_round(paths, r))
        if not args.reference_only and gateway_error is None:
            log(f"round {r}/{args.rounds}: gateway ...")
            try:
                rows.append(gateway_round(paths, r))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                gateway_error = str(exc)
                log(f"  gateway round failed, skipping the gateway from now on: {exc}")
        sends += rows
        log(table(HEADERS, [s.row() for s in rows]) + "\n")

    ref = [s.per_second for s in sends if s.peer == "storescp" and s.returncode == 0]
    floor = [s.per_second for s in sends if s.peer.startswith("pynetdicom") and s.returncode == 0]
    gw = [s.per_second for s in sends if s.peer == "gateway" and s.returncode == 0]
    failed = [s for s in sends if s.returncode != 0]
    summary: dict[str, Any] = {
        "storescp_median_instances_per_s": round(median(ref), 1) if ref else None,
        "gateway_median_instances_per_s": round(median(gw), 1) if gw else None,
    }
    log(f"median storescp: {median(ref):,.1f} instances/s ({len(ref)} good rounds)")
    if floor and ref:
        summary["pynetdicom_floor_median_instances_per_s"] = round(median(floor), 1)
        summary["ratio_pynetdicom_floor_over_storescp"] = round(median(floor) / median(ref), 3)
        log(f"median bare pynetdicom SCP (stores nothing): {median(floor):,.1f} instances/s, "
            f"ratio {median(floor) / median(ref):.2f} of storescp: the ceiling of any "
            "pynetdicom receiver on one association")
    if gw and ref:
        ratio = median(gw) / median(ref)
        summary["ratio_gateway_over_storescp"] = round(ratio, 3)
        summary["verdict"] = verdict(ratio, RATIO_TARGET, RATIO_AIM)
        log(f"median gateway:  {median(gw):,.1f} instances/s ({len(gw)} good rounds)")
        log(f"ratio gateway/storescp = {ratio:.2f}   target >= {RATIO_TARGET} "
            f"(aim {RATIO_AIM}): {summary['verdict']}")
    else:
        log("gateway: no successful round" + (f" ({gateway_error})" if gateway_error else ""))
    if failed:
        log(f"{len(failed)} send(s) did not complete cleanly: "
            + ", ".join(f"{s.peer} round {s.round} rc={s.returncode}" for s in failed))

    stream_result: dict[str, Any] | None = None
    if args.gb > 0 and not args.reference_only and gateway_error is None:
        try:
            stream_result = stream(paths, args.gb)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            log(f"stream step failed: {exc}")
            stream_result = {"error": str(exc)}

    path = write_json("ingest.json", {
        "benchmark": "ingest",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "series": {"instances": len(paths), "rows": 512, "cols": 512, "megabytes": round(mb, 1)},
        "method": "one storescu invocation (one association) per send; TCP_NODELAY=1; "
                  "fresh storescp / gateway per round; rounds interleaved",
        "targets": {"ratio": RATIO_TARGET, "ratio_aim": RATIO_AIM,
                    "rss_growth_mb": RSS_GROWTH_TARGET_MB},
        "rounds": [s.as_json() for s in sends],
        "summary": summary,
        "gateway_error": gateway_error,
        "stream": stream_result,
    })
    log(f"\nresults written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
