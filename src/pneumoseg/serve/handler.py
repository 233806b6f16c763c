"""The inference handler of a model package: SageMaker's handler functions, which the HTTP server
(:mod:`pneumoseg.serve.server`) calls too::

    model = model_fn("/opt/ml/model")                   # an extracted model.tar.gz
    data = input_fn(body, "application/dicom")          # request bytes -> ImageInput
    result = predict_fn(data, model)                    # -> Result: the stage-05 Predictor's Prediction
    body, content_type = output_fn(result, "application/json")
    status, body, content_type = answer(model, body, "application/dicom", "application/json")  # all three, never raises

The package's ``code/inference.py`` gives SageMaker's container ``model_fn`` and :func:`transform_fn` (the three
steps in one, with the toolkit's trailing ``context``): an error is answered with its own status and a JSON body
instead of the toolkit's 500 with a Python traceback.

A model package (written by stage 06, :mod:`pneumoseg.stages.package`) is a folder, or its ``model.tar.gz``:

* ``manifest.json``: name, version, the model files and how to predict (TTA, resizing, batch size, AMP);
* ``thresholds.json``: the post-processing as a ``{name, params}`` block;
* ``config.yaml``: the experiment's resolved config, for the record;
* ``fold<k>/best_<rank>.pt``: the weights, in stage 03's checkpoint format (tensors and plain data only, loaded
  with ``weights_only=True``: no pickled code, no download);
* ``code/inference.py`` (imports ``model_fn`` and ``transform_fn`` from here), ``code/requirements.txt`` and
  ``code/pneumoseg/`` (this package's source), which SageMaker's container puts on its Python path.

Request bodies, by content type: ``application/dicom`` (a DICOM file, read like stage 01 reads one),
``image/png`` and ``image/jpeg`` (8-bit grey, or colour made grey with the ITU-R 601 luma weights),
``application/x-npy`` (``numpy.save`` of an H x W, H x W x 1 or H x W x 3 array of integers in 0..255). Responses,
by ``Accept``: ``application/json`` (the default) or ``image/png`` (the mask, 0 or 255, at the input's size). The
JSON's ImageId is a DICOM's SOPInstanceUID: the challenge's ImageId for its stage-1 files, which are named by it
(stage-2 files are named by another id, which the body does not carry); other bodies have none.

A request the handler cannot serve raises a :class:`RequestError` that carries its HTTP status: 400
(:class:`BadRequest`: an empty or unreadable body), 415 (:class:`UnsupportedMediaType`) or 406
(:class:`NotAcceptable`). Inside SageMaker's container they are also the inference toolkit's own error type, so
even the four separate functions answer with that status (the toolkit then adds a traceback to the message).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from pneumoseg.data.dicom import read_dicom_bytes
from pneumoseg.data.pictures import check_size, decode_picture
from pneumoseg.errors import DataError, plain_reason
from pneumoseg.inference.predictor import Prediction
from pneumoseg.registry import Registry
from pneumoseg.serve.package import ServingModel, load_package

log = logging.getLogger(__name__)

JSON = "application/json"
PNG = "image/png"

try:  # inside SageMaker's serving container
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        """Stands in for the SageMaker inference toolkit's error type where the toolkit is not installed."""


class RequestError(DataError, _ToolkitError):
    """A request the handler cannot serve; ``status`` is the HTTP status to answer with.

    Args:
        message: what is wrong with the request and how to fix it (sent to the client).
    """

    status: ClassVar[int] = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        # The attributes SageMaker's inference toolkit answers with (it reads no others).
        self.status_code = int(self.status)
        self.message = message
        self.phrase = HTTPStatus(self.status).phrase


class BadRequest(RequestError):
    """An empty body, or one that is not a readable image of its content type."""


