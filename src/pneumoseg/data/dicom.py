"""DICOM input and output.

Reading: :func:`read_dicom` turns one DICOM into an 8-bit grey image (0 is black) and the tags competitors
used, :func:`read_dicom_bytes` does the same from bytes in memory; :func:`read_dicom_header` gives the same
tags without touching the pixels; :func:`find_dicoms` lists the DICOMs of a challenge folder in either layout.
A file that cannot become an image raises a subclass of :class:`DicomError` that names the file and the reason,
so a caller converting thousands of files can record it and carry on.

Writing: :func:`write_jpeg_dicom` stores an 8-bit image the way the challenge's files are stored
(Secondary Capture, MONOCHROME2, JPEG Baseline encapsulated). pydicom cannot encode JPEG itself, so Pillow
compresses and ``pydicom.encaps.encapsulate`` wraps the bytes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from pneumoseg.data.codestream import (
    CodestreamError,
    CodestreamHeader,
    CodestreamLimitError,
    check_scans,
    j2k_header,
    jpeg_header,
)
from pneumoseg.errors import DataError
from pneumoseg.io import atomic_path

log = logging.getLogger(__name__)

# The challenge's UIDs all share this root; study, series and instance differ in the digit after it.
UID_ROOT = "1.2.276.0.7230010.3"


@dataclass(frozen=True)
class DicomTags:
    """The tags of a challenge DICOM that competitors used, with the challenge's own conventions."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    sex: str = "M"  # "M" or "F"
    age: str = "50"  # a bare number string, as in the challenge's files
    view_position: str = "PA"  # "PA" or "AP"
    pixel_spacing: float = 0.168  # mm; the real files range from 0.139 to 0.194


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
    meta.MediaStorageSOPInstanceUID = UID(tags.sop_instance_uid)
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


# ---------------------------------------------------------------------------------------------------------
# Reading

DICOM_IDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
METADATA_KEYS = (
    "ImageId",
    "source_path",
    "rows",
    "cols",
    "sex",
    "age",
    "view",
    "pixel_spacing",
    "photometric",
    "transfer_syntax",
    *DICOM_IDS,
)
"""The keys of the metadata dict of :func:`read_dicom`, in order (stage 01's metadata.csv columns)."""

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

MAX_SIDE = 8192
"""The most rows or columns read: beyond any radiograph (the challenge's are 1024, detectors reach about 4300)."""
MAX_IMAGE_BYTES = MAX_SIDE * MAX_SIDE * 2
"""The most pixel data read, 128 MiB: one MAX_SIDE x MAX_SIDE frame at 16 bits. The header's claim is checked
before any pixel is decoded, so a small file claiming a huge image costs nothing."""
MAX_FILE_BYTES = MAX_IMAGE_BYTES + (16 << 20)
"""The most bytes read from a file, and inflated from a deflated one: the largest image plus 16 MiB of header."""

_UNDEFINED_LENGTH = 0xFFFFFFFF
# Data of more than 8 bits is displayed through a table of every stored value when it spans fewer values than this.
_MAX_TABLE = 1 << 16
# Deflated data is inflated block by block, so that memory grows with the output and the bound is met to a block.
_INFLATE_INPUT_BLOCK = 1 << 16
_INFLATE_OUTPUT_BLOCK = 1 << 20
# The header is read from the first MiB inflated (the challenge's headers have about 2 KB), and the inflated file
# may run this far past the pixel data its header declares (trailing elements, padding).
_INFLATE_HEADER_PROBE = 1 << 20
_INFLATE_TRAILER_BYTES = 1 << 20
_AGE = re.compile(r"^\s*(\d+)\s*([DWMY]?)\s*$", re.IGNORECASE)
_UNITS_PER_YEAR = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}


