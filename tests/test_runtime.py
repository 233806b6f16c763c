"""The ONNX Runtime path (pneumoseg.inference.runtime): the export agrees with torch, auto picks as documented, and a
corrupt or mismatched .onnx file is a DataError naming it."""

import hashlib
import logging

import numpy as np
import pytest
import torch

from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference import runtime as rt
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import Prediction, Predictor
from pneumoseg.inference.runtime import Agreement
from pneumoseg.inference.tta import TTA, predict_with_gate
from pneumoseg.modeling.models import build_model
from pneumoseg.modeling.normalize import normalize_from_model
from pneumoseg.postprocess.strategies import Threshold

CPU = torch.device("cpu")
TINY = {
    "name": "Unet",
    "params": {
        "encoder_name": "tu-resnet10t",
        "encoder_weights": None,
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 4],
        "in_channels": 1,
    },
}
# The demo's network (configs/demo.yaml) with the gate head, at the demo's 128 px.
DEMO = {
    "name": "Unet",
    "params": {
        "encoder_name": "tu-resnet10t",
        "encoder_weights": None,
        "decoder_channels": [128, 64, 32, 16, 8],
        "aux_params": {"classes": 1},
    },
}


def _fold_model(block, size, seed=0):
    torch.manual_seed(seed)
    net = build_model(block, pretrained=False).eval()
    # Non-zero biases everywhere: an export that drops an offset or a channel cannot hide behind zero-initialised ones.
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.bias.uniform_(-0.2, 0.2)
        net.segmentation_head[0].weight.mul_(30)  # maps far from 0.5 everywhere, as a trained model's
    return FoldModel(net=net, normalize=normalize_from_model(block), image_size=size, fold=seed)


def _images(count, size, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    smooth = (rows + cols) * (200 / (2 * size))
    return np.stack([np.clip(smooth + rng.normal(0, 20, (size, size)), 0, 255) for _ in range(count)]).astype(np.uint8)


@pytest.mark.parametrize("block, size", [(TINY, 64), (DEMO, 128)], ids=["tiny", "demo"])
def test_onnxruntime_gives_the_probabilities_and_gates_of_torch(block, size):
    models = [_fold_model(block, size, seed) for seed in range(2)]
    onnx_models = rt.with_runtime(models, rt.ONNXRUNTIME, None, threads=1)
    assert rt.runtime_of(onnx_models) == rt.ONNXRUNTIME and rt.runtime_of(models) == rt.TORCH
    images = _images(3, size)
    # Flips and a rescaled view: the export's height and width are dynamic.
    tta = TTA(hflip=True, vflip=True, scales=(1.0, 1.5))
    expected, expected_gate = predict_with_gate(models, images, tta, batch_size=2)
    found, found_gate = predict_with_gate(onnx_models, images, tta, batch_size=2)
    assert expected.std() > 0.01  # the maps vary: a transposed or shifted output would show
    np.testing.assert_allclose(found, expected, atol=1e-4)
    if "aux_params" in block["params"]:
        np.testing.assert_allclose(found_gate, expected_gate, atol=1e-4)
    else:
        assert found_gate is None and expected_gate is None


def test_a_predictor_on_onnxruntime_says_so_and_predicts_the_same_masks():
    models = [_fold_model(TINY, 64)]
    torch_predictor = Predictor(models, TTA(), Threshold(0.5, 0))
    onnx_predictor = Predictor(rt.with_runtime(models, rt.ONNXRUNTIME, None, threads=1), TTA(), Threshold(0.5, 0))
    assert (torch_predictor.runtime, onnx_predictor.runtime) == ("torch", "onnxruntime")
    assert onnx_predictor.device == CPU
    image = _images(1, 100)[0]
    [expected], [found] = torch_predictor.predict([image]), onnx_predictor.predict([image])
    assert np.abs(expected.probs - found.probs).max() < 1e-4


@pytest.mark.parametrize(
    "requested, device, has_onnx, importable, chosen",
    [
        ("auto", "cpu", True, True, "onnxruntime"),
        ("auto", "cpu", False, True, "torch"),
        ("auto", "cpu", True, False, "torch"),
        ("auto", "cuda", True, True, "torch"),
        ("torch", "cpu", True, True, "torch"),
        ("onnxruntime", "cpu", True, True, "onnxruntime"),
        ("onnxruntime", "cpu", False, True, "torch"),
        ("onnxruntime", "cpu", True, False, "torch"),
    ],
)
def test_auto_picks_onnxruntime_on_the_cpu_with_onnx_models_else_torch(
    monkeypatch, caplog, requested, device, has_onnx, importable, chosen
):
    monkeypatch.setattr(rt, "onnx_available", lambda: importable)
    with caplog.at_level(logging.INFO, logger=rt.__name__):
        assert rt.choose_runtime(requested, torch.device(device), has_onnx) == chosen
    fell_back = requested != "torch" and device == "cpu" and chosen == "torch"
    assert len(caplog.records) == int(fell_back)  # one log line says why torch predicts


def test_unknown_runtime_or_onnxruntime_on_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="predict.runtime must be one of"):
        rt.choose_runtime("tensorrt", CPU, True)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        rt.choose_runtime("onnxruntime", torch.device("cuda"), True)


