"""A model result (the runner's JSON) as a :class:`ModelRun` for the findings store."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from gateway.store.findings import STATUSES, FindingRecord, Measurement, ModelRun, Status

# measurement keys a model's finding may carry, and their UCUM units; other keys ending in
# one of these suffixes get the unit too (a vector such as centre_mm is a position, not a
# measurement, and is left out)
_UNITS = (("_mm3", "mm3"), ("_ml", "mL"), ("_mm2", "mm2"), ("_mm", "mm"), ("_hu", "[hnsf'U]"))


def finding_record(f: Mapping[str, Any]) -> FindingRecord:
    """One finding of a model result, normalised: a code given as ``{system|scheme, value,
    meaning}`` or as a bare SNOMED CT value (note models); no status is "present" (image
    models report what they found); measurements from the keys with a unit suffix."""
    code = f.get("code")
    if isinstance(code, Mapping):
        scheme = str(code.get("system") or code.get("scheme") or "")
        value = str(code.get("value") or "")
        meaning = str(code.get("meaning") or f.get("meaning") or "")
    else:
        scheme, value, meaning = (
            ("SCT" if code else ""),
            str(code or ""),
            str(f.get("meaning") or ""),
        )
    name = str(f.get("finding") or meaning or value or "finding")
    status: Status = f["status"] if f.get("status") in STATUSES else "present"
    concept = str(f.get("concept") or (f"{scheme}:{value}" if value else name))
    return FindingRecord(
        finding=name,
        concept=concept,
        code_scheme=scheme,
        code_value=value,
        code_meaning=meaning,
        status=status,
        probability=_number(f.get("probability")),
        measurements=_measurements(f),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _measurements(f: Mapping[str, Any]) -> tuple[Measurement, ...]:
    out = []
    for key in sorted(f):
        number = _number(f[key])
        if number is None or key == "probability":
            continue
        for suffix, unit in _UNITS:
            if key.endswith(suffix):
                out.append(Measurement(key, number, unit))
                break
    return tuple(out)


def model_run(
    result: Mapping[str, Any],
    *,
    run_id: str,
    kind: Literal["dicom", "hl7"],
    subject: str,
    model: str,
    inferred_at: float,
    study_key: str | None = None,
    accession_ref: str | None = None,
    modality: str = "",
    body_part: str = "",
    route: str = "",
    report_status: str = "",
    received_at: float | None = None,
    complete_at: float | None = None,
) -> ModelRun:
    """The findings-store row of one model *result* (as :mod:`gateway.infer.runtime`
    returns it: ``findings``, ``model`` identity, ``concepts`` looked for, ``input``)."""
    identity = result.get("model") or {}
    given = result.get("input") or {}
    findings = tuple(
        finding_record(f) for f in result.get("findings") or [] if isinstance(f, Mapping)
    )
    looked_for = [str(c) for c in result.get("concepts") or [] if c]
    return ModelRun(
        id=run_id,
        kind=kind,
        subject=subject,
        study_key=study_key,
        accession_ref=accession_ref,
        modality=str(given.get("modality") or modality or ""),
        body_part=body_part,
        model=model,
        model_version=str(identity.get("version") or ""),
        weights_sha256=str(identity.get("weights_sha256") or ""),
        route=route,
        report_status=report_status,
        received_at=received_at,
        complete_at=complete_at,
        inferred_at=inferred_at,
        concepts=tuple(sorted({*looked_for, *(f.concept for f in findings)})),
        findings=findings,
    )
