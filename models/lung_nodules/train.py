"""Train the lung-nodule UNet on synthetic volumes; writes ``models/model.pt`` and a log.

    python -m models.lung_nodules.train            # defaults: 80 volumes, 3600 iterations

The network and the preprocessing come from ``configs/inference.json`` (the same objects
inference uses), so the weights always match the bundle. Each synthetic case is made at
its native spacing (0.6-0.9 mm in-plane, 1-3 mm slices) and passed through the bundle's
preprocessing (Spacingd to 1.5 mm, HU window); labels are resampled the same way
(bilinear, then > 0.5). Training draws 64^3 patches: half centred near a nodule (half of
those on a nodule under ``--small-mm`` (8 mm) drawn from the whole training set, the other
half on a nodule of the drawn volume, each equally likely whatever its size), the rest in
the lungs, at the ends of the slab or anywhere, with flips, intensity jitter and extra noise.
Loss: Dice + cross-entropy. Seeded; deterministic algorithms on, fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.transforms import Spacingd

from models.lung_nodules import synth
from models.lung_nodules.infer import BUNDLE_ROOT, load_bundle, make_affine, preprocess

PATCH = 64


@dataclass
class Sample:
    image: np.ndarray  # (X, Y, Z) float32 in [0, 1], network grid
    label: np.ndarray  # (X, Y, Z) uint8
    lung_idx: np.ndarray  # (n, 3) lung voxel indices (subsampled)
    nodule_idx: np.ndarray  # (m, 3) nodule centres (network grid voxels)
    nodule_mm: np.ndarray  # (m,) nodule diameters


def prepare(case: synth.SynthCase, pixdim: tuple[float, float, float], bundle_root: Path
            ) -> Sample:
    bundle = load_bundle(bundle_root, weights=False)
    image = preprocess(bundle, case.volume, case.spacing)
    aff = make_affine(case.spacing)
    lab = Spacingd(keys=["label", "lungs"], pixdim=pixdim, mode="bilinear")({
        "label": MetaTensor(torch.from_numpy(case.mask[None].astype(np.float32)), affine=aff),
        "lungs": MetaTensor(torch.from_numpy(case.lungs[None].astype(np.float32)), affine=aff),
    })
    img = image.as_tensor()[0].numpy().astype(np.float32)
    label = (lab["label"].as_tensor()[0].numpy() > 0.5).astype(np.uint8)
    lungs = lab["lungs"].as_tensor()[0].numpy() > 0.5
    if label.shape != img.shape:
        raise RuntimeError(f"label grid {label.shape} != image grid {img.shape}")
    lung_idx = np.argwhere(lungs)[::7]
    centres = np.array([n.centre_mm for n in case.nodules]).reshape(-1, 3)
    nodule_idx = np.rint(centres / np.asarray(pixdim)).astype(int)
    diameters = np.array([n.diameter_mm for n in case.nodules], dtype=np.float64)
    return Sample(img, label, lung_idx, nodule_idx, diameters)


def _crop(sample: Sample, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shape = np.array(sample.image.shape)
    pad = np.maximum(PATCH - shape, 0)
    img, lab = sample.image, sample.label
    if pad.any():
        widths = [(0, int(p)) for p in pad]
        img = np.pad(img, widths, mode="edge")
        lab = np.pad(lab, widths)
        shape = np.array(img.shape)
    lo = np.clip(centre - PATCH // 2, 0, shape - PATCH).astype(int)
    sl = tuple(slice(int(a), int(a) + PATCH) for a in lo)
    return img[sl], lab[sl]


def small_nodules(samples: list[Sample], below_mm: float) -> list[tuple[int, int]]:
    """(sample, nodule) pairs of every nodule under ``below_mm`` across the training set."""
    return [(i, j) for i, s in enumerate(samples) for j, d in enumerate(s.nodule_mm)
            if d < below_mm]


def draw_batch(samples: list[Sample], rng: np.random.Generator, batch: int,
               small: list[tuple[int, int]] | None = None, small_frac: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        s = samples[int(rng.integers(len(samples)))]
        u = rng.uniform()
        centre: np.ndarray
        if u < 0.5 and small and rng.uniform() < small_frac:
            # A small nodule from the whole set: they are the hard (and rare) ones.
            i, j = small[int(rng.integers(len(small)))]
            s = samples[i]
            centre = s.nodule_idx[j] + rng.integers(-24, 25, size=3)
        elif u < 0.5 and len(s.nodule_idx):
            # One nodule chosen uniformly (not by voxel count, which would favour big ones).
            centre = s.nodule_idx[int(rng.integers(len(s.nodule_idx)))]
            centre = centre + rng.integers(-24, 25, size=3)
        elif u < 0.8 and len(s.lung_idx):
            centre = s.lung_idx[int(rng.integers(len(s.lung_idx)))]
        elif u < 0.9:
            # The ends of the slab, where the lungs taper and the inferer pads.
            centre = rng.integers(0, np.array(s.image.shape))
            centre[2] = rng.choice([0, s.image.shape[2] - 1])
        else:
            centre = rng.integers(0, np.array(s.image.shape))
        x, y = _crop(s, np.asarray(centre))
        for ax in range(3):
            if rng.uniform() < 0.5:
                x, y = np.flip(x, ax), np.flip(y, ax)
        x = x * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
        x = x + rng.standard_normal(x.shape).astype(np.float32) * rng.uniform(0.0, 0.02)
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(np.ascontiguousarray(y, dtype=np.int64))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--volumes", type=int, default=80)
    ap.add_argument("--iterations", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small-mm", type=float, default=8.0,
                    help="nodules under this diameter are oversampled")
    ap.add_argument("--small-frac", type=float, default=0.5,
                    help="share of the nodule patches centred on a small nodule")
    ap.add_argument("--bundle", type=Path, default=BUNDLE_ROOT)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for model.pt and train_log.json (default: <bundle>/models)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    bundle = load_bundle(args.bundle, weights=False)
    net = bundle.network
    out_dir = args.out or args.bundle / "models"
    log_path = out_dir / "train_log.json"
    t0 = time.perf_counter()

    params = synth.SynthParams(p_no_nodule=0.15)
    samples = []
    for _ in range(args.volumes):
        case = synth.make_case(rng, params)
        samples.append(prepare(case, bundle.pixdim, args.bundle))
    t_data = time.perf_counter() - t0
    n_nod = sum(int(len(s.nodule_idx) > 0) for s in samples)
    small = small_nodules(samples, args.small_mm)
    n_all = sum(len(s.nodule_idx) for s in samples)
    print(f"{len(samples)} volumes ({n_nod} with nodules, {n_all} nodules, {len(small)} under "
          f"{args.small_mm:g} mm) prepared in {t_data:.1f}s", flush=True)

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.iterations, pct_start=0.1
    )
    net.train()
    history: list[dict[str, float]] = []
    running = 0.0
    for it in range(1, args.iterations + 1):
        x, y = draw_batch(samples, rng, args.batch, small, args.small_frac)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if it % 50 == 0:
            entry = {"iteration": it, "loss": running / 50,
                     "lr": sched.get_last_lr()[0], "elapsed_s": time.perf_counter() - t0}
            history.append(entry)
            print(json.dumps(entry), flush=True)
            running = 0.0
    net.eval()
    out = out_dir / "model.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so model.pt is never half-written.
    tmp = out.with_name(out.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, out)
    total = time.perf_counter() - t0
    log = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "volumes_with_nodules": n_nod,
        "nodules": n_all,
        "small_nodules": len(small),
        "data_seconds": t_data,
        "total_seconds": total,
        "weights_bytes": out.stat().st_size,
        "history": history,
    }
    tmp_log = log_path.with_name(log_path.name + ".tmp")
    tmp_log.write_text(json.dumps(log, indent=1) + "\n")
    os.replace(tmp_log, log_path)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) in {total:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
