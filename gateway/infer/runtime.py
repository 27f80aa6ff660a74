"""Loading and running one model: what happens inside a runner process (or `models run`).

Imports torch and monai, so only the runner's worker processes and the ``gateway models``
command import it; the network side of the gateway never does.

How a bundle is run, by its ``gateway`` section (see :mod:`gateway.infer.bundles`):

- **image, with ``entrypoint``** (``"infer.py:run"``): the function is called as
  ``run(volume_hu, spacing, *, affine=..., [threads=...], [device=...], [datasets=...])``
  with the selected series as a float32 volume indexed ``[column, row, slice]``, its
  spacing in mm and its voxel-to-patient (LPS, mm) affine; ``datasets`` (asked for by
  naming it) are the series' pydicom datasets, de-identified when the model's config says
  ``deidentify: true`` (:mod:`gateway.security.deid`).  It returns ``{"findings": [...],
  "classification": {...} | None, "mask": uint8 array | None}``.
- **image, without ``entrypoint``**: the MONAI Model Zoo layout (``network_def``,
  ``preprocessing``, ``inferer``, ``postprocessing`` in ``inference.json``) is run on the
  volume by :mod:`gateway.infer.segmentation`; labels become findings through
  ``gateway.outputs.labels``.
- **text**: ``entrypoint`` is called with the report text, or else the config's
  ``inferer`` item (a callable) is; either returns the findings list.

The input is read here too (decrypting spool objects when the runner gives spool keys), so
the gateway process never holds a decoded volume.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.dicom.header import read_dataset
from gateway.errors import MalformedInput, Permanent
from gateway.infer.bundles import ModelInfo
from gateway.infer.image import (
    NoSeriesMatch,
    SeriesRules,
    VolumeError,
    build_volume,
    dataset_from_bytes,
    nearest_slice,
    select_series,
)
from gateway.security.crypto import KeyStore, Sealer
from gateway.security.deid import (
    PROFILE,
    DeidentificationError,
    Pseudonymizer,
    deidentify_dataset,
)
from gateway.store.spool import Spool, row_context

# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class FilesInput:
    """DICOM files on disk (``gateway models run``)."""

    paths: tuple[str, ...]
    deidentify: bool = False


@dataclass(frozen=True)
class SpoolInput:
    """Instances in the gateway's encrypted spool, read inside the runner process."""

    spool_dir: str
    key_file: str
    keys: tuple[str, ...]
    deidentify: bool = False  # the basic profile before the model sees the series
    # small instances kept sealed in their queue rows: (envelope id, sealed bytes)
    inline: tuple[tuple[str, bytes], ...] = ()


ModelInput = TextInput | FilesInput | SpoolInput


class InputError(Permanent):
    """The input does not suit the model (no matching series, a volume that cannot be
    built, no report text); running it again cannot help."""


# --- loading ---------------------------------------------------------------------------


class LoadedModel:
    """A model ready to run: weights loaded once, called per input."""

    def __init__(self, info: ModelInfo, call: Callable[..., Any], device: str) -> None:
        self.info = info
        self._call = call
        self.device = device
        params = _parameters(call)
        self._kwargs = {k for k in ("threads", "device", "datasets") if k in params}

    def run(self, model_input: ModelInput, *, threads: int | None = None) -> dict[str, Any]:
        started = time.monotonic()
        if self.info.input == "text":
            if not isinstance(model_input, TextInput):
                raise InputError(f"model '{self.info.name}' takes report text, not images")
            if not model_input.text.strip():
                raise InputError("the message holds no report text (no OBX TX/FT/ST values)")
            findings = list(self._call(model_input.text))
            result: dict[str, Any] = {
                "findings": [_jsonable(f) for f in findings],
                "classification": None,
                "input": {"kind": "text", "characters": len(model_input.text)},
                "mask": None,
            }
        else:
            if isinstance(model_input, TextInput):
                raise InputError(f"model '{self.info.name}' takes a DICOM series, not text")
            series = read_series(model_input, self.info.series_selection)
            volume = series.volume
            extra: dict[str, Any] = {}
            if "threads" in self._kwargs and threads:
                extra["threads"] = threads
            if "device" in self._kwargs:
                extra["device"] = self.device
            if "datasets" in self._kwargs:
                extra["datasets"] = series.datasets
            out = self._call(volume.array, volume.spacing, affine=volume.affine, **extra)
            result = image_result(out, volume)
            if series.crosswalk is not None:
                # pseudonym -> original UID: the gateway keeps it apart, encrypted, and
                # re-identifies the result with it before anything is built or sent
                result["input"]["deidentified"] = PROFILE
                result["crosswalk"] = series.crosswalk
            concept = self.info.outputs.get("classification")
            if result["classification"] and isinstance(concept, dict):
                # what the study-level class means, coded, for the result builders
                result["classification"] = {
                    "finding": concept.get("finding"),
                    "code": concept.get("code"),
                    **result["classification"],
                }
        concepts = self.info.concepts
        for f in result["findings"]:
            if isinstance(f, dict) and "concept" not in f:
                f["concept"] = concepts.get(str(f.get("finding")), "")
        result["concepts"] = sorted(set(concepts.values()))  # what the model looks for
        result["model"] = self.info.identity
        result["device"] = self.device
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    def warm_up(self) -> None:
        """One run on a small blank input, so the first real run pays no start-up cost."""
        if self.info.input == "text":
            self._call("No acute abnormality.")
            return
        extra: dict[str, Any] = {"device": self.device} if "device" in self._kwargs else {}
        blank = np.full((96, 96, 48), -1000.0, dtype=np.float32)
        self._call(blank, (1.5, 1.5, 1.5), affine=np.diag([1.5, 1.5, 1.5, 1.0]), **extra)


