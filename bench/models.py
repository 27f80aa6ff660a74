"""Model latency: the reference bundles run the way the gateway runs them.

    python -m bench.models [--ct-runs 5] [--slices 120] [--reports 300] [--threads 0]

Both models run in a model runner process (``gateway.infer.runner``, as ``gateway run``
starts it: spawned, models loaded and warmed up, ``torch_threads`` = all cores for one
process), so the times include what a real run costs: reading and decoding the DICOM
files, building the volume, the model, and the pipe back.

- **Image model** (``lung-nodules``): a synthetic 512x512 chest CT of ``--slices`` slices
  (0.7 mm pixels, 1.25 mm slices, three nodules), written as DICOM files; ``--ct-runs``
  runs. Reported: p50/p95 seconds per study (target <= 10 s on 2 CPU cores) and the peak
  resident memory of the runner process (VmHWM).
- **Note model** (``report-findings``): ``--reports`` reports made of the held-out
  sentences of its evaluation set, one run per report, sequentially. Reported:
  reports/second through the runner (target >= 50) and in-process for comparison.

A GPU is used when torch sees one (``device: auto``). Results: printed and
bench/out/models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import REPO, log, machine, median, percentile, scratch_dir, table, verdict, write_json

CT_TARGET_S = 10.0
REPORTS_TARGET = 50.0


def write_ct(folder: Path, slices: int) -> list[Path]:
    from models.lung_nodules.synth import SynthParams, make_case
    from tests.ctstudy import write_ct_series

    spacing = (0.7, 0.7, 1.25)
    extent = slices * spacing[2]
    params = SynthParams(z_extent_mm=(extent, extent))
    nodules = [
        ((120.0, 150.0, extent * 0.3), 8.0),
        ((240.0, 200.0, extent * 0.5), 15.0),
        ((150.0, 260.0, extent * 0.7), 24.0),
    ]
    case = make_case(np.random.default_rng(3), params, spacing=spacing, nodules_mm=nodules)
    assert case.volume.shape[2] == slices, case.volume.shape
    return write_ct_series(case.volume, case.spacing, folder)


def reports(count: int) -> list[str]:
    path = REPO / "models" / "report_findings" / "eval" / "sentences.jsonl"
    sentences = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        picked = rng.choice(len(sentences), size=int(rng.integers(3, 9)), replace=False)
        out.append("\n".join(sentences[i] for i in picked))
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct-runs", type=int, default=5)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--reports", type=int, default=300)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args(argv)

    from gateway.infer.bundles import read_bundle
    from gateway.infer.runner import Limits, ModelRunner, RunnerSettings
    from gateway.infer.runtime import FilesInput, TextInput, load_model

    folder = scratch_dir("models-")
    try:
        log(f"writing a {args.slices}-slice 512x512 CT ...")
        paths = write_ct(folder / "ct", args.slices)
        models = {
            "lung-nodules": read_bundle("lung-nodules", REPO / "models" / "lung_nodules"),
            "report-findings": read_bundle("report-findings", REPO / "models" / "report_findings"),
        }
        settings = RunnerSettings(processes=1, torch_threads=args.threads)
        runner = ModelRunner(models, settings)
        started = time.monotonic()
        runner.start()
        if not runner.wait_ready(600):
            raise SystemExit("the runner process did not start")
        start_s = time.monotonic() - started
        log(f"runner ready in {start_s:.1f} s (models loaded and warmed up)")
        pid = runner._slots[0].proc.pid
        ct_input = FilesInput(tuple(str(p) for p in paths))
        limits = Limits(timeout=600, memory_mb=16384)
        ct_times: list[float] = []
        findings = 0
        device = "?"
        for i in range(args.ct_runs):
            t0 = time.monotonic()
            result = runner.run("lung-nodules", ct_input, limits)
            ct_times.append(time.monotonic() - t0)
            findings = len(result["findings"])
            device = result["device"]
            log(f"  CT run {i + 1}: {ct_times[-1]:.2f} s, {findings} findings")
        peak = peak_rss_mb(pid)

        texts = reports(args.reports)
        t0 = time.monotonic()
        for text in texts:
            runner.run("report-findings", TextInput(text), limits)
        via_runner = len(texts) / (time.monotonic() - t0)
        runner.close()
        local = load_model(models["report-findings"])
        t0 = time.monotonic()
        for text in texts:
            local.run(TextInput(text))
        in_process = len(texts) / (time.monotonic() - t0)

        rows: list[list[Any]] = [
            [
                "lung-nodules p50 s/study",
                median(ct_times),
                f"<= {CT_TARGET_S:g}",
                verdict(median(ct_times), CT_TARGET_S, below=True),
            ],
            [
                "lung-nodules p95 s/study",
                percentile(ct_times, 95),
                f"<= {CT_TARGET_S:g}",
                verdict(percentile(ct_times, 95), CT_TARGET_S, below=True),
            ],
            ["runner peak RSS MB", peak, "", ""],
            [
                "report-findings reports/s (runner)",
                via_runner,
                f">= {REPORTS_TARGET:g}",
                verdict(via_runner, REPORTS_TARGET),
            ],
            ["report-findings reports/s (in process)", in_process, "", ""],
        ]
        log("")
        log(
            f"device {device}, {os.cpu_count()} CPUs, torch threads "
            f"{settings.threads()}, {args.slices} slices 512x512, {findings} findings"
        )
        log(table(["measure", "value", "target", "verdict"], rows))
        out = write_json(
            "models.json",
            {
                "machine": machine(),
                "device": device,
                "torch_threads": settings.threads(),
                "slices": args.slices,
                "runner_start_s": start_s,
                "ct_seconds": ct_times,
                "ct_p50_s": median(ct_times),
                "ct_p95_s": percentile(ct_times, 95),
                "runner_peak_rss_mb": peak,
                "reports": len(texts),
                "reports_per_s_runner": via_runner,
                "reports_per_s_in_process": in_process,
            },
        )
        log(f"results: {out}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
