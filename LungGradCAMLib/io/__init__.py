"""Files in and out: DICOM series (read, write), Slicer's DICOM database, DICOM SEG, Slicer .seg.nrrd,
the input resolver, PNG montages. Imports no torch."""
