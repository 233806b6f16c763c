"""The headers of compressed image codestreams, read without decoding a pixel.

A decoder allocates, and spends time on, what a codestream's own header declares, which may differ from what the
DICOM around it declares: a 2 KB JPEG 2000 frame can claim 13000 x 13000 pixels, a 600 KB progressive JPEG can
hold 2,000 scans, each a pass over the whole image. The readers here give the size, components, bit depth and
scan (or tile) count of a codestream from its markers alone, so that the caller can refuse it before decoding:
:func:`jpeg_header` for the JPEG family (baseline, extended and progressive JPEG, lossless JPEG, JPEG-LS) and
:func:`j2k_header` for JPEG 2000 (a bare codestream or one wrapped in JP2 boxes). :func:`check_scans` holds the
scan cap, shared by the DICOM reader and the server's JPEG bodies.
"""

from __future__ import annotations

from dataclasses import dataclass

from pneumoseg.errors import DataError

MAX_JPEG_SCANS = 64
"""The most scans a JPEG may hold. Each scan of a progressive JPEG is a pass over every block of the image, so
decode time is about scans x pixels; encoders write 1 scan per component for sequential JPEG and about 6-10 for
progressive (libjpeg's default script; mozjpeg's optimised ones stay near 20). With the pixel bound of the DICOM
reader (8192 x 8192), 64 scans of an empty progression cost about 2 s; 2,000 scans cost minutes."""

# Start-of-frame markers: every SOFn of ISO 10918-1 (C0-C3, C5-C7, C9-CB, CD-CF; C4, C8 and CC are other
# markers) and JPEG-LS's SOF55 (F7).
_SOF_MARKERS = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7])
_SOS, _EOI, _SOI = 0xDA, 0xD9, 0xD8
# Markers without a length field: RSTm (D0-D7), SOI, EOI and TEM (01).
_STANDALONE = frozenset([*range(0xD0, 0xD8), _SOI, _EOI, 0x01])
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(DataError):
    """A codestream whose header is malformed, or beyond a limit; the message says which."""


class CodestreamLimitError(CodestreamError):
    """A well-formed codestream beyond a limit (:data:`MAX_JPEG_SCANS`): refused before decoding."""


@dataclass(frozen=True)
class CodestreamHeader:
    """What a codestream's own header declares.

    Args:
        rows, cols: the image's size in pixels.
        components: samples per pixel (1 for grey).
        bits: bits per sample.
        scans: JPEG scans (SOS markers) up to the first EOI, or JPEG 2000 tiles.
    """

    rows: int
    cols: int
    components: int
    bits: int
    scans: int


def check_scans(header: CodestreamHeader, name: str) -> None:
    """Refuse a JPEG of more than :data:`MAX_JPEG_SCANS` scans.

    Args:
        header: from :func:`jpeg_header`.
        name: what the message calls the image (a file, "the JPEG frame").

    Raises:
        CodestreamLimitError: naming the limit.
    """
    if header.scans > MAX_JPEG_SCANS:
        raise CodestreamLimitError(
            f"{name} holds more than {MAX_JPEG_SCANS} scans (MAX_JPEG_SCANS), the most "
            f"decoded: each scan is a pass over the whole image (a progressive-JPEG scan bomb)"
        )


def jpeg_header(data: bytes) -> CodestreamHeader:
    """The header of a JPEG, lossless JPEG or JPEG-LS codestream: its frame (SOF) and its scan count.

    Args:
        data: the codestream, from its SOI marker.

    Markers are walked up to EOI (or the data's end); entropy-coded data is skipped to the next marker. Counting
    stops one past :data:`MAX_JPEG_SCANS`, so a scan bomb costs no more to read than a valid file.

    Raises:
        CodestreamError: no SOI, a marker segment cut short, no frame before the first scan, two frames, or a
            frame whose height is left to a DNL marker.
    """
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("the JPEG codestream does not start with an SOI marker")
    frame: tuple[int, int, int, int] | None = None
    scans, position = 0, 2
    while position + 1 < len(data) and scans <= MAX_JPEG_SCANS:
        if data[position] != 0xFF:  # stray bytes before a marker: decoders skip them with a warning, as here
            found = data.find(b"\xff", position)
            position = found if found >= 0 else len(data)
            continue
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            position += 2
            continue
        segment = _segment(data, position)
        if marker in _SOF_MARKERS:
            if frame is not None:
                raise CodestreamError("the JPEG codestream has two frames (SOF markers); one image is read")
            frame = _frame(segment)
        position += 2 + 2 + len(segment)
        if marker == _SOS:
            if frame is None:
                raise CodestreamError("the JPEG codestream has a scan before its frame header (SOF)")
            scans += 1
            position = _entropy_end(data, position)
    if frame is None:
        raise CodestreamError("the JPEG codestream has no frame header (SOF marker)")
    bits, rows, cols, components = frame
    return CodestreamHeader(rows, cols, components, bits, scans)