class UnsupportedMediaType(RequestError):
    """A content type the handler does not read."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class NotAcceptable(RequestError):
    """An ``Accept`` header that names no response type the handler writes."""

    status = HTTPStatus.NOT_ACCEPTABLE


@dataclass
class ImageInput:
    """A decoded request.

    Attributes:
        pixels: uint8 H x W grey image (0 is black).
        image_id: the challenge's ImageId when the body carries one (a DICOM's SOPInstanceUID), else None.
        media_type: the content type it was decoded from.
    """

    pixels: np.ndarray
    image_id: str | None
    media_type: str


@dataclass
class Result:
    """What :func:`predict_fn` returns: the prediction for one request, and where it came from."""

    prediction: Prediction
    image_id: str | None
    model: ServingModel

    def to_json(self) -> dict[str, Any]:
        """The JSON response: ImageId (None when unknown), the mask in the submission's run-length form
        (``EncodedPixels``, ``"-1"`` when empty; the package's ``fmt``), the image's size, the mask's area in pixels,
        the highest probability, the image-level gate probability (``gate_probability``; None for a model without the
        gate head), whether the gate emptied a mask the strategy alone would have drawn (``emptied_by_gate``), the
        post-processing and the model (its name, version and the runtime that answered: ``torch`` or
        ``onnxruntime``)."""
        prediction = self.prediction
        height, width = prediction.mask.shape
        return {
            "ImageId": self.image_id,
            "EncodedPixels": prediction.rle(self.model.fmt),
            "has_pneumothorax": prediction.has_pneumothorax,
            "area": prediction.area,
            "max_probability": prediction.max_prob,
            "gate_probability": prediction.gate,
            "emptied_by_gate": prediction.emptied_by_gate,
            "height": int(height),
            "width": int(width),
            "postprocess": self.model.postprocess,
            "model": {"name": self.model.name, "version": self.model.version, "runtime": self.model.runtime},
        }


# ---------------------------------------------------------------------------------------------------------
# Request bodies

Decoder = Callable[[bytes], ImageInput]
DECODERS: Registry[ImageInput] = Registry("request content type")  # each factory is a Decoder


def media_type(header: str | None) -> str:
    """The bare, lower-case media type of a ``Content-Type`` header (``"image/png; charset=x"`` -> ``image/png``)."""
    return (header or "").split(";", 1)[0].strip().lower()


@DECODERS.register("application/dicom")
def _decode_dicom(body: bytes) -> ImageInput:
    pixels, metadata = read_dicom_bytes(body)
    check_size(*pixels.shape)
    return ImageInput(pixels, metadata["ImageId"] or None, "application/dicom")


def _decode_picture(body: bytes, fmt: str, media: str) -> ImageInput:
    """A PNG or JPEG, strictly of format ``fmt`` (:func:`pneumoseg.data.pictures.decode_picture`)."""
    return ImageInput(decode_picture(body, fmt), None, media)


DECODERS.add("image/png", lambda body: _decode_picture(body, "PNG", "image/png"))
DECODERS.add("image/jpeg", lambda body: _decode_picture(body, "JPEG", "image/jpeg"))

_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


@DECODERS.register("application/x-npy")
def _decode_npy(body: bytes) -> ImageInput:
    """``numpy.save`` output, read without ``numpy.load``: that would allocate whatever shape the header claims
    before finding the data missing, and would unpickle object arrays."""
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version not in _NPY_HEADER_READERS:
        raise BadRequest(f".npy format version {version} is not read; save with numpy.save")
    shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    if dtype.hasobject or dtype.kind not in "ui":
        raise BadRequest(f"the array has dtype {dtype}; send uint8 (or integers in 0..255)")
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise BadRequest(f"the array has shape {shape}; send H x W (grey), H x W x 1 or H x W x 3 (RGB)")
    check_size(shape[0], shape[1])
    count = int(np.prod(shape))
    offset = stream.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise BadRequest(
            f"the array's data has {len(body) - offset} bytes, but its header declares {shape} "
            f"{dtype} ({count * dtype.itemsize} bytes): the body is truncated or padded"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(
        shape, order="F" if fortran_order else "C"
    )
    if dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise BadRequest(
                f"the {dtype} array has values in {array.min()}..{array.max()}; send 8-bit values (0..255)"
            )
        array = array.astype(np.uint8)
    if array.ndim == 3:
        array = (
            array[..., 0]
            if array.shape[2] == 1
            else np.array(Image.fromarray(np.ascontiguousarray(array)).convert("L"))
        )
    return ImageInput(np.ascontiguousarray(array), None, "application/x-npy")


def check_content_type(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header that :func:`input_fn` reads.

    Raises:
        UnsupportedMediaType: a content type not in :data:`DECODERS` (or none).
    """
    media = media_type(content_type)
    if media not in DECODERS.names():
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not read; send one of {', '.join(DECODERS.names())}"
        )
    return media


