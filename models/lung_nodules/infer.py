"""Run the lung-nodule bundle on one CT volume: findings, a study-level class and a mask.

The bundle is this folder (``configs/inference.json``, ``configs/metadata.json``,
``models/model.pt``), read with ``monai.bundle.ConfigParser``; nothing is downloaded.

Input: ``volume_hu`` is a 3-D float array of Hounsfield units indexed ``[i, j, k]`` =
(column, row, slice), MONAI's ``LoadImage`` order, and ``spacing`` is ``(sx, sy, sz)`` in mm
in that order. Optionally ``affine`` (4x4, voxel index -> patient mm, e.g. LPS built from
ImagePositionPatient / ImageOrientationPatient / PixelSpacing) replaces the default
``diag(spacing)``; its rotation is kept through resampling, its scale must match ``spacing``.

Pipeline: the bundle's ``preprocessing`` (channel first, ``Spacingd`` to 1.5 mm isotropic,
HU window [-1000, 400] -> [0, 1]) -> the bundle's sliding-window ``inferer`` with the UNet ->
softmax foreground probability -> connected components (26-connectivity) of
``prob > threshold`` on the 1.5 mm grid -> the probability and the component labels
resampled back onto the input grid -> per-component measurements on the input grid ->
components smaller than ``min_diameter_mm`` (equivalent sphere) dropped.

Output (``run``), all positions on the *input* grid:

- ``findings``: one per component, ``centre_voxel`` (float ``[i, j, k]``, mask centroid),
  ``centre_mm`` (``affine @ [i, j, k, 1]``: patient LPS mm when a DICOM affine was given,
  otherwise the volume frame ``index * spacing``), ``diameter_mm`` (equivalent sphere of
  the component's volume), ``volume_mm3``, ``probability`` (highest voxel probability in it),
  plus the coded concept from ``metadata.json`` (``gateway.outputs``).
- ``classification``: ``nodule_present`` (any finding) and ``probability`` (highest finding
  probability; without findings the highest voxel probability, capped just below the
  threshold so the class and the probability agree).
- ``mask``: uint8 array shaped like ``volume_hu``, 1 on the voxels of the kept findings.
- ``frame``: ``"affine"`` or ``"volume"``, saying what ``centre_mm`` is in.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, SpatialResample

BUNDLE_ROOT = Path(__file__).resolve().parent


@dataclass
class Bundle:
    root: Path
    metadata: dict[str, Any]
    network: torch.nn.Module
    preprocessing: Compose
    inferer: Any
    pixdim: tuple[float, float, float]
    threshold: float
    min_diameter_mm: float


_cache: dict[tuple[str, bool], Bundle] = {}
_lock = threading.Lock()


def load_bundle(root: Path | str = BUNDLE_ROOT, *, weights: bool = True) -> Bundle:
    """Parse the bundle's configs and (optionally) load its weights; cached per folder."""
    root = Path(root).resolve()
    key = (str(root), weights)
    with _lock:
        if key in _cache:
            return _cache[key]
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "inference.json"))
        parser["bundle_root"] = str(root)
        metadata = json.loads((root / "configs" / "metadata.json").read_text())
        network: torch.nn.Module = parser.get_parsed_content("network")
        if weights:
            state = torch.load(
                parser.get_parsed_content("model_file"), map_location="cpu", weights_only=True
            )
            network.load_state_dict(state)
        network.eval()
        post = parser.get_parsed_content("postprocessing")
        pixdim = tuple(float(v) for v in parser.get_parsed_content("pixdim"))
        bundle = Bundle(
            root=root,
            metadata=metadata,
            network=network,
            preprocessing=parser.get_parsed_content("preprocessing"),
            inferer=parser.get_parsed_content("inferer"),
            pixdim=(pixdim[0], pixdim[1], pixdim[2]),
            threshold=float(post["threshold"]),
            min_diameter_mm=float(post["min_diameter_mm"]),
        )
        _cache[key] = bundle
        return bundle


def make_affine(
    spacing: tuple[float, float, float], affine: np.ndarray | None = None
) -> torch.Tensor:
    if affine is not None:
        return torch.as_tensor(np.asarray(affine, dtype=np.float64))
    return torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))


def preprocess(
    bundle: Bundle,
    volume_hu: np.ndarray,
    spacing: tuple[float, float, float],
    affine: np.ndarray | None = None,
) -> MetaTensor:
    """The bundle's preprocessing: returns a (1, X', Y', Z') MetaTensor on the network grid."""
    img = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume_hu, dtype=np.float32)),
        affine=make_affine(spacing, affine),
    )
    out: MetaTensor = bundle.preprocessing({"image": img})["image"]
    return out


def predict_probability(bundle: Bundle, image: MetaTensor) -> MetaTensor:
    """Foreground probability (1, X', Y', Z') on the network grid, with its affine."""
    with torch.inference_mode():
        logits = bundle.inferer(image.as_tensor()[None], bundle.network)
        prob = torch.softmax(logits, dim=1)[0, 1:2]
    return MetaTensor(prob.float(), affine=image.affine)


