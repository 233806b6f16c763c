"""pneumoseg.data.dicom reading: the real challenge files, generated files of every kind, bad files, listings."""

from __future__ import annotations

import hashlib
import logging
import os
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import hostile
from pneumoseg.data.dicom import (
    MAX_FILE_BYTES,
    MAX_SIDE,
    METADATA_KEYS,
    CorruptPixelDataError,
    DicomError,
    DicomTags,
    NoPixelDataError,
    NotDicomError,
    TooLargeDicomError,
    TruncatedDicomError,
    UnreadableDicomError,
    UnsupportedDicomError,
    find_dicoms,
    read_dicom,
    read_dicom_bytes,
    read_dicom_header,
    write_jpeg_dicom,
)
from pneumoseg.errors import DataError


def tags(image_id: str, **kwargs) -> DicomTags:
    return DicomTags(
        sop_instance_uid=image_id,
        study_instance_uid=f"{image_id}.1",
        series_instance_uid=f"{image_id}.2",
        patient_id=f"patient-{image_id}",
        **kwargs,
    )


def gradient(height: int = 48, width: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth image with some noise: compresses like an X-ray, varies between seeds."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    image = 40 + 150 * rows / height + 50 * np.sin(cols / 5 + seed) + rng.normal(0, 4, (height, width))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_native_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    **elements,
) -> Path:
    """An uncompressed DICOM (or one with ``pixel_data`` given as is, under ``syntax``), written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1 if pixels.ndim == 2 else pixels.shape[2]
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.itemsize * 8
    ds.BitsStored = bits_stored or pixels.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    with warnings.catch_warnings():  # some tests store values in non-standard forms on purpose
        warnings.simplefilter("ignore")
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
    if pixel_data is not None or pixels.size:
        ds.PixelData = pixel_data if pixel_data is not None else pixels.tobytes()
        if ds.BitsAllocated > 8:
            ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Explicit little endian, stated outright so that an unknown (test) transfer syntax can be written too.
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# The real challenge files


@pytest.mark.real_data
def test_real_samples_decode_like_pydicom_with_the_right_metadata(siim_dir):
    paths = sorted((siim_dir / "sample_images").glob("*.dcm"))
    assert len(paths) == 10
    views = set()
    for path in paths:
        pixels, metadata = read_dicom(path)
        reference = pydicom.dcmread(path).pixel_array
        assert pixels.dtype == np.uint8 and pixels.shape == (1024, 1024)
        assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1
        assert tuple(metadata) == METADATA_KEYS
        assert metadata["ImageId"] == path.stem
        assert metadata["source_path"] == str(path)
        assert (metadata["rows"], metadata["cols"]) == (1024, 1024)
        assert metadata["photometric"] == "MONOCHROME2"
        assert metadata["transfer_syntax"] == "1.2.840.10008.1.2.4.50"
        assert metadata["sex"] in ("M", "F")
        assert isinstance(metadata["age"], int) and 0 < metadata["age"] < 120
        assert metadata["view"] in ("PA", "AP")
        assert isinstance(metadata["pixel_spacing"], float) and 0.139 <= metadata["pixel_spacing"] <= 0.1944
        assert read_dicom_header(path) == metadata
        views.add(metadata["view"])
    assert views == {"PA", "AP"}


@pytest.mark.real_data
def test_real_samples_give_the_pixels_stage_01_has_always_written(siim_dir):
    """The digest of the 10 samples' pixels as read before clinical codecs and VOI were added (Pillow 13.0.0's
    libjpeg-turbo): reading the challenge's 8-bit JPEG Baseline files must not change a pixel."""
    digest = hashlib.sha256()
    for path in sorted((siim_dir / "sample_images").glob("*.dcm")):
        digest.update(read_dicom(path)[0].tobytes())
    assert digest.hexdigest() == "e2f98f2feb6344547fa7d5864da9c578f30192c1a4d3e87a6d2a9d0a0ad1ac9b"