def warm_up(model: LoadedModel) -> None:
    model.warm_up()


def pick_device(setting: str = "auto") -> str:
    import torch  # heavy and optional: imported only where a model is loaded

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise Permanent(f"device '{setting}' was asked for, but torch sees no GPU")
    return setting


def load_model(info: ModelInfo, device: str = "cpu") -> LoadedModel:
    """Load a bundle's code and weights from its folder (nothing is downloaded)."""
    if info.entrypoint is not None:
        return LoadedModel(info, _entrypoint(info), device)
    if info.input == "text":
        return LoadedModel(info, _config_item(info, "inferer"), device)
    from gateway.infer.segmentation import SegmentationBundle  # imports torch: only here

    return LoadedModel(info, SegmentationBundle(info, device), device)


def _entrypoint(info: ModelInfo) -> Callable[..., Any]:
    assert info.entrypoint is not None
    file, func = info.entrypoint.split(":")
    path = info.root / file
    # a module name of its own per bundle, so two bundles' infer.py never collide
    module_name = f"gateway_bundle_{info.name.replace('-', '_')}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise Permanent(f"model '{info.name}': cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    call = getattr(module, func, None)
    if not callable(call):
        raise Permanent(f"model '{info.name}': {file} has no function {func}()")
    return call  # type: ignore[no-any-return]


def _config_item(info: ModelInfo, item: str) -> Callable[..., Any]:
    """An item of ``inference.json``, parsed with the bundle folder on sys.path (the Model
    Zoo convention for a bundle's own code)."""
    from monai.bundle.config_parser import ConfigParser  # heavy and optional: only here

    parser = ConfigParser()
    parser.read_config(str(info.root / "configs" / "inference.json"))
    parser["bundle_root"] = str(info.root)
    sys.path.insert(0, str(info.root))
    try:
        value = parser.get_parsed_content(item)
    finally:
        sys.path.remove(str(info.root))
    if not callable(value):
        raise Permanent(f"model '{info.name}': inference.json item '{item}' is not callable")
    return value  # type: ignore[no-any-return]


def _parameters(call: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(call).parameters)
    except (TypeError, ValueError):
        return set()


# --- image input -----------------------------------------------------------------------


