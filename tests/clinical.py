"""DICOMs as clinical systems store them, as bytes: each lossless codec the reader accepts, at 8 to 16 bits, with
windows and VOI LUTs; and codestreams altered to declare another size or to hold a progressive-JPEG scan bomb."""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

import hostile

CODECS = (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless)
"""The lossless transfer syntaxes made here: pydicom encodes RLE itself, JPEG-LS through pyjpegls and JPEG 2000
through pylibjpeg-openjpeg; lossless JPEG (Process 14, first-order prediction, and predictor 6 for the general
Process 14 syntax) is encoded by libjpeg-turbo through imagecodecs, as pydicom has no encoder for it."""


def clinical_image(height: int = 48, width: int = 40, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth image with noise spanning most of ``bits`` bits (uint8 at 8 bits, else uint16)."""
    top = 2**bits - 1
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    image = top * (0.1 + 0.6 * rows / height + 0.25 * np.sin(cols / 5 + seed) ** 2) + rng.normal(
        0, top / 60, (height, width)
    )
    return np.clip(image, 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def clinical_dataset(
    pixels: np.ndarray,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    **elements,
) -> Dataset:
    """A grey DICOM of ``pixels`` compressed with ``syntax``, with ``bits_stored`` and any other elements
    (``WindowCenter=...``) set first."""
    ds = hostile.dataset(pixels, ExplicitVRLittleEndian)
    ds.BitsStored = bits_stored or pixels.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PhotometricInterpretation = photometric
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if syntax in (JPEGLosslessSV1, JPEGLossless):
        predictor = 1 if syntax == JPEGLosslessSV1 else 6
        frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=predictor, bitspersample=ds.BitsStored)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, pixels)
    return ds


def clinical_dicom(pixels: np.ndarray, syntax: str = ExplicitVRLittleEndian, **kwargs) -> bytes:
    """:func:`clinical_dataset` as the bytes of a DICOM file."""
    return hostile.to_bytes(clinical_dataset(pixels, syntax, **kwargs))


def frame_of(ds: Dataset) -> bytes:
    """The one encapsulated frame of ``ds``."""
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def with_frame(ds: Dataset, frame: bytes) -> bytes:
    """The DICOM file of ``ds`` holding ``frame`` instead of its own."""
    ds.PixelData = encapsulate([frame])
    return hostile.to_bytes(ds)


def codestream_claiming(syntax: str, rows: int, cols: int) -> bytes:
    """A small DICOM declaring 48 x 40 pixels whose ``syntax`` codestream's own header claims ``rows`` x ``cols``."""
    ds = clinical_dataset(clinical_image(48, 40), syntax, bits_stored=12)
    frame = frame_of(ds)
    if syntax == JPEG2000Lossless:
        siz = frame.index(b"\xff\x51")  # marker, Lsiz, Rsiz, then Xsiz and Ysiz (4 bytes each; origin 0)
        frame = frame[: siz + 6] + cols.to_bytes(4, "big") + rows.to_bytes(4, "big") + frame[siz + 14 :]
    else:
        sof = frame.index(b"\xff\xf7" if syntax == JPEGLSLossless else b"\xff\xc3")  # marker, length, precision
        frame = frame[: sof + 5] + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + frame[sof + 9 :]
    return with_frame(ds, frame)


def progressive_jpeg(pixels: np.ndarray, extra_scans: int = 0) -> bytes:
    """A progressive JPEG of ``pixels`` (Pillow's scan script), its last scan repeated ``extra_scans`` times: each
    copy is a refinement pass that libjpeg decodes again over the whole image, with a warning only (the scan bomb
    of issue 25, at a few hundred bytes a scan)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, progressive=True)
    jpeg = buffer.getvalue()
    last = jpeg.rindex(b"\xff\xda")
    end = jpeg.rindex(b"\xff\xd9")
    return jpeg[:end] + jpeg[last:end] * extra_scans + jpeg[end:]


def progressive_jpeg_dicom(pixels: np.ndarray, extra_scans: int = 0) -> bytes:
    """A DICOM under the JPEG Baseline transfer syntax (as the challenge's) holding a progressive frame."""
    return hostile.to_bytes(
        hostile.dataset(pixels, JPEGBaseline8Bit, encapsulate([progressive_jpeg(pixels, extra_scans)]))
    )
