"""Predict a folder of new chest X-rays (DICOM, PNG, JPEG; no labels): predictions.csv, masks, overlays, DICOM SEG
and a review page; the same as ``pneumoseg predict`` (see pneumoseg.inference.folder)."""

import sys

from pneumoseg.inference.folder import main

if __name__ == "__main__":
    sys.exit(main())
