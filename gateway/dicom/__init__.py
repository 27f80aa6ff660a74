"""DICOM encoding, read without the rest of the gateway: the Part-10 walker
(:mod:`gateway.dicom.part10`) and the one header reader (:mod:`gateway.dicom.header`).

Imports only :mod:`gateway.errors`, pydicom and the standard library, so every edge
(ingest, routing, delivery, the image input) can use it without importing another.
"""