def test_a_corrupt_or_mismatched_onnx_file_is_a_data_error_naming_it(tmp_path):
    model = _fold_model(TINY, 64)
    path = tmp_path / "fold0" / "best_1.onnx"
    rt.export_onnx(model.net, 64, 1, path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    [loaded] = rt.with_runtime([model], rt.ONNXRUNTIME, [(path, good)], threads=1)
    assert isinstance(loaded.net, rt.OnnxNet)

    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{path}.*does not match its sha256"):
        rt.with_runtime([model], rt.ONNXRUNTIME, [(path, good)], threads=1)
    path.write_bytes(b"not an onnx model")  # past the hash (none given): ONNX Runtime's own error
    with pytest.raises(DataError, match=f"ONNX Runtime cannot load {path}"):
        rt.with_runtime([model], rt.ONNXRUNTIME, [(path, None)], threads=1)
    # Another fold's weights, hash and all: the logits give it away.
    rt.export_onnx(_fold_model(TINY, 64, seed=1).net, 64, 1, path)
    with pytest.raises(DataError, match=f"{path} is not the ONNX export of the checkpoint"):
        rt.with_runtime([model], rt.ONNXRUNTIME, [(path, hashlib.sha256(path.read_bytes()).hexdigest())], threads=1)
    # A model with the gate head packaged beside a checkpoint without it.
    rt.export_onnx(
        _fold_model({**TINY, "params": {**TINY["params"], "aux_params": {"classes": 1}}}, 64).net, 64, 1, path
    )
    with pytest.raises(DataError, match=f"{path} has the gate output"):
        rt.with_runtime([model], rt.ONNXRUNTIME, [(path, None)], threads=1)


def test_agreement_refuses_a_difference_beyond_the_tolerances():
    rows, cols = np.mgrid[0:16, 0:16]
    probs = (rows / 16).astype(np.float32)
    reference = Prediction(probs=probs, mask=probs > 0.5)
    close = Agreement()
    close.add([reference], [Prediction(probs=probs + 1e-5, mask=probs > 0.5)])
    close.check("close")
    assert close.summary() == {
        "images": 1,
        "max_probability_difference": pytest.approx(1e-5, rel=1e-2),
        "mask_share_differing": 0.0,
        "dice_between_runtimes": 1.0,
    }
    transposed = Agreement()
    transposed.add([reference], [Prediction(probs=probs.T.copy(), mask=probs.T > 0.5)])
    assert transposed.summary()["dice_between_runtimes"] < 0.6
    with pytest.raises(DataError, match="ONNX Runtime disagrees with torch on 1 images.*tolerance"):
        transposed.check("the ONNX export")


@pytest.mark.parametrize("setting, expected", [(None, "0"), ("1", "1"), ("0", "0")])
def test_onnxruntime_threads_block_unless_told_to_spin(monkeypatch, setting, expected):
    if setting is None:
        monkeypatch.delenv(rt.SPIN_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(rt.SPIN_VARIABLE, setting)
    session = rt.open_session(rt.export_bytes(_fold_model(TINY, 64).net, 64, 1), "tiny.onnx")
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == expected