def _datasets(model_input: FilesInput | SpoolInput) -> tuple[list[Any], Callable[[Any], Any]]:
    """Headers of every instance, and a function that reads one of them in full."""
    if isinstance(model_input, FilesInput):
        headers: list[Any] = []
        for p in model_input.paths:
            try:
                headers.append(read_dataset(Path(p)))
            except MalformedInput:  # not DICOM: skipped, like any DICOM folder reader does
                continue

        def full(h: Any) -> Any:
            return read_dataset(Path(h.filename), pixels=True)

        return headers, full

    keys = KeyStore.open(Path(model_input.key_file), create=False)
    sealer = Sealer(keys)
    spool = Spool(Path(model_input.spool_dir), sealer, pool=False)  # reads only
    inline = dict(model_input.inline)

    def instance(ref: str) -> bytes:
        """A spool key's instance, or an envelope id's kept in its row."""
        sealed = inline.get(ref)
        return spool.get(ref) if sealed is None else sealer.open(sealed, row_context(ref))

    by_uid: dict[str, str] = {}
    headers = []
    for ref in (*model_input.keys, *inline):
        h = dataset_from_bytes(instance(ref), headers_only=True)
        by_uid[str(h.SOPInstanceUID)] = ref
        headers.append(h)

    def full_from_spool(h: Any) -> Any:
        return dataset_from_bytes(instance(by_uid[str(h.SOPInstanceUID)]))

    return headers, full_from_spool


@dataclass
class Series:
    """The series a model gets: its volume, its datasets, and, when it was de-identified,
    the crosswalk from pseudonymous UIDs back to the originals."""

    volume: Any
    datasets: list[Any]
    crosswalk: dict[str, str] | None = None


def read_series(model_input: FilesInput | SpoolInput, selection: dict[str, Any]) -> Series:
    """Select the series the model wants and build its volume (see gateway.infer.image).

    The selection runs on the original headers (the gateway's own code); with
    ``deidentify`` the chosen instances are then de-identified before the volume is built,
    so nothing the model is given carries the patient's identity.
    """
    headers, full = _datasets(model_input)
    if not headers:
        raise InputError("no DICOM instances in the input")
    try:
        chosen = select_series(headers, SeriesRules.from_dict(selection))
        datasets = [full(h) for h in chosen.instances]
        crosswalk = None
        if model_input.deidentify:
            pseudonyms = Pseudonymizer()
            datasets = [deidentify_dataset(ds, pseudonyms) for ds in datasets]
            crosswalk = pseudonyms.crosswalk
        return Series(build_volume(datasets), datasets, crosswalk)
    except (NoSeriesMatch, VolumeError, DeidentificationError) as exc:
        raise InputError(str(exc)) from None


def image_result(out: dict[str, Any], volume: Any) -> dict[str, Any]:
    """The model's output plus where it came from: each finding gets the source image
    nearest to its centre, and the result says which series and frame it was made on."""
    findings = []
    for f in out.get("findings") or []:
        f = dict(f)
        centre = f.get("centre_voxel")
        if centre is not None and len(centre) == 3:
            f["referenced_sop_instance_uid"] = nearest_slice(volume, float(centre[2]))
        findings.append(_jsonable(f))
    mask = out.get("mask")
    if mask is not None:
        mask = np.asarray(mask, dtype=np.uint8)
    return {
        "findings": findings,
        "classification": _jsonable(out.get("classification")),
        "input": {
            "kind": "image",
            "study_uid": volume.study_uid,
            "series_uid": volume.series_uid,
            "frame_of_reference_uid": volume.frame_of_reference_uid,
            "modality": volume.modality,
            "sop_instance_uids": list(volume.sop_instance_uids),
            "shape": [int(s) for s in volume.array.shape],
            "spacing": [float(s) for s in volume.spacing],
            "affine": np.asarray(volume.affine, dtype=float).tolist(),
        },
        "mask": mask,
    }


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays (and tuples) to plain JSON types; NaN to None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summarize(result: dict[str, Any]) -> Sequence[str]:
    """Human lines for ``gateway models run``: one per finding (no patient data)."""
    lines = []
    for f in result.get("findings", []):
        if "status" in f:
            lines.append(f"{f.get('finding')}: {f.get('status')} (SCT {f.get('code')})")
        else:
            parts = [str(f.get("finding", "finding"))]
            if f.get("centre_mm") is not None:
                parts.append("at (" + ", ".join(f"{v:.1f}" for v in f["centre_mm"]) + ") mm")
            if f.get("diameter_mm") is not None:
                parts.append(f"diameter {f['diameter_mm']:.1f} mm")
            if f.get("volume_mm3") is not None:
                parts.append(f"volume {f['volume_mm3']:.0f} mm3")
            if f.get("probability") is not None:
                parts.append(f"p={f['probability']:.2f}")
            lines.append(", ".join(parts))
    cls = result.get("classification")
    if cls:
        lines.append(
            "classification: "
            + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in cls.items()
            )
        )
    return lines
