import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fake_experiment import write_experiment
from pneumoseg import layout
from pneumoseg.config import to_dict
from pneumoseg.data.dicom import DicomTags, read_dicom, write_jpeg_dicom
from pneumoseg.data.resize import resize_square
from pneumoseg.data.rle import decode
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.inference.predictor import Prediction, Predictor
from pneumoseg.inference.tta import TTA
from pneumoseg.io import read_png
from pneumoseg.modeling.models import build_model
from pneumoseg.modeling.normalize import Normalize, normalize_from_model
from pneumoseg.postprocess.strategies import Threshold, Triplet
from pneumoseg.stages import convert

SIZE = 32


class _Brightness(torch.nn.Module):
    """A 'network' whose logit is ``gain`` x (pixel / 255 - 0.5) (the input is normalised with mean 0.5, std 1)."""

    def __init__(self, gain: float = 20.0):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain))

    def forward(self, x):
        return self.gain * x


def _model(gain=20.0, size=SIZE):
    return FoldModel(net=_Brightness(gain).eval(), normalize=Normalize(0.5, 1.0, 1), image_size=size)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_prediction_properties_and_rle():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1] = mask[0, 2] = mask[3, 3] = True
    prediction = Prediction(probs=np.where(mask, 0.9, 0.1).astype(np.float32), mask=mask)
    assert prediction.rle() == "5 2 1 1 6 1"
    assert prediction.rle("absolute") == "6 2 9 1 16 1"
    assert prediction.area == 4 and prediction.has_pneumothorax
    assert prediction.max_prob == pytest.approx(0.9)
    empty = Prediction(probs=np.zeros((4, 4), np.float32), mask=np.zeros((4, 4), bool))
    assert empty.rle() == "-1" and empty.area == 0 and not empty.has_pneumothorax


def test_predict_gives_the_ensemble_mean_at_each_original_size():
    images = [np.full(shape, value, np.uint8) for shape, value in [((64, 64), 200), ((50, 70), 100), ((20, 20), 128)]]
    predictor = Predictor([_model(20.0), _model(-4.0)], TTA(hflip=True), Threshold(0.5))
    predictions = predictor.predict(images)
    for image, prediction in zip(images, predictions):
        assert prediction.probs.shape == prediction.mask.shape == image.shape
        x = image[0, 0] / 255 - 0.5
        expected = (_sigmoid(20 * x) + _sigmoid(-4 * x)) / 2
        np.testing.assert_allclose(prediction.probs, expected, rtol=1e-5)
        assert (prediction.mask == (expected > 0.5)).all()


