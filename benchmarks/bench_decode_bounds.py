"""Benchmark of the decode bounds: the costliest file the DICOM reader still decodes, against a valid image of the
same size decoded in the same run, and the time to refuse the bombs of issue 25.

    python benchmarks/bench_decode_bounds.py [--side 2048] [--repeats 3]

Files, all ``--side`` x ``--side`` grey DICOMs made here (tests/clinical.py), timed through ``read_dicom_bytes``
(CPU time, the best of ``--repeats``):

* reference: the image as JPEG Baseline (quality 90), as the challenge stores it;
* progressive at the cap: a progressive JPEG frame whose last scan (an AC refinement, the costliest kind) is
  repeated up to ``MAX_JPEG_SCANS`` scans in all; each scan is a pass over the whole image;
* empty progressive at the cap: the same with a DC refinement scan repeated (a few bytes a scan for small images);
* 16-bit JPEG 2000 and JPEG-LS lossless, and 16-bit RLE, of the same image.

Then the refusals: the issue's 2,000-scan progressive bomb and a 48 x 40 DICOM whose JPEG 2000 codestream claims
13000 x 13000, each refused from its header (milliseconds, no pixel decoded).

Prints each time and its ratio to the reference. Time per file grows with pixels x passes and with its bytes; the
cap holds the passes, the reader's size bounds the pixels and bytes.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostile  # noqa: E402
from clinical import clinical_dicom, clinical_image, codestream_claiming, progressive_jpeg_dicom  # noqa: E402
from pneumoseg.data.codestream import MAX_JPEG_SCANS, jpeg_header  # noqa: E402
from pneumoseg.data.dicom import DicomError, read_dicom_bytes  # noqa: E402


def cpu_seconds(read: Callable[[], object], repeats: int) -> float:
    """The least CPU time of ``repeats`` calls of ``read``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        read()
        best = min(best, time.process_time() - start)
    return best


def refusal_seconds(data: bytes, repeats: int) -> tuple[float, str]:
    """CPU time to refuse ``data``, and the reason given."""
    reason = ""

    def read() -> None:
        nonlocal reason
        try:
            read_dicom_bytes(data)
        except DicomError as exc:
            reason = exc.reason

    return cpu_seconds(read, repeats), reason


def jpeg_with_repeated_scan(image: np.ndarray, scan: int) -> bytes:
    """A DICOM under JPEG Baseline holding a progressive JPEG of ``image`` whose ``scan``-th scan (0-based) is
    repeated until the frame holds :data:`MAX_JPEG_SCANS` scans."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, progressive=True)
    jpeg = buffer.getvalue()
    end = jpeg.rindex(b"\xff\xd9")
    bounds = [match.start() for match in re.finditer(b"\xff\xda", jpeg)] + [end]  # no 0xFF 0xDA in scan data
    scan %= len(bounds) - 1
    chosen = jpeg[bounds[scan] : bounds[scan + 1]]
    frame = jpeg[:end] + chosen * (MAX_JPEG_SCANS - jpeg_header(jpeg).scans) + jpeg[end:]
    assert jpeg_header(frame).scans == MAX_JPEG_SCANS
    return hostile.to_bytes(hostile.dataset(image, JPEGBaseline8Bit, encapsulate([frame])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed reads per file, the best kept (default 3)")
    args = parser.parse_args(argv)

    image8 = clinical_image(args.side, args.side, bits=8)
    image16 = clinical_image(args.side, args.side, bits=16)
    reference = hostile.jpeg_dicom(image8)
    files = {
        "progressive, AC refinement scans to the cap": jpeg_with_repeated_scan(image8, scan=-1),
        "progressive, DC refinement scans to the cap": jpeg_with_repeated_scan(image8, scan=4),
        "JPEG 2000 lossless, 16-bit": clinical_dicom(image16, JPEG2000Lossless),
        "JPEG-LS lossless, 16-bit": clinical_dicom(image16, JPEGLSLossless),
        "RLE lossless, 16-bit": clinical_dicom(image16, RLELossless),
    }
    base = cpu_seconds(lambda: read_dicom_bytes(reference), args.repeats)
    print(
        f"{args.side} x {args.side}, CPU seconds (best of {args.repeats}); reference: JPEG Baseline "
        f"{len(reference) / 1e6:.2f} MB, {base:.3f} s"
    )
    for name, data in files.items():
        seconds = cpu_seconds(lambda data=data: read_dicom_bytes(data), args.repeats)
        print(f"  {name:45s} {len(data) / 1e6:7.2f} MB {seconds:7.3f} s  {seconds / base:6.1f}x the reference")
    bombs = {
        "2,000-scan progressive bomb": progressive_jpeg_dicom(hostile.small_image(), extra_scans=2000),
        "JPEG 2000 claiming 13000 x 13000": codestream_claiming(JPEG2000Lossless, 13000, 13000),
    }
    for name, data in bombs.items():
        seconds, reason = refusal_seconds(data, args.repeats)
        print(f"  refused: {name:36s} {len(data) / 1e3:7.1f} KB {seconds * 1e3:7.2f} ms ({reason[:60]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
