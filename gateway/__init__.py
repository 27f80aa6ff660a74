"""DICOM/HL7 integration gateway for hospital AI."""

__version__ = "0.1.0"
