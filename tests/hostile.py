"""Hostile DICOMs, as bytes, for the tests of the reader, stage 01 and the server: decompression bombs, a JPEG
larger than its DICOM, a corrupted VR, a valid deflated file, and seeded random mutations of a valid file."""

from __future__ import annotations

import io
import random
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)


def small_image(height: int = 40, width: int = 36, seed: int = 0) -> np.ndarray:
    """A smooth 8-bit image with some noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    image = 60 + 120 * rows / height + 50 * np.sin(cols / 4 + seed) + rng.normal(0, 4, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def dataset(pixels: np.ndarray, syntax: str, pixel_data: bytes | None = None) -> Dataset:
    """A minimal grey single-frame DICOM of ``pixels`` (stored as ``pixel_data`` when given) under ``syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
    ds.PatientSex, ds.ViewPosition = "F", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
    ds["PixelData"].VR = "OB" if pixels.itemsize == 1 else "OW"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def jpeg_dicom(pixels: np.ndarray | None = None) -> bytes:
    """A JPEG Baseline DICOM like the challenge's."""
    pixels = small_image() if pixels is None else pixels
    frame = io.BytesIO()
    Image.fromarray(pixels).save(frame, format="JPEG", quality=95)
    return to_bytes(dataset(pixels, JPEGBaseline8Bit, encapsulate([frame.getvalue()])))


def deflated_dicom(pixels: np.ndarray) -> bytes:
    """A valid Deflated Explicit VR Little Endian DICOM of ``pixels``, written by pydicom."""
    return to_bytes(dataset(pixels, DeflatedExplicitVRLittleEndian))


def rle_bomb(side: int = 65535) -> bytes:
    """A few hundred bytes of RLE Lossless DICOM whose header claims ``side`` x ``side`` pixels."""
    ds = dataset(np.zeros((4, 4), np.uint8), RLELossless, encapsulate([bytes(64)]))
    ds.Rows = ds.Columns = side
    return to_bytes(ds)


def jpeg_frame_bomb(side: int = 20000, declared: int = 64) -> bytes:
    """A JPEG DICOM declaring ``declared`` x ``declared`` pixels whose JPEG frame claims ``side`` x ``side``."""
    frame = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(frame, format="JPEG")
    jpeg = frame.getvalue()
    sof = jpeg.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    jpeg = jpeg[: sof + 5] + side.to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    return to_bytes(dataset(np.zeros((declared, declared), np.uint8), JPEGBaseline8Bit, encapsulate([jpeg])))


def deflate_bomb(inflated: int = 1 << 30) -> bytes:
    """A deflated DICOM of about 1 MB declaring a 64 x 64 image, whose dataset inflates to ``inflated`` bytes:
    a Pixel Data element that long, of zeros. Built from one flushed 1 MiB block repeated, so it costs
    milliseconds to make."""
    header = dataset(np.zeros((64, 64), np.uint8), ExplicitVRLittleEndian, b"")
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    del header.PixelData
    pydicom.filewriter.write_dataset(body, header)
    block = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # A full flush resets the compressor, so every later block of zeros compresses to the same bytes.
    head = compressor.compress(body.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00" + inflated.to_bytes(4, "little"))
    head += compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH) == zeros
    stream = head + zeros * (inflated // block - 1) + compressor.compress(bytes(block)) + compressor.flush()
    meta = DicomBytesIO()
    header.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_file_meta_info(meta, header.file_meta)
    return bytes(128) + b"DICM" + meta.getvalue() + stream


def corrupt_vr(data: bytes, tag: bytes = b"\x10\x00\x40\x00", vr: bytes = b"ZX") -> bytes:
    """``data`` with the VR of the explicit-VR element ``tag`` (default PatientSex) replaced by ``vr``."""
    at = data.index(tag) + 4
    return data[:at] + vr + data[at + 2 :]


def mutants(data: bytes, count: int, seed: int) -> list[tuple[str, bytes]]:
    """``count`` seeded mutations of a valid DICOM: bit flips, truncations, corrupted VRs, huge lengths and
    overwritten transfer syntaxes, named by what was done."""
    rng = random.Random(seed)
    kinds = [_flip_bits, _truncate, _scramble_vr, _huge_length, _wrong_syntax]
    out = []
    for i in range(count):
        mutate = kinds[i % len(kinds)]
        name, mutated = mutate(bytearray(data), rng)
        out.append((f"{i:03d}-{name}", bytes(mutated)))
    return out


def _flip_bits(data: bytearray, rng: random.Random) -> tuple[str, bytearray]:
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(128, len(data))
        data[at] ^= 1 << rng.randrange(8)
    return "flip", data


def _truncate(data: bytearray, rng: random.Random) -> tuple[str, bytearray]:
    return "cut", data[: rng.randrange(0, len(data))]


def _explicit_vr_positions(data: bytearray) -> list[int]:
    """Offsets of two upper-case letters that follow a 4-byte tag: likely VRs of explicit-VR elements."""
    return [
        i
        for i in range(132, len(data) - 2)
        if 65 <= data[i] <= 90 and 65 <= data[i + 1] <= 90 and data[i - 3] == 0 and data[i - 1] == 0
    ]


def _scramble_vr(data: bytearray, rng: random.Random) -> tuple[str, bytearray]:
    positions = _explicit_vr_positions(data)
    at = rng.choice(positions)
    data[at : at + 2] = rng.choice([b"ZX", b"\x00\x01", b"SQ", b"UN", b"OB", b"FD", b"UT"])
    return "vr", data


def _huge_length(data: bytearray, rng: random.Random) -> tuple[str, bytearray]:
    at = rng.choice(_explicit_vr_positions(data)) + 2
    width = 4 if bytes(data[at - 2 : at]) in (b"OB", b"OW", b"SQ", b"UN", b"UT") else 2
    if width == 4:
        at += 2  # two reserved bytes come first
    data[at : at + width] = rng.choice(
        [b"\xff" * width, b"\xfe" * width, (rng.getrandbits(8 * width)).to_bytes(width, "little")]
    )
    return "length", data


def _wrong_syntax(data: bytearray, rng: random.Random) -> tuple[str, bytearray]:
    uid = b"1.2.840.10008.1.2.4.50"  # JPEG Baseline: the valid file's syntax
    replacement = rng.choice(
        [
            b"1.2.840.10008.1.2.1.99",
            b"1.2.840.10008.1.2\x00\x00\x00\x00\x00",
            b"1.2.840.10008.1.2.5\x00\x00\x00",
            b"1.2.840.10008.1.2.4.90",
            b"1.2.840.10008.1.2.2\x00\x00\x00",
            b"9.9.9.9.9.9.9.9.9.9.99",
        ]
    )
    at = data.find(uid)
    data[at : at + len(uid)] = replacement
    return "syntax", data
