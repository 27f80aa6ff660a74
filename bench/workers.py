"""Model throughput with 1 and 2 worker processes: studies per hour through ``lung-nodules``.

    python -m bench.workers [--rounds 2] [--studies 8] [--slices 60] [--workers 1,2]
                            [--threads 1] [--quiet 1.0] [--no-reference] [--keep]

Issue 14: with ``workers.processes`` 2, each model run on one thread, the gateway should
run ``lung-nodules`` >= 1.8 times as many studies an hour as with 1, on a 2-core machine.

1. Data, generated once and cached in ``bench/out/ct-studies-<n>x<slices>/``: one
   synthetic 512x512 chest CT volume (``--slices`` slices of 2 mm, two nodules) written
   as ``max(--workers) + --studies`` CT studies, each with its own Study, Series and SOP
   Instance UIDs (``tests/ctstudy.py: write_ct_series``), Explicit VR Little Endian. The
   first ``max(--workers)`` are warm-up studies, the rest the measured ones.
2. ``--rounds`` rounds; in each, for W in ``--workers`` (in that order: 1, 2, 1, 2, ...):

   - **runner alone** (the reference, unless ``--no-reference``): the gateway's
     ``ModelRunner`` in this process with W runner processes and the same
     ``torch_threads``, the same studies as de-identified files, W runs at a time (after
     one warm-up run per process). What this machine allows for the model alone.
   - **gateway**: a fresh ``gateway run -c CONFIG`` (own data dir and ports) with
     ``workers.processes: W``, ``ingest.processes: 1``, one runner process per worker
     process (``gateway.inference.processes: 1``) with ``torch_threads: --threads``,
     ``dicom.study_complete_after: --quiet``, and one route: every CT study through
     ``lung-nodules`` (de-identified first, as the shipped config runs it; results go
     nowhere). Not timed: readiness; every runner process's ``model.loaded`` log line
     (torch loaded, the model warmed up on a blank volume); then W warm-up studies sent
     at once (one per worker process, as each has one infer worker) and their runs
     awaited. Timed: one ``storescu`` (one association, ``TCP_NODELAY=1``) sends all
     ``--studies`` studies; the time runs from its start until the last of their model
     runs is done (the timestamp of the last ``infer.done`` log line; the log file is
     polled, which costs the gateway nothing). The batch counts when every model run
     succeeded (``gateway_model_runs_total`` on /metrics: warm-up + studies ``ok``, no
     other outcome).

   Also recorded: the storescu time, each run's own time (``infer.done`` seconds, input
   reading included), the CPU seconds of each gateway process in the timed window
   (supervisor, ingest, worker, runner; from ``/proc``), and the share of the machine's
   CPUs that everything else used meanwhile (``others' CPU``: storescu, this bench, and
   any other program; above a few per cent the figures are noise).
3. Summary: median over rounds of studies/hour per peer and W; the ratios W=2 / W=1 for
   the gateway (target >= 1.8, issue 14) and for the runner alone (this machine's
   ceiling), and gateway / runner alone per W.

Results: printed, and bench/out/workers.json. The model's time dominates; the rest
(receiving the studies, the quiet period, routing) is part of what is measured, as a
site would see it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    REPO,
    GatewayProcess,
    cached_data,
    child_pids,
    log,
    machine,
    median,
    scratch_dir,
    table,
    verdict,
    write_gateway_config,
    write_json,
)
from gateway.errors import GatewayError
from tests.dicomgen import dcmtk_env, storescu_args

MODEL = "lung-nodules"
RATIO_TARGET = 1.8  # issue 14: studies/hour with 2 worker processes over 1
START_TIMEOUT_S = 120.0
LOADED_TIMEOUT_S = 300.0
SEND_TIMEOUT_S = 600
RUN_TIMEOUT_S = 900.0  # seconds a whole timed batch may take
SPACING = (0.7, 0.7, 2.0)


# --- data ------------------------------------------------------------------------------


def write_studies(folder: Path, count: int, slices: int) -> list[Path]:
    """``count`` CT studies of the same synthetic volume, each with new UIDs; file names
    ``ctNN_SSSS.dcm`` (NN: the study's number)."""
    from models.lung_nodules.synth import SynthParams, make_case
    from tests.ctstudy import write_ct_series

    extent = slices * SPACING[2]
    case = make_case(
        np.random.default_rng(14),
        SynthParams(z_extent_mm=(extent, extent)),
        spacing=SPACING,
        nodules_mm=[((120.0, 150.0, extent * 0.4), 12.0), ((230.0, 210.0, extent * 0.6), 18.0)],
    )
    assert case.volume.shape[2] == slices, case.volume.shape
    paths: list[Path] = []
    for i in range(count):
        paths += write_ct_series(case.volume, case.spacing, folder, series_number=i + 1,
                                 patient_id=f"PIDWRK{i:03d}", accession=f"ACCWRK{i:03d}")
    return paths


def cached_studies(count: int, slices: int) -> list[list[Path]]:
    """The studies, generated once into bench/out/ and reused: one list of files each."""
    paths = cached_data(f"ct-studies-{count}x{slices}", count * slices,
                        f"CT slices 512x512 ({count} studies)",
                        lambda f: write_studies(f, count, slices))
    studies: dict[str, list[Path]] = {}
    for p in sorted(paths):
        studies.setdefault(p.name.split("_", 1)[0], []).append(p)
    return list(studies.values())


# --- processes and their CPU time --------------------------------------------------------


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (its threads included), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role(pid: int, parent_role: str | None) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    args = [a.decode(errors="replace") for a in argv]
    if "--child" in args:
        i = args.index("--child")
        index = args[args.index("--index") + 1] if "--index" in args else "0"
        return f"{args[i + 1]}-{index}"
    if parent_role is None:
        return "supervisor"
    if parent_role.startswith("worker"):
        return f"runner ({parent_role})"
    return f"child of {parent_role}"


def gateway_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of each process in the gateway's tree, by role."""
    found: dict[str, float] = {}
    todo: list[tuple[int, str | None]] = [(root, None)]
    while todo:
        pid, parent = todo.pop()
        role = _role(pid, parent)
        cpu = _cpu_seconds(pid)
        if cpu is not None:
            found[role] = found.get(role, 0.0) + cpu
        todo += [(kid, role) for kid in child_pids(pid)]
    return found


def machine_cpu() -> float:
    """CPU seconds all processes of this machine used so far (busy time in /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --- the gateway and one timed batch ------------------------------------------------------


@dataclass
class Batch:
    """One timed batch: ``studies`` studies into a fresh gateway with ``workers`` worker
    processes, from the start of storescu to the last model run done."""

    workers: int
    round: int
    studies: int
    slices: int
    peer: str = "gateway"  # or "runner alone" (the reference)
    seconds: float = 0.0
    send_seconds: float = 0.0
    run_seconds: list[float] = field(default_factory=list)  # each model run's own time
    model_runs_ok: int | None = None
    model_runs_other: int | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # gateway processes
    machine_cpu_seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.run_seconds) == self.studies

    @property
    def others_share(self) -> float:
        """The share of the machine's CPUs that other processes (storescu and this bench
        included) used while it ran: how noisy the figure is."""
        capacity = (os.cpu_count() or 1) * self.seconds
        others = self.machine_cpu_seconds - sum(self.cpu_seconds.values())
        return others / capacity if capacity > 0 else 0.0

    @property
    def per_hour(self) -> float:
        return self.studies / self.seconds * 3600 if self.seconds > 0 else 0.0

    def row(self) -> list[Any]:
        gateway = sum(self.cpu_seconds.values())
        runners = sum(v for k, v in self.cpu_seconds.items() if k.startswith("runner"))
        return [self.peer, self.workers, self.studies, f"{self.seconds:.2f}", self.per_hour,
                f"{self.send_seconds:.2f}" if self.peer == "gateway" else "-",
                f"{median(self.run_seconds):.2f}" if self.run_seconds else "-",
                f"{runners:.1f}", f"{gateway - runners:.1f}", f"{self.others_share:.0%}",
                "yes" if self.ok else f"NO ({(self.error or 'runs missing')[:60]})"]

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "studies_per_hour": round(self.per_hour, 1), "ok": self.ok,
                "others_cpu_share": round(self.others_share, 3)}


HEADERS = ["peer", "W", "studies", "seconds", "studies/h", "send s", "run p50 s", "runner CPU s",
           "rest of gw CPU s", "others' CPU", "counted"]


@contextlib.contextmanager
def gateway(workers: int, args: argparse.Namespace) -> Iterator[GatewayProcess]:
    folder = scratch_dir(f"workers-gw{workers}-")
    cfg = write_gateway_config(
        folder,
        gateway={"inference": {"processes": 1, "torch_threads": args.threads}},
        dicom={"study_complete_after": args.quiet},
        ingest={"processes": 1},
        workers={"processes": workers},
        models={MODEL: {"bundle": str(REPO / "models" / "lung_nodules"), "timeout": 600,
                        "deidentify": True}},
        routes=[{"name": "chest-ct", "when": {"dicom": {"Modality": "CT"}}, "run": [MODEL]}],
    )
    gw = GatewayProcess(cfg)
    try:
        yield gw.start(timeout=START_TIMEOUT_S)
    finally:
        rc = gw.stop()
        if rc not in (0, None, -signal.SIGTERM):
            log(f"  note: gateway exited with {rc}; log tail:\n{gw.log_tail(1500)}")
        if args.keep:
            log(f"  kept {folder} (its log: gateway.log)")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def storescu(gw: GatewayProcess, studies: Sequence[list[Path]]) -> float:
    """All files of ``studies`` over one association; its wall time."""
    files = [p for study in studies for p in study]
    t0 = time.perf_counter()
    r = subprocess.run(storescu_args(files, port=gw.cfg.dicom_port, aet=CALLING_AE,
                                     aec=GATEWAY_AE),
                       env=dcmtk_env(), capture_output=True, text=True, timeout=SEND_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu exited {r.returncode}: {r.stderr.strip()[-600:]}")
    return seconds


_INFER_DONE = re.compile(r'"event":\s*"infer\.done"')


def infer_done(gw: GatewayProcess) -> list[dict[str, Any]]:
    """The gateway's ``infer.done`` log events so far, in log order."""
    try:
        text = gw.log_path.read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        if _INFER_DONE.search(line):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def wait_runs(gw: GatewayProcess, count: int, timeout: float) -> list[dict[str, Any]]:
    """Until ``count`` model runs are logged done; RuntimeError on a failed run (any
    other outcome on /metrics), the gateway's exit, or ``timeout``."""
    deadline = time.monotonic() + timeout
    checked = time.monotonic()
    while True:
        done = infer_done(gw)
        if len(done) >= count:
            return done
        if gw.proc is not None and gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}:\n{gw.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(done)} of {count} model runs done after {timeout:.0f}s:"
                               f"\n{gw.log_tail()}")
        if time.monotonic() - checked > 5:  # now and then: did a run fail?
            checked = time.monotonic()
            other = model_runs_other(gw)
            if other:
                raise RuntimeError(f"{other:.0f} model run(s) failed:\n{gw.log_tail()}")
        time.sleep(0.1)


