"""Reading model bundles: the registry, and a precise message for each way a bundle is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gateway.infer.bundles import BundleError, Registry, read_bundle, sha256_file
from gateway.infer.masks import decode_mask, encode_mask

REPO = Path(__file__).resolve().parents[2]


def make_bundle(
    root: Path,
    gateway: dict[str, Any] | None,
    *,
    weights: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    (root / "configs").mkdir(parents=True)
    metadata: dict[str, Any] = {"name": "test_bundle", "version": "1.2.3", **(meta or {})}
    if gateway is not None:
        metadata["gateway"] = gateway
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (root / "configs" / "inference.json").write_text("{}")
    if weights:
        (root / "models").mkdir()
        (root / "models" / "model.pt").write_bytes(b"weights")
    return root


def test_reference_bundles_read() -> None:
    lung = read_bundle("lung-nodules", REPO / "models" / "lung_nodules")
    assert lung.input == "image"
    assert lung.entrypoint == "infer.py:run"
    assert lung.series_selection["Modality"] == "CT"
    assert lung.weights == REPO / "models" / "lung_nodules" / "models" / "model.pt"
    assert lung.weights_sha256 == sha256_file(lung.weights)
    notes = read_bundle("report-findings", REPO / "models" / "report_findings")
    assert notes.input == "text"
    assert notes.weights is not None and notes.weights.name == "rules.json"
    assert notes.identity == {
        "name": "report-findings",
        "bundle": "report_findings",
        "version": notes.version,
        "weights_sha256": sha256_file(notes.weights),
    }


@pytest.mark.parametrize(
    ("gateway", "weights", "meta", "message"),
    [
        (None, True, None, "no 'gateway' section"),
        ({"input": "video"}, True, None, "gateway.input must be 'image' or 'text'"),
        ({"input": "image"}, False, None, "no weights: expected models/model.pt"),
        ({"input": "image", "entrypoint": "run"}, True, None, "must look like 'infer.py:run'"),
        ({"input": "image", "entrypoint": "nope.py:run"}, True, None, "'nope.py:run' not found"),
        (
            {"input": "image", "series_selection": {"Modality": "CT", "Modalty": "x"}},
            True,
            None,
            "series_selection.Modalty is not a DICOM keyword",
        ),
        (
            {"input": "image", "series_selection": {"min_slices": 0}},
            True,
            None,
            "min_slices must be an integer >= 1",
        ),
        ({"input": "text", "weights": "rules.json"}, False, None, "weights file 'rules.json'"),
        ({"input": "text"}, False, {"version": ""}, "has no 'version'"),
    ],
)
def test_bad_bundles_say_what_is_wrong(
    tmp_path: Path,
    gateway: dict[str, Any] | None,
    weights: bool,
    meta: dict[str, Any] | None,
    message: str,
) -> None:
    root = make_bundle(tmp_path / "b", gateway, weights=weights, meta=meta)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_bundle("m", root)


def test_missing_folder_and_missing_configs(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle folder not found"):
        read_bundle("m", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"configs/metadata\.json not found"):
        read_bundle("m", tmp_path / "empty")
    root = make_bundle(tmp_path / "b", {"input": "text"})
    (root / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle("m", root)


def test_a_text_model_needs_no_weights_file(tmp_path: Path) -> None:
    info = read_bundle("m", make_bundle(tmp_path / "b", {"input": "text"}, weights=False))
    assert info.weights is None and info.weights_sha256 == ""


def test_registry_keeps_good_bundles_and_reports_bad_ones(tmp_path: Path) -> None:
    make_bundle(tmp_path / "good", {"input": "image"})
    models = {
        "good": SimpleNamespace(bundle=Path("good")),
        "bad": SimpleNamespace(bundle=Path("missing")),
    }
    registry = Registry.from_config(models, tmp_path)
    assert [m.name for m in registry] == ["good"]
    assert registry.get("good").version == "1.2.3"
    with pytest.raises(BundleError, match="bundle folder not found"):
        registry.get("bad")
    with pytest.raises(BundleError, match="not configured"):
        registry.get("other")


def test_mask_round_trip_is_exact_and_small() -> None:
    mask = np.zeros((512, 512, 120), dtype=np.uint8)
    mask[100:120, 200:230, 40:50] = 1
    mask[300:310, 300:310, 10:12] = 2
    data = encode_mask(mask)
    assert len(data) < 200_000
    back = decode_mask(data)
    assert back.shape == mask.shape and np.array_equal(back, mask)
    with pytest.raises(ValueError, match="bad magic"):
        decode_mask(b"nonsense")