class DicomError(DataError):
    """A DICOM file that cannot become an image; subclasses say why.

    Args:
        path: the file.
        reason: what is wrong with it, in a few words (stage 01 stores it in errors.csv).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        path = printable_name(str(path))
        # Both go to Exception's args, so the error pickles back from a worker process.
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot read DICOM {self.path}: {self.reason}"


class UnreadableDicomError(DicomError):
    """The file cannot be opened: it is missing, a folder, or not readable by this user."""


class NotDicomError(DicomError):
    """Not a DICOM file: no 'DICM' marker after the 128-byte preamble, or a header pydicom cannot parse."""


class TruncatedDicomError(DicomError):
    """The file ends before its data does (an interrupted download or copy)."""


class NoPixelDataError(DicomError):
    """A complete DICOM file without a Pixel Data element (a report or presentation state, say)."""


class UnsupportedDicomError(DicomError):
    """Pixel data in a form pneumoseg does not read: a transfer syntax with no decoder installed, colour,
    or several frames."""


class CorruptPixelDataError(DicomError):
    """Pixel data that does not decode to the image the header declares."""


class TooLargeDicomError(DicomError):
    """A file, its inflated data, or the image its header declares is larger than any plausible radiograph
    (see :data:`MAX_IMAGE_BYTES`); refused before the pixels are decoded."""


def printable_name(name: str) -> str:
    """``name`` (a file name or path as the file system gave it) with each byte that is not UTF-8 written as
    ``\\xNN``, so that it can go into a UTF-8 CSV file, a log line or the name of a file made from it (OpenCV
    crashes on Python's surrogate escapes); a UTF-8 name is returned unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _warn_unlisted(error: OSError) -> None:
    """os.walk's report of a folder it cannot list (no permission, gone): said once, as its files are left out."""
    log.warning(
        "cannot list the folder %s (%s); the DICOMs in it are left out",
        printable_name(str(error.filename)),
        error.strerror,
    )


def find_dicoms(root: str | os.PathLike) -> dict[str, Path]:
    """Every DICOM file under ``root``, keyed by ImageId (the file's stem, as :func:`printable_name`) and sorted
    by it.

    Both challenge layouts are found, as is any other nesting: stage 1's
    ``dicom-images-train/<Study>/<Series>/<SOP>.dcm`` and ``dicom-images-test/...``, and stage 2's flat
    ``stage_2_images/ID_<hex>.dcm``. The ``.dcm`` suffix is matched in any case. Hidden files are skipped:
    they are the temporary files of an interrupted atomic write. A folder that cannot be listed is left out with a
    warning.

    Raises:
        DataError: ``root`` is not a folder, or two files share a stem (their ImageIds would clash).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DICOM folder {root} does not exist")
    found: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(root, onerror=_warn_unlisted):
        subfolders.sort()  # a deterministic walk names the same two files in a clash on every run
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(".dcm"):
                continue
            path = Path(folder) / name
            image_id = printable_name(path.stem)
            if image_id in found:
                first, second = (printable_name(str(each)) for each in (found[image_id], path))
                raise DataError(
                    f"two DICOM files have the ImageId {image_id!r}: {first} and {second}. ImageIds must "
                    f"be unique; remove the duplicate."
                )
            found[image_id] = path
    return dict(sorted(found.items()))


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read one DICOM as an 8-bit grey image (0 is black) and its metadata.

    Args:
        path: a ``.dcm`` file; its stem is the ImageId.

    Returns:
        ``(pixels, metadata)``: an HxW uint8 array, and a dict with the keys of :data:`METADATA_KEYS`:
        ImageId, source_path, rows, cols, sex ("M"/"F", "" when absent), age (whole years, None when absent),
        view ("PA"/"AP", "" when absent), pixel_spacing (mm, the first value of PixelSpacing, else of
        ImagerPixelSpacing; None when absent), photometric, transfer_syntax (the UID), PatientID,
        StudyInstanceUID, SeriesInstanceUID ("" when absent).

    Pixels: JPEG Baseline (the challenge's encoding) is decoded by Pillow straight from the encapsulated
    frame, which skips pydicom's pixel pipeline; the other syntaxes read (uncompressed, deflated, RLE Lossless,
    JPEG Extended, lossless JPEG, JPEG-LS, JPEG 2000, HTJ2K) go through pydicom's ``pixel_array`` and its plugins.
    Unsigned data of at most 8 bits stored is kept as it is. Data of more bits is shown as the file says
    (:func:`_displayed_8_bits`): its modality rescale, then its VOI LUT or window, mapped onto 0..255; without
    either, it is mapped linearly from the image's own minimum and maximum (rather than from the declared bit
    depth: scanners often declare 16 bits stored for 12-bit data, which a fixed shift would leave nearly black).
    Signed data of at most 8 bits is stretched so too. MONOCHROME1 is inverted last.

    Raises:
        DicomError: one of its subclasses (UnreadableDicomError, NotDicomError, TruncatedDicomError,
            NoPixelDataError, UnsupportedDicomError, CorruptPixelDataError, TooLargeDicomError), naming the file
            and the reason; never another exception, whatever the file holds.

    Untrusted files are refused before they cost memory: a file (or a deflated dataset inflated) past
    :data:`MAX_FILE_BYTES`, or a header declaring more than :data:`MAX_IMAGE_BYTES` of pixels or a side
    beyond :data:`MAX_SIDE`, is refused before a pixel is decoded; so is a compressed frame whose codestream's own
    header declares another size or sample count than the DICOM, or (JPEG) more than
    :data:`pneumoseg.data.codestream.MAX_JPEG_SCANS` scans. Deflated Explicit VR Little Endian files are read.
    """
    path = Path(path)
    pixels, metadata, _ = _read_buffer(_read_bounded(path), path)
    return pixels, metadata


def read_dicom_bytes(data: bytes, name: str = "request body") -> tuple[np.ndarray, dict]:
    """:func:`read_dicom` of a whole DICOM file's bytes held in memory (the body of an HTTP request, say).

    Args:
        data: the file's bytes.
        name: what error messages call the data, in place of a file name.

    Returns:
        ``(pixels, metadata)`` as :func:`read_dicom`, except that the ImageId is the SOPInstanceUID (the
        challenge's ImageId, which its file names repeat; "" when absent) and source_path is "".

    Raises:
        DicomError: as :func:`read_dicom`, naming ``name``.
    """
    if len(data) > MAX_FILE_BYTES:
        raise TooLargeDicomError(name, f"it has {len(data)} bytes, more than the {MAX_FILE_BYTES} any radiograph needs")
    pixels, metadata, ds = _read_buffer(bytes(data), Path(name))
    with _failures_as(NotDicomError, Path(name), "malformed DICOM header"):
        metadata.update(ImageId=_text(ds.get("SOPInstanceUID")), source_path="")
    return pixels, metadata


def _read_bounded(path: Path) -> bytes:
    """The bytes of ``path``, refused before reading unless it is a file of at most :data:`MAX_FILE_BYTES`."""
    # One read of the whole file: its length is needed for the truncation check, and pydicom parses a buffer
    # faster than a file.
    with _open_dicom(path) as handle:
        return handle.read()


@contextlib.contextmanager
def _open_dicom(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for reading, once it is known to be a regular file of at most :data:`MAX_FILE_BYTES`
    (a FIFO or a device named ``.dcm`` would otherwise block the reader or never end)."""
    try:
        # Non-blocking, so that opening a FIFO returns at once; it changes nothing for a regular file.
        handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    except OSError as exc:
        raise UnreadableDicomError(path, exc.strerror or str(exc)) from None
    with handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise UnreadableDicomError(path, "it is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableDicomError(path, "it is not a regular file (a device, FIFO or socket)")
        if info.st_size > MAX_FILE_BYTES:
            raise TooLargeDicomError(
                path, f"the file has {info.st_size} bytes, more than the {MAX_FILE_BYTES} any radiograph needs"
            )
        yield handle


def _read_buffer(data: bytes, path: Path) -> tuple[np.ndarray, dict, Dataset]:
    """Parse, check and decode the bytes of one DICOM file -> ``(pixels, metadata, dataset)``; ``path`` names
    the file in the metadata and in errors."""
    with _quiet_pydicom():
        ds, size = _parse_file(io.BytesIO(data), path)
        with _failures_as(NotDicomError, path, "malformed DICOM header"):
            _check_complete(ds, size, path, whole_file=True)
            metadata = _metadata(ds, path)
        with _failures_as(CorruptPixelDataError, path, "the pixel data does not decode"):
            pixels = _pixels(ds, metadata, path)
    return pixels, metadata, ds


def read_dicom_header(path: str | os.PathLike) -> dict:
    """The metadata dict of :func:`read_dicom` without reading the pixel data from disk (a fraction of a ms).

    Only problems in the header are found: UnreadableDicomError, NotDicomError, TruncatedDicomError for a
    file cut inside its header, or TooLargeDicomError. (A deflated file is read and inflated whole, within
    :data:`MAX_FILE_BYTES`: its header cannot be found otherwise.)
    """
    path = Path(path)
    with _quiet_pydicom():
        with _open_dicom(path) as handle:
            ds, size = _parse_file(handle, path, stop_before_pixels=True)
        with _failures_as(NotDicomError, path, "malformed DICOM header"):
            _check_complete(ds, size, path, whole_file=False)
            return _metadata(ds, path)


@contextlib.contextmanager
def _failures_as(error: type[DicomError], path: Path, what: str) -> Iterator[None]:
    """Turn any exception but a DicomError into ``error`` about ``path``: pydicom and the image libraries fail
    on malformed data with every exception type there is (NotImplementedError for an unknown VR, struct.error,
    Pillow's DecompressionBombError, ...), and each means the same thing to the caller: this file is unusable."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:
        raise error(path, f"{what} ({type(exc).__name__}: {exc})") from None


def _parse_file(source: BinaryIO, path: Path, **kwargs) -> tuple[Dataset, int]:
    """``(dataset, length of the data parsed)`` of the DICOM file in ``source``: :func:`_parse` of
    :func:`_inflated`, with a deflated file's transfer syntax put back once its inflated data is parsed."""
    with _failures_as(NotDicomError, path, "malformed DICOM header"):  # meta information that will not rewrite
        stream, size, deflated = _inflated(source, path)
    ds = _parse(stream, path, **kwargs)
    if deflated:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return ds, size


def _inflated(source: BinaryIO, path: Path) -> tuple[BinaryIO | DicomBytesIO, int, bool]:
    """``(stream, length, deflated)`` of the DICOM file in ``source`` (at its start), for :func:`_parse`.

    A file in Deflated Explicit VR Little Endian is given back as the same file with its dataset inflated in
    memory to at most :data:`MAX_FILE_BYTES` (pydicom would inflate any amount at once, and the truncation
    check needs the inflated length); pydicom reads it as it reads its own inflated data. Any other file is
    ``source`` itself, rewound. A file whose meta information does not parse is left for :func:`_parse` to
    name what is wrong.
    """
    try:
        preamble = read_preamble(source, False)
        # pydicom reads the file meta information with a private helper only; its public one takes a path.
        meta = _read_file_meta_info(source)
        deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    except Exception:  # any header problem: _parse reports it
        deflated = False
    if not deflated:
        size = source.seek(0, io.SEEK_END)
        source.seek(0)
        return source, size, False
    out = DicomBytesIO()
    out.write(preamble or bytes(128))
    out.write(b"DICM")
    # The meta information is rewritten as the inflated data's (explicit VR little endian), which pydicom
    # then parses as plain; the dataset's pixels are native either way.
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_file_meta_info(out, meta, enforce_standard=False)
    _inflate_into(out, source.read(), path)  # the caller bounds the file's size
    size = out.tell()
    out.seek(0)
    return out, size, True


def _inflate_into(out: DicomBytesIO, compressed: bytes, path: Path) -> None:
    """Inflate the raw deflate stream ``compressed`` onto ``out``, refusing output past what the header declares.

    Until the first :data:`_INFLATE_HEADER_PROBE` bytes are out, the bound is :data:`MAX_FILE_BYTES`; then the
    header inflated so far declares the image (:func:`_declared_bound`), and inflation stops a little past
    that image's size, so a small file inflating to a gigabyte of zeros costs a few MB instead of the cap.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(compressed)
    bound, probed = MAX_FILE_BYTES, False
    try:
        for start in range(0, len(view), _INFLATE_INPUT_BLOCK):
            pending: memoryview | bytes = view[start : start + _INFLATE_INPUT_BLOCK]
            # With its output bounded, the inflater may hold output back after taking all of ``pending``:
            # it is drained (decompress of no input) before the next block is read.
            while not inflater.eof:
                chunk = inflater.decompress(pending, _INFLATE_OUTPUT_BLOCK)
                pending = inflater.unconsumed_tail
                if not chunk and not pending:
                    break
                out.write(chunk)
                if not probed and out.tell() >= _INFLATE_HEADER_PROBE:
                    bound, probed = _declared_bound(out, path), True
                if out.tell() > bound:
                    raise TooLargeDicomError(
                        path,
                        f"the deflated data inflates to more than {bound} bytes, "
                        f"more than its header's image (or any radiograph) needs",
                    )
            if inflater.eof:
                return
    except zlib.error as exc:
        raise NotDicomError(path, f"the deflated data does not inflate ({exc})") from None
    raise TruncatedDicomError(path, "the file ends early (its deflated data stops before its end)")


def _declared_bound(out: DicomBytesIO, path: Path) -> int:
    """The most bytes the inflated file in ``out`` (written so far, position at its end) may reach: what is
    there now, plus the pixel data its header declares, plus :data:`_INFLATE_TRAILER_BYTES`. A header that
    declares too large an image is refused here; one that does not parse yet keeps :data:`MAX_FILE_BYTES`
    (the full parse then says what is wrong)."""
    written = out.tell()
    out.seek(0)
    head = io.BytesIO(out.read(written))
    out.seek(written)
    try:
        ds = pydicom.dcmread(head, stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = _int_or_none(ds.get("NumberOfFrames")) or 1
        bits = (_int_or_none(ds.get("SamplesPerPixel")) or 1) * (_int_or_none(ds.get("BitsAllocated")) or 8)
    except Exception:  # a header cut at the probe, or malformed: bound by the cap alone
        return MAX_FILE_BYTES
    _check_size(rows, cols, frames, bits, path)
    return written + _image_bytes(rows, cols, frames, bits) + _INFLATE_TRAILER_BYTES


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Keep pydicom's warnings and log lines about the file being read from reaching the user.

    pydicom both warns and logs every oddity it meets (a value in a non-standard form, a file that ends
    early); over 12,000 files that buries the log. The oddities that matter become DicomErrors, the rest is
    noise. (pydicom 3.0 checks the challenge's bare-number ages, such as ``50``, when they are written, not
    when they are read; the tests check that reading them stays silent.)
    """
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)


def _parse(source: BinaryIO | DicomBytesIO, path: Path, **kwargs) -> Dataset:
    """``pydicom.dcmread(source, **kwargs)`` with its failures, and its warning about a file that ends
    early, turned into DicomErrors about ``path``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(source, **kwargs)
    except InvalidDicomError:
        raise NotDicomError(
            path, "no DICOM header (the 'DICM' marker after the 128-byte preamble is missing)"
        ) from None
    except OSError as exc:
        raise UnreadableDicomError(path, exc.strerror or str(exc)) from None
    except Exception as exc:  # pydicom's parser raises many exception types on a malformed header
        raise NotDicomError(path, f"malformed DICOM header ({type(exc).__name__}: {exc})") from None
    for warning in caught:
        message = str(warning.message)
        if "end of file" in message.lower():
            raise TruncatedDicomError(path, f"the file ends early ({message.split(' in file ')[0]})")
    return ds


def _check_complete(ds: Dataset, size: int, path: Path, whole_file: bool) -> None:
    """Raise TruncatedDicomError when the last element parsed does not fit the file's ``size`` bytes.

    pydicom reads a file cut inside its header without complaint: the value it was reading comes out
    short, or the bytes of a half element header are dropped. The last element parsed must not end beyond
    the file; when ``ds`` is the ``whole_file`` (not read with ``stop_before_pixels``), its last element of
    defined length must end exactly where the file does. (Encapsulated pixel data has undefined length and
    ends with a delimiter instead; a missing one is the warning that _parse turns into an error.)
    """
    group = ds if len(ds) else ds.file_meta
    if not len(group):
        raise TruncatedDicomError(path, "the file ends right after its 'DICM' marker")
    last = group.get_item(max(group.keys()))
    if isinstance(last, RawDataElement) and last.length != _UNDEFINED_LENGTH:
        end = last.value_tell + last.length
        if end > size or (whole_file and end != size):
            raise TruncatedDicomError(
                path, f"the file is cut off: it has {size} bytes, but its data element {last.tag} ends at byte {end}"
            )


def _metadata(ds: Dataset, path: Path) -> dict:
    """The metadata dict of :func:`read_dicom`, keys in the order of :data:`METADATA_KEYS`."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return {
        "ImageId": printable_name(path.stem),
        "source_path": printable_name(str(path)),
        "rows": _int_or_none(ds.get("Rows")),
        "cols": _int_or_none(ds.get("Columns")),
        "sex": _text(ds.get("PatientSex")),
        "age": _age_years(ds.get("PatientAge")),
        "view": _text(ds.get("ViewPosition")),
        "pixel_spacing": _first_float(spacing),
        "photometric": _text(ds.get("PhotometricInterpretation")),
        "transfer_syntax": _text(ds.file_meta.get("TransferSyntaxUID")),
        # Named as the DICOM keywords: folds.group_by takes a column name, and these are what users know.
        **{key: _text(ds.get(key)) for key in DICOM_IDS},
    }


def _text(value) -> str:
    return str(value).strip() if value is not None else ""


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _first_float(value) -> float | None:
    """The first number of a (possibly multi-valued) decimal string; None when absent or not a number."""
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _age_years(value) -> int | None:
    """Whole years from PatientAge: the standard ``038Y`` / ``006M`` / ``010W`` / ``200D`` forms or the
    challenge's bare ``38``; None when absent or unreadable."""
    match = _AGE.match(_text(value))
    if match is None:
        return None
    number, unit = match.groups()
    return int(number) // _UNITS_PER_YEAR[unit.upper()]


def _pixels(ds: Dataset, metadata: dict, path: Path) -> np.ndarray:
    """Decode, check and convert the pixel data to 8-bit MONOCHROME2 (see :func:`read_dicom`)."""
    if "PixelData" not in ds:
        raise NoPixelDataError(path, "the file has no Pixel Data element")
    _check_supported(ds, metadata, path)
    _check_codestream(ds, metadata["transfer_syntax"], path)
    decode = _DECODERS.get(metadata["transfer_syntax"], _decode_with_pydicom)
    pixels = decode(ds, path)
    declared = (metadata["rows"], metadata["cols"])
    if pixels.shape != declared:
        raise CorruptPixelDataError(
            path, f"the pixel data decodes to shape {pixels.shape}, but the header declares {declared[0]}x{declared[1]}"
        )
    if int(ds.get("BitsStored") or 8) > 8:
        pixels = _displayed_8_bits(pixels, ds)
    elif int(ds.get("PixelRepresentation") or 0) == 1:
        pixels = _stretch_to_8_bits(pixels)
    else:
        pixels = pixels.astype(np.uint8, copy=False)
    if metadata["photometric"] == "MONOCHROME1":  # 0 is white: flip so that 0 is black
        pixels = np.subtract(255, pixels, dtype=np.uint8)
    return pixels


def _check_supported(ds: Dataset, metadata: dict, path: Path) -> None:
    if metadata["photometric"] not in MONOCHROME:
        raise UnsupportedDicomError(
            path,
            f"photometric interpretation {metadata['photometric']!r}; only grey "
            f"images ({' or '.join(MONOCHROME)}) are read",
        )
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if samples != 1 or frames != 1:
        raise UnsupportedDicomError(
            path, f"{samples} samples per pixel and {frames} frames; only single-frame grey images are read"
        )
    if metadata["rows"] is None or metadata["cols"] is None:
        raise CorruptPixelDataError(path, "the header has no Rows or Columns, so the pixel data has no shape")
    _check_size(
        metadata["rows"], metadata["cols"], frames, samples * (_int_or_none(ds.get("BitsAllocated")) or 8), path
    )
    syntax = metadata["transfer_syntax"]
    try:
        available = get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):  # no decoder exists for this UID (or it is no UID at all)
        available = False
    if not available:
        name = UID(syntax).name if syntax else "missing from the file meta information"
        raise UnsupportedDicomError(path, f"no decoder is installed for transfer syntax {syntax} ({name})")


