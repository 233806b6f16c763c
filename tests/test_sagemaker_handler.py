"""The handler as SageMaker's PyTorch inference toolkit calls it: transform_fn with the toolkit's context, the
package's entry point, and a code/requirements.txt that asks the container only for what it lacks."""

from __future__ import annotations

import inspect
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fake_experiment import make_package
from pneumoseg.serve import handler
from pneumoseg.serve import package as package_format
from sagemaker_container import CONTAINER, NEVER_REQUIRED, normalise, required_names, with_dependencies


class FakeContext:
    """The part of TorchServe's context the handler uses."""

    def __init__(self) -> None:
        self.statuses: list[tuple[int, str]] = []

    def set_response_status(self, code: int, phrase: str) -> None:
        self.statuses.append((code, phrase))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, path = make_package(tmp_path_factory.mktemp("package"))
    with package_format.open_package(path) as model_dir:
        return package_format.load_package(model_dir, device="cpu")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_transform_fn_takes_the_toolkits_context():
    # The toolkit passes its context to a handler with one parameter more than its own arguments (4 here).
    assert len(inspect.signature(handler.transform_fn).parameters) == 5


def test_transform_fn_answers_a_prediction_without_touching_the_status(model):
    context = FakeContext()
    body, content_type = handler.transform_fn(
        model, png(np.zeros((40, 30), np.uint8)), "image/png", "application/json", context
    )
    assert content_type == "application/json" and json.loads(body)["height"] == 40 and context.statuses == []


@pytest.mark.parametrize(
    "body, content_type, accept, status",
    [
        (b"not a png", "image/png", "application/json", 400),
        (b"hello", "text/csv", "application/json", 415),
        (png(np.zeros((8, 8), np.uint8)), "image/png", "text/html", 406),
    ],
)
def test_transform_fn_errors_set_the_status_and_answer_json(model, body, content_type, accept, status):
    context = FakeContext()
    answer, answer_type = handler.transform_fn(model, body, content_type, accept, context)
    assert context.statuses == [(status, handler.HTTPStatus(status).phrase)]
    assert answer_type == "application/json" and json.loads(answer)["status"] == status


def test_a_failing_model_is_a_500_with_a_plain_message_and_the_details_in_the_log(model, monkeypatch, caplog):
    def broken(*_):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(model.predictor, "predict", broken)
    context = FakeContext()
    with caplog.at_level("ERROR"):
        answer, _ = handler.transform_fn(model, png(np.zeros((8, 8), np.uint8)), "image/png", None, context)
    assert context.statuses == [(500, "Internal Server Error")]
    assert json.loads(answer)["error"] == "the model failed on this request; the server's log has the details"
    assert "RuntimeError" in caplog.text and "CUDA error: out of memory" in caplog.text


def test_the_entry_point_gives_the_toolkit_model_fn_and_transform_fn_only():
    namespace: dict = {}
    exec(package_format.ENTRY_POINT, namespace)
    handlers = {
        name for name in ("model_fn", "transform_fn", "input_fn", "predict_fn", "output_fn") if name in namespace
    }
    # The toolkit refuses a module with transform_fn and any of the other three.
    assert handlers == {"model_fn", "transform_fn"}


def test_requirements_list_only_what_the_container_lacks_as_ranges():
    text = package_format.requirements_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    names = required_names(text)
    assert names and not names & NEVER_REQUIRED
    assert all(re.fullmatch(r"[\w.-]+>=[\d.]+,<[\d.]+", line) for line in lines), lines
    # Everything the serving path imports is in the container or comes with a requirement.
    script = (
        "import sys, json; import pneumoseg.serve.handler; from importlib.metadata import "
        "packages_distributions as p; d = p(); print(json.dumps(sorted({x for m in list(sys.modules) "
        "for x in d.get(m.split('.')[0], [])})))"
    )
    imported = {
        normalise(name)
        for name in json.loads(
            subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
        )
    }
    provided = with_dependencies(CONTAINER | names) | {"pneumoseg"}
    assert imported <= provided, (
        f"imported by the handler but neither required nor in the container: {sorted(imported - provided)}"
    )
