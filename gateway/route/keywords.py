"""Which DICOM attributes are kept with each instance for routing.

Only these are read at ingest (pixel data never is) and stored, encrypted, with the
instance; routing a study later reads them from the queue, not from the spool.  The
fixed set covers the usual routing and result-building needs; any other keyword a route
names in its ``dicom:`` conditions is added from the configuration.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import Route
from gateway.route.rules import CALLING_AE

ROUTING_KEYWORDS = (
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesInstanceUID",
    "SeriesNumber",
    "InstanceNumber",
    "StationName",
    "InstitutionName",
    "ProtocolName",
    "AccessionNumber",
    "StudyInstanceUID",  # kept (encrypted) so audit records of transfers can name the study
)


def routing_keywords(routes: Iterable[Route]) -> tuple[str, ...]:
    """:data:`ROUTING_KEYWORDS` plus every DICOM keyword the *routes* test."""
    extra = [
        key
        for route in routes
        for key in (route.when.dicom or {})
        if key != CALLING_AE and key not in ROUTING_KEYWORDS
    ]
    return ROUTING_KEYWORDS + tuple(dict.fromkeys(extra))
