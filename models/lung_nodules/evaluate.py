"""Measure the bundle on held-out synthetic volumes (a seed training never uses).

    python -m models.lung_nodules.evaluate                 # 40 volumes, seed 20240601

Matching: a true nodule is detected when a finding's centre lies within the nodule's
radius (in mm) of its centre, or the finding's mask overlaps the nodule's mask. A finding
that matches no nodule is a false positive. Dice is computed on the input grid between
the returned mask and the true mask, per volume that has nodules (mean) and pooled over
all voxels. AUC is the study-level ``classification.probability`` against "has a nodule",
over all volumes (about a quarter have none).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.lung_nodules import synth
from models.lung_nodules.infer import BUNDLE_ROOT, run

HELD_OUT_SEED = 20240601
SIZE_BINS = [(4.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.01)]
HU_BINS = [(-450.0, -250.0), (-250.0, -50.0), (-50.0, 100.01)]
SLICE_BINS = [(1.0, 1.75), (1.75, 2.5), (2.5, 3.01)]


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def match_case(case: synth.SynthCase, result: dict[str, Any]) -> dict[str, Any]:
    sp = np.asarray(case.spacing)
    pred_mask = result["mask"].astype(bool)
    findings = result["findings"]
    centres = [np.asarray(f["centre_voxel"]) * sp for f in findings]
    matched_findings: set[int] = set()
    nodules = []
    for n in case.nodules:
        c = np.asarray(n.centre_mm)
        r = n.diameter_mm / 2
        hits = [i for i, fc in enumerate(centres) if np.linalg.norm(fc - c) <= r]
        # Overlap: the finding whose centre is nearest among those touching this nodule.
        lo = np.maximum(np.floor((c - r) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((c + r) / sp).astype(int) + 1, case.mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        overlap = bool((pred_mask[box] & case.mask[box].astype(bool)).any())
        if not hits and overlap:
            hits = [int(np.argmin([np.linalg.norm(fc - c) for fc in centres]))]
        matched_findings.update(hits)
        best = min(hits, key=lambda i: np.linalg.norm(centres[i] - c)) if hits else None
        nodules.append({
            "diameter_mm": n.diameter_mm,
            "hu": n.hu,
            "slice_mm": case.spacing[2],
            "detected": bool(hits),
            "pred_diameter_mm": findings[best]["diameter_mm"] if best is not None else None,
            "centre_error_mm": float(np.linalg.norm(centres[best] - c)) if best is not None
            else None,
        })
    true = case.mask.astype(bool)
    inter = int((pred_mask & true).sum())
    denom = int(pred_mask.sum() + true.sum())
    return {
        "spacing": case.spacing,
        "has_nodule": bool(case.nodules),
        "nodules": nodules,
        "false_positives": len(findings) - len(matched_findings),
        "fp_diameters_mm": [f["diameter_mm"] for i, f in enumerate(findings)
                            if i not in matched_findings],
        "dice": (2 * inter / denom) if case.nodules else None,
        "intersection": inter,
        "sum_sizes": denom,
        "probability": result["classification"]["probability"],
        "nodule_present": result["classification"]["nodule_present"],
    }


def _binned(nodules: list[dict[str, Any]], key: str, bins: list[tuple[float, float]]
            ) -> list[dict[str, Any]]:
    rows = []
    for lo, hi in bins:
        sel = [n for n in nodules if lo <= n[key] < hi]
        det = sum(n["detected"] for n in sel)
        rows.append({"range": [lo, hi], "nodules": len(sel), "detected": det,
                     "sensitivity": det / len(sel) if sel else None})
    return rows


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    nodules = [n for c in cases for n in c["nodules"]]
    det = [n for n in nodules if n["detected"]]
    dices = [c["dice"] for c in cases if c["dice"] is not None]
    inter = sum(c["intersection"] for c in cases if c["has_nodule"])
    sizes = sum(c["sum_sizes"] for c in cases if c["has_nodule"])
    labels = [c["has_nodule"] for c in cases]
    probs = [c["probability"] for c in cases]
    pred = [c["nodule_present"] for c in cases]
    tp = sum(p and y for p, y in zip(pred, labels, strict=True))
    tn = sum((not p) and (not y) for p, y in zip(pred, labels, strict=True))
    diam_err = [abs(n["pred_diameter_mm"] - n["diameter_mm"]) for n in det]
    return {
        "volumes": len(cases),
        "volumes_with_nodules": sum(labels),
        "nodules": len(nodules),
        "sensitivity": len(det) / len(nodules) if nodules else None,
        "false_positives_per_volume": sum(c["false_positives"] for c in cases) / len(cases),
        "dice_mean_per_volume": float(np.mean(dices)) if dices else None,
        "dice_median_per_volume": float(np.median(dices)) if dices else None,
        "dice_pooled": 2 * inter / sizes if sizes else None,
        "auc": auc(probs, labels),
        "classification_sensitivity": tp / max(sum(labels), 1),
        "classification_specificity": tn / max(len(labels) - sum(labels), 1),
        "diameter_abs_error_mm_median": float(np.median(diam_err)) if diam_err else None,
        "centre_error_mm_median": float(np.median([n["centre_error_mm"] for n in det]))
        if det else None,
        "by_diameter_mm": _binned(nodules, "diameter_mm", SIZE_BINS),
        "by_nodule_hu": _binned(nodules, "hu", HU_BINS),
        "by_slice_mm": _binned(nodules, "slice_mm", SLICE_BINS),
        "missed": [n for n in nodules if not n["detected"]],
        "fp_diameters_mm": [d for c in cases for d in c["fp_diameters_mm"]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--volumes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bundle", type=Path, default=BUNDLE_ROOT)
    ap.add_argument("--out", type=Path, default=None, help="write the full report (JSON)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    params = synth.SynthParams(p_no_nodule=0.25)
    cases: list[dict[str, Any]] = []
    times: list[float] = []
    for i in range(args.volumes):
        case = synth.make_case(rng, params)
        t = time.perf_counter()
        result = run(case.volume, case.spacing, bundle_root=args.bundle, threads=args.threads)
        times.append(time.perf_counter() - t)
        m = match_case(case, result)
        cases.append(m)
        dice = "-" if m["dice"] is None else f"{m['dice']:.3f}"
        print(f"{i:3d} shape={case.volume.shape} slice={case.spacing[2]:.2f}mm "
              f"nodules={len(case.nodules)} found={sum(n['detected'] for n in m['nodules'])} "
              f"fp={m['false_positives']} dice={dice} "
              f"p={m['probability']:.3f} t={times[-1]:.1f}s", flush=True)
    summary = summarise(cases)
    summary["seconds_per_volume_median"] = float(np.median(times))
    summary["seed"] = args.seed
    print(json.dumps({k: v for k, v in summary.items() if k not in ("missed",)}, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
