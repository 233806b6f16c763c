"""The image-level gate head: its loss, its probability averaged over views and stored with the OOF maps, the
predictor applying it and the server reporting it."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fake_experiment import write_fake_training
from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.data.probstore import GATE_FILE, ProbabilityStore, ProbabilityWriter
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import Predictor
from pneumoseg.inference.tta import TTA, predict_with_gate
from pneumoseg.modeling.losses import build_training_loss
from pneumoseg.modeling.models import build_model, has_gate
from pneumoseg.modeling.normalize import Normalize
from pneumoseg.modeling.optim import build_optimizer, build_scheduler
from pneumoseg.postprocess.strategies import Gated, Threshold
from pneumoseg.serve import handler as serving
from pneumoseg.serve import package as package_format
from pneumoseg.stages import package
from pneumoseg.training.trainer import StepSettings, Trainer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
GATE_BLOCK = {"classes": 1, "dropout": 0.0}
GATED = {"name": "gated", "params": {"gate": 0.5, "inner": {"name": "threshold", "params": {"threshold": 0.5}}}}


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_the_gated_loss_by_hand():
    # Image 0 has one mask pixel, image 1 none; mask logits 0 everywhere: BCE ln 2 per pixel.
    masks = torch.zeros(2, 1, 2, 2)
    masks[0, 0, 0, 0] = 1
    output = (torch.zeros(2, 1, 2, 2), torch.tensor([[2.0], [-1.0]]))
    loss = build_training_loss({"name": "bce", "gate_weight": 0.3}, gated=True)
    expected = math.log(2) + 0.3 * (_bce(2.0, 1) + _bce(-1.0, 0)) / 2
    assert loss(output, masks).item() == pytest.approx(expected, rel=1e-6)
    plain = build_training_loss({"name": "bce", "gate_weight": None}, gated=False)
    assert plain(output[0], masks).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize(
    "block, gated, message",
    [
        ({"name": "bce", "gate_weight": None}, True, "gate head"),
        ({"name": "bce", "gate_weight": 0.0}, True, "gate head"),
        ({"name": "bce", "gate_weight": 0.1}, False, "needs a gate head"),
    ],
)
def test_gate_weight_and_head_go_together(block, gated, message):
    with pytest.raises(ConfigError, match=message):
        build_training_loss(block, gated)


@pytest.mark.parametrize("aux", [{"classes": 2}, {"classes": 1, "activation": "sigmoid"}])
def test_a_gate_head_of_more_than_one_logit_is_refused(aux):
    with pytest.raises(ConfigError, match="one logit"):
        build_model(
            {
                "name": "Unet",
                "params": {"encoder_name": "resnet18", "encoder_weights": None, "in_channels": 1, "aux_params": aux},
            }
        )


def _gated_trainer(gate_weight: float) -> Trainer:
    torch.manual_seed(0)
    net = build_model(
        {
            "name": "Unet",
            "params": {
                "encoder_name": "resnet18",
                "encoder_weights": None,
                "in_channels": 1,
                "encoder_depth": 3,
                "decoder_channels": [16, 8, 4],
                "aux_params": GATE_BLOCK,
            },
        }
    )
    optimizer = build_optimizer({"name": "adam", "params": {"lr": 1e-2}}, net.parameters())
    schedule = build_scheduler({"name": "constant"}, optimizer, updates_per_epoch=10, epochs=1)
    loss = build_training_loss({"name": "bce", "gate_weight": gate_weight}, has_gate(net))
    return Trainer(net, loss, optimizer, schedule, steps=StepSettings())


def _gate_batches(n: int = 4):
    """Bright images have a mask (a small square), dark ones none: the gate can learn to tell them apart."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        positive = torch.tensor([1.0, 0.0, 1.0, 0.0])
        images = torch.randn(4, 1, 32, 32, generator=generator) * 0.1 + positive[:, None, None, None]
        masks = torch.zeros(4, 1, 32, 32)
        masks[positive > 0, :, 8:12, 8:12] = 1
        batches.append((images, masks))
    return batches