@pytest.mark.real_data
def test_reading_the_real_files_is_silent(siim_dir, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in sorted((siim_dir / "sample_images").glob("*.dcm"))[:3]:
            read_dicom(path)
            read_dicom_header(path)
    assert not caplog.records


# ---------------------------------------------------------------------------------------------------------
# Generated files


def test_jpeg_dicom_round_trip_matches_pydicom(tmp_path):
    image = gradient()
    path = tmp_path / "ID_0a1b2c3d4.dcm"
    write_jpeg_dicom(path, image, tags("1.2.3", sex="F", age="50", view_position="AP", pixel_spacing=0.143))
    pixels, metadata = read_dicom(path)
    # Pillow's decoder, as the reader's (pydicom prefers pylibjpeg's libjpeg 9, which rounds differently).
    assert (pixels == pydicom.pixels.pixel_array(path, decoding_plugin="pillow")).all()
    assert np.abs(pixels.astype(int) - image).mean() < 3  # JPEG at quality 95
    assert metadata == {
        "ImageId": "ID_0a1b2c3d4",
        "source_path": str(path),
        "rows": 48,
        "cols": 40,
        "sex": "F",
        "age": 50,
        "view": "AP",
        "pixel_spacing": 0.143,
        "photometric": "MONOCHROME2",
        "transfer_syntax": JPEGBaseline8Bit,
        "PatientID": "patient-1.2.3",
        "StudyInstanceUID": "1.2.3.1",
        "SeriesInstanceUID": "1.2.3.2",
    }


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_8_bit_native_pixels_are_kept_and_monochrome1_inverted(tmp_path, photometric):
    image = gradient()
    pixels, metadata = read_dicom(write_native_dicom(tmp_path / "a.dcm", image, photometric))
    expected = image if photometric == "MONOCHROME2" else 255 - image
    assert pixels.dtype == np.uint8 and (pixels == expected).all()
    assert metadata["photometric"] == photometric
    assert metadata["transfer_syntax"] == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    "values, bits_stored, dtype, photometric, expected",
    [
        ([0, 1000, 4095], 12, np.uint16, "MONOCHROME2", [0, 62, 255]),  # full 12-bit range
        ([100, 1100, 2100], 16, np.uint16, "MONOCHROME2", [0, 128, 255]),  # 16 declared, less used
        ([100, 1100, 2100], 16, np.uint16, "MONOCHROME1", [255, 127, 0]),  # ... and inverted
        ([-1000, 0, 1000], 12, np.int16, "MONOCHROME2", [0, 128, 255]),  # signed
        ([-100, 0, 27], 8, np.int8, "MONOCHROME2", [0, 201, 255]),  # signed 8-bit is stretched too
        ([700, 700, 700], 12, np.uint16, "MONOCHROME2", [0, 0, 0]),  # constant
    ],
)
def test_deeper_or_signed_data_is_stretched_from_its_own_range(
    tmp_path, values, bits_stored, dtype, photometric, expected
):
    image = np.array([values, values[::-1]], dtype=dtype)
    path = write_native_dicom(tmp_path / "a.dcm", image, photometric, bits_stored=bits_stored)
    pixels, _ = read_dicom(path)
    assert pixels.dtype == np.uint8
    assert pixels.tolist() == [expected, expected[::-1]]


@pytest.mark.parametrize(
    "age, years",
    [("50", 50), ("038Y", 38), ("018M", 1), ("011M", 0), ("104W", 2), ("400D", 1), ("", None), ("unknown", None)],
)
def test_age_in_whole_years(tmp_path, age, years):
    path = write_native_dicom(tmp_path / "a.dcm", gradient(4, 4), PatientAge=age)
    assert read_dicom(path)[1]["age"] == years


def test_missing_tags_are_empty_and_imager_spacing_is_the_fallback(tmp_path):
    path = write_native_dicom(tmp_path / "a.dcm", gradient(4, 4), ImagerPixelSpacing=[0.2, 0.25])
    metadata = read_dicom_header(path)
    assert (metadata["sex"], metadata["age"], metadata["view"]) == ("", None, "")
    assert metadata["pixel_spacing"] == 0.2


def test_reading_a_file_that_makes_pydicom_warn_is_silent(tmp_path, caplog):
    """pydicom warns and logs about a file that ends early; read_dicom raises instead, and nothing leaks."""
    path = tmp_path / "a.dcm"
    write_jpeg_dicom(path, gradient(), tags("1.2.3", age="50"))
    path.write_bytes(path.read_bytes()[:-40])
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TruncatedDicomError):
            read_dicom(path)
    assert not caplog.records


# ---------------------------------------------------------------------------------------------------------
# Bad files: every one raises its own DicomError, with the path and the reason


def _jpeg_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.dcm"
    write_jpeg_dicom(path, gradient(), tags("1.2.3"))
    return path