def model_runs_other(gw: GatewayProcess) -> float | None:
    """Model runs that did not succeed (outcomes input, failed), from /metrics."""
    total = gw.metric("gateway_model_runs_total", model=MODEL)
    ok = gw.metric("gateway_model_runs_total", model=MODEL, outcome="ok")
    return None if total is None or ok is None else total - ok


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def batch(workers: int, round_no: int, warm: Sequence[list[Path]],
          studies: Sequence[list[Path]], args: argparse.Namespace) -> Batch:
    result = Batch(workers, round_no, len(studies), len(studies[0]))
    try:
        with gateway(workers, args) as gw:
            gw.wait_for_log(workers, '"model.loaded"', MODEL, timeout=LOADED_TIMEOUT_S)
            storescu(gw, warm[:workers])  # one per worker process: each runner's first run
            wait_runs(gw, workers, RUN_TIMEOUT_S)
            cpu0, machine0 = gateway_cpu(gw.pid), machine_cpu()
            t0 = time.time()
            result.send_seconds = storescu(gw, studies)
            done = wait_runs(gw, workers + len(studies), RUN_TIMEOUT_S)
            cpu1, machine1 = gateway_cpu(gw.pid), machine_cpu()
            timed = done[workers:]
            result.seconds = max(_timestamp(e) for e in timed) - t0
            result.run_seconds = [float(e.get("seconds") or 0.0) for e in timed]
            result.cpu_seconds = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cpu1.items()}
            result.machine_cpu_seconds = round(machine1 - machine0, 2)
            ok = gw.metric("gateway_model_runs_total", model=MODEL, outcome="ok")
            other = model_runs_other(gw)
            result.model_runs_ok = None if ok is None else int(ok)
            result.model_runs_other = None if other is None else int(other)
            if ok != workers + len(studies) or other:
                result.error = (f"/metrics: {ok} runs ok, {other} not, for "
                                f"{workers + len(studies)} studies")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        result.error = str(exc)[-2000:]
        log(f"  failed: {result.error[-1500:]}")
    return result


