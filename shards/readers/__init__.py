"""Format readers: DICOM, NIfTI, WFDB/EDF signals, image indexes and MEDS event tables -> readers.base.Record."""
