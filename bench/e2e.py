"""End-to-end result latency: last instance sent -> SR stored at the PACS.

    python -m bench.e2e [--studies 10] [--slices 60] [--quiet 1.0]

The PACS is Orthanc (Debian's, started here on free loopback ports). The gateway routes CT
to the reference ``lung-nodules`` model and sends its results (SEG + SR) to Orthanc. For
each of ``--studies`` chest CTs (512x512, ``--slices`` slices, nodules; each a new study),
sent one after the other by ``storescu`` over one association:

- *latency* = the time the SR can be found in Orthanc (REST ``/tools/find``, polled every
  50 ms) minus the time storescu returned (the last instance acknowledged), minus the
  study's quiet period (``dicom.study_complete_after``: the gateway waits for it by design);
- *model* = the model run's own time, from the gateway's ``infer.done`` log line;
- *overhead* = latency - model: routing, reading the input, building and validating SEG
  and SR, and the C-STOREs to the PACS.

Reported: p50/p95 of each; target: latency <= model time + 1 s (overhead p95 <= 1 s).
Results: printed, and bench/out/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench import (
    CALLING_AE,
    GATEWAY_AE,
    REPO,
    GatewayProcess,
    log,
    machine,
    median,
    percentile,
    scratch_dir,
    table,
    verdict,
    write_gateway_config,
    write_json,
)
from tests.dicomgen import dcmtk_env, storescu_args
from tests.orthanc import Orthanc

OVERHEAD_TARGET_S = 1.0


def sr_in_orthanc(pacs: Orthanc, study_uid: str) -> bool:
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
    req = urllib.request.Request(
        f"http://127.0.0.1:{pacs.http_port}/tools/find",
        data=json.dumps(query).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return bool(json.loads(r.read()))


def model_seconds(log_path: Path) -> dict[str, float]:
    """Model run time per study, from the gateway's infer.done lines (subject = study key)."""
    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if '"infer.done"' in line:
            event = json.loads(line)
            found[event["subject"]] = float(event["seconds"])
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--quiet", type=float, default=1.0)
    args = parser.parse_args(argv)

    from models.lung_nodules.synth import SynthParams, make_case
    from tests.ctstudy import write_ct_series

    folder = scratch_dir("e2e-")
    pacs = Orthanc(folder / "orthanc").start()
    try:
        spacing = (0.7, 0.7, 2.0)
        extent = args.slices * spacing[2]
        case = make_case(
            np.random.default_rng(21),
            SynthParams(z_extent_mm=(extent, extent)),
            spacing=spacing,
            nodules_mm=[((120.0, 150.0, extent * 0.4), 12.0), ((230.0, 210.0, extent * 0.6), 18.0)],
        )
        log(f"writing {args.studies} studies of {case.volume.shape[2]} slices 512x512 ...")
        studies = [
            write_ct_series(case.volume, case.spacing, folder / f"study{i:02d}")
            for i in range(args.studies)
        ]
        cfg = write_gateway_config(
            folder / "gw",
            dicom={"study_complete_after": args.quiet},
            destinations={
                "pacs": {
                    "dicom": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
                }
            },
            # as the shipped config runs it: the model sees the series de-identified
            models={
                "lung-nodules": {
                    "bundle": str(REPO / "models" / "lung_nodules"),
                    "deidentify": True,
                }
            },
            routes=[
                {
                    "name": "chest-ct",
                    "when": {"dicom": {"Modality": "CT"}},
                    "run": ["lung-nodules"],
                    "send": ["pacs"],
                }
            ],
        )
        gw = GatewayProcess(cfg).start(timeout=120)
        try:
            time.sleep(5)  # the runner process loads and warms up the model
            sent_at: list[tuple[str, float]] = []
            latencies: list[float] = []
            for i, files in enumerate(studies):
                from pydicom import dcmread

                study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                r = subprocess.run(
                    storescu_args(files, port=cfg.dicom_port, aet=CALLING_AE, aec=GATEWAY_AE),
                    env=dcmtk_env(),
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                if r.returncode != 0:
                    raise SystemExit(f"storescu failed: {r.stdout}{r.stderr}")
                last_sent = time.monotonic()
                deadline = last_sent + 300
                while not sr_in_orthanc(pacs, study_uid):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"no SR for study {i + 1}; log {gw.log_path}")
                    time.sleep(0.05)
                latency = time.monotonic() - last_sent - args.quiet
                latencies.append(latency)
                sent_at.append((study_uid, latency))
                log(f"  study {i + 1}: SR at the PACS {latency:.2f} s after the quiet period")
            models = list(model_seconds(gw.log_path).values())
        finally:
            gw.stop()
    finally:
        pacs.stop()
    if len(models) != len(latencies):
        raise SystemExit(f"{len(models)} model runs logged for {len(latencies)} studies")
    overhead = [lat - m for lat, m in zip(latencies, models, strict=True)]
    rows: list[list[Any]] = [
        ["latency (after quiet period) s", median(latencies), percentile(latencies, 95), ""],
        ["model run s", median(models), percentile(models, 95), ""],
        [
            "overhead s",
            median(overhead),
            percentile(overhead, 95),
            f"<= {OVERHEAD_TARGET_S:g}: "
            + verdict(percentile(overhead, 95), OVERHEAD_TARGET_S, below=True),
        ],
    ]
    log("")
    log(f"{args.studies} studies, {case.volume.shape[2]} slices each, quiet period {args.quiet} s")
    log(table(["measure", "p50", "p95", "target"], rows))
    out = write_json(
        "e2e.json",
        {
            "machine": machine(),
            "studies": args.studies,
            "slices": int(case.volume.shape[2]),
            "quiet_s": args.quiet,
            "latency_s": latencies,
            "model_s": models,
            "overhead_s": overhead,
            "latency_p50_s": median(latencies),
            "latency_p95_s": percentile(latencies, 95),
            "overhead_p50_s": median(overhead),
            "overhead_p95_s": percentile(overhead, 95),
        },
    )
    log(f"results: {out}")
    shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