# --- the reference: the runner alone ---------------------------------------------------


def bare_batch(workers: int, round_no: int, warm: Sequence[list[Path]],
               studies: Sequence[list[Path]], args: argparse.Namespace) -> Batch:
    """The same studies through the gateway's model runner alone (``ModelRunner``, W
    processes, the same torch_threads, de-identified input read from the files), W runs
    at a time: what this machine allows without receiving, spooling, routing."""
    from gateway.infer.bundles import read_bundle
    from gateway.infer.runner import Limits, ModelRunner, RunnerSettings
    from gateway.infer.runtime import FilesInput
    from gateway.observability.logging import configure_logging

    configure_logging("WARNING")  # the runner's own info lines, in this process
    result = Batch(workers, round_no, len(studies), len(studies[0]), peer="runner alone")
    models = {MODEL: read_bundle(MODEL, REPO / "models" / "lung_nodules")}
    runner = ModelRunner(models, RunnerSettings(processes=workers, torch_threads=args.threads,
                                                log_level="WARNING"))
    limits = Limits(timeout=600, memory_mb=16384)

    def run(files: list[Path]) -> float:
        out = runner.run(MODEL, FilesInput(tuple(map(str, files)), deidentify=True), limits)
        return float(out.get("seconds") or 0.0)

    try:
        runner.start()
        if not runner.wait_ready(LOADED_TIMEOUT_S):
            raise RuntimeError("the runner processes did not start")
        pids = [slot.proc.pid for slot in runner._slots]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, warm[:workers]))
            cpu0 = {pid: _cpu_seconds(pid) or 0.0 for pid in pids}
            machine0 = machine_cpu()
            t0 = time.perf_counter()
            result.run_seconds = list(pool.map(run, studies))
            result.seconds = time.perf_counter() - t0
        result.machine_cpu_seconds = round(machine_cpu() - machine0, 2)
        result.cpu_seconds = {"runner": round(sum((_cpu_seconds(pid) or 0.0) - cpu0[pid]
                                                  for pid in pids), 2)}
    except (RuntimeError, OSError, GatewayError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[-2000:]
        log(f"  failed: {result.error[-1500:]}")
    finally:
        runner.close()
    return result


# --- summary ---------------------------------------------------------------------------

PEERS = ("gateway", "runner alone")


def summarize(batches: list[Batch], workers: list[int]) -> dict[str, Any]:
    """Per peer and W: median studies/hour over good rounds; the ratio of the highest W
    over the lowest for each peer (the gateway's against the target), and gateway/runner
    alone per W."""
    summary: dict[str, Any] = {}
    for peer in PEERS:
        per: dict[str, Any] = {}
        for w in workers:
            good = [b for b in batches if b.peer == peer and b.workers == w and b.ok]
            if not good:
                continue
            per[str(w)] = {
                "median_studies_per_hour": round(median([b.per_hour for b in good]), 1),
                "studies_per_hour_by_round": [round(b.per_hour, 1) for b in good],
                "median_run_seconds": round(median([median(b.run_seconds) for b in good]), 3),
                "median_others_cpu_share": round(median([b.others_share for b in good]), 3),
                "good_rounds": len(good),
            }
        summary[peer] = per
    lo, hi = str(min(workers)), str(max(workers))
    ratios: dict[str, Any] = {}
    for peer in PEERS:
        per = summary[peer]
        if lo != hi and lo in per and hi in per:
            ratios[f"{peer}: W={hi} / W={lo}"] = round(
                per[hi]["median_studies_per_hour"] / per[lo]["median_studies_per_hour"], 3)
    for key in map(str, workers):
        if key in summary["gateway"] and key in summary["runner alone"]:
            ratios[f"W={key}: gateway / runner alone"] = round(
                summary["gateway"][key]["median_studies_per_hour"]
                / summary["runner alone"][key]["median_studies_per_hour"], 3)
    summary["ratios"] = ratios
    key = "gateway: W=2 / W=1"
    if key in ratios:
        summary["target"] = {"ratio": key, "value": RATIO_TARGET,
                             "verdict": verdict(ratios[key], RATIO_TARGET)}
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    rows = []
    for peer in PEERS:
        for w, s in summary[peer].items():
            rows.append([peer, w, s["median_studies_per_hour"],
                         ", ".join(f"{v:,.0f}" for v in s["studies_per_hour_by_round"]),
                         s["median_run_seconds"], f"{s['median_others_cpu_share']:.0%}"])
    return table(["peer", "W", "studies/h (median)", "by round", "run p50 s", "others' CPU"],
                 rows)


# --- main ------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 or v > 64 for v in values):
        raise argparse.ArgumentTypeError(f"integers 1..64, comma-separated: {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--studies", type=int, default=8,
                   help="timed CT studies per batch (default 8); a multiple of every W, "
                        "else the last runs leave a process idle")
    p.add_argument("--slices", type=int, default=60,
                   help="512x512 slices per study (default 60)")
    p.add_argument("--workers", type=_int_list, default=[1, 2],
                   help="workers.processes to compare, comma-separated (default 1,2)")
    p.add_argument("--threads", type=int, default=1,
                   help="gateway.inference.torch_threads per runner (default 1)")
    p.add_argument("--quiet", type=float, default=1.0,
                   help="dicom.study_complete_after, seconds (default 1.0)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference (the same runs through the model runner alone)")
    p.add_argument("--keep", action="store_true",
                   help="keep each gateway's folder (config, data, gateway.log) in bench/out")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.studies < 1 or not 8 <= args.slices <= 400 \
            or args.threads < 0 or args.quiet <= 0:
        p.error("--rounds >= 1, --studies >= 1, --slices 8..400, --threads >= 0, --quiet > 0")
    uneven = [w for w in args.workers if args.studies % w]
    if uneven:
        log(f"note: {args.studies} studies do not divide among {uneven} processes: the "
            "last runs leave a process idle, which lowers that W's figure")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            log(f"{tool} not found: install dcmtk (make system-deps)")
            return 2
    warm_count = max(args.workers)
    every = cached_studies(warm_count + args.studies, args.slices)
    warm, studies = every[:warm_count], every[warm_count:]
    log(f"{args.rounds} round(s) x workers.processes {args.workers}: {args.studies} CT "
        f"studies of {args.slices} slices 512x512 through {MODEL} (torch_threads "
        f"{args.threads}, one runner per worker process, quiet period {args.quiet:g} s), "
        f"after {warm_count} warm-up studies; {os.cpu_count()} CPUs\n")
    batches: list[Batch] = []
    for r in range(1, args.rounds + 1):
        rows = []
        for w in args.workers:
            if args.reference:
                log(f"round {r}/{args.rounds}: W={w}, the runner alone ...")
                rows.append(bare_batch(w, r, warm, studies, args))
            log(f"round {r}/{args.rounds}: W={w}, the gateway with workers.processes {w} ...")
            rows.append(batch(w, r, warm, studies, args))
        batches += rows
        log(table(HEADERS, [b.row() for b in rows]) + "\n")

    summary = summarize(batches, args.workers)
    log("summary: medians over good rounds")
    log(summary_table(summary))
    for name, value in summary["ratios"].items():
        line = f"{name} = {value:.2f}"
        if summary.get("target", {}).get("ratio") == name:
            line += f"   target >= {RATIO_TARGET}: {summary['target']['verdict']}"
        log(line)
    path = write_json("workers.json", {
        "benchmark": "workers",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "args": {"rounds": args.rounds, "studies": args.studies, "slices": args.slices,
                 "workers": args.workers, "torch_threads": args.threads,
                 "quiet_s": args.quiet, "warmup_studies": warm_count,
                 "reference": args.reference},
        "method": "a fresh gateway per batch (workers.processes W, one runner each, "
                  "torch_threads per runner, de-identified input); runners loaded and one "
                  "warm-up study per worker process run first; timed: one storescu sends "
                  "every study, until the last infer.done; reference: the same runs "
                  "through ModelRunner alone (W processes, W at a time); rounds "
                  "interleaved, medians",
        "rounds": [b.as_json() for b in batches],
        "summary": summary,
    })
    log(f"\nresults written to {path}")
    return 0 if all(b.ok for b in batches) else 1


if __name__ == "__main__":
    sys.exit(main())
