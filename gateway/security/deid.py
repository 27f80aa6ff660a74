"""De-identification for models that must not see who the patient is.

A model configured with ``deidentify: true`` gets:

- **images** de-identified with the DICOM PS3.15 Annex E *Basic Application Level
  Confidentiality Profile* (:func:`deidentify_dataset`).  The attribute table is the
  standard's Table E.1-1 as shipped by ``dicom-anonymizer`` (the 2026c edition); the
  actions are applied here, recursively into every sequence:

  ====== ===========================================================================
  table  what the gateway does
  ====== ===========================================================================
  D      a dummy value of the attribute's VR (``ANONYMIZED``, ``19000101``, ``0`` …)
  Z      an empty value (Z/D, X/Z and X/Z/D too: the attribute stays, empty)
  X      removed (X/D too)
  U      a new UID, the same for the same original UID throughout one run
  X/Z/U* a sequence is cleaned item by item with the same table; a UID is replaced
  K      kept (sequences are still cleaned)
  ====== ===========================================================================

  Private attributes are removed.  Beyond the profile, every date, time and date-time
  still left is emptied, so no date reaches the model.  An instance whose
  ``BurnedInAnnotation`` is ``YES`` is refused: the basic profile does not clean pixels.
  ``PatientIdentityRemoved`` (YES) and ``DeidentificationMethod`` record what was done.

- **report text** scrubbed (:func:`deidentify_text`) of the identifiers the message itself
  carries (names, IDs, birth date, addresses, phone numbers, order and visit numbers,
  provider names) and of anything shaped like a date, a long number, a phone number, an
  e-mail address or an honorific followed by a name.

New UIDs are ``2.25.`` + 128 bits of HMAC-SHA256 of the original under a secret made
fresh for each run, so the same study sent twice gets different pseudonyms and a model's
vendor cannot link runs.  The way back (pseudonym → original, :attr:`Pseudonymizer.
crosswalk`) is kept by the gateway, encrypted in the spool, and :func:`reidentify` puts
the original UIDs back into the model's result before anything is built or sent.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

PROFILE = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
METHOD = "PS3.15 E.1 Basic Profile; all dates removed"  # an LO: 64 characters at most
TABLE_EDITION = "dicomfields_2026c"  # dicom-anonymizer's copy of PS3.15 Table E.1-1

# What the gateway does for each of the table's action groups (see the module docstring).
_ACTION_OF_GROUP = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z",
    "X_Z_TAGS": "Z",
    "X_D_TAGS": "X",
    "X_Z_D_TAGS": "Z",
    "X_Z_U_STAR_TAGS": "U*",
}

_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000"}
_TEXT_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "UL", "US", "SV", "UV"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})


class DeidentificationError(ValueError):
    """An object the profile cannot make safe (burned-in annotation)."""


@functools.cache
def _table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """The profile's actions by tag, and the repeating-group entries (curves, overlays)
    as (group, element, group mask, element mask, action)."""
    groups = dicom_anonymization_database_selector(TABLE_EDITION)
    by_tag: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for group, action in _ACTION_OF_GROUP.items():
        for entry in groups[group]:
            if len(entry) == 2:
                by_tag[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return by_tag, tuple(masked)


def _action(tag: int) -> str | None:
    by_tag, masked = _table()
    found = by_tag.get(tag)
    if found is not None:
        return found
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gmask, emask, action in masked:
        if group & gmask == g & gmask and element & emask == e & emask:
            return action
    return None


class Pseudonymizer:
    """New UIDs for one run, consistent within it, and the way back."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else os.urandom(32)
        #: pseudonym → original UID
        self.crosswalk: dict[str, str] = {}

    def uid(self, original: str) -> str:
        original = str(original).strip()
        if not original:
            return original
        digest = hmac.new(self._secret, original.encode(), hashlib.sha256).digest()
        pseudonym = f"2.25.{int.from_bytes(digest[:16], 'big')}"
        self.crosswalk[pseudonym] = original
        return pseudonym


def deidentify_dataset(ds: Dataset, pseudonyms: Pseudonymizer) -> Dataset:
    """Apply the basic profile to *ds* in place (and to its file meta); returns *ds*.

    Raises :class:`DeidentificationError` for an instance with burned-in annotation.
    """
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DeidentificationError(
            "an instance has burned-in annotation (BurnedInAnnotation YES), which the basic "
            "profile cannot remove; a de-identifying model is not given it"
        )
    _clean(ds, pseudonyms)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = pseudonyms.uid(meta.MediaStorageSOPInstanceUID)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    return ds


