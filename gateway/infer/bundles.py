"""Model bundles and the registry: what a model is, read from its folder without torch.

A model is a MONAI bundle folder::

    configs/metadata.json     name, version, ... and the gateway's own section "gateway"
    configs/inference.json    monai.bundle ConfigParser config
    models/model.pt | model.ts

The ``gateway`` section of ``metadata.json`` says what the gateway needs to know::

    "gateway": {
      "input": "image" | "text",
      "series_selection": {"Modality": "CT", "min_slices": 20},   # image models
      "entrypoint": "infer.py:run",        # optional, see runtime.py
      "weights": "models/model.pt",        # optional: the file whose sha256 is the identity
      "outputs": {"labels": {"1": {"finding": ..., "code": {...}}}, ...}   # image models
      "findings": {...}                    # text models: finding -> code
    }

This module only reads JSON and hashes files, so ``check-config`` and ``models list`` stay
fast and never import torch.  Loading and running happens in :mod:`gateway.infer.runtime`,
inside the runner's worker processes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydicom.datadict import tag_for_keyword

from gateway.errors import Permanent

INPUT_KINDS = ("image", "text")
_WEIGHT_CANDIDATES = ("models/model.ts", "models/model.pt")
_ENTRYPOINT = re.compile(r"^[\w./-]+\.py:[A-Za-z_]\w*$")


class BundleError(Permanent):
    """The model bundle is missing or invalid."""


@dataclass(frozen=True)
class ModelInfo:
    """A bundle as the gateway sees it; everything here is plain data (picklable)."""

    name: str  # the name in the gateway config (routes refer to it)
    root: Path
    bundle_name: str  # metadata "name"
    version: str
    input: Literal["image", "text"]
    weights: Path | None
    weights_sha256: str
    entrypoint: str | None = None
    series_selection: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    findings: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def concepts(self) -> dict[str, str]:
        """What each finding is compared by with other models' findings (AI against the
        report): the finding's ``concept`` in the metadata, else its code as
        ``SCHEME:VALUE``; keyed by finding name (and, for image labels, code value)."""
        out: dict[str, str] = {}
        if self.input == "image":
            labels = self.outputs.get("labels") or {}
            for label in labels.values() if isinstance(labels, dict) else ():
                if not isinstance(label, dict):
                    continue
                given = label.get("code")
                code: dict[str, Any] = given if isinstance(given, dict) else {}
                value = str(code.get("value") or "")
                concept = str(
                    label.get("concept")
                    or (f"{code.get('system', 'SCT')}:{value}" if value else "")
                    or label.get("finding", "")
                )
                if label.get("finding"):
                    out[str(label["finding"])] = concept
                if value:
                    out[value] = concept
        else:
            for name, entry in self.findings.items():
                entry = entry if isinstance(entry, dict) else {}
                snomed = str(entry.get("snomed") or "")
                out[str(name)] = str(entry.get("concept") or (f"SCT:{snomed}" if snomed else name))
        return out

    @property
    def identity(self) -> dict[str, str]:
        """Recorded with every result: which model, which version, which weights."""
        return {
            "name": self.name,
            "bundle": self.bundle_name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_bundle(name: str, root: Path, *, hash_weights: bool = True) -> ModelInfo:
    """Read and check one bundle folder; :class:`BundleError` says precisely what is wrong."""
    root = root.resolve()
    where = f"model '{name}' ({root})"
    if not root.is_dir():
        raise BundleError(f"{where}: bundle folder not found")
    meta_path = root / "configs" / "metadata.json"
    if not meta_path.is_file():
        raise BundleError(f"{where}: configs/metadata.json not found; is this a MONAI bundle?")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: configs/metadata.json is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: configs/metadata.json must hold a JSON object")
    if not (root / "configs" / "inference.json").is_file():
        raise BundleError(f"{where}: configs/inference.json not found")
    section = meta.get("gateway")
    if not isinstance(section, dict):
        raise BundleError(
            f"{where}: metadata.json has no 'gateway' section; add at least "
            '"gateway": {"input": "image"} (see docs/models.md)'
        )
    kind = section.get("input")
    if kind not in INPUT_KINDS:
        raise BundleError(
            f"{where}: metadata.json gateway.input must be 'image' or 'text', not {kind!r}"
        )
    entrypoint = section.get("entrypoint")
    if entrypoint is not None:
        if not isinstance(entrypoint, str) or not _ENTRYPOINT.match(entrypoint):
            raise BundleError(
                f"{where}: gateway.entrypoint must look like 'infer.py:run' (a file in the "
                f"bundle and a function in it), not {entrypoint!r}"
            )
        if not (root / entrypoint.split(":")[0]).is_file():
            raise BundleError(f"{where}: gateway.entrypoint file {entrypoint!r} not found")
    selection = section.get("series_selection", {})
    if kind == "image":
        _check_selection(where, selection)
    weights = _weights(where, root, section, kind)
    version = str(meta.get("version", "")).strip()
    if not version:
        raise BundleError(f"{where}: metadata.json has no 'version'")
    return ModelInfo(
        name=name,
        root=root,
        bundle_name=str(meta.get("name") or root.name),
        version=version,
        input=kind,
        weights=weights,
        weights_sha256=sha256_file(weights) if weights is not None and hash_weights else "",
        entrypoint=entrypoint,
        series_selection=dict(selection) if isinstance(selection, dict) else {},
        outputs=dict(section.get("outputs") or {}),
        findings=dict(section.get("findings") or {}),
        description=str(meta.get("task") or meta.get("description") or ""),
    )


def _check_selection(where: str, selection: Any) -> None:
    if not isinstance(selection, dict):
        raise BundleError(f"{where}: gateway.series_selection must be an object")
    for key, value in selection.items():
        if key == "min_slices":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BundleError(f"{where}: series_selection.min_slices must be an integer >= 1")
        elif tag_for_keyword(key) is None:
            raise BundleError(f"{where}: series_selection.{key} is not a DICOM keyword")


def _weights(where: str, root: Path, section: Mapping[str, Any], kind: str) -> Path | None:
    named = section.get("weights") or section.get("rules")
    if named is not None:
        path = root / str(named)
        if not path.is_file():
            raise BundleError(f"{where}: weights file '{named}' not found")
        return path
    for candidate in _WEIGHT_CANDIDATES:
        if (root / candidate).is_file():
            return root / candidate
    if kind == "image":
        raise BundleError(
            f"{where}: no weights: expected models/model.pt or models/model.ts (or name the "
            "file in gateway.weights)"
        )
    return None  # a text model may have no file besides its configs


class Registry:
    """The configured models, read once; ``problems`` holds the bundles that failed to read,
    so one broken bundle does not stop the gateway from running the others."""

    def __init__(self, models: Mapping[str, ModelInfo], problems: Mapping[str, str]) -> None:
        self.models = dict(models)
        self.problems = dict(problems)

    @classmethod
    def from_config(cls, models: Mapping[str, Any], base: Path) -> Registry:
        """*models* is the config's ``models`` mapping (name -> object with ``bundle``);
        relative bundle paths are taken from *base* (the config file's folder)."""
        found: dict[str, ModelInfo] = {}
        problems: dict[str, str] = {}
        for name, entry in models.items():
            bundle = Path(entry.bundle)
            root = bundle if bundle.is_absolute() else base / bundle
            try:
                found[name] = read_bundle(name, root)
            except BundleError as exc:
                problems[name] = exc.message
        return cls(found, problems)

    def get(self, name: str) -> ModelInfo:
        if name in self.models:
            return self.models[name]
        if name in self.problems:
            raise BundleError(self.problems[name])
        raise BundleError(f"model '{name}' is not configured")

    def __iter__(self) -> Any:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)
