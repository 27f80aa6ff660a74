"""A MONAI Model Zoo style bundle, with no gateway code in it, runs on a DICOM series.

The bundle is written the way the Zoo writes them (``network_def``, ``preprocessing``
starting with ``LoadImaged``, a sliding-window ``inferer``, ``postprocessing`` with
``Invertd`` and ``SaveImaged``), with a one-layer network whose weights make it a
threshold at -300 HU, so the right answer is known: the sphere drawn into the volume.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gateway.infer.bundles import read_bundle  # noqa: E402
from gateway.infer.runtime import FilesInput, load_model  # noqa: E402
from tests.ctstudy import write_ct_series  # noqa: E402

INFERENCE = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "torch.nn.Conv3d",
        "in_channels": 1,
        "out_channels": 2,
        "kernel_size": 1,
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {
                "_target_": "Spacingd",
                "keys": "image",
                "pixdim": [1.5, 1.5, 2.0],
                "mode": "bilinear",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -1000,
                "a_max": 400,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [32, 32, 16],
        "sw_batch_size": 1,
        "overlap": 0.25,
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "$@bundle_root + '/eval'",
                "output_postfix": "seg",
            },
        ],
    },
}


def zoo_bundle(root: Path) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE))
    (root / "configs" / "metadata.json").write_text(
        json.dumps(
            {
                "name": "threshold_seg",
                "version": "0.3.0",
                "gateway": {
                    "input": "image",
                    "series_selection": {"Modality": "CT"},
                    "outputs": {
                        "labels": {
                            "1": {
                                "finding": "dense region",
                                "code": {"system": "SCT", "value": "4147007", "meaning": "Mass"},
                            }
                        }
                    },
                },
            }
        )
    )
    # foreground logit 20 * x - 10 on the [0, 1] scaled image: x > 0.5 is HU > -300
    state = {
        "weight": torch.tensor([0.0, 20.0]).reshape(2, 1, 1, 1, 1),
        "bias": torch.tensor([0.0, -10.0]),
    }
    torch.save(state, root / "models" / "model.pt")
    return root


def test_a_zoo_style_bundle_finds_the_sphere_in_patient_coordinates(tmp_path: Path) -> None:
    spacing = (0.8, 0.8, 2.0)
    shape = (64, 64, 24)
    centre_vox = np.array([20.0, 40.0, 12.0])
    radius = 6.0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    dist = np.linalg.norm((grid - centre_vox) * np.array(spacing), axis=-1)
    volume = np.where(dist <= radius, 40.0, -1000.0).astype(np.float32)
    paths = write_ct_series(volume, spacing, tmp_path / "ct")

    info = read_bundle("zoo", zoo_bundle(tmp_path / "bundle"))
    assert info.entrypoint is None
    result = load_model(info).run(FilesInput(tuple(str(p) for p in paths)))

    (finding,) = result["findings"]
    expected_mm = [-175.0 + 0.8 * 20, -175.0 + 0.8 * 40, 2.0 * 12]  # origin + index * spacing
    assert finding["centre_mm"] == pytest.approx(expected_mm, abs=1.0)
    assert finding["volume_mm3"] == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.2)
    assert finding["code"]["value"] == "4147007" and finding["label"] == 1
    mask = result["mask"]
    assert mask.shape == shape
    dice = 2 * np.sum((mask == 1) & (dist <= radius)) / (np.sum(mask == 1) + np.sum(dist <= radius))
    assert dice > 0.85
    assert not (tmp_path / "bundle" / "eval").exists(), "SaveImaged must not run"
