"""Forwarding throughput: a CT series sent to the gateway and forwarded to a PACS, against
the same series sent straight to that PACS.

    python -m bench.forward [--rounds 3] [--count 300] [--quiet 0.5]

The PACS is dcmtk ``storescp`` (a fresh one per run, writing files). In each round:

- *direct*: ``storescu`` sends the series straight to the PACS; the time is from the start
  of storescu to the last file written by the PACS;
- *gateway*: ``storescu`` sends the series to the gateway, whose config forwards CT to the
  PACS; the time is from the start of storescu to the last file written by the PACS. It
  includes the study's quiet period (``--quiet``, ``dicom.study_complete_after``): the
  gateway forwards a study once it is complete, by design.

Reported: instances/s for each, the ratio gateway/direct, and the gateway time split into
receiving, quiet period, and routing + delivery. ``TCP_NODELAY=1`` for every dcmtk program.
Results: printed, and bench/out/forward.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    GatewayProcess,
    log,
    machine,
    median,
    running,
    scratch_dir,
    table,
    write_gateway_config,
    write_json,
)
from bench.ingest import cached_series
from tests.dicomgen import dcmtk_env, free_port, storescp_args, wait_for_port

PACS_AE = "STORESCP"


def wait_for_files(folder: Path, count: int, timeout: float = 300.0) -> float:
    """Block until *folder* holds *count* files; return the time that happened."""
    deadline = time.monotonic() + timeout
    while True:
        if sum(1 for _ in folder.iterdir()) >= count:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(1 for _ in folder.iterdir())} of {count} arrived")
        time.sleep(0.005)


def send(files: list[Path], port: int, aec: str) -> float:
    started = time.perf_counter()
    r = subprocess.run(
        ["storescu", "-R", "-xe", "-aet", CALLING_AE, "-aec", aec, "127.0.0.1", str(port),
         *map(str, files)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-500:]}")
    return time.perf_counter() - started


def direct_round(files: list[Path]) -> dict[str, Any]:
    out = scratch_dir("fwd-direct-")
    port = free_port()
    with running(storescp_args(out, port=port, aet=PACS_AE), env=dcmtk_env()):
        wait_for_port(port)
        started = time.perf_counter()
        send(files, port, PACS_AE)
        done = wait_for_files(out, len(files))
    shutil.rmtree(out, ignore_errors=True)
    seconds = done - started
    return {"peer": "direct", "seconds": seconds, "inst_s": len(files) / seconds}


def gateway_round(files: list[Path], quiet: float) -> dict[str, Any]:
    out = scratch_dir("fwd-pacs-")
    port = free_port()
    folder = scratch_dir("fwd-gw-")
    cfg = write_gateway_config(
        folder,
        dicom={"study_complete_after": quiet},
        destinations={"pacs": {"dicom": {"ae_title": PACS_AE, "host": "127.0.0.1",
                                         "port": port}}},
        routes=[{"name": "ct", "when": {"dicom": {"Modality": "CT"}}, "forward": ["pacs"]}],
    )
    gw = GatewayProcess(cfg)
    try:
        with running(storescp_args(out, port=port, aet=PACS_AE), env=dcmtk_env()):
            wait_for_port(port)
            gw.start()
            started = time.perf_counter()
            received = send(files, cfg.dicom_port, GATEWAY_AE)
            done = wait_for_files(out, len(files))
    finally:
        gw.stop()
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    seconds = done - started
    return {
        "peer": "gateway", "seconds": seconds, "inst_s": len(files) / seconds,
        "receive_s": received, "quiet_s": quiet,
        "route_deliver_s": max(0.0, seconds - received - quiet),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.forward", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--count", type=int, default=300, help="instances (default 300)")
    parser.add_argument("--quiet", type=float, default=0.5,
                        help="dicom.study_complete_after for the gateway (default 0.5 s)")
    args = parser.parse_args(argv)
    files = cached_series(args.count)
    rows: list[dict[str, Any]] = []
    for i in range(1, args.rounds + 1):
        log(f"round {i}/{args.rounds}: direct ...")
        rows.append(direct_round(files))
        log(f"round {i}/{args.rounds}: through the gateway ...")
        rows.append(gateway_round(files, args.quiet))
        log(table(["peer", "seconds", "inst/s", "receive s", "quiet s", "route+deliver s"], [
            [r["peer"], r["seconds"], r["inst_s"], r.get("receive_s", "-"),
             r.get("quiet_s", "-"), r.get("route_deliver_s", "-")] for r in rows[-2:]
        ]))
    direct = median([r["inst_s"] for r in rows if r["peer"] == "direct"])
    through = median([r["inst_s"] for r in rows if r["peer"] == "gateway"])
    deliver = median([args.count / r["route_deliver_s"] for r in rows
                      if r["peer"] == "gateway" and r["route_deliver_s"] > 0])
    log(f"\nmedian direct (storescu -> storescp):        {direct:,.1f} instances/s")
    log(f"median through the gateway (arrival to PACS): {through:,.1f} instances/s "
        f"(incl. {args.quiet} s quiet period)")
    log(f"median gateway delivery alone (route + send):  {deliver:,.1f} instances/s")
    log(f"ratio gateway/direct = {through / direct:.2f}")
    path = write_json("forward", {
        "machine": machine(), "count": args.count, "quiet_s": args.quiet, "rounds": rows,
        "median_direct_inst_s": direct, "median_gateway_inst_s": through,
        "median_delivery_inst_s": deliver, "ratio": through / direct,
    })
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
