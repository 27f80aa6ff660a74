"""Running a MONAI Model Zoo segmentation bundle that brings no gateway code of its own.

Zoo bundles (e.g. ``spleen_ct_segmentation``) describe inference in ``inference.json`` with
``network_def`` (or ``network``), ``preprocessing``, ``inferer`` and ``postprocessing``;
their preprocessing starts by reading a file (``LoadImaged``) and their postprocessing ends
by writing one (``SaveImaged``).  Here the volume comes from DICOM in memory, so those two
are left out and the rest runs as the bundle wrote it:

1. the volume becomes a ``MetaTensor`` the way ``LoadImage`` would make it: no channel, its
   affine in MONAI's RAS convention (DICOM's LPS with x and y negated);
2. ``preprocessing`` (minus file reading), the ``inferer`` with the network (weights from
   ``models/model.pt`` as a state dict, or TorchScript ``models/model.ts``);
3. ``postprocessing`` (minus file writing): usually softmax, ``Invertd`` back to the input
   grid, ``AsDiscreted`` argmax.  If the labels are not on the input grid after it, they
   are resampled onto it (nearest neighbour);
4. each label named in ``gateway.outputs.labels`` becomes findings, one per connected
   region: centre (voxel and patient LPS mm), volume mm3, equivalent diameter mm.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor
from monai.transforms.compose import Compose
from monai.transforms.spatial.array import SpatialResample

from gateway.errors import Permanent
from gateway.infer.bundles import ModelInfo

_FILE_IO = {"LoadImage", "LoadImaged", "SaveImage", "SaveImaged"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class SegmentationBundle:
    """Callable as an image entrypoint: ``(volume_hu, spacing, *, affine) -> output``."""

    def __init__(self, info: ModelInfo, device: str = "cpu") -> None:
        self.info = info
        self.device = torch.device(device)
        parser = ConfigParser()
        parser.read_config(str(info.root / "configs" / "inference.json"))
        parser["bundle_root"] = str(info.root)
        if "device" in parser:
            parser["device"] = f"$torch.device('{device}')"
        missing = [k for k in ("preprocessing", "inferer") if k not in parser]
        if "network_def" not in parser and "network" not in parser:
            missing.append("network_def")
        if missing:
            raise Permanent(
                f"model '{info.name}': inference.json has no {', '.join(missing)}; without a "
                "gateway.entrypoint the gateway runs Model Zoo style bundles only"
            )
        for item in ("preprocessing", "postprocessing"):
            _drop_file_io(parser, item)  # before parsing: SaveImaged needs a writer package
        sys.path.insert(0, str(info.root))  # a bundle's own scripts/, the Zoo convention
        try:
            self.network = self._network(parser)
            self.preprocessing = _compose(parser.get_parsed_content("preprocessing"))
            self.inferer = parser.get_parsed_content("inferer")
            self.postprocessing = (
                _compose(parser.get_parsed_content("postprocessing"))
                if "postprocessing" in parser
                else None
            )
        finally:
            sys.path.remove(str(info.root))
        self.labels: dict[str, Any] = dict(info.outputs.get("labels") or {})
        self.min_volume_mm3 = float(info.outputs.get("min_volume_mm3", 0.0))

    def _network(self, parser: Any) -> torch.nn.Module:
        weights = self.info.weights
        assert weights is not None
        if weights.suffix == ".ts":
            net: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
                str(weights), map_location=self.device
            )
        else:
            key = "network_def" if "network_def" in parser else "network"
            net = parser.get_parsed_content(key)
            state = torch.load(str(weights), map_location=self.device, weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("model"), dict):
                state = state["model"]  # a training checkpoint rather than a state dict
            net.load_state_dict(state)
        return net.to(self.device).eval()

    def __call__(
        self,
        volume_hu: np.ndarray,
        spacing: tuple[float, float, float],
        *,
        affine: np.ndarray,
        threads: int | None = None,
    ) -> dict[str, Any]:
        shape = tuple(int(s) for s in volume_hu.shape)
        lps = np.asarray(affine, dtype=np.float64)
        ras = LPS_TO_RAS @ lps
        image = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(volume_hu, dtype=np.float32)),
            affine=torch.as_tensor(ras),
            meta={
                "original_channel_dim": "no_channel",
                "original_affine": ras,
                "spatial_shape": np.array(shape),
                "filename_or_obj": "dicom-series",
            },
        )
        data = self.preprocessing({"image": image})
        net_input = data["image"]
        with torch.inference_mode():
            pred = self.inferer(net_input.as_tensor()[None].to(self.device), self.network)[0]
        out = MetaTensor(pred.float().cpu(), affine=net_input.affine, meta=dict(net_input.meta))
        out.applied_operations = list(net_input.applied_operations)
        data["pred"] = out
        if self.postprocessing is not None:
            data = self.postprocessing(data)
        labels = self._labels_on_input_grid(data["pred"], ras, shape)
        return {
            "findings": self._findings(labels, lps),
            "classification": None,
            "mask": labels,
        }

    def _labels_on_input_grid(self, pred: Any, ras: np.ndarray, shape: tuple[int, ...]) -> Any:
        t: Any = pred if isinstance(pred, MetaTensor) else MetaTensor(torch.as_tensor(pred))
        if t.ndim == 4 and t.shape[0] > 1:
            t = MetaTensor(torch.argmax(t.as_tensor(), dim=0, keepdim=True), affine=t.affine)
        elif t.ndim == 3:
            t = MetaTensor(t.as_tensor()[None], affine=t.affine)
        if tuple(t.shape[1:]) != shape or not np.allclose(
            np.asarray(t.affine, dtype=float), ras, atol=1e-3
        ):
            t = SpatialResample(mode="nearest", padding_mode="zeros")(
                t.float(), dst_affine=torch.as_tensor(ras), spatial_size=shape
            )
        return np.rint(np.asarray(t.as_tensor()[0].cpu().numpy())).astype(np.uint8)

    def _findings(self, labels: np.ndarray, lps: np.ndarray) -> list[dict[str, Any]]:
        voxel_mm3 = float(abs(np.linalg.det(lps[:3, :3])))
        findings: list[dict[str, Any]] = []
        for value, concept in sorted(self.labels.items(), key=lambda kv: int(kv[0])):
            comps, n = connected_components(labels == int(value))
            if n == 0:
                continue
            coords = np.nonzero(comps)
            ids = comps[coords]
            counts = np.bincount(ids, minlength=n + 1)
            sums = [np.bincount(ids, weights=c.astype(np.float64), minlength=n + 1) for c in coords]
            for comp in range(1, n + 1):
                volume = float(counts[comp]) * voxel_mm3
                if counts[comp] == 0 or volume < self.min_volume_mm3:
                    continue
                centre = [float(s[comp] / counts[comp]) for s in sums]
                findings.append(
                    {
                        "label": int(value),
                        "finding": concept.get("finding", f"label {value}"),
                        "code": concept.get("code"),
                        "centre_voxel": centre,
                        "centre_mm": [float(v) for v in (lps @ np.array([*centre, 1.0]))[:3]],
                        "volume_mm3": volume,
                        "diameter_mm": (6.0 * volume / math.pi) ** (1.0 / 3.0),
                        "probability": None,
                    }
                )
        findings.sort(key=lambda f: -float(f["volume_mm3"]))
        return findings


def _drop_file_io(parser: Any, item: str) -> None:
    """Remove file reading/writing transforms from a Compose item of the raw config."""
    if item not in parser:
        return
    raw = parser.get(item)
    if isinstance(raw, dict) and isinstance(raw.get("transforms"), list):
        kept = [
            t
            for t in raw["transforms"]
            if not (
                isinstance(t, dict) and str(t.get("_target_", "")).rsplit(".", 1)[-1] in _FILE_IO
            )
        ]
        parser[f"{item}#transforms"] = kept


def _compose(transform: Any) -> Any:
    return transform if isinstance(transform, Compose) else Compose([transform])


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean 3-D array: labels 1..n (int32), and n.

    Label propagation with 3x3x3 max pooling inside the foreground's bounding box (torch
    only, no scipy); the number of passes grows with the longest component.
    """
    out = np.zeros(mask.shape, dtype=np.int32)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return out, 0
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = torch.from_numpy(np.ascontiguousarray(mask[box]))
    lab = torch.zeros(sub.shape, dtype=torch.float64)  # exact labels for any count
    lab[sub] = torch.arange(1, int(sub.sum()) + 1, dtype=torch.float64)
    keep = sub.double()
    while True:
        new = F.max_pool3d(lab[None, None], 3, stride=1, padding=1)[0, 0] * keep
        if torch.equal(new, lab):
            break
        lab = new
    uniq, inverse = np.unique(lab.numpy().astype(np.int64), return_inverse=True)
    offset = 0 if uniq[0] == 0 else 1
    out[box] = (inverse.reshape(sub.shape) + offset).astype(np.int32)
    return out, len(uniq) - (1 - offset)