def test_training_with_the_head_uses_the_gate_weight_and_learns_the_gate():
    batches = _gate_batches()
    images, masks = batches[0]
    grads = {}
    for weight in (0.1, 0.5):
        trainer = _gated_trainer(weight)
        trainer.net.train()
        trainer.loss_fn(trainer.net(images), masks).backward()
        grads[weight] = torch.cat([p.grad.flatten() for p in trainer.net.classification_head.parameters()])
    # The mask loss does not reach the head: its gradient is the gate term's, proportional to the weight.
    torch.testing.assert_close(grads[0.5], 5 * grads[0.1], rtol=1e-4, atol=1e-7)

    trainer = _gated_trainer(1.0)

    def gate_bce():
        trainer.net.eval()
        with torch.no_grad():
            return float(
                np.mean(
                    [
                        nn.functional.binary_cross_entropy_with_logits(
                            trainer.net(x)[1][:, 0], m.flatten(1).amax(1)
                        ).item()
                        for x, m in batches
                    ]
                )
            )

    before = gate_bce()
    for _ in range(5):
        trainer.train_epoch(batches)
    assert gate_bce() < 0.5 * before


class _MeanGate(nn.Module):
    """Mask logits 0; gate logit ``10 * (mean - 0.5)``: bright images pass the gate, dark ones do not."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.classification_head = nn.Identity()

    def forward(self, x):
        return torch.zeros_like(x), self.scale * (x.mean((1, 2, 3)) - 0.5)[:, None]


def test_validation_reports_the_gate_accuracy():
    # Bright, dark, bright, dark; a mask on the first only: the third (bright, empty) is the gate's one mistake.
    images = torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None, None, None].expand(4, 1, 8, 8).contiguous()
    masks = torch.zeros(4, 1, 8, 8)
    masks[0, :, 2:4, 2:4] = 1
    net = _MeanGate()
    optimizer = build_optimizer({"name": "adam", "params": {"lr": 1e-2}}, net.parameters())
    schedule = build_scheduler({"name": "constant"}, optimizer, updates_per_epoch=1, epochs=1)
    trainer = Trainer(
        net,
        build_training_loss({"name": "bce", "gate_weight": 0.1}, gated=True),
        optimizer,
        schedule,
        steps=StepSettings(),
    )
    batches = [(images[:3], masks[:3]), (images[3:], masks[3:])]
    assert trainer.validate(batches, [Threshold(0.5)])["val_gate_accuracy"] == pytest.approx(3 / 4)
    plain = Trainer(
        nn.Conv2d(1, 1, 1),
        build_training_loss({"name": "bce", "gate_weight": None}, gated=False),
        optimizer,
        schedule,
        steps=StepSettings(),
    )
    assert "val_gate_accuracy" not in plain.validate(batches, [Threshold(0.5)])


class _GatedBrightness(nn.Module):
    """Mask logit ``gain * x``; gate logit: the mean of the image's left half minus its right half (a flip changes
    it, so averaging over views shows)."""

    def __init__(self, gain: float = 20.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))
        self.classification_head = nn.Identity()

    def forward(self, x):
        half = x.shape[-1] // 2
        gate = 8 * (x[..., :half].mean((1, 2, 3)) - x[..., half:].mean((1, 2, 3)))
        return self.gain * x, gate[:, None]


def _model(net, size=32):
    return FoldModel(net=net.eval(), normalize=Normalize(0.5, 1.0, 1), image_size=size)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_gate_probability_is_the_mean_over_views_and_models():
    images = np.zeros((2, 32, 32), np.uint8)
    images[0, :, :16] = 255  # left half bright
    images[1, :, :8] = 200
    plain = _model(nn.Conv2d(1, 1, 1))  # no gate head: left out of the gate's average
    _, gates = predict_with_gate([_model(_GatedBrightness()), plain], images, TTA(hflip=True))
    halves = [(255 / 255, 0.0), (100 / 255, 0.0)]  # left and right half means of the normalised images
    expected = [(_sigmoid(8 * (left - right)) + _sigmoid(8 * (right - left))) / 2 for left, right in halves]
    np.testing.assert_allclose(gates, expected, rtol=1e-5)
    _, unflipped = predict_with_gate([_model(_GatedBrightness())], images, TTA(hflip=False))
    np.testing.assert_allclose(unflipped, [_sigmoid(8 * (left - right)) for left, right in halves], rtol=1e-5)
    assert predict_with_gate([plain], images)[1] is None


def test_the_gate_file_is_written_with_the_maps_and_read_back(tmp_path):
    maps = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    gates = np.array([0.1, 0.5, 0.9, 0.0, 1.0], np.float32)
    with ProbabilityWriter(tmp_path / "oof", list("abcde"), 8) as writer:
        writer.write(0, maps[:3], gates[:3])
        writer.write(3, maps[3:], gates[3:])
    store = ProbabilityStore(tmp_path / "oof")
    np.testing.assert_array_equal(store.gates, gates)
    with ProbabilityWriter(tmp_path / "oof", list("abcde"), 8) as writer:
        writer.write(0, maps)
    assert ProbabilityStore(tmp_path / "oof").gates is None and not (tmp_path / "oof" / GATE_FILE).exists()
    with (
        pytest.raises(ValueError, match="every block"),
        ProbabilityWriter(tmp_path / "mixed", list("abcde"), 8) as writer,
    ):
        writer.write(0, maps[:3], gates[:3])
        writer.write(3, maps[3:])
    assert not (tmp_path / "mixed" / GATE_FILE).exists()


def test_a_damaged_gate_file_is_a_data_error(tmp_path):
    with ProbabilityWriter(tmp_path / "oof", list("ab"), 4) as writer:
        writer.write(0, np.zeros((2, 4, 4), np.float32), np.array([0.2, 0.3]))
    np.save(tmp_path / "oof" / GATE_FILE, np.array([0.2, 0.3, 0.4], np.float32))
    with pytest.raises(DataError, match="2 float32 gate probabilities"):
        ProbabilityStore(tmp_path / "oof")


def test_the_predictor_applies_the_gate():
    bright, dim = np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)
    bright[:, :16] = 255  # at 32 px: gate sigmoid(6.4) ~ 0.998
    dim[:, :4] = 255  # at 32 px: gate sigmoid(1.6) ~ 0.83
    predictor = Predictor([_model(_GatedBrightness())], TTA(hflip=False), Gated(0.9, Threshold(0.5)))
    found_bright, found_dim = predictor.predict([bright, dim])
    assert found_bright.gate == pytest.approx(_sigmoid(6.4), abs=1e-4)
    assert found_bright.area == int((bright > 128).sum())
    assert found_dim.gate == pytest.approx(_sigmoid(1.6), abs=1e-4)
    assert found_dim.area == 0 and found_dim.probs.max() > 0.9
    ungated = Predictor([_model(_GatedBrightness())], TTA(hflip=False), Threshold(0.5)).predict([dim])[0]
    assert ungated.area > 0 and ungated.gate == pytest.approx(found_dim.gate)
    # Only the dim image lost a mask to the gate; a black one is below the gate too, but has no mask to lose.
    [black] = predictor.predict([np.zeros((40, 40), np.uint8)])
    assert black.gate < 0.9 and black.area == 0
    assert [p.emptied_by_gate for p in (found_bright, found_dim, ungated, black)] == [False, True, False, False]
    with pytest.raises(ConfigError, match="no model has the gate head"):
        Predictor([_model(nn.Conv2d(1, 1, 1))], TTA(hflip=False), Gated(0.9, Threshold(0.5)))


@pytest.fixture(scope="module")
def gated_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"paths.input_dir={root / 'input'}",
            f"paths.output_root={root / 'output'}",
            "model.params.aux_params={classes: 1, dropout: 0.2}",
            "loss.gate_weight=0.1",
        ],
    )
    write_fake_training(cfg, postprocess=GATED)
    package.run(cfg)
    return cfg, layout.package_path(cfg)


def test_the_package_carries_the_gate_and_the_server_reports_its_probability(gated_package, tmp_path):
    cfg, path = gated_package
    image = np.random.default_rng(4).integers(0, 256, (50, 70), dtype=np.uint8)
    [expected] = Predictor.from_experiment(cfg, device="cpu").predict([image])
    with package_format.open_package(path) as model_dir:
        model = package_format.load_package(model_dir, device="cpu")
    assert all(has_gate(m.net) for m in model.predictor.models)
    assert model.predictor.postprocessor.to_block() == Gated(**GATED["params"]).to_block()
    result = serving.predict_fn(serving.ImageInput(image, None, "application/x-npy"), model)
    assert expected.gate is not None and result.prediction.gate == pytest.approx(expected.gate, abs=1e-7)
    np.testing.assert_array_equal(result.prediction.mask, expected.mask)
    answer = json.loads(serving.output_fn(result, "application/json")[0])
    assert answer["gate_probability"] == pytest.approx(expected.gate, abs=1e-7)
    assert answer["has_pneumothorax"] == (expected.gate >= 0.5 and bool(expected.mask.any()))
    assert answer["emptied_by_gate"] == expected.emptied_by_gate