def _header_end(path: Path) -> int:
    """Where the Pixel Data element of a complete file starts: the end of the element before it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    last = ds.get_item(max(ds.keys()))
    return last.value_tell + last.length


def _cut(keep):
    """A JPEG DICOM cut after its first ``keep(complete_file)`` bytes."""

    def make(tmp_path: Path) -> Path:
        good = _jpeg_file(tmp_path)
        path = tmp_path / "cut.dcm"
        path.write_bytes(good.read_bytes()[: keep(good)])
        return path

    return make


def _text_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("ImageId,EncodedPixels\n1.2.3,-1\n")
    return path


def _empty_file(tmp_path):
    path = tmp_path / "empty.dcm"
    path.touch()
    return path


def _folder(tmp_path):
    path = tmp_path / "folder.dcm"
    path.mkdir()
    return path


def _native_cut(tmp_path):
    path = write_native_dicom(tmp_path / "a.dcm", gradient().astype(np.uint16) * 16, bits_stored=12)
    path.write_bytes(path.read_bytes()[:-100])
    return path


BAD_FILES = {
    "missing": (lambda tmp_path: tmp_path / "missing.dcm", UnreadableDicomError, "No such file"),
    "folder": (_folder, UnreadableDicomError, "directory"),
    "text": (_text_file, NotDicomError, "DICM"),
    "empty": (_empty_file, NotDicomError, "DICM"),
    "only_preamble": (_cut(lambda good: 132), TruncatedDicomError, "DICM"),
    "cut_in_file_meta": (_cut(lambda good: 170), TruncatedDicomError, "(0002,0002)"),
    "cut_in_header_value": (_cut(lambda good: _header_end(good) - 5), TruncatedDicomError, "cut off"),
    "cut_in_element_tag": (_cut(lambda good: _header_end(good) + 3), TruncatedDicomError, "cut off"),
    "cut_in_pixel_data": (_cut(lambda good: int(good.stat().st_size * 0.8)), TruncatedDicomError, "ends early"),
    "cut_before_delimiter": (_cut(lambda good: good.stat().st_size - 12), TruncatedDicomError, "ends early"),
    "cut_native_pixels": (_native_cut, TruncatedDicomError, "cut off"),
    "no_pixel_data": (
        lambda tmp_path: write_native_dicom(tmp_path / "a.dcm", np.zeros((0, 0), np.uint8)),
        NoPixelDataError,
        "no Pixel Data",
    ),
    "jpeg_ls_garbage": (
        lambda tmp_path: write_native_dicom(
            tmp_path / "a.dcm", gradient(), syntax=JPEGLSLossless, pixel_data=encapsulate([b"\xff\xd8 not really"])
        ),
        CorruptPixelDataError,
        "no frame header (SOF marker)",
    ),
    "unknown_syntax": (
        lambda tmp_path: write_native_dicom(tmp_path / "a.dcm", gradient(), syntax="1.2.3.4.5"),
        UnsupportedDicomError,
        "1.2.3.4.5",
    ),
    "colour": (
        lambda tmp_path: write_native_dicom(
            tmp_path / "a.dcm", np.zeros((4, 4, 3), np.uint8), "RGB", PlanarConfiguration=0
        ),
        UnsupportedDicomError,
        "RGB",
    ),
    "multi_frame": (
        lambda tmp_path: write_native_dicom(
            tmp_path / "a.dcm", np.zeros((4, 4), np.uint8), pixel_data=bytes(32), NumberOfFrames=2
        ),
        UnsupportedDicomError,
        "2 frames",
    ),
    "jpeg_garbage": (
        lambda tmp_path: write_native_dicom(
            tmp_path / "a.dcm",
            gradient(),
            syntax=JPEGBaseline8Bit,
            pixel_data=encapsulate([b"\xff\xd8\xff\xe0 garbage!"]),
        ),
        CorruptPixelDataError,
        "beyond the data",
    ),
    "jpeg_wrong_size": (
        lambda tmp_path: _resized_header(_jpeg_file(tmp_path)),
        CorruptPixelDataError,
        "declares 24x40",
    ),
    "native_too_short": (
        lambda tmp_path: write_native_dicom(tmp_path / "a.dcm", gradient(), pixel_data=bytes(100)),
        CorruptPixelDataError,
        "does not decode",
    ),
}


def _resized_header(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.Rows = 24
    ds.save_as(path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_its_own_error_with_path_and_reason(tmp_path, case):
    make, error, reason = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(error) as caught:
        read_dicom(path)
    exc = caught.value
    assert isinstance(exc, DataError)
    assert exc.path == str(path)
    assert reason in exc.reason
    assert str(path) in str(exc) and exc.reason in str(exc)


@pytest.mark.parametrize("case", ["missing", "text", "cut_in_file_meta"])
def test_header_reading_sees_header_problems(tmp_path, case):
    make, error, _ = BAD_FILES[case]
    with pytest.raises(error):
        read_dicom_header(make(tmp_path))


def test_dicom_error_survives_pickling():
    """Workers send results back by pickling; an error must come back whole."""
    import pickle

    exc = pickle.loads(pickle.dumps(TruncatedDicomError("/x/a.dcm", "the file is cut off")))
    assert isinstance(exc, TruncatedDicomError) and isinstance(exc, DicomError)
    assert (exc.path, exc.reason) == ("/x/a.dcm", "the file is cut off")


# ---------------------------------------------------------------------------------------------------------
# Hostile files: refused before they cost memory, and never an exception other than a DicomError


def _peak_bytes(read, data: bytes) -> tuple[int, DicomError | None]:
    """The peak of Python's allocations while ``read(data)`` runs, and the DicomError it raised (or None)."""
    tracemalloc.start()
    try:
        read(data)
        error = None
    except DicomError as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


