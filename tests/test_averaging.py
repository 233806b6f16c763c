"""Weight averaging: the EMA during training and the average of a fold's top-k checkpoints, against averages
computed by hand, and each switched on in a tiny fold trained end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from crash import run_killed_at_update
from fake_experiment import CONFIGS, write_fake_training
from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.errors import ConfigError
from pneumoseg.inference.fold_models import load_fold_models
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint, save_checkpoint
from pneumoseg.modeling.losses import build_loss
from pneumoseg.modeling.optim import build_optimizer, build_scheduler
from pneumoseg.stages import package as package_stage
from pneumoseg.stages import search as search_stage
from pneumoseg.stages import train as train_stage
from pneumoseg.training.averaging import average_checkpoints, check_average_top_k, ema_decay
from pneumoseg.training.trainer import StepSettings, Trainer
from synthetic import write_prepared

SIZE = 32
ROOT = CONFIGS.parent


def _net():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 1, 1))


def _state(net):
    """Every parameter and floating-point buffer (BatchNorm statistics), by name, as copies."""
    return {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 1, 8, 8, generator=generator), (torch.rand(4, 1, 8, 8, generator=generator) > 0.6).float())


def test_ema_is_the_hand_computed_moving_average_of_the_weights_after_every_step():
    torch.manual_seed(0)
    net = _net()
    optimizer = build_optimizer({"name": "sgd", "params": {"lr": 0.5}}, net.parameters())
    schedule = build_scheduler({"name": "constant"}, optimizer, updates_per_epoch=3, epochs=2)
    decay = 0.6
    trainer = Trainer(net, build_loss({"name": "bce"}), optimizer, schedule, steps=StepSettings(ema_decay=decay))
    after_steps = []
    original = schedule.after_update
    schedule.after_update = lambda: (original(), after_steps.append(_state(net)))
    for epoch in range(2):
        trainer.train_epoch([_batch(3 * epoch + i) for i in range(3)])
    assert len(after_steps) == 6
    expected = after_steps[0]
    for weights in after_steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    found = _state(trainer.ema.module)
    assert not torch.equal(found["0.weight"], after_steps[-1]["0.weight"])  # it is not the last weights
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_the_average_of_checkpoints_is_their_mean(tmp_path):
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append(_net().state_dict())
        save_checkpoint(tmp_path / f"best_{seed + 1}.pt", {"state_dict": states[-1]})
    averaged = average_checkpoints(_net(), best_files(tmp_path))
    for name, param in averaged.named_parameters():
        torch.testing.assert_close(param.detach(), sum(s[name] for s in states) / 3, msg=name)


@pytest.mark.parametrize("block, message", [({"decay": 1.0}, "strictly between"), ({}, "needs a decay")])
def test_a_bad_ema_block_is_refused(block, message):
    with pytest.raises(ConfigError, match=message):
        ema_decay(block)


def test_average_top_k_beyond_the_kept_checkpoints_is_refused():
    with pytest.raises(ConfigError, match="keep_best"):
        check_average_top_k(3, keep_best=2)


# --- a tiny fold trained end to end -------------------------------------------------------------------------------


@pytest.fixture
def fold_cfg(tiny_cfg, tmp_path):
    """The tiny config at 32 px, 2 epochs, fold 0 only, over a synthetic prepared dataset of 16 images."""

    def make(*overrides):
        cfg = tiny_cfg(
            f"data.image_size={SIZE}",
            "train.epochs=2",
            "train.keep_best=2",
            "train.folds=[0]",
            "train.oof_size=16",
            *overrides,
        )
        write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
        return cfg

    return make


def _fold_ids(cfg, fold=0):
    folds = pd.read_csv(layout.train_folds_path(cfg), dtype={"ImageId": str})
    return folds.loc[folds["fold"] == fold, "ImageId"].tolist()


@pytest.mark.slow
def test_a_fold_with_ema_validates_and_keeps_the_ema_with_its_own_oof_maps(fold_cfg):
    cfg = fold_cfg("train.ema={decay: 0.5}", "predict.checkpoints=ema", "predict.top_k=2")
    summary = train_stage.run(cfg)["folds"][0]
    fold_dir = layout.fold_dir(cfg, 0)
    ema_dir = layout.checkpoints_dir(fold_dir, "ema")
    log = pd.read_csv(layout.fold_log_path(fold_dir))
    assert {"ema_val_dice", "ema_val_loss", "ema_val_postprocess"} <= set(log)
    table = pd.read_csv(ema_dir / "checkpoints.csv")
    assert table["rank"].tolist() == [1, 2] and set(table["epoch"]) == {1, 2}
    best = load_checkpoint(ema_dir / "best_1.pt")
    assert best["score"] == pytest.approx(log["ema_val_dice"].max())
    assert summary["ema"]["best"]["val_dice"] == pytest.approx(log["ema_val_dice"].max())
    ema_state = load_checkpoint(fold_dir / "last.pt")["trainer"]["ema"]  # resumable
    [epoch2] = [load_checkpoint(p) for p in best_files(ema_dir) if load_checkpoint(p)["epoch"] == 2]
    for name, value in epoch2["state_dict"].items():
        assert torch.equal(value, ema_state[f"module.{name}"]), name  # the EMA's, not the net's
    ema_oof = ProbabilityStore(layout.oof_dir(ema_dir))
    assert ema_oof.ids == _fold_ids(cfg) and ema_oof.size == 16
    assert not np.array_equal(ema_oof.maps, ProbabilityStore(layout.oof_dir(fold_dir)).maps)
    models = load_fold_models(layout.train_dir(cfg), [0], top=2, checkpoints="ema")
    assert [m.path for m in models] == [ema_dir / "best_1.pt", ema_dir / "best_2.pt"]
    assert search_stage.open_folds(cfg)[0].store.folder == layout.oof_dir(ema_dir)  # stage 04 searches its maps


@pytest.mark.slow
def test_a_fold_with_top_k_averaging_saves_validates_and_predicts_the_averaged_weights(fold_cfg):
    cfg = fold_cfg("train.average_top_k=2", "predict.checkpoints=averaged")
    summary = train_stage.run(cfg)["folds"][0]
    fold_dir = layout.fold_dir(cfg, 0)
    averaged_dir = layout.checkpoints_dir(fold_dir, "averaged")
    sources = [load_checkpoint(path)["state_dict"] for path in best_files(fold_dir)]
    averaged = load_checkpoint(averaged_dir / "best_1.pt")
    assert averaged["averaged_epochs"] == summary["averaged"]["epochs"] and sorted(summary["averaged"]["epochs"]) == [
        1,
        2,
    ]
    assert averaged["score"] == pytest.approx(summary["averaged"]["val_dice"])
    weights = averaged["state_dict"]
    for name in ("encoder.model.conv1.0.weight", "segmentation_head.0.weight"):
        torch.testing.assert_close(weights[name], (sources[0][name] + sources[1][name]) / 2, msg=name)
    statistics = [name for name in weights if name.endswith("running_mean")]
    assert statistics and all(
        not torch.equal(weights[name], source[name]) for name in statistics[:3] for source in sources
    )  # recomputed, not copied
    oof = ProbabilityStore(layout.oof_dir(averaged_dir))
    assert oof.ids == _fold_ids(cfg) and oof.size == 16
    [model] = load_fold_models(layout.train_dir(cfg), [0], top=1, checkpoints="averaged")
    assert model.path == averaged_dir / "best_1.pt"


@pytest.mark.slow
def test_top_k_averaging_leaves_the_statistics_that_freeze_bn_froze(fold_cfg):
    cfg = fold_cfg("train.average_top_k=2", "train.freeze_bn=true")
    train_stage.run(cfg)
    fold_dir = layout.fold_dir(cfg, 0)
    sources = [load_checkpoint(path)["state_dict"] for path in best_files(fold_dir)]
    weights = load_checkpoint(layout.checkpoints_dir(fold_dir, "averaged") / "best_1.pt")["state_dict"]
    encoder = [name for name in weights if name.startswith("encoder.") and name.endswith("running_var")]
    decoder = [name for name in weights if name.startswith("decoder.") and name.endswith("running_var")]
    assert encoder and decoder
    for name in encoder:  # frozen in training, so every checkpoint holds the same; the average keeps them
        assert torch.equal(weights[name], sources[0][name]) and torch.equal(weights[name], sources[1][name]), name
    assert all(not torch.equal(weights[name], sources[0][name]) for name in decoder)  # recomputed


@pytest.mark.slow
def test_a_crashed_fold_with_averaging_resumes_to_the_same_averaged_weights(fold_cfg, tmp_path, monkeypatch):
    overrides = ("train.ema={decay: 0.5}", "train.average_top_k=2")
    reference = train_stage.run(fold_cfg(*overrides))["folds"][0]
    again = fold_cfg(*overrides, f"paths.experiment_dir={tmp_path / 'again'}")
    run_killed_at_update(monkeypatch, lambda: train_stage.run(again))
    resumed = train_stage.run(again, resume=True)["folds"][0]
    assert resumed["ema"] == reference["ema"] and resumed["averaged"] == reference["averaged"]
    first = fold_cfg(*overrides)
    logs = [
        pd.read_csv(layout.fold_log_path(layout.fold_dir(cfg, 0))).drop(columns="seconds") for cfg in (first, again)
    ]
    pd.testing.assert_frame_equal(*logs)  # the EMA's metrics of every epoch too
    for which in ("ema", "averaged"):
        found, expected = (
            [load_checkpoint(path) for path in best_files(layout.checkpoints_dir(layout.fold_dir(cfg, 0), which))]
            for cfg in (again, first)
        )
        assert len(found) == len(expected) == (2 if which == "ema" else 1)
        for one, other in zip(found, expected):
            for name, value in other["state_dict"].items():
                assert torch.equal(one["state_dict"][name], value), (which, name)


def test_the_package_of_averaged_checkpoints_names_each_fold_apart(tmp_path):
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            f"paths.input_dir={tmp_path / 'input'}",
            "predict.checkpoints=averaged",
            f"paths.output_root={tmp_path / 'output'}",
        ],
    )
    for fold, path in enumerate(write_fake_training(cfg)):
        averaged = load_checkpoint(path)
        averaged["state_dict"] = {
            k: v + 0.01 * (fold + 1) if v.is_floating_point() else v for k, v in averaged["state_dict"].items()
        }
        save_checkpoint(layout.checkpoints_dir(path.parent, "averaged") / "best_1.pt", averaged)
    summary = package_stage.run(cfg)  # it also checks that the package predicts as the experiment
    assert summary["models"] == ["fold0/averaged/best_1.pt", "fold1/averaged/best_1.pt"]


@pytest.mark.slow
def test_two_cpu_processes_average_identically(tmp_path):
    output = tmp_path / "output"
    write_prepared(output / "prepared" / "tiny", n_images=16, sizes=(SIZE,), n_folds=2)
    results = tmp_path / "ranks"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "ddp_worker.py"),
        str(CONFIGS / "tiny.yaml"),
        str(results),
        f"paths.output_root={output}",
        f"data.image_size={SIZE}",
        "train.epochs=2",
        "train.device=cpu",
        "train.folds=[0]",
        "train.ema={decay: 0.5}",
        "train.average_top_k=2",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((results / f"rank{r}.json").read_text())["folds"]["0"] for r in (0, 1)]
    # Metrics are reduced over both ranks' halves of the validation images, BatchNorm statistics taken from rank 0:
    # both ranks end with the same EMA and the same average (the digests of their weights).
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["averaged"] == ranks[1]["averaged"]
    assert len(ranks[0]["averaged"]["weights_sha256"]) == len(ranks[0]["ema"]["weights_sha256"]) == 64
    fold_dir = output / "tiny" / "03_train" / "fold0"
    assert len(best_files(fold_dir / "ema")) == 2 and len(best_files(fold_dir / "averaged")) == 1
    assert len(ProbabilityStore(fold_dir / "averaged" / "oof")) == 8
