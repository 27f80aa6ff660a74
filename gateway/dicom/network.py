"""What both DICOM network edges share: the status codes they send or read (PS3.4 Annex
B.2.3 and PS3.7 Annex C) and the one pynetdicom tuning knob they both set.

:mod:`gateway.ingest.dicom_scp` answers with these codes; :mod:`gateway.deliver.dicom_scu`
reads a peer's answer against them.
"""

from __future__ import annotations

# Status codes (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
MISSING_IDENTIFIER = 0xC211
PROCESSING_FAILURE = 0xC212
# The pixel data cannot be the image its attributes describe (shorter than Rows x Columns
# x ... need, or encapsulated without a fragment).  A "cannot understand" code of its own
# (0xC000-0xCFFF, PS3.4 B.2.3), not 0xA900: the data set has the attributes its SOP class
# asks for, it is their value that cannot be right; and not 0xC210, so that a sender's log
# tells a cut image from a broken encoding.
PIXEL_DATA_MISMATCH = 0xC213

# pynetdicom's DUL thread sleeps this long whenever its event queue is empty (default
# 1 ms), which adds up to a millisecond to every C-STORE round trip. pynetdicom has no
# setting for it; `assoc.dul._run_loop_delay` is the documented latency/idle-CPU trade-off
# knob (pynetdicom issue #650). 0.5 ms measured 0.86 s -> 0.70 s for 300 CT instances on
# one association, at ~2000 idle wake-ups/s.
DUL_POLL_SECONDS = 0.0005