def label_components(fg: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean 3-D array: labels 1..n (int32) and n.

    Label propagation with max-pooling (no scipy needed); the work is confined to the
    bounding box of the foreground, and the number of passes to the longest component.
    """
    labels = np.zeros(fg.shape, dtype=np.int32)
    idx = np.argwhere(fg)
    if idx.size == 0:
        return labels, 0
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    sub = torch.from_numpy(np.ascontiguousarray(fg[box]))
    n_fg = int(sub.sum())
    lab = torch.zeros(sub.shape, dtype=torch.float32)
    lab[sub] = torch.arange(1, n_fg + 1, dtype=torch.float32)
    keep = sub.float()
    while True:
        new = F.max_pool3d(lab[None, None], 3, stride=1, padding=1)[0, 0] * keep
        if torch.equal(new, lab):
            break
        lab = new
    uniq, inverse = np.unique(lab.numpy().astype(np.int64), return_inverse=True)
    # uniq[0] is 0 (background) whenever the box holds any background voxel.
    offset = 0 if uniq[0] == 0 else 1
    labels[box] = (inverse.reshape(sub.shape) + offset).astype(np.int32)
    n = len(uniq) - (1 - offset)
    return labels, n


def _to_input_grid(
    data: torch.Tensor, src_affine: torch.Tensor, dst_affine: torch.Tensor,
    shape: tuple[int, ...], mode: str,
) -> np.ndarray:
    src = MetaTensor(data[None].float(), affine=src_affine)
    out = SpatialResample(mode=mode, padding_mode="zeros")(
        src, dst_affine=dst_affine, spatial_size=shape
    )
    return np.asarray(out.as_tensor()[0].numpy())


def run(
    volume_hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    affine: np.ndarray | None = None,
    bundle_root: Path | str = BUNDLE_ROOT,
    threads: int | None = None,
) -> dict[str, Any]:
    """Findings, study classification and mask for one volume (see the module docstring)."""
    if volume_hu.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume_hu.shape}")
    if threads is not None:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_root)
    image = preprocess(bundle, volume_hu, spacing, affine)
    prob = predict_probability(bundle, image)
    prob_np = prob.as_tensor()[0].numpy()

    labels_net, n = label_components(prob_np > bundle.threshold)
    dst_affine = make_affine(spacing, affine)
    shape = tuple(int(s) for s in volume_hu.shape)
    aff = dst_affine.numpy()
    voxel_mm3 = float(abs(np.linalg.det(aff[:3, :3])))

    findings: list[dict[str, Any]] = []
    mask = np.zeros(shape, dtype=np.uint8)
    if n:
        comp_prob = np.zeros(n + 1, dtype=np.float64)
        np.maximum.at(comp_prob, labels_net.ravel(), prob_np.ravel())
        prob_in = _to_input_grid(prob.as_tensor()[0], prob.affine, dst_affine, shape, "bilinear")
        lab_in = _to_input_grid(
            torch.from_numpy(labels_net), prob.affine, dst_affine, shape, "nearest"
        )
        lab_in = np.rint(lab_in).astype(np.int32)
        lab_in[prob_in <= bundle.threshold] = 0
        coords = np.nonzero(lab_in)
        lab_vals = lab_in[coords]
        counts = np.bincount(lab_vals, minlength=n + 1)
        sums = [np.bincount(lab_vals, weights=c.astype(np.float64), minlength=n + 1)
                for c in coords]
        output = _output_concept(bundle)
        kept: list[int] = []
        for lab in range(1, n + 1):
            if counts[lab] == 0:
                continue
            vol_mm3 = float(counts[lab]) * voxel_mm3
            diameter = (6.0 * vol_mm3 / math.pi) ** (1.0 / 3.0)
            if diameter < bundle.min_diameter_mm:
                continue
            centre = [float(s[lab] / counts[lab]) for s in sums]
            centre_mm = (aff @ np.array([*centre, 1.0]))[:3]
            kept.append(lab)
            findings.append({
                **output,
                "centre_voxel": centre,
                "centre_mm": [float(v) for v in centre_mm],
                "diameter_mm": diameter,
                "volume_mm3": vol_mm3,
                "probability": float(comp_prob[lab]),
            })
        if kept:
            mask[np.isin(lab_in, kept)] = 1
    findings.sort(key=lambda f: -f["probability"])
    if findings:
        study_p = max(f["probability"] for f in findings)
    else:
        study_p = min(float(prob_np.max(initial=0.0)), bundle.threshold - 1e-3)
    return {
        "model": {"name": bundle.metadata["name"], "version": bundle.metadata["version"]},
        "findings": findings,
        "classification": {"nodule_present": bool(findings), "probability": study_p},
        "mask": mask,
        "frame": "affine" if affine is not None else "volume",
    }


def _output_concept(bundle: Bundle) -> dict[str, Any]:
    outputs = bundle.metadata.get("gateway", {}).get("outputs", {})
    label = outputs.get("labels", {}).get("1", {})
    return {
        "label": 1,
        "finding": label.get("finding", "lung nodule"),
        "code": label.get("code"),
    }
