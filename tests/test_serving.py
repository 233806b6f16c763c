"""The inference handler (pneumoseg.serve.handler) called in-process: decoding every content type, refusing bad bodies,
response negotiation, the JSON and PNG answers, and agreement with stage 05's submission."""

from __future__ import annotations

import inspect
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fake_experiment import make_package, write_fake_training
from pneumoseg import layout
from pneumoseg.data import rle
from pneumoseg.data.dicom import DicomTags, find_dicoms, read_dicom, write_jpeg_dicom
from pneumoseg.errors import DataError
from pneumoseg.serve import handler as serving
from pneumoseg.serve import package as package_format
from pneumoseg.stages import convert, demo_data, package, predict, prepare_labels

RNG = np.random.default_rng(7)
IMAGE = RNG.integers(0, 256, (40, 30), dtype=np.uint8)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """``(cfg, model.tar.gz)`` of a tiny untrained two-fold ensemble."""
    return make_package(tmp_path_factory.mktemp("package"))


@pytest.fixture(scope="module")
def model(packaged):
    with package_format.open_package(packaged[1]) as model_dir:
        return package_format.load_package(model_dir, device="cpu")


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def dicom_bytes(tmp_path: Path, image: np.ndarray, uid: str = "1.2.276.0.7230010.3.1.4.1.1") -> bytes:
    path = tmp_path / f"{uid}.dcm"
    write_jpeg_dicom(path, image, DicomTags(uid, "1.2.276.0.7230010.3.1.2.1", "1.2.276.0.7230010.3.1.3.1", "p1"))
    return path.read_bytes()


def grey3(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2)


# Lossless encodings of IMAGE, each of which must decode to exactly IMAGE.
LOSSLESS = {
    "png grey": ("image/png", lambda: png_bytes(IMAGE)),
    "png rgb": ("image/png", lambda: png_bytes(grey3(IMAGE))),
    "png rgba": ("image/png", lambda: png_bytes(np.dstack([grey3(IMAGE), np.full(IMAGE.shape, 9, np.uint8)]))),
    "png with parameters": ("Image/PNG; charset=binary", lambda: png_bytes(IMAGE)),
    "npy uint8": ("application/x-npy", lambda: npy_bytes(IMAGE)),
    "npy int64": ("application/x-npy", lambda: npy_bytes(IMAGE.astype(np.int64))),
    "npy big-endian uint16": ("application/x-npy", lambda: npy_bytes(IMAGE.astype(">u2"))),
    "npy fortran order": ("application/x-npy", lambda: npy_bytes(np.asfortranarray(IMAGE))),
    "npy h x w x 1": ("application/x-npy", lambda: npy_bytes(IMAGE[..., None])),
    "npy h x w x 3": ("application/x-npy", lambda: npy_bytes(grey3(IMAGE))),
}


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_bodies_decode_to_the_image(name):
    content_type, make = LOSSLESS[name]
    data = serving.input_fn(make(), content_type)
    assert data.pixels.dtype == np.uint8
    np.testing.assert_array_equal(data.pixels, IMAGE)
    assert data.image_id is None


def test_colour_is_made_grey_with_luma_weights():
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200  # pure red: 0.299 * 200 = 59.8
    assert serving.input_fn(png_bytes(colour), "image/png").pixels.max() == 60


def test_jpeg_decodes_as_pillow_decodes_it():
    body = jpeg_bytes(IMAGE)
    expected = np.asarray(Image.open(io.BytesIO(body)))
    np.testing.assert_array_equal(serving.input_fn(body, "image/jpeg").pixels, expected)


def test_dicom_decodes_as_read_dicom_with_its_image_id(tmp_path):
    image = RNG.integers(0, 256, (64, 48), dtype=np.uint8)
    body = dicom_bytes(tmp_path, image, uid="1.2.276.0.7230010.3.1.4.9.9")
    data = serving.input_fn(body, "application/dicom")
    np.testing.assert_array_equal(data.pixels, read_dicom(tmp_path / "1.2.276.0.7230010.3.1.4.9.9.dcm")[0])
    assert data.image_id == "1.2.276.0.7230010.3.1.4.9.9"


@pytest.mark.real_data
def test_real_dicom_decodes_as_stage_01_reads_it(siim_dir):
    path = sorted((siim_dir / "sample_images").glob("*.dcm"))[0]
    data = serving.input_fn(bytearray(path.read_bytes()), "application/dicom")
    np.testing.assert_array_equal(data.pixels, read_dicom(path)[0])
    assert data.pixels.shape == (1024, 1024)
    assert data.image_id == path.stem


