"""Files to volumes and back: NRRD/NIfTI/MHA, DICOM series reading, derived DICOM series export."""
