"""Decode bounds (issue 25): a codestream is refused from its own header, before a pixel is decoded, when it
declares another size than its DICOM, a size beyond the bound, or a progressive JPEG of too many scans."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless

import hostile
from clinical import (
    clinical_dataset,
    clinical_dicom,
    clinical_image,
    codestream_claiming,
    frame_of,
    progressive_jpeg,
    progressive_jpeg_dicom,
)
from pneumoseg.data import dicom
from pneumoseg.data.codestream import MAX_JPEG_SCANS, CodestreamError, j2k_header, jpeg_header
from pneumoseg.data.dicom import CorruptPixelDataError, TooLargeDicomError, read_dicom_bytes
from pneumoseg.serve import handler

CODESTREAMS = [JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1]


@pytest.fixture
def no_decoding(monkeypatch):
    """Every decoder of the reader fails the test: a refusal must come before decoding."""

    def decoded(*_):
        pytest.fail("the pixels were decoded")

    monkeypatch.setattr(dicom, "_decode_with_pydicom", decoded)
    monkeypatch.setitem(dicom._DECODERS, JPEGBaseline8Bit, decoded)


@pytest.mark.parametrize("syntax", CODESTREAMS, ids=lambda uid: uid.keyword)
def test_codestream_beyond_the_pixel_bound_is_refused_before_decoding(syntax, no_decoding):
    """Issue 25's case: a 2 KB DICOM declaring 48 x 40 whose codestream declares 13000 x 13000."""
    data = codestream_claiming(syntax, 13000, 13000)
    assert len(data) < 4000
    with pytest.raises(TooLargeDicomError, match="its codestream declares 13000x13000"):
        read_dicom_bytes(data)


@pytest.mark.parametrize("syntax", CODESTREAMS, ids=lambda uid: uid.keyword)
def test_codestream_of_another_size_than_its_dicom_is_refused_before_decoding(syntax, no_decoding):
    with pytest.raises(CorruptPixelDataError, match="its codestream holds 64x56 pixels .* declares 48x40"):
        read_dicom_bytes(codestream_claiming(syntax, 64, 56))


def test_jpeg_frame_beyond_the_pixel_bound_is_refused_before_decoding(no_decoding):
    with pytest.raises(TooLargeDicomError, match="its codestream declares 20000x20000"):
        read_dicom_bytes(hostile.jpeg_frame_bomb(20000, declared=64))


def test_progressive_frame_under_the_baseline_syntax_reads_like_pillow():
    image = hostile.small_image()
    pixels, _ = read_dicom_bytes(progressive_jpeg_dicom(image))
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(progressive_jpeg(image)))))


def test_progressive_scan_bomb_in_a_dicom_is_refused_before_decoding(no_decoding):
    data = progressive_jpeg_dicom(hostile.small_image(), extra_scans=MAX_JPEG_SCANS)
    assert len(data) < 200_000
    with pytest.raises(TooLargeDicomError, match=f"more than {MAX_JPEG_SCANS} scans \\(MAX_JPEG_SCANS\\)"):
        read_dicom_bytes(data)


def test_progressive_jpeg_at_the_scan_cap_is_read():
    image = hostile.small_image()
    scans = jpeg_header(progressive_jpeg(image)).scans
    data = progressive_jpeg_dicom(image, extra_scans=MAX_JPEG_SCANS - scans)
    assert read_dicom_bytes(data)[0].shape == image.shape


def test_progressive_scan_bomb_as_a_jpeg_request_is_a_400_naming_the_limit(monkeypatch):
    bomb = progressive_jpeg(hostile.small_image(), extra_scans=MAX_JPEG_SCANS)
    monkeypatch.setattr(Image.Image, "load", lambda *_: pytest.fail("the pixels were decoded"))
    with pytest.raises(handler.BadRequest, match="MAX_JPEG_SCANS") as caught:
        handler.input_fn(bomb, "image/jpeg")
    assert caught.value.status == 400


def test_jpeg_header_counts_scans_and_skips_stuffed_bytes():
    image = hostile.small_image()
    baseline = io.BytesIO()
    Image.fromarray(image).save(baseline, format="JPEG", quality=95)
    assert jpeg_header(baseline.getvalue()).scans == 1
    progressive = progressive_jpeg(image)
    scans = jpeg_header(progressive).scans
    assert scans == progressive.count(b"\xff\xda") > 1  # no 0xFF 0xDA inside entropy-coded data
    assert jpeg_header(progressive_jpeg(image, extra_scans=5)).scans == scans + 5
    # JPEG-LS stuffs a bit, not a byte, after 0xFF: a 12-bit noisy image has many 0xFF bytes in its scan.
    frame = frame_of(clinical_dataset(clinical_image(bits=12), JPEGLSLossless, bits_stored=12))
    assert frame.count(b"\xff") > 5 and jpeg_header(frame).scans == 1


def test_j2k_header_reads_a_bare_codestream_and_a_jp2_file():
    frame = frame_of(clinical_dataset(clinical_image(bits=12), JPEG2000Lossless, bits_stored=12))
    header = j2k_header(frame)
    assert (header.rows, header.cols, header.components, header.bits, header.scans) == (48, 40, 1, 12, 1)
    jp2 = (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + b"\x00\x00\x00\x10ftypjp2 \x00\x00\x00\x00"
        + (len(frame) + 8).to_bytes(4, "big")
        + b"jp2c"
        + frame
    )
    assert j2k_header(jp2) == header


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x01", "SOI"),
        (b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00", "scan before its frame"),
        (b"\xff\xd8\xff\xc0\x00\x0b\x08\x00\x00\x00\x10\x01\x01\x11\x00", "DNL"),
        (b"\xff\xd8\xff\xc0\x00\x40\x08", "beyond the data"),
        (
            b"\xff\xd8\xff\xc3\x00\x0b\x08\x00\x10\x00\x10\x01\x01\x11\x00\xff\xc0\x00\x0b\x08\x00\x10\x00\x10\x01"
            b"\x01\x11\x00",
            "two frames",
        ),
    ],
)
def test_malformed_jpeg_headers(data, message):
    with pytest.raises(CodestreamError, match=message):
        jpeg_header(data)


def test_malformed_j2k_headers():
    frame = frame_of(clinical_dataset(clinical_image(bits=12), JPEG2000Lossless, bits_stored=12))
    with pytest.raises(CodestreamError, match="SOC and SIZ"):
        j2k_header(frame[2:])
    with pytest.raises(CodestreamError, match="cut short"):
        j2k_header(frame[:30])
    siz = frame.index(b"\xff\x51")
    zero_tiles = frame[: siz + 22] + bytes(8) + frame[siz + 30 :]  # XTsiz = YTsiz = 0
    with pytest.raises(CodestreamError, match="inconsistent"):
        j2k_header(zero_tiles)
    with pytest.raises(CodestreamError, match="jp2c"):
        j2k_header(b"\x00\x00\x00\x0cjP  \r\n\x87\n")


def test_an_encapsulated_syntax_without_a_codestream_check_is_refused(monkeypatch):
    """A decoder pydicom may add for another syntax is not used before its codestream's header is read here."""
    monkeypatch.delitem(dicom._CODESTREAM_HEADERS, JPEGLSLossless)
    data = clinical_dicom(clinical_image(bits=12), JPEGLSLossless, bits_stored=12)
    with pytest.raises(dicom.UnsupportedDicomError, match="JPEG-LS Lossless Image Compression\\) is not read"):
        read_dicom_bytes(data)