def input_fn(request_body: bytes | bytearray | memoryview, request_content_type: str | None) -> ImageInput:
    """Decode a request body (SageMaker's ``input_fn``).

    Args:
        request_body: the body's bytes.
        request_content_type: its ``Content-Type`` (parameters such as ``charset`` are ignored).

    Raises:
        UnsupportedMediaType: a content type not in :data:`DECODERS`.
        BadRequest: an empty body, or one that does not decode as its content type says.
    """
    media = check_content_type(request_content_type)
    body = bytes(request_body)
    if not body:
        raise BadRequest(f"the request body is empty; send the image's bytes as {media}")
    try:
        return DECODERS.get(media)(body)
    except RequestError:
        raise
    except DataError as exc:  # a DICOM that cannot become an image says why
        raise BadRequest(str(exc)) from None
    except Exception as exc:  # every library fails on bad bytes in its own way; all mean an unreadable body
        log.info("unreadable %s body: %s: %s", media, type(exc).__name__, exc)
        raise BadRequest(f"the body is not a readable {media}: {plain_reason(exc)}") from None


# ---------------------------------------------------------------------------------------------------------
# Prediction and responses


def model_fn(model_dir: str) -> ServingModel:
    """Load the package extracted in ``model_dir`` (SageMaker's ``model_fn``), on a GPU when there is one."""
    return load_package(model_dir)


def predict_fn(input_data: ImageInput, model: ServingModel) -> Result:
    """Predict one decoded request (SageMaker's ``predict_fn``): the fold ensemble, its TTA and the
    post-processing, at the image's own size."""
    [prediction] = model.predictor.predict([input_data.pixels])
    return Result(prediction=prediction, image_id=input_data.image_id, model=model)


def _encode_png(result: Result) -> bytes:
    ok, encoded = cv2.imencode(".png", result.prediction.mask.astype(np.uint8) * 255)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {result.prediction.mask.shape} mask as PNG")
    return encoded.tobytes()


def _encode_json(result: Result) -> bytes:
    return json.dumps(result.to_json()).encode()


ENCODERS: dict[str, Callable[[Result], bytes]] = {JSON: _encode_json, PNG: _encode_png}
# Accept patterns -> the response type they get; "*/*" and no Accept header get JSON.
_WILDCARDS = {"*/*": JSON, "application/*": JSON, "image/*": PNG}


def negotiate(accept: str | None) -> str:
    """The response type for an ``Accept`` header: the supported type of highest quality (``q``), earliest first
    among equals; JSON when the header is missing or ``*/*``.

    Raises:
        NotAcceptable: every type the header names is unsupported (or has ``q=0``).
    """
    if not accept or not accept.strip():
        return JSON
    best, best_q = None, 0.0
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        kind = kind.lower()
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        chosen = kind if kind in ENCODERS else _WILDCARDS.get(kind)
        if chosen is not None and quality > best_q:
            best, best_q = chosen, quality
    if best is None:
        raise NotAcceptable(
            f"Accept {accept!r} names no response type this model writes; ask for one of {', '.join(ENCODERS)}"
        )
    return best


