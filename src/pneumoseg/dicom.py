"""DICOM input and output.

Writing: :func:`write_jpeg_dicom` stores an 8-bit image the way the challenge's files are stored
(Secondary Capture, MONOCHROME2, JPEG Baseline encapsulated). pydicom cannot encode JPEG itself, so Pillow
compresses and ``pydicom.encaps.encapsulate`` wraps the bytes.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

from .io import atomic_path

# The challenge's UIDs all share this root; study, series and instance differ in the digit after it.
UID_ROOT = "1.2.276.0.7230010.3"


@dataclass(frozen=True)
class DicomTags:
    """The tags of a challenge DICOM that competitors used, with the challenge's own conventions."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    sex: str = "M"                  # "M" or "F"
    age: str = "50"                 # a bare number string, as in the challenge's files
    view_position: str = "PA"       # "PA" or "AP"
    pixel_spacing: float = 0.168    # mm; the real files range from 0.139 to 0.194


def write_jpeg_dicom(path: str | os.PathLike, pixels: np.ndarray, tags: DicomTags, quality: int = 95) -> None:
    """Write an 8-bit grey image as a JPEG Baseline DICOM like the challenge's, atomically.

    Args:
        path: the ``.dcm`` file to write; folders are created.
        pixels: HxW uint8 array (MONOCHROME2: 0 is black).
        tags: identity and acquisition tags.
        quality: JPEG quality (the challenge's files look like about 95).
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"pixels must be a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = tags.sop_instance_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = tags.sop_instance_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {tags.view_position}"
    ds.PatientName = tags.patient_id
    ds.PatientID = tags.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = tags.sex
    with warnings.catch_warnings():
        # The challenge stores ages as bare numbers ("50"), which pydicom flags as a non-standard AS value.
        warnings.simplefilter("ignore", UserWarning)
        ds.PatientAge = tags.age
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = tags.view_position
    ds.StudyInstanceUID = tags.study_instance_uid
    ds.SeriesInstanceUID = tags.series_instance_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{tags.pixel_spacing:.3f}", f"{tags.pixel_spacing:.3f}"]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"

    with atomic_path(Path(path)) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