def _segment(data: bytes, position: int) -> bytes:
    """The payload of the marker segment at ``position`` (after its 2-byte length)."""
    if position + 4 > len(data):
        raise CodestreamError(f"the JPEG codestream ends inside the marker at byte {position}")
    length = int.from_bytes(data[position + 2 : position + 4], "big")
    if length < 2 or position + 2 + length > len(data):
        raise CodestreamError(f"the JPEG marker segment at byte {position} has length {length}, beyond the data")
    return data[position + 4 : position + 2 + length]


def _frame(segment: bytes) -> tuple[int, int, int, int]:
    """``(bits, rows, cols, components)`` of an SOF segment."""
    if len(segment) < 6:
        raise CodestreamError("the JPEG frame header (SOF) is too short")
    bits, rows, cols, components = (
        segment[0],
        int.from_bytes(segment[1:3], "big"),
        int.from_bytes(segment[3:5], "big"),
        segment[5],
    )
    if rows == 0:
        raise CodestreamError("the JPEG frame leaves its height to a DNL marker, which is not read")
    return bits, rows, cols, components


def _entropy_end(data: bytes, position: int) -> int:
    """The position of the first marker after the entropy-coded data starting at ``position`` (or the data's end).

    Inside the data an 0xFF byte is followed by 0x00 (JPEG's byte stuffing), by a byte below 0x80 (JPEG-LS's bit
    stuffing) or by a restart marker RSTm; any other byte after 0xFF starts a marker.
    """
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following < 0x80 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            position += 1
            continue
        return position


def j2k_header(data: bytes) -> CodestreamHeader:
    """The header of a JPEG 2000 codestream (its SIZ marker), bare or inside a JP2 file's ``jp2c`` box.

    Args:
        data: the codestream or JP2 file.

    Returns:
        The size of the first component's grid, the component count, the first component's bit depth, and the
        tile count as ``scans``.

    Raises:
        CodestreamError: no SOC and SIZ markers at the start, or a SIZ segment that is too short or inconsistent.
    """
    if data[:12] == _JP2_SIGNATURE:
        data = _jp2_codestream(data)
    if data[:4] != _J2K_SOC_SIZ:
        raise CodestreamError("the JPEG 2000 codestream does not start with SOC and SIZ markers")
    length = int.from_bytes(data[4:6], "big")
    siz = data[6 : 4 + length]
    if length < 41 or len(siz) != length - 2:
        raise CodestreamError("the JPEG 2000 SIZ marker segment is cut short")
    fields = [int.from_bytes(siz[at : at + 4], "big") for at in range(2, 34, 4)]
    width, height, x_origin, y_origin, tile_width, tile_height, tile_x, tile_y = fields
    components = int.from_bytes(siz[34:36], "big")
    if not (
        x_origin < width
        and y_origin < height
        and tile_width
        and tile_height
        and components
        and tile_x <= x_origin
        and tile_y <= y_origin
        and len(siz) >= 36 + 3 * components
    ):
        raise CodestreamError("the JPEG 2000 SIZ marker declares an inconsistent image or tile grid")
    depth, x_step, y_step = siz[36], siz[37], siz[38]
    if not (x_step and y_step):
        raise CodestreamError("the JPEG 2000 SIZ marker declares a zero subsampling step")
    cols = -(-width // x_step) - -(-x_origin // x_step)
    rows = -(-height // y_step) - -(-y_origin // y_step)
    tiles = -(-(width - tile_x) // tile_width) * -(-(height - tile_y) // tile_height)
    return CodestreamHeader(rows, cols, components, (depth & 0x7F) + 1, tiles)


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of a JP2 file's contiguous codestream box (``jp2c``)."""
    position = 0
    while position + 8 <= len(data):
        size, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
        header = 8
        if size == 1:  # the size follows as 8 bytes
            size, header = int.from_bytes(data[position + 8 : position + 16], "big"), 16
        elif size == 0:  # the last box runs to the end
            size = len(data) - position
        if size < header:
            break
        if kind == b"jp2c":
            return data[position + header : position + size]
        position += size
    raise CodestreamError("the JP2 file has no codestream box (jp2c)")