def _clean(ds: Dataset, pseudonyms: Pseudonymizer) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            continue
        elem = ds[tag]  # a raw element becomes a DataElement here
        action = _action(int(tag))
        if action == "X":
            del ds[tag]
        elif action == "Z":
            _empty(elem)
        elif action == "D":
            _dummy(elem)
        elif action in ("U", "U*") and elem.VR == "UI":
            _replace_uids(elem, pseudonyms)
        elif elem.VR == "SQ":  # K, U* and attributes outside the table: clean each item
            for item in elem.value or []:
                _clean(item, pseudonyms)
        elif action in ("U", "U*") or elem.VR in _TEMPORAL_VRS:
            # a UID attribute not encoded as UI (e.g. UN) cannot be replaced: emptied;
            # and, beyond the profile, no date or time is kept
            _empty(elem)


def _replace_uids(elem: DataElement, pseudonyms: Pseudonymizer) -> None:
    if elem.value is None or elem.value == "":
        return
    if isinstance(elem.value, MultiValue | list):
        elem.value = [pseudonyms.uid(v) for v in elem.value]
    else:
        elem.value = pseudonyms.uid(elem.value)


def _empty(elem: DataElement) -> None:
    if elem.VR == "SQ":
        elem.value = Sequence([])
    elif elem.VR in _BYTES_VRS:
        elem.value = b""
    else:
        elem.value = None


def _dummy(elem: DataElement) -> None:
    vr = elem.VR
    if vr in _TEXT_VRS:
        elem.value = _DUMMY_TEXT
    elif vr in _DUMMY:
        elem.value = _DUMMY[vr]
    elif vr in ("DS", "IS"):
        elem.value = "0"
    elif vr in _NUMBER_VRS:
        elem.value = 0
    else:  # SQ, bytes, UI with a D action: nothing to stand in for it
        _empty(elem)


def reidentify(value: Any, crosswalk: Mapping[str, str]) -> Any:
    """*value* (a model result: dicts, lists, strings) with every pseudonymous UID put back."""
    if isinstance(value, str):
        return crosswalk.get(value, value)
    if isinstance(value, dict):
        return {k: reidentify(v, crosswalk) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [reidentify(v, crosswalk) for v in value]
    return value


# --- report text -----------------------------------------------------------------------

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("[CONTACT]", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("[DATE]", re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?)?\b")),
    ("[DATE]", re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b")),
    ("[DATE]", re.compile(r"\b(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d*\b")),
    (
        "[DATE]",
        re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\.?,?\s+\d{{4}}\b", re.IGNORECASE),
    ),
    (
        "[DATE]",
        re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", re.IGNORECASE),
    ),
    ("[CONTACT]", re.compile(r"(?:\+\d{1,3}[\s-]?)?\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b")),
    ("[ID]", re.compile(r"\b[A-Z]{0,4}\d[\d-]{4,}\d\b", re.IGNORECASE)),
    (
        "[NAME]",
        re.compile(
            r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof|Doctor)\.?\s+[A-Z][A-Za-z'-]+(?:\s+[A-Z][A-Za-z'-]+)?"
        ),
    ),
)


def deidentify_text(text: str, identifiers: Iterable[tuple[str, str]] = ()) -> str:
    """*text* with the given identifiers and identifier-shaped strings replaced by
    placeholders (``[NAME]``, ``[ID]``, ``[DATE]``, ``[CONTACT]``).

    *identifiers* are ``(placeholder, value)`` pairs the message itself names (see
    :func:`gateway.infer.text.identifiers_from_hl7`); they are matched as whole words,
    ignoring case, longest first.  Over-scrubbing is the safe direction: a surname that is
    also an English word is replaced wherever it appears.
    """
    known = sorted(
        {(p, v.strip()) for p, v in identifiers if len(v.strip()) >= 2},
        key=lambda pv: -len(pv[1]),
    )
    for placeholder, value in known:
        pattern = re.compile(rf"(?<!\w){re.escape(value)}(?!\w)", re.IGNORECASE)
        text = pattern.sub(placeholder, text)
    for placeholder, pattern in _PATTERNS:
        text = pattern.sub(placeholder, text)
    return text
