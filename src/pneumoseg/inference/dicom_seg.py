"""A prediction as a DICOM Segmentation (SEG) object, which a PACS or a DICOM viewer shows over its source image.

One binary segment, "Pneumothorax" (SNOMED CT 36118008), made by highdicom from the source's header: the SEG
carries the patient and study of the source and references its series and SOP instance, so a viewer lays it over
the right image. Its UIDs are derived from the source's and the model's version, so a rerun (or a resumed run)
writes the same UIDs, and every SEG of one source series falls into one SEG series.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pneumoseg import __version__
from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path

SEGMENT_LABEL = "Pneumothorax"
SERIES_NUMBER = 9100
"""The SEG series' number: high, so that viewers list it after the source's own series."""
_PNEUMOTHORAX = hd.sr.CodedConcept("36118008", "SCT", "Pneumothorax")
_MORPHOLOGY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
_AI = hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence")


def make_segmentation(header: Dataset, mask: np.ndarray, model_name: str, model_version: str) -> hd.seg.Segmentation:
    """The SEG of one prediction.

    Args:
        header: the source DICOM's dataset (its pixel data is not needed).
        mask: the bool rows x cols mask, at the source's size.
        model_name, model_version: the model, recorded as the segmentation algorithm.
    """
    source = copy.copy(header)
    # highdicom 0.28 copies PixelSpacing into a Pixel Measures Sequence without the SliceThickness its own reader
    # requires, so such a SEG would not read back; a projection image has no slice thickness to give it, and the
    # SEG's geometry is its source's, which it references.
    for keyword in ("PixelSpacing", "PixelData"):
        if keyword in source:
            delattr(source, keyword)
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version, family=_AI)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=_MORPHOLOGY,
        segmented_property_type=_PNEUMOTHORAX,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    sop_uid = str(header.SOPInstanceUID)
    with warnings.catch_warnings():  # highdicom warns about the source's own name formats, which are not ours
        warnings.simplefilter("ignore", UserWarning)
        return hd.seg.Segmentation(
            source_images=[source],
            pixel_array=mask.astype(bool),
            segment_descriptions=[segment],
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            series_instance_uid=generate_uid(entropy_srcs=[str(header.get("SeriesInstanceUID", "")), model_version]),
            series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[sop_uid, model_version]),
            instance_number=int(header.get("InstanceNumber") or 1),
            manufacturer="pneumoseg",
            manufacturer_model_name=model_name,
            software_versions=__version__,
            device_serial_number="0",
            series_description=f"{SEGMENT_LABEL} ({model_name})",
            omit_empty_frames=False,
        )


def write_segmentation(path: Path, header: Dataset, mask: np.ndarray, model_name: str, model_version: str) -> None:
    """Write the SEG of one prediction to ``path``, atomically; arguments as for :func:`make_segmentation`.

    Raises:
        DataError: the source's header lacks what a SEG must reference (its UIDs, say).
    """
    try:
        segmentation = make_segmentation(header, mask, model_name, model_version)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DataError(
            f"cannot make a DICOM SEG of {path.name}: its source's header is incomplete ({type(exc).__name__}: {exc})"
        ) from None
    with atomic_path(path) as tmp:
        segmentation.save_as(tmp)


def read_segmentation_mask(path: Path) -> tuple[np.ndarray, str]:
    """The mask of a SEG this module wrote, read back with highdicom: ``(bool rows x cols, referenced SOP
    instance UID)``."""
    segmentation = hd.seg.segread(io.BytesIO(Path(path).read_bytes()))
    [(_, _, sop_uid)] = segmentation.get_source_image_uids()
    pixels = segmentation.get_pixels_by_source_instance(source_sop_instance_uids=[sop_uid], segment_numbers=[1])
    return pixels[0, :, :, 0].astype(bool), str(sop_uid)