def test_rle_bomb_is_refused_from_its_header_without_allocating(tmp_path):
    data = hostile.rle_bomb(65535)
    assert len(data) < 1000
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    peak, error = _peak_bytes(lambda _: read_dicom(path), data)
    assert isinstance(error, TooLargeDicomError) and "65535x65535" in error.reason and error.path == str(path)
    assert peak < 1 << 20  # the decoder would allocate 4 GiB


def test_image_of_the_largest_size_read_passes_the_size_check(tmp_path):
    """The limit is a radiograph's: 8192 x 8192 at 16 bits is read (here its missing data is what fails)."""
    data = hostile.rle_bomb(MAX_SIDE)
    with pytest.raises(CorruptPixelDataError):
        read_dicom_bytes(data)


def test_deflate_bomb_is_refused_with_bounded_memory():
    data = hostile.deflate_bomb(1 << 30)  # 1 MB inflating to 1 GiB
    assert len(data) < 2 << 20
    peak, error = _peak_bytes(read_dicom_bytes, data)
    assert isinstance(error, TooLargeDicomError) and "inflates to more than" in error.reason
    # Its header declares 64 x 64 pixels, so inflation stops about 2 MiB in, far below the MAX_FILE_BYTES cap.
    assert peak < 8 << 20


def test_deflated_file_larger_than_the_header_probe_reads():
    """Past the first MiB inflated the header bounds the inflation: a valid 1024 x 1024 16-bit file (2 MiB of
    pixels) must still read whole."""
    pixels = (np.arange(1024 * 1024, dtype=np.uint32).reshape(1024, 1024) * 7919 % 4096).astype(np.uint16)
    found, metadata = read_dicom_bytes(hostile.deflated_dicom(pixels))
    assert found.shape == (1024, 1024) and metadata["rows"] == 1024
    assert len(np.unique(found)) > 200