def output_fn(prediction: Result, accept: str | None) -> tuple[bytes, str]:
    """Serialise a :class:`Result` (SageMaker's ``output_fn``) -> ``(body, content type)``.

    Args:
        prediction: what :func:`predict_fn` returned.
        accept: the request's ``Accept`` header (see :func:`negotiate`).

    Raises:
        NotAcceptable: no supported type is acceptable.
    """
    content_type = negotiate(accept)
    return ENCODERS[content_type](prediction), content_type


def error_body(status: int, message: str) -> bytes:
    """The JSON body of every error answer: ``{"error": message, "status": status}``."""
    return json.dumps({"error": message, "status": int(status)}).encode()


def answer(
    model: ServingModel,
    body: bytes,
    content_type: str | None,
    accept: str | None,
    predict: Callable[[ImageInput, ServingModel], Result] = predict_fn,
) -> tuple[int, bytes, str]:
    """Decode, predict and encode one request; never raises: an error is its status and a JSON body.

    Args:
        model: the loaded package.
        body: the request's bytes.
        content_type: its ``Content-Type``.
        accept: its ``Accept`` (see :func:`negotiate`).
        predict: :func:`predict_fn`, or a caller's wrapper of it (the server bounds predictions at once).

    Returns:
        ``(HTTP status, body, content type)``. A failure of the model is 500, logged with its traceback.
    """
    try:
        negotiate(accept)  # an unacceptable Accept is refused before the prediction, not after it
        data = input_fn(body, content_type)
    except RequestError as exc:
        return int(exc.status), error_body(exc.status, str(exc)), JSON
    return respond(model, data, accept, predict)


def respond(
    model: ServingModel,
    data: ImageInput,
    accept: str | None,
    predict: Callable[[ImageInput, ServingModel], Result] = predict_fn,
) -> tuple[int, bytes, str]:
    """Predict a decoded request and encode the answer (the second half of :func:`answer`); never raises.

    Args:
        model: the loaded package.
        data: what :func:`input_fn` decoded.
        accept: the request's ``Accept`` (see :func:`negotiate`).
        predict: :func:`predict_fn`, or a caller's wrapper of it.

    Returns:
        ``(HTTP status, body, content type)``, as :func:`answer` does.
    """
    try:
        payload, response_type = output_fn(predict(data, model), accept)
    except RequestError as exc:
        return int(exc.status), error_body(exc.status, str(exc)), JSON
    except Exception:  # a failure of the model must not take the server down: answer 500, log it
        log.exception("prediction failed")
        return (
            HTTPStatus.INTERNAL_SERVER_ERROR,
            error_body(
                HTTPStatus.INTERNAL_SERVER_ERROR, "the model failed on this request; the server's log has the details"
            ),
            JSON,
        )
    return HTTPStatus.OK, payload, response_type


def transform_fn(
    model: ServingModel, request_body: bytes, request_content_type: str | None, accept: str | None, context: Any = None
) -> tuple[bytes, str]:
    """SageMaker's one-function handler: :func:`answer`, with its status set on the toolkit's ``context``.

    Args:
        model: what :func:`model_fn` returned.
        request_body: the request's bytes.
        request_content_type: its ``Content-Type``.
        accept: its ``Accept``; the toolkit gives ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` for none or ``*/*``.
        context: the TorchServe context the toolkit passes to a handler that declares one; its
            ``set_response_status(code, phrase)`` sets the answer's status.

    Returns:
        ``(body, content type)``: the prediction, or ``{"error": ..., "status": ...}`` in JSON.
    """
    status, body, content_type = answer(model, request_body, request_content_type, accept)
    if status != HTTPStatus.OK and context is not None:
        context.set_response_status(int(status), HTTPStatus(status).phrase)
    return body, content_type
