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
softmax foreground probability, averaged with the passes on the copies flipped along the
axes listed in ``postprocessing.tta_flips`` (test-time augmentation; each flipped back) ->
connected components (26-connectivity) of ``prob > threshold`` on the 1.5 mm grid -> the
probability and the component labels resampled back onto the input grid -> per-component
measurements on the input grid -> components smaller than ``min_diameter_mm`` (equivalent
sphere), or whose highest probability is under ``min_probability`` (optional; defaults to
``threshold``, which drops nothing more), dropped.

Output (``run``), all positions on the *input* grid:

- ``findings``: one per component, ``centre_voxel`` (float ``[i, j, k]``, mask centroid),
  ``centre_mm`` (``affine @ [i, j, k, 1]``: patient LPS mm when a DICOM affine was given,
  otherwise the volume frame ``index * spacing``), ``diameter_mm`` (equivalent sphere of
  the component's volume), ``volume_mm3``, ``probability`` (highest voxel probability in it),
  plus the coded concept from ``metadata.json`` (``gateway.outputs``).
- ``classification``: ``nodule_present`` (any finding) and ``probability`` (highest finding
  probability; without findings the highest voxel probability, capped just below
  ``max(threshold, min_probability)`` so the class and the probability agree).
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
    threshold: float  # voxel threshold for components and the mask
    min_diameter_mm: float
    min_probability: float  # a component is a finding when its highest probability reaches it
    tta_flips: list[list[int]]  # extra passes on flipped copies (spatial axes 0-2), averaged

    @property
    def study_threshold(self) -> float:
        return max(self.threshold, self.min_probability)


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
            min_probability=float(post.get("min_probability", post["threshold"])),
            tta_flips=[[int(a) for a in f] for f in post.get("tta_flips", [])],
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


def predict_probability(bundle: Bundle, image: MetaTensor, device: str = "cpu") -> MetaTensor:
    """Foreground probability (1, X', Y', Z') on the network grid, with its affine.

    *device* ("cpu", "cuda", "cuda:1"): where the network runs; the result comes back to
    the CPU."""
    network = _network_on(bundle, device)
    x = image.as_tensor()[None].to(device)
    with torch.inference_mode():
        prob = torch.softmax(bundle.inferer(x, network), dim=1)[0, 1:2]
        for axes in bundle.tta_flips:
            dims = [a + 2 for a in axes]
            flipped = bundle.inferer(torch.flip(x, dims), network)
            prob += torch.flip(torch.softmax(flipped, dim=1), dims)[0, 1:2]
        prob /= 1 + len(bundle.tta_flips)
    return MetaTensor(prob.float().cpu(), affine=image.affine)


_on_device: dict[tuple[int, str], torch.nn.Module] = {}


def _network_on(bundle: Bundle, device: str) -> torch.nn.Module:
    """The bundle's network on *device* (a copy per device, made once)."""
    if device == "cpu":
        return bundle.network
    key = (id(bundle), device)
    with _lock:
        if key not in _on_device:
            import copy

            _on_device[key] = copy.deepcopy(bundle.network).to(device).eval()
        return _on_device[key]


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


@dataclass
class Components:
    """Connected components of ``prob > threshold`` and their measurements (input grid)."""

    labels: np.ndarray  # int32, input shape; 0 outside components (and where prob <= t)
    counts: np.ndarray  # (n + 1,) voxels per label on the input grid
    centres: np.ndarray  # (n + 1, 3) mean voxel index on the input grid
    max_prob: np.ndarray  # (n + 1,) highest network-grid probability in each component
    voxel_mm3: float


def components(
    prob: MetaTensor, threshold: float, dst_affine: torch.Tensor, shape: tuple[int, ...],
    prob_in: np.ndarray | None = None,
) -> Components:
    """Label ``prob > threshold`` on the network grid, carry the labels to the input grid.

    ``prob_in`` (the probability resampled onto the input grid) may be passed when the
    caller already has it; it is computed otherwise.
    """
    aff = dst_affine.numpy()
    voxel_mm3 = float(abs(np.linalg.det(aff[:3, :3])))
    prob_np = prob.as_tensor()[0].numpy()
    labels_net, n = label_components(prob_np > threshold)
    if not n:
        return Components(np.zeros(shape, dtype=np.int32), np.zeros(1), np.zeros((1, 3)),
                          np.zeros(1), voxel_mm3)
    comp_prob = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(comp_prob, labels_net.ravel(), prob_np.ravel())
    if prob_in is None:
        prob_in = _to_input_grid(prob.as_tensor()[0], prob.affine, dst_affine, shape, "bilinear")
    lab_in = _to_input_grid(
        torch.from_numpy(labels_net), prob.affine, dst_affine, shape, "nearest"
    )
    lab_in = np.rint(lab_in).astype(np.int32)
    lab_in[prob_in <= threshold] = 0
    coords = np.nonzero(lab_in)
    lab_vals = lab_in[coords]
    counts = np.bincount(lab_vals, minlength=n + 1).astype(np.float64)
    sums = np.stack([np.bincount(lab_vals, weights=c.astype(np.float64), minlength=n + 1)
                     for c in coords], axis=1)
    centres = sums / np.maximum(counts, 1)[:, None]
    return Components(lab_in, counts, centres, comp_prob, voxel_mm3)


def select_findings(
    bundle: Bundle, comps: Components, aff: np.ndarray, *,
    min_diameter_mm: float, min_probability: float,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Findings (sorted by probability) and the uint8 mask of the components kept."""
    output = _output_concept(bundle)
    findings: list[dict[str, Any]] = []
    kept: list[int] = []
    for lab in range(1, len(comps.counts)):
        if comps.counts[lab] == 0 or comps.max_prob[lab] < min_probability:
            continue
        vol_mm3 = float(comps.counts[lab]) * comps.voxel_mm3
        diameter = (6.0 * vol_mm3 / math.pi) ** (1.0 / 3.0)
        if diameter < min_diameter_mm:
            continue
        centre = [float(v) for v in comps.centres[lab]]
        centre_mm = (aff @ np.array([*centre, 1.0]))[:3]
        kept.append(lab)
        findings.append({
            **output,
            "centre_voxel": centre,
            "centre_mm": [float(v) for v in centre_mm],
            "diameter_mm": diameter,
            "volume_mm3": vol_mm3,
            "probability": float(comps.max_prob[lab]),
        })
    mask = np.zeros(comps.labels.shape, dtype=np.uint8)
    if kept:
        mask[np.isin(comps.labels, kept)] = 1
    findings.sort(key=lambda f: -f["probability"])
    return findings, mask


def run(
    volume_hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    affine: np.ndarray | None = None,
    bundle_root: Path | str = BUNDLE_ROOT,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Findings, study classification and mask for one volume (see the module docstring).
    *device*: where the network runs ("cpu", or "cuda" when torch sees a GPU)."""
    if volume_hu.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume_hu.shape}")
    if threads is not None:
        torch.set_num_threads(threads)
    bundle = load_bundle(bundle_root)
    image = preprocess(bundle, volume_hu, spacing, affine)
    prob = predict_probability(bundle, image, device)
    dst_affine = make_affine(spacing, affine)
    shape = tuple(int(s) for s in volume_hu.shape)
    comps = components(prob, bundle.threshold, dst_affine, shape)
    findings, mask = select_findings(
        bundle, comps, dst_affine.numpy(),
        min_diameter_mm=bundle.min_diameter_mm, min_probability=bundle.min_probability,
    )
    if findings:
        study_p = max(f["probability"] for f in findings)
    else:
        prob_max = float(prob.as_tensor().max()) if prob.numel() else 0.0
        study_p = min(prob_max, bundle.study_threshold - 1e-3)
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