def _npy_header_only(shape: tuple, dtype: str = "|u1") -> bytes:
    """An .npy header declaring ``shape`` with no data after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _dicom(tmp_path: Path) -> bytes:
    return dicom_bytes(tmp_path, RNG.integers(0, 256, (64, 64), dtype=np.uint8))


def _jpeg(_: Path) -> bytes:
    return jpeg_bytes(RNG.integers(0, 256, (64, 64), dtype=np.uint8))


# name -> (content type, body maker taking a scratch folder, what the error must say)
BAD_BODIES = {
    "empty dicom": ("application/dicom", lambda _: b"", "empty"),
    "empty png": ("image/png", lambda _: b"", "empty"),
    "empty npy": ("application/x-npy", lambda _: b"", "empty"),
    "not a dicom": ("application/dicom", lambda _: b"\0" * 300, "DICM"),
    "truncated dicom": ("application/dicom", lambda tmp: _dicom(tmp)[:-2000], "cannot read DICOM"),
    "truncated png": ("image/png", lambda _: png_bytes(IMAGE)[:-200], "image/png"),
    "truncated jpeg": ("image/jpeg", lambda tmp: _jpeg(tmp)[:-1000], "image/jpeg"),
    "jpeg sent as png": ("image/png", _jpeg, "image/png"),
    "not an image": (
        "image/png",
        lambda _: b"this is text, not a picture",
        "not a readable image/png: cannot identify image file$",
    ),
    "16-bit png": ("image/png", lambda _: png_bytes(IMAGE.astype(np.uint16) * 200), "mode"),
    "not an npy": ("application/x-npy", lambda _: png_bytes(IMAGE), "application/x-npy"),
    "truncated npy": ("application/x-npy", lambda _: npy_bytes(IMAGE)[:-7], "truncated"),
    "npy header only": ("application/x-npy", lambda _: _npy_header_only((8000, 8000)), "truncated"),
    "npy too many pixels": ("application/x-npy", lambda _: _npy_header_only((100_000, 100_000)), "more than"),
    "npy empty image": ("application/x-npy", lambda _: npy_bytes(np.zeros((0, 5), np.uint8)), "empty"),
    "npy object array": ("application/x-npy", lambda _: npy_bytes(np.array([[None, 1]], dtype=object)), "dtype"),
    "npy floats": ("application/x-npy", lambda _: npy_bytes(IMAGE / 255.0), "dtype"),
    "npy 16-bit values": ("application/x-npy", lambda _: npy_bytes(IMAGE.astype(np.int16) * 4), "0..255"),
    "npy 4 channels": ("application/x-npy", lambda _: npy_bytes(np.zeros((4, 4, 4), np.uint8)), "shape"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_unreadable_bodies_are_bad_requests(case, tmp_path):
    content_type, make, reason = BAD_BODIES[case]
    with pytest.raises(serving.BadRequest, match=reason) as caught:
        serving.input_fn(make(tmp_path), content_type)
    assert caught.value.status == 400 and caught.value.status_code == 400
    # what a user reads: no Python object repr, no exception class name
    assert not re.search(r" at 0x|<\w+|\b[A-Z]\w+Error\b", str(caught.value)), str(caught.value)


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "image/gif", "application/octet-stream"])
def test_unsupported_content_types_are_415(content_type):
    with pytest.raises(serving.UnsupportedMediaType, match="application/dicom") as caught:
        serving.input_fn(png_bytes(IMAGE), content_type)
    assert caught.value.status == 415


def test_request_errors_carry_what_sagemakers_toolkit_reads():
    error = serving.NotAcceptable("no such type")
    assert (error.status_code, error.message, error.phrase) == (406, "no such type", "Not Acceptable")
    assert isinstance(error, DataError) and str(error) == "no such type"


def test_handler_functions_have_the_arity_sagemaker_calls_them_with():
    # SageMaker's toolkit passes one more argument (its context) to a function that takes one more parameter.
    arity = {
        name: len(inspect.signature(getattr(serving, name)).parameters)
        for name in ("model_fn", "input_fn", "predict_fn", "output_fn")
    }
    assert arity == {"model_fn": 1, "input_fn": 2, "predict_fn": 2, "output_fn": 2}


@pytest.mark.parametrize(
    "accept, expected",
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("image/png", "image/png"),
        ("image/*", "image/png"),
        ("text/html, */*;q=0.1", "application/json"),
        ("application/json;q=0.5, image/png", "image/png"),
        ("image/png;q=0.2, application/json;q=0.9", "application/json"),
        ("IMAGE/PNG", "image/png"),
    ],
)
def test_negotiate(accept, expected):
    assert serving.negotiate(accept) == expected


@pytest.mark.parametrize("accept", ["text/html", "image/png;q=0", "text/csv, image/jpeg"])
def test_negotiate_refuses_unsupported_types(accept):
    with pytest.raises(serving.NotAcceptable):
        serving.negotiate(accept)


def test_json_answer_describes_the_prediction(model, packaged):
    image = RNG.integers(0, 256, (50, 70), dtype=np.uint8)
    result = serving.predict_fn(serving.input_fn(png_bytes(image), "image/png"), model)
    body, content_type = serving.output_fn(result, "application/json")
    answer = json.loads(body)
    mask = rle.decode(answer["EncodedPixels"], 50, 70)
    np.testing.assert_array_equal(mask, result.prediction.mask)
    assert mask.any(), "the untrained models should draw something at threshold 0.5"
    manifest = json.loads((packaged[1].parent / "manifest.json").read_text())
    assert content_type == "application/json"
    assert answer["ImageId"] is None
    assert answer["area"] == int(mask.sum()) and answer["has_pneumothorax"] is True
    assert answer["max_probability"] == pytest.approx(float(result.prediction.probs.max()))
    assert answer["gate_probability"] is None  # the tiny model has no gate head
    assert (answer["height"], answer["width"]) == (50, 70)
    assert answer["postprocess"] == {"name": "threshold", "params": {"threshold": 0.5, "min_area": 0.0}}
    assert answer["model"] == {"name": "tiny", "version": manifest["version"], "runtime": model.runtime}


def test_png_answer_is_the_mask_at_the_input_size(model):
    image = RNG.integers(0, 256, (90, 60), dtype=np.uint8)
    result = serving.predict_fn(serving.input_fn(npy_bytes(image), "application/x-npy"), model)
    body, content_type = serving.output_fn(result, "image/*")
    mask = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert content_type == "image/png" and mask.shape == (90, 60) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, result.prediction.mask)


def test_handler_predicts_as_the_experiments_predictor(model, packaged):
    from pneumoseg.inference.predictor import Predictor

    image = RNG.integers(0, 256, (130, 100), dtype=np.uint8)
    # The package's models run on ONNX Runtime (auto on the CPU); the experiment's, exported in memory, too.
    assert model.runtime == "onnxruntime"
    [expected] = Predictor.from_experiment(packaged[0], device="cpu", runtime="onnxruntime").predict([image])
    found = serving.predict_fn(serving.ImageInput(image, None, "application/x-npy"), model).prediction
    np.testing.assert_array_equal(found.probs, expected.probs)
    np.testing.assert_array_equal(found.mask, expected.mask)


def test_load_package_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(DataError, match="not a pneumoseg model package"):
        package_format.load_package(tmp_path)


def test_open_package_refuses_a_corrupt_archive(tmp_path):
    broken = tmp_path / "model.tar.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot extract"), package_format.open_package(broken):
        pass


@pytest.mark.slow
def test_handler_rle_equals_the_submission_row(tiny_cfg):
    """The demo pipeline on tiny data (stages 00-02, untrained stand-ins for 03-04, stage 05), packaged: the handler's
    EncodedPixels for each test DICOM equals its row of submission.csv.

    Stage 05 predicts one image per batch here, as the handler does: a convolution may add up in another order for
    another batch size, and the last bit of a probability that sits exactly at the threshold could then differ.
    (Untrained models put many pixels near the threshold.)"""
    cfg = tiny_cfg("predict.batch_size=1")
    demo_data.run(cfg)
    convert.run(cfg)
    prepare_labels.run(cfg)
    write_fake_training(cfg)
    predict.run(cfg)
    package.run(cfg)
    submission = pd.read_csv(layout.submission_path(cfg), dtype=str).set_index("ImageId")["EncodedPixels"]
    test_ids = set(pd.read_csv(layout.test_images_path(cfg), dtype=str)["ImageId"])
    dicoms = {image_id: path for image_id, path in find_dicoms(cfg.paths.input_dir).items() if image_id in test_ids}
    assert len(dicoms) == len(submission) > 0
    with package_format.open_package(layout.package_path(cfg)) as model_dir:
        # Stage 05 predicts with torch (the runtime of the OOF maps); the package served with torch gives exactly its
        # rows. (ONNX Runtime, model_fn's default on the CPU, is held to stage 06's measured tolerance instead: on
        # untrained models many pixels sit at the threshold.)
        model = package_format.load_package(model_dir, device="cpu", runtime="torch")
        assert serving.model_fn(str(model_dir)).runtime == "onnxruntime"
    positive = 0
    for image_id, path in dicoms.items():
        result = serving.predict_fn(serving.input_fn(path.read_bytes(), "application/dicom"), model)
        answer = json.loads(serving.output_fn(result, "application/json")[0])
        assert answer["ImageId"] == image_id
        assert answer["EncodedPixels"] == submission[image_id]
        positive += answer["has_pneumothorax"]
    assert positive > 0, "the comparison should include non-empty masks"
