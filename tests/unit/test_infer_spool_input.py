"""The runner's view of a stored study: instances in spool files and instances kept sealed
in their queue rows (small ones) are read alike (Store.study_instances -> SpoolInput)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from gateway.errors import IntegrityError
from gateway.infer.runtime import SpoolInput, read_series
from gateway.store.spool import INLINE_MAX_BYTES
from gateway.store.store import Store
from tests.dicomgen import SeriesSpec, make_study


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Store, str, list[Path]]:
    """One study: 5 MR 64 x 64 (kept in rows) and 3 CT 192 x 192 (spool files)."""
    paths = make_study(
        tmp_path / "study",
        series=[
            SeriesSpec("MR", count=5, rows=64, cols=64),
            SeriesSpec("CT", count=3, rows=192, cols=192),
        ],
    )
    store = Store(tmp_path / "var", tmp_path / "var" / "keys.json")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.ingest_instance(
            path.read_bytes(),
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            attrs={"Modality": ds.Modality},
            source="PACS@127.0.0.1",
            quiet=1.0,
        )
    study_key = store.keys.index("study", str(ds.StudyInstanceUID))
    return store, study_key, paths


def test_small_instances_are_rows_and_large_ones_spool_files(
    stored: tuple[Store, str, list[Path]],
) -> None:
    store, study_key, paths = stored
    spool_keys, in_rows = store.study_instances(study_key)
    sizes = sorted(p.stat().st_size for p in paths)
    assert sizes[4] <= INLINE_MAX_BYTES < sizes[5]  # the data are what the test needs
    assert (len(spool_keys), len(in_rows)) == (3, 5)
    # what a row holds is sealed: no plaintext UID in it
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID).encode()
    assert all(uid not in sealed for _, sealed in in_rows)
    store.close()


@pytest.mark.parametrize(("modality", "slices", "shape"), [("MR", 5, 64), ("CT", 3, 192)])
def test_the_runner_reads_either_kind_into_a_volume(
    stored: tuple[Store, str, list[Path]], modality: str, slices: int, shape: int
) -> None:
    store, study_key, _ = stored
    spool_keys, in_rows = store.study_instances(study_key)
    model_input = SpoolInput(
        str(store.spool.root), str(store.keys.path), spool_keys, inline=in_rows
    )
    series = read_series(model_input, {"Modality": modality, "min_slices": 1})
    assert len(series.datasets) == slices
    assert sorted(series.volume.array.shape) == sorted((shape, shape, slices))
    store.close()


def test_a_row_blob_moved_to_another_envelope_does_not_open(
    stored: tuple[Store, str, list[Path]],
) -> None:
    store, study_key, _ = stored
    _, in_rows = store.study_instances(study_key)
    (_, blob), (second, _) = in_rows[0], in_rows[1]
    swapped = ((second, blob),)
    model_input = SpoolInput(str(store.spool.root), str(store.keys.path), (), inline=swapped)
    with pytest.raises(IntegrityError, match="moved from another object"):
        read_series(model_input, {"Modality": "MR", "min_slices": 1})
    store.close()
