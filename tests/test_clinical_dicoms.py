"""Clinical DICOMs through the one reader: every lossless codec, deeper data shown through its window or VOI LUT,
MONOCHROME1. The files are made here (see clinical.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from clinical import CODECS, clinical_dicom, clinical_image
from pneumoseg.data.dicom import read_dicom_bytes


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("syntax", CODECS, ids=lambda uid: uid.keyword)
def test_each_codec_reads_like_its_uncompressed_twin(syntax, bits):
    image = clinical_image(bits=bits)
    expected, _ = read_dicom_bytes(clinical_dicom(image, bits_stored=bits))
    pixels, metadata = read_dicom_bytes(clinical_dicom(image, syntax, bits_stored=bits))
    assert metadata["transfer_syntax"] == syntax
    np.testing.assert_array_equal(pixels, expected)
    if bits == 8:
        np.testing.assert_array_equal(pixels, image)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1) onto 0..255, written out here rather than taken from pydicom."""
    position = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.rint(np.clip(position, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=lambda uid: uid.keyword)
@pytest.mark.parametrize("intercept", [0, -1024])
def test_12_bit_file_is_shown_through_its_window(syntax, intercept):
    """The window is in the units after the modality rescale; pixels beyond it are black or white."""
    image = clinical_image(bits=12)
    center, width = 1800 + intercept, 1500
    data = clinical_dicom(
        image,
        syntax,
        bits_stored=12,
        WindowCenter=center,
        WindowWidth=width,
        RescaleIntercept=intercept,
        RescaleSlope=1,
    )
    pixels, _ = read_dicom_bytes(data)
    expected = linear_window(image.astype(float) + intercept, center, width)
    np.testing.assert_array_equal(pixels, expected)
    assert (pixels == 0).any() and (pixels == 255).any()  # the window clips: not the image's own range


def voi_lut(first_mapped: int, entries: int) -> tuple[Dataset, np.ndarray]:
    """A 16-bit VOI LUT item, and its table: an S-shaped curve over ``entries`` values from ``first_mapped`` on."""
    curve = 65535 / (1 + np.exp(-(np.arange(entries) - entries / 2) / (entries / 8)))
    table = np.rint(curve).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [entries, first_mapped, 16]
    item.LUTData = table.tobytes()
    return item, table


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEGLosslessSV1], ids=lambda uid: uid.keyword)
def test_16_bit_monochrome1_file_is_shown_through_its_voi_lut_then_inverted(syntax):
    """The VOI LUT is preferred to the file's window; values outside the LUT take its first or last entry."""
    image = clinical_image(bits=16)
    lut, table = voi_lut(first_mapped=20000, entries=30000)
    data = clinical_dicom(
        image, syntax, photometric="MONOCHROME1", VOILUTSequence=[lut], WindowCenter=100, WindowWidth=10
    )
    pixels, metadata = read_dicom_bytes(data)
    shown = table.astype(float)[np.clip(image.astype(int) - 20000, 0, len(table) - 1)]
    expected = 255 - np.rint(shown * 255 / 65535).astype(np.uint8)
    assert metadata["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(pixels, expected)
    assert len(np.unique(pixels)) > 100


def test_signed_12_bit_file_is_shown_through_its_window():
    image = clinical_image(bits=12).astype(np.int16) - 2048
    pixels, _ = read_dicom_bytes(
        clinical_dicom(image, JPEG2000Lossless, bits_stored=12, WindowCenter=0, WindowWidth=2000)
    )
    np.testing.assert_array_equal(pixels, linear_window(image.astype(float), 0, 2000))


def test_12_bit_file_without_window_is_stretched_from_its_own_range():
    image = clinical_image(bits=12)
    pixels, _ = read_dicom_bytes(clinical_dicom(image, JPEGLSLossless, bits_stored=12))
    low, high = image.min(), image.max()
    np.testing.assert_array_equal(pixels, np.rint((image - low) * (255 / (high - low))).astype(np.uint8))