class _ProbabilityRamp(torch.nn.Module):
    """A 'network' whose probability (not logit) is ``0.5 + 0.25 u + 0.15 v``, u and v the pixel centre's column
    and row on [-1, 1]: a bilinear resize back to any original size is exact away from the border, so the map at
    the original's pixels is known, and a transposed, shifted or flipped resize shows."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        p = _ramp(*x.shape[-2:], torch)
        return (torch.log(p / (1 - p)) + self.anchor).expand_as(x[:, :1])


def _ramp(rows: int, cols: int, xp=np):
    u = (xp.arange(cols) + 0.5) / cols * 2 - 1
    v = (xp.arange(rows) + 0.5) / rows * 2 - 1
    return 0.5 + 0.25 * u[None, :] + 0.15 * v[:, None]


@pytest.mark.parametrize("shape", [(50, 70), (96, 40), (1024, 1024)])
def test_probabilities_are_resized_back_onto_the_original_pixels(shape):
    model = FoldModel(net=_ProbabilityRamp().eval(), normalize=Normalize(0.5, 1.0, 1), image_size=SIZE)
    predictor = Predictor([model], TTA(hflip=False), Threshold(0.5))
    prediction = predictor.predict_prepared(np.zeros((1, SIZE, SIZE), np.uint8), [shape])[0]
    assert prediction.probs.shape == shape
    # The outer half source pixel is clamped, not extrapolated: leave it out.
    inner = tuple(slice(m, -m) for m in (int(np.ceil(side / SIZE / 2)) for side in shape))
    np.testing.assert_allclose(prediction.probs[inner], _ramp(*shape)[inner], atol=1e-5)
    assert (prediction.mask == (prediction.probs > 0.5)).all()


def test_post_processing_runs_at_the_original_size_with_areas_in_1024_px_pixels():
    # A bright 8 x 8 square at 32 px is a 256 x 256 square (65,536 pixels) of the 1024 px original.
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[8:16, 8:16] = 255
    kept = Predictor([_model()], TTA(hflip=False), Threshold(0.5, min_area=60_000)).predict_prepared(
        image[None], [(1024, 1024)]
    )[0]
    dropped = Predictor([_model()], TTA(hflip=False), Threshold(0.5, min_area=70_000)).predict_prepared(
        image[None], [(1024, 1024)]
    )[0]
    assert kept.mask.shape == (1024, 1024)
    assert kept.area == pytest.approx(256 * 256, rel=0.03)
    assert not dropped.has_pneumothorax
    # The same rule at a 512 px original: areas scale with the image, so the decision does not change.
    half = Predictor([_model()], TTA(hflip=False), Threshold(0.5, min_area=70_000)).predict_prepared(
        image[None], [(512, 512)]
    )[0]
    assert not half.has_pneumothorax


def test_predict_equals_predict_prepared_on_the_resized_image():
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(100, 80), (32, 32), (300, 300)]]
    predictor = Predictor([_model(3.0)], TTA(hflip=True, vflip=True), Triplet(0.6, 100, 0.4), interpolation="cubic")
    direct = predictor.predict(images)
    prepared = np.stack([resize_square(image, SIZE, "cubic") for image in images])
    for a, b in zip(direct, predictor.predict_prepared(prepared, [image.shape for image in images])):
        assert np.array_equal(a.probs, b.probs) and np.array_equal(a.mask, b.mask)


def test_bad_inputs():
    predictor = Predictor([_model()], TTA(), Threshold())
    assert predictor.image_size == SIZE and predictor.n_views == 2
    assert predictor.predict([]) == []
    with pytest.raises(DataError, match="image 1"):
        predictor.predict([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32)])
    with pytest.raises(DataError, match="image 0"):
        predictor.predict([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(DataError, match="N x 32 x 32"):
        predictor.predict_prepared(np.zeros((1, 64, 64), np.uint8), [(64, 64)])
    with pytest.raises(DataError, match="original shapes"):
        predictor.predict_prepared(np.zeros((2, SIZE, SIZE), np.uint8), [(64, 64)])
    with pytest.raises(DataError, match="different sizes"):
        Predictor([_model(size=32), _model(size=64)], TTA(), Threshold())
    with pytest.raises(ValueError):
        Predictor([], TTA(), Threshold())


def test_from_experiment(tiny_cfg):
    cfg = tiny_cfg("predict.top_k=2", "tta.vflip=true")
    write_experiment(cfg, n_test=2, per_fold=2)
    predictor = Predictor.from_experiment(cfg, device="cpu")
    assert len(predictor.models) == 2 * int(cfg.folds.n_splits)
    assert [m.path.name for m in predictor.models[:2]] == ["best_1.pt", "best_2.pt"]
    assert predictor.tta == TTA(hflip=True, vflip=True) and predictor.n_views == 12
    assert predictor.postprocessor == Threshold(0.5, 0)  # 04_search/thresholds.json
    assert predictor.interpolation == cfg.prepare.interpolation and predictor.image_size == cfg.data.image_size

    top1 = Predictor.from_experiment(tiny_cfg("predict.top_k=1", "train.folds=[1]"), device="cpu")
    assert [(m.fold, m.path.name) for m in top1.models] == [(1, "best_1.pt")]
    configured = Predictor.from_experiment(tiny_cfg("postprocess.source=config", "postprocess.params.threshold=0.2"))
    assert configured.postprocessor == Threshold(0.2, 0)
    with pytest.raises(ConfigError, match="top_k"):
        Predictor.from_experiment(tiny_cfg("predict.top_k=3"))


def test_from_experiment_without_training_is_a_data_error(tiny_cfg):
    with pytest.raises(DataError, match="03_train"):
        Predictor.from_experiment(tiny_cfg())


def _phantom_xrays():
    """Two non-square 8-bit images: a smooth wide one and a blurred-noise tall one."""
    rows, cols = np.mgrid[0:300, 0:260]
    wide = (60 + 100 * np.sin(rows / 23) * np.cos(cols / 31) + 80 * (cols / 260)).clip(0, 255).astype(np.uint8)
    tall = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 255, (200, 120), dtype=np.uint8), (0, 0), 4)
    return [wide, tall]


def _check_both_paths_agree(cfg):
    """Convert the DICOMs of the config's input folder with stage 01, then predict each from its PNG and from its
    pixels: identical probabilities and masks."""
    convert.run(cfg)
    torch.manual_seed(0)
    block = to_dict(cfg.model)
    model = FoldModel(
        net=build_model(block, pretrained=False).eval(),
        normalize=normalize_from_model(block),
        image_size=int(cfg.data.image_size),
    )
    predictor = Predictor([model], TTA(hflip=True), Threshold(0.5), interpolation=cfg.prepare.interpolation)
    dicoms = sorted(Path(cfg.paths.input_dir).rglob("*.dcm"))
    assert dicoms
    for path in dicoms:
        pixels, _ = read_dicom(path)
        png = read_png(layout.images_dir(cfg, predictor.image_size) / f"{path.stem}.png")
        direct = predictor.predict([pixels])[0]
        staged = predictor.predict_prepared(png[None], [pixels.shape])[0]
        assert direct.probs.shape == pixels.shape
        assert np.array_equal(direct.probs, staged.probs) and direct.rle() == staged.rle()
        assert np.array_equal(decode(direct.rle(), *pixels.shape), direct.mask)


@pytest.mark.parametrize("interpolation", ["area", "linear"])
def test_a_dicom_predicts_the_same_through_its_stage_01_png_and_directly(tiny_cfg, interpolation):
    cfg = tiny_cfg("prepare.n_jobs=1", f"prepare.interpolation={interpolation}")
    for k, pixels in enumerate(_phantom_xrays()):
        write_jpeg_dicom(
            Path(cfg.paths.input_dir) / "dicom-images-test" / f"1.2.276.0.9.{k}.dcm",
            pixels,
            DicomTags(f"1.2.276.0.9.{k}", f"1.2.9.{k}.1", f"1.2.9.{k}.2", f"patient-{k}"),
        )
    _check_both_paths_agree(cfg)


@pytest.mark.real_data
def test_a_real_dicom_predicts_the_same_through_its_stage_01_png_and_directly(tiny_cfg, siim_dir):
    cfg = tiny_cfg("prepare.n_jobs=1")
    target = Path(cfg.paths.input_dir) / "dicom-images-test"
    target.mkdir(parents=True)
    for path in sorted((siim_dir / "sample_images").glob("*.dcm"))[:2]:
        shutil.copy(path, target / path.name)
    _check_both_paths_agree(cfg)
