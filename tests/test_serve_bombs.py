"""Decompression bombs posted to the server: a DICOM of a few hundred bytes whose header claims 65535 x 65535
RLE pixels, and a ~1 MB deflated DICOM that inflates to 1 GiB. Each must get a 400 with a reason, quickly, while
the server process grows by less than :data:`MEMORY_BOUND`; a watchdog kills the server the moment it grows past
that, so a missing bound fails the test instead of exhausting the machine."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

from fake_experiment import make_package
from serve_client import call, running_server

MEMORY_BOUND = 64 * 2**20
"""Most the server's resident memory may grow while refusing a bomb (a 1024 px radiograph needs a few MB)."""
ANSWER_SECONDS = 5


def _file_meta(transfer_syntax: str) -> bytes:
    meta = Dataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.276.0.7230010.3.1.4.99"
    meta.TransferSyntaxUID = transfer_syntax
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()


def _image_header(rows: int, columns: int, bits: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.276.0.7230010.3.1.4.99"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _explicit_le(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def rle_bomb() -> bytes:
    """65535 x 65535 16-bit pixels claimed; one RLE frame of two 2-byte segments."""
    segment = b"\x81\x00"  # one run: 128 zero bytes
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds = _image_header(65535, 65535, 16)
    ds.PixelData = encapsulate([header + segment * 2])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _file_meta(RLELossless) + _explicit_le(ds)


def deflate_bomb(inflated: int = 2**30) -> bytes:
    """A plausible 1024 x 1024 8-bit header, then pixel data of ``inflated`` zero bytes, deflated."""
    body = _explicit_le(_image_header(1024, 1024, 8)) + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", inflated)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts, zeros = [packer.compress(body)], bytes(2**24)
    for _ in range(inflated // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return _file_meta(DeflatedExplicitVRLittleEndian) + b"".join(parts)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class Watchdog(threading.Thread):
    """Samples a process's resident memory every 10 ms; kills it once it grows past ``bound`` bytes."""

    def __init__(self, process, bound: int) -> None:
        super().__init__(daemon=True)
        self.process, self.bound = process, bound
        self.baseline = self.peak = _rss(process.pid)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01) and self.process.poll() is None:
            try:
                self.peak = max(self.peak, _rss(self.process.pid))
            except (OSError, AssertionError):
                return
            if self.peak - self.baseline > self.bound:
                self.process.kill()
                return

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.fixture
def server(tmp_path):
    _, package = make_package(tmp_path)
    with running_server(package, tmp_path / "server.log", "--max-body-mb", "6", "--workers", "2") as started:
        yield started


@pytest.mark.parametrize("make", [rle_bomb, deflate_bomb], ids=["rle 65535 x 65535", "deflate to 1 GiB"])
def test_a_bomb_is_refused_before_it_costs_memory(server, make):
    body = make()
    assert len(body) < 2 * 2**20
    watchdog = Watchdog(server.process, MEMORY_BOUND)
    watchdog.start()
    began = time.monotonic()
    try:
        status, _, answer = call(
            server.port, "POST", "/invocations", body, {"Content-Type": "application/dicom"}, timeout=60
        )
    except OSError:
        status, answer = 0, b""
    seconds = time.monotonic() - began
    watchdog.stop.set()
    watchdog.join()
    assert watchdog.growth < MEMORY_BOUND, f"the server grew by {watchdog.growth / 2**20:.0f} MiB (killed)"
    assert status == 400 and b"error" in answer, answer
    assert seconds < ANSWER_SECONDS
    assert call(server.port, "GET", "/ping")[0] == 200
