"""The reference lung-nodule model: synthetic data, bundle loading, inference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai")
torch = pytest.importorskip("torch")

from models.lung_nodules import infer, synth  # noqa: E402

BUNDLE = Path(infer.__file__).resolve().parent
SMALL = synth.SynthParams(matrix=384, inplane_mm=(0.8, 0.85), z_extent_mm=(96.0, 100.0))


def test_synth_nodule_has_its_diameter_in_the_mask() -> None:
    spacing = (0.7, 0.7, 1.25)
    params = synth.SynthParams(matrix=384, z_extent_mm=(100.0, 100.0))
    empty = synth.make_case(
        np.random.default_rng(1), params, spacing=spacing, nodules_mm=[], noise=False
    )
    # The centre of the first lung (lower x) at mid-slab, in mm (volume frame).
    lung = np.argwhere(empty.lungs[:192, :, 40])
    i0, j0 = lung.mean(axis=0)
    centre = (float(i0) * 0.7, float(j0) * 0.7, 50.0)
    case = synth.make_case(
        np.random.default_rng(1), params,
        spacing=spacing, nodules_mm=[(centre, 12.0)], nodule_hu=60.0, noise=False,
    )
    assert np.array_equal(case.lungs, empty.lungs)
    assert case.volume.dtype == np.float32
    assert case.volume.shape == case.mask.shape == (384, 384, 80)
    assert len(case.nodules) == 1
    nod = case.nodules[0]
    assert nod.diameter_mm == 12.0
    assert nod.centre_voxel == pytest.approx((centre[0] / 0.7, centre[1] / 0.7, 40.0))
    vox = np.argwhere(case.mask)
    volume_mm3 = len(vox) * math.prod(spacing)
    diameter = (6 * volume_mm3 / math.pi) ** (1 / 3)
    assert diameter == pytest.approx(12.0, rel=0.03)
    centroid_mm = vox.mean(axis=0) * np.asarray(spacing)
    assert np.linalg.norm(centroid_mm - np.asarray(centre)) < 0.5
    extent_x = (vox[:, 0].max() - vox[:, 0].min() + 1) * spacing[0]
    assert extent_x == pytest.approx(12.0, abs=2 * spacing[0])
    i, j, k = (round(c) for c in nod.centre_voxel)
    assert case.volume[i, j, k] == pytest.approx(60.0, abs=1.0)
    assert case.lungs[i, j, k] == 1


def test_synth_is_seeded_and_varies() -> None:
    a = synth.make_case(np.random.default_rng(7), SMALL)
    b = synth.make_case(np.random.default_rng(7), SMALL)
    c = synth.make_case(np.random.default_rng(8), SMALL)
    assert np.array_equal(a.volume, b.volume) and a.nodules == b.nodules
    assert a.spacing != c.spacing
    lung = a.volume[a.lungs.astype(bool) & (a.mask == 0)]
    assert -950 < float(np.median(lung)) < -750
    assert 1.0 <= a.spacing[2] <= 3.0 and 0.8 <= a.spacing[0] <= 0.85


def test_components_are_26_connected() -> None:
    fg = np.zeros((12, 12, 12), dtype=bool)
    fg[1:4, 1:4, 1:4] = True
    fg[4, 4, 4] = True  # touches the cube at a corner only
    fg[8:10, 8, 8] = True
    labels, n = infer.label_components(fg)
    assert n == 2
    assert labels[1, 1, 1] == labels[4, 4, 4] != labels[8, 8, 8]
    assert (labels > 0).sum() == fg.sum()
    assert infer.label_components(np.zeros((4, 4, 4), dtype=bool))[1] == 0


def test_committed_weights_load_through_the_bundle_config() -> None:
    bundle = infer.load_bundle(BUNDLE)
    assert bundle.metadata["name"] == "lung_nodules"
    gw = bundle.metadata["gateway"]
    assert gw["input"] == "image"
    assert gw["series_selection"] == {"Modality": "CT", "min_slices": 20}
    assert gw["outputs"]["labels"]["1"]["code"]["system"] == "SCT"
    weights = BUNDLE / "models" / "model.pt"
    assert weights.stat().st_size < 5_000_000
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for name, value in bundle.network.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert not bundle.network.training
    assert bundle.pixdim == (1.5, 1.5, 1.5)


@pytest.mark.timeout(20)
def test_inference_finds_the_nodule_of_a_held_out_volume() -> None:
    params = synth.SynthParams(
        matrix=384, inplane_mm=(0.8, 0.85), z_extent_mm=(96.0, 100.0),
        p_no_nodule=0.0, n_nodules=(1, 1), diameter_mm=(8.0, 16.0), nodule_hu=(-100.0, 60.0),
    )
    case = synth.make_case(np.random.default_rng(987_654), params)
    (nod,) = case.nodules
    result = infer.run(case.volume, case.spacing, threads=2)
    assert result["classification"]["nodule_present"] is True
    assert result["classification"]["probability"] > 0.5
    assert result["mask"].shape == case.volume.shape
    assert result["frame"] == "volume"
    best = min(
        result["findings"],
        key=lambda f: np.linalg.norm(np.subtract(f["centre_mm"], nod.centre_mm)),
    )
    assert np.linalg.norm(np.subtract(best["centre_mm"], nod.centre_mm)) < nod.diameter_mm / 4
    assert best["diameter_mm"] == pytest.approx(nod.diameter_mm, rel=0.2)
    assert best["volume_mm3"] == pytest.approx(math.pi / 6 * best["diameter_mm"] ** 3)
    assert best["code"]["value"] == "786838002"
    assert len(result["findings"]) <= 2


def test_affine_maps_centres_to_patient_coordinates() -> None:
    """With an affine, centre_mm is affine @ centre_voxel (e.g. LPS from the DICOM header)."""
    params = synth.SynthParams(
        matrix=384, inplane_mm=(0.8, 0.8), z_extent_mm=(96.0, 100.0),
        p_no_nodule=0.0, n_nodules=(1, 1), diameter_mm=(14.0, 18.0), nodule_hu=(0.0, 60.0),
    )
    case = synth.make_case(np.random.default_rng(4242), params)
    sx, sy, sz = case.spacing
    affine = np.array([
        [sx, 0, 0, -150.0],
        [0, sy, 0, -160.0],
        [0, 0, sz, -400.0],
        [0, 0, 0, 1.0],
    ])
    result = infer.run(case.volume, case.spacing, affine=affine)
    assert result["frame"] == "affine"
    assert result["findings"]
    f = result["findings"][0]
    expected = affine @ np.array([*f["centre_voxel"], 1.0])
    assert np.allclose(f["centre_mm"], expected[:3])
    truth = np.asarray(case.nodules[0].centre_mm) + np.array([-150.0, -160.0, -400.0])
    assert np.linalg.norm(np.asarray(f["centre_mm"]) - truth) < 3.0
