"""Result builders: model results -> DICOM SR and SEG (highdicom), HL7 ORU^R01 (hl7apy)."""
