"""The model runner with real worker processes: a model that works, and models that raise,
hang, eat memory or kill their process.  Each failure is a clear error for that run; the
runner replaces the process and the next run works."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from gateway.errors import Permanent
from gateway.infer.bundles import read_bundle
from gateway.infer.runner import Limits, ModelRunFailed, ModelRunner, RunnerSettings
from gateway.infer.runtime import FilesInput, InputError, TextInput
from tests.ctstudy import write_ct_series

# Every bad behaviour triggers only on a real input (max HU above 0), not on the blank
# warm-up volume, so the process starts and the failure happens inside a run.
ENTRYPOINTS = {
    "bright": """
        import numpy as np

        def run(volume_hu, spacing, *, affine):
            i, j, k = np.unravel_index(int(np.argmax(volume_hu)), volume_hu.shape)
            mask = np.zeros(volume_hu.shape, dtype=np.uint8)
            mask[i, j, k] = 1
            return {
                "findings": [{"finding": "bright spot", "centre_voxel": [i, j, k],
                              "centre_mm": (affine @ np.array([i, j, k, 1.0]))[:3],
                              "probability": np.float32(0.75)}],
                "classification": {"present": True, "probability": 0.75},
                "mask": mask,
            }
    """,
    "boom": """
        def run(volume_hu, spacing, *, affine):
            if volume_hu.max() > 0:
                raise RuntimeError("weights do not fit this network")
            return {"findings": []}
    """,
    "sleepy": """
        import time

        def run(volume_hu, spacing, *, affine):
            if volume_hu.max() > 0:
                time.sleep(60)
            return {"findings": []}
    """,
    "hog": """
        import numpy as np

        def run(volume_hu, spacing, *, affine):
            if volume_hu.max() > 0:
                block = np.ones(3 * 1024**3 // 8)  # 3 GB, far past the 600 MB limit
                return {"findings": [{"n": float(block.sum())}]}
            return {"findings": []}
    """,
    "crash": """
        import os

        def run(volume_hu, spacing, *, affine):
            if volume_hu.max() > 0:
                os._exit(3)
            return {"findings": []}
    """,
}


def write_bundle(root: Path, name: str, code: str) -> Path:
    folder = root / name
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "models" / "model.pt").write_bytes(name.encode())
    (folder / "configs" / "inference.json").write_text("{}")
    (folder / "configs" / "metadata.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": "0.0.1",
                "gateway": {
                    "input": "image",
                    "entrypoint": "infer.py:run",
                    "series_selection": {"Modality": "CT", "min_slices": 4},
                },
            }
        )
    )
    (folder / "infer.py").write_text(textwrap.dedent(code))
    return folder


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], tuple[int, int, int]]:
    volume = np.full((24, 20, 8), -1000.0, dtype=np.float32)
    spot = (5, 13, 6)
    volume[spot] = 300.0
    paths = write_ct_series(volume, (0.8, 0.8, 2.0), tmp_path_factory.mktemp("ct"))
    return paths, spot


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRunner]:
    root = tmp_path_factory.mktemp("bundles")
    models = {n: read_bundle(n, write_bundle(root, n, c)) for n, c in ENTRYPOINTS.items()}
    runner = ModelRunner(models, RunnerSettings(processes=1, torch_threads=1))
    runner.start()
    assert runner.wait_ready(120), "the runner process did not start"
    yield runner
    runner.close()


def files(series: tuple[list[Path], tuple[int, int, int]]) -> FilesInput:
    return FilesInput(tuple(str(p) for p in series[0]))


def run_ok(runner: ModelRunner, series: tuple[list[Path], tuple[int, int, int]]) -> Any:
    return runner.run("bright", files(series), Limits(timeout=60, memory_mb=2048))


def test_a_model_runs_in_its_process_and_positions_are_patient_lps(
    runner: ModelRunner, series: tuple[list[Path], tuple[int, int, int]]
) -> None:
    result = run_ok(runner, series)
    paths, (i, j, k) = series
    (finding,) = result["findings"]
    # write_ct_series: origin (-175, -175, 0), axial, 0.8 mm pixels, 2 mm slices
    assert finding["centre_mm"] == pytest.approx([-175 + 0.8 * i, -175 + 0.8 * j, 2.0 * k])
    assert finding["probability"] == 0.75 and isinstance(finding["probability"], float)
    from pydicom import dcmread

    assert finding["referenced_sop_instance_uid"] == dcmread(paths[k]).SOPInstanceUID
    assert result["mask"].shape == (24, 20, 8) and int(result["mask"].sum()) == 1
    assert result["model"]["name"] == "bright" and len(result["model"]["weights_sha256"]) == 64
    assert result["input"]["series_uid"] == dcmread(paths[0]).SeriesInstanceUID
    assert result["input"]["shape"] == [24, 20, 8]
    assert result["device"] == "cpu"
    assert result["classification"] == {"present": True, "probability": 0.75}


@pytest.mark.parametrize(
    ("model", "limits", "message"),
    [
        ("boom", Limits(60, 2048), "raised RuntimeError: weights do not fit this network"),
        ("sleepy", Limits(3, 2048), "did not finish within its timeout of 3 s"),
        ("hog", Limits(60, 600), "memory limit"),
        ("crash", Limits(60, 2048), "process died (exit code 3)"),
    ],
)
def test_a_failing_model_fails_its_run_and_the_next_run_works(
    runner: ModelRunner,
    series: tuple[list[Path], tuple[int, int, int]],
    model: str,
    limits: Limits,
    message: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(ModelRunFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
        runner.run(model, files(series), limits)
    assert time.monotonic() - started < limits.timeout + 30
    assert run_ok(runner, series)["findings"], "the runner works again after the failure"


def test_wrong_input_is_a_permanent_input_error(
    runner: ModelRunner, tmp_path: Path, series: tuple[list[Path], tuple[int, int, int]]
) -> None:
    with pytest.raises(InputError, match="takes a DICOM series, not text"):
        runner.run("bright", TextInput("No pneumothorax."))
    with pytest.raises(InputError, match="no DICOM instances"):
        runner.run("bright", FilesInput((str(tmp_path / "nothing.txt"),)))
    with pytest.raises(InputError, match="fewer than 4"):
        runner.run("bright", FilesInput(tuple(str(p) for p in series[0][:3])))
    with pytest.raises(Permanent, match="not configured"):
        runner.run("nobody", files(series))
    assert runner.status()["ready"] == 1
