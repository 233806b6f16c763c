"""The OOF predictions of stage 03 are made with the test recipe of stage 05: the same checkpoints per fold
(predict.top_k), the same TTA views and the same precision."""

import numpy as np
import pytest

from pneumoseg import layout
from pneumoseg.data.probstore import ProbabilityStore, quantize
from pneumoseg.errors import ConfigError
from pneumoseg.inference.predictor import Predictor
from pneumoseg.io import read_png
from pneumoseg.stages import train as train_stage
from pneumoseg.training.trainer import check_oof_recipe
from synthetic import write_prepared

SIZE = 32


@pytest.mark.slow
def test_oof_maps_are_what_stage_05_predicts_for_those_images(tiny_cfg):
    # Two kept checkpoints, both averaged, and a TTA with a vertical flip: a recipe unlike training's defaults.
    cfg = tiny_cfg(
        f"data.image_size={SIZE}",
        "train.epochs=2",
        "train.keep_best=2",
        "predict.top_k=2",
        "tta.vflip=true",
        "postprocess.source=config",
        "train.folds=[0]",
    )
    write_prepared(cfg.paths.prepared_dir, n_images=12, sizes=(SIZE,), n_folds=2)
    train_stage.run(cfg, folds=[0])
    store = ProbabilityStore(layout.oof_dir(layout.fold_dir(cfg, 0)))
    predictor = Predictor.from_experiment(cfg, device="cpu")
    assert len(predictor.models) == 2 and predictor.tta.vflip
    images = np.stack([read_png(layout.images_dir(cfg, SIZE) / f"{i}.png") for i in store.ids])
    expected = [quantize(p.probs) for p in predictor.predict_prepared(images, [(SIZE, SIZE)] * len(images))]
    assert (np.asarray(store.maps) == np.stack(expected)).all()


@pytest.mark.parametrize("top_k", [0, 3])
def test_a_top_k_the_folds_do_not_keep_is_refused_before_training(tiny_cfg, top_k):
    cfg = tiny_cfg(f"data.image_size={SIZE}", "train.keep_best=2", f"predict.top_k={top_k}")
    write_prepared(cfg.paths.prepared_dir, n_images=8, sizes=(SIZE,), n_folds=2)
    with pytest.raises(ConfigError, match=rf"predict.top_k={top_k} must be between 1 and train.keep_best=2"):
        train_stage.run(cfg, folds=[0])
    assert not list(layout.train_dir(cfg).glob("fold0/*.pt"))


def test_oof_maps_coarser_than_the_model_output_are_warned_about(tiny_cfg, caplog):
    with caplog.at_level("WARNING"):
        check_oof_recipe(tiny_cfg("data.image_size=64", "train.oof_size=64"))
    assert not caplog.records
    with caplog.at_level("WARNING"):
        check_oof_recipe(tiny_cfg("data.image_size=64", "train.oof_size=32"))
    assert "train.oof_size=32 is below train.image_size=64" in caplog.text