def _image_bytes(rows: int, cols: int, frames: int, bits_per_pixel: int) -> int:
    """The bytes of native pixel data a header declares (each pixel's bits rounded up to whole bytes)."""
    return rows * cols * frames * -(-bits_per_pixel // 8)


def _check_size(rows: int, cols: int, frames: int, bits_per_pixel: int, path: Path, source: str = "the header") -> None:
    """Refuse, from a header alone (``source``: the DICOM's, or its codestream's), an image beyond :data:`MAX_SIDE`
    or :data:`MAX_IMAGE_BYTES`: decoders allocate what the header declares before they find the data missing
    (65535 x 65535 RLE from 788 bytes)."""
    size = _image_bytes(rows, cols, frames, bits_per_pixel)
    if max(rows, cols) > MAX_SIDE or size > MAX_IMAGE_BYTES:
        raise TooLargeDicomError(
            path,
            f"{source} declares {rows}x{cols} pixels x {frames} frames at "
            f"{bits_per_pixel} bits ({size} bytes), larger than any radiograph read "
            f"(at most {MAX_SIDE}x{MAX_SIDE} at 16 bits)",
        )


# Encapsulated transfer syntaxes read, with the reader of their codestream's own header; RLE Lossless has no
# header of its own (its segments decode to the DICOM header's size, already bounded).
_CODESTREAM_HEADERS: dict[str, Callable[[bytes], CodestreamHeader]] = {
    **dict.fromkeys(
        [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless],
        jpeg_header,
    ),
    **dict.fromkeys([JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K], j2k_header),
}


def _check_codestream(ds: Dataset, syntax: str, path: Path) -> None:
    """Refuse an encapsulated frame whose codestream's own header declares another size or sample count than the
    DICOM's, an image beyond the size bound, or (JPEG) more scans than :data:`MAX_JPEG_SCANS`, before a pixel is
    decoded: decoders allocate and work for what the codestream declares (a 2 KB DICOM may hold a 13000 x 13000
    JPEG 2000). Native and RLE data pass; another encapsulated syntax is refused."""
    if not UID(syntax).is_encapsulated or syntax == RLELossless:
        return
    read_header = _CODESTREAM_HEADERS.get(syntax)
    if read_header is None:
        raise UnsupportedDicomError(
            path, f"transfer syntax {syntax} ({UID(syntax).name}) is not read; see the README for the ones that are"
        )
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    try:
        header = read_header(frame)
        if read_header is jpeg_header:
            check_scans(header, "its JPEG frame")
    except CodestreamLimitError as exc:
        raise TooLargeDicomError(path, str(exc)) from None
    except CodestreamError as exc:
        raise CorruptPixelDataError(path, str(exc)) from None
    _check_size(header.rows, header.cols, 1, header.components * header.bits, path, source="its codestream")
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    if (header.rows, header.cols, header.components) != (ds.Rows, ds.Columns, samples):
        raise CorruptPixelDataError(
            path,
            f"its codestream holds {header.rows}x{header.cols} pixels of "
            f"{header.components} samples, but the header declares "
            f"{ds.Rows}x{ds.Columns} of {samples}",
        )


def _decode_jpeg_baseline(ds: Dataset, path: Path) -> np.ndarray:
    """JPEG Baseline through Pillow directly: the one encapsulated frame is a complete JPEG file, whose size and
    scan count :func:`_check_codestream` has checked."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    with Image.open(io.BytesIO(frame), formats=["JPEG"]) as image:
        if image.mode != "L":
            raise CorruptPixelDataError(
                path, f"the JPEG holds a {image.mode} image, but the header declares a grey one"
            )
        return np.asarray(image)


def _decode_with_pydicom(ds: Dataset, path: Path) -> np.ndarray:
    return ds.pixel_array


def _displayed_8_bits(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Data of more than 8 bits as the file says to display it, on 0..255: the modality rescale or LUT, then the
    VOI LUT or window (pydicom's ``apply_voi_lut``; a LUT is preferred to a window, the first of several is
    used), its output range mapped linearly onto 0..255. A file with neither is stretched from its own range.

    The transforms are applied once to every stored value between 0 (or the minimum, for negative data) and the
    maximum, giving a table that each pixel then indexes: memory stays one byte per pixel where pydicom's
    windowing would hold several float64 copies of the image. Data spanning more than 2**16 values (32-bit) is
    transformed directly.
    """
    low, high = min(int(pixels.min()), 0), int(pixels.max())
    if high - low >= _MAX_TABLE:
        shown = _voi_8_bits(pixels, ds)
        return _stretch_to_8_bits(pixels) if shown is None else shown
    table = _voi_8_bits(np.arange(low, high + 1, dtype=pixels.dtype), ds)
    if table is None:
        return _stretch_to_8_bits(pixels)
    return table[pixels if low == 0 else np.subtract(pixels, low, dtype=np.int32)]


def _voi_8_bits(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """``stored`` values through the modality and VOI transforms of ``ds``, mapped onto 0..255; None when ``ds``
    has no VOI LUT or window."""
    values = apply_modality_lut(stored, ds)
    shown = apply_voi_lut(values, ds)
    if shown is values:  # pydicom gives the input back when there is no valid VOI LUT or window
        return None
    if np.issubdtype(shown.dtype, np.integer):  # a VOI LUT: its output spans 0..2**bits - 1 (PS3.3 C.11.2.1.1)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:  # a window: its output spans the range pydicom maps onto, which it gives for inputs beyond any window
        with np.errstate(over="ignore"):
            low, high = (float(value) for value in apply_windowing(np.array([-np.inf, np.inf]), ds))
    scaled = (np.clip(shown, low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def _stretch_to_8_bits(pixels: np.ndarray) -> np.ndarray:
    """Map the image's minimum..maximum linearly onto 0..255 (a constant image becomes 0)."""
    low, high = float(pixels.min()), float(pixels.max())
    if high == low:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (pixels.astype(np.float32) - low) * np.float32(255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


# Transfer syntax UID -> decoder; any other syntax goes through pydicom's pixel_array.
_DECODERS: dict[str, Callable[[Dataset, Path], np.ndarray]] = {JPEGBaseline8Bit: _decode_jpeg_baseline}