@pytest.mark.parametrize("pixels", [gradient(), gradient().astype(np.uint16) * 16], ids=["8bit", "12bit"])
def test_valid_deflated_file_reads_like_its_plain_twin(tmp_path, pixels):
    plain = tmp_path / "plain.dcm"
    plain.write_bytes(hostile.to_bytes(hostile.dataset(pixels, ExplicitVRLittleEndian)))
    deflated = tmp_path / "deflated.dcm"
    deflated.write_bytes(hostile.deflated_dicom(pixels))
    assert pydicom.dcmread(deflated).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    expected, expected_meta = read_dicom(plain)
    found, metadata = read_dicom(deflated)
    np.testing.assert_array_equal(found, expected)
    assert metadata["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    assert read_dicom_header(deflated) == metadata
    assert {k: v for k, v in metadata.items() if k not in ("ImageId", "source_path", "transfer_syntax")} == {
        k: v for k, v in expected_meta.items() if k not in ("ImageId", "source_path", "transfer_syntax")
    }


def test_cut_deflated_file_is_truncated():
    data = hostile.deflated_dicom(gradient())
    with pytest.raises(TruncatedDicomError, match="deflated data stops"):
        read_dicom_bytes(data[:-40])


@pytest.mark.parametrize(
    "data, error, reason",
    [
        (hostile.jpeg_frame_bomb(20000, declared=64), TooLargeDicomError, "its codestream declares 20000x20000"),
        (hostile.jpeg_frame_bomb(4000, declared=64), CorruptPixelDataError, "declares 64x64"),
        (hostile.jpeg_frame_bomb(20000, declared=20000), TooLargeDicomError, "20000x20000"),
        (hostile.corrupt_vr(hostile.jpeg_dicom()), NotDicomError, "NotImplementedError"),
    ],
    ids=["jpeg_bomb", "jpeg_larger_than_header", "huge_header", "corrupt_vr"],
)
def test_decoder_failures_of_any_type_become_dicom_errors(data, error, reason):
    peak, caught = _peak_bytes(read_dicom_bytes, data)
    assert isinstance(caught, error) and reason in caught.reason
    assert caught.path == "request body" and "request body" in str(caught)
    assert peak < 8 << 20  # nothing decoded: a 4000 x 4000 JPEG alone would take 16 MB


def test_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.dcm"
    with open(path, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk space used
    peak, error = _peak_bytes(lambda _: read_dicom(path), b"")
    assert isinstance(error, TooLargeDicomError) and "more than" in error.reason
    assert peak < 1 << 20
    with pytest.raises(TooLargeDicomError):
        read_dicom_header(path)


def test_fifo_named_dcm_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.dcm"
    os.mkfifo(path)
    with pytest.raises(UnreadableDicomError, match="not a regular file"):
        read_dicom(path)


# ---------------------------------------------------------------------------------------------------------
# Listing

STAGE1 = [
    "dicom-images-train/1.2.1/1.2.2/1.2.276.0.7230010.3.1.4.1.dcm",
    "dicom-images-train/1.2.3/1.2.4/1.2.276.0.7230010.3.1.4.2.dcm",
    "dicom-images-test/1.2.5/1.2.6/1.2.276.0.7230010.3.1.4.3.dcm",
]
STAGE2 = ["stage_2_images/ID_0a1b2c3d4.dcm", "stage_2_images/ID_ff00ee11d.DCM"]


@pytest.mark.parametrize("layout", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_find_dicoms_in_either_layout(tmp_path, layout):
    for relative in layout:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    (tmp_path / "stage_2_train.csv").write_text("ImageId,EncodedPixels\n")
    (tmp_path / layout[0]).with_name(".ID_x.tmp.dcm").write_bytes(b"")  # an interrupted atomic write
    found = find_dicoms(tmp_path)
    expected = sorted((Path(relative).stem, tmp_path / relative) for relative in layout)
    assert list(found.items()) == expected


def test_find_dicoms_rejects_two_files_with_one_image_id(tmp_path):
    for relative in ["dicom-images-train/a/b/1.2.3.dcm", "dicom-images-test/c/d/1.2.3.dcm"]:
        (tmp_path / relative).parent.mkdir(parents=True)
        (tmp_path / relative).write_bytes(b"")
    with pytest.raises(DataError) as caught:
        find_dicoms(tmp_path)
    message = str(caught.value)
    assert "'1.2.3'" in message
    assert str(tmp_path / "dicom-images-train/a/b/1.2.3.dcm") in message
    assert str(tmp_path / "dicom-images-test/c/d/1.2.3.dcm") in message


def test_find_dicoms_warns_of_a_folder_it_cannot_list(tmp_path, monkeypatch, caplog):
    write_jpeg_dicom(tmp_path / "open" / "a.dcm", gradient(8, 8), tags("1.2.3"))
    write_jpeg_dicom(tmp_path / "closed" / "b.dcm", gradient(8, 8), tags("1.2.4"))
    real_scandir = os.scandir

    def scandir(folder):  # as a folder without read permission answers (tests may run as root, who reads all)
        if Path(folder).name == "closed":
            raise PermissionError(13, "Permission denied", str(folder))
        return real_scandir(folder)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.dicom"):
        assert list(find_dicoms(tmp_path)) == ["a"]
    assert f"cannot list the folder {tmp_path / 'closed'} (Permission denied)" in caplog.text


def test_find_dicoms_in_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_dicoms(tmp_path / "nowhere")
