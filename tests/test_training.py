import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from crash import run_killed_at_update
from pneumoseg import layout
from pneumoseg.cli import run_stage_script
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.errors import ConfigError
from pneumoseg.evaluation.metrics import competition_dice, dice_per_image
from pneumoseg.inference.fold_models import load_fold_models
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint
from pneumoseg.modeling.losses import build_loss
from pneumoseg.modeling.optim import build_optimizer, build_scheduler
from pneumoseg.postprocess.strategies import Threshold, Triplet
from pneumoseg.sagemaker.arguments import sagemaker_arguments
from pneumoseg.stages import train as train_stage
from pneumoseg.training.checkpoints import BestCheckpoints
from pneumoseg.training.trainer import StepSettings, Trainer, epochs_since_best
from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]


def _conv_trainer(accumulation_steps, lr=0.5, loss="bce"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    optimizer = build_optimizer({"name": "sgd", "params": {"lr": lr}}, net.parameters())
    schedule = build_scheduler({"name": "constant"}, optimizer, updates_per_epoch=10, epochs=1)
    return Trainer(
        net, build_loss({"name": loss}), optimizer, schedule, steps=StepSettings(accumulation_steps=accumulation_steps)
    )


def _batches(n_batches, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_batches * batch_size, 1, 8, 8, generator=generator)
    masks = (torch.rand(n_batches * batch_size, 1, 8, 8, generator=generator) > 0.6).float()
    return [(images[i : i + batch_size], masks[i : i + batch_size]) for i in range(0, len(images), batch_size)]


def _params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.net.parameters()])


@pytest.mark.parametrize("steps, batch_size, loss", [(4, 2, "bce"), (2, 3, "focal"), (3, 1, "bce")])
def test_accumulated_steps_equal_one_large_batch(steps, batch_size, loss):
    small = _conv_trainer(steps, loss=loss)
    small.train_epoch(_batches(steps, batch_size))
    large = _conv_trainer(1, loss=loss)
    images, masks = zip(*_batches(steps, batch_size))
    large.train_epoch([(torch.cat(images), torch.cat(masks))])
    assert not torch.equal(_params(small), _params(_conv_trainer(1)))  # it did learn
    torch.testing.assert_close(_params(small), _params(large), rtol=1e-5, atol=1e-6)


def test_the_last_partial_group_of_an_epoch_is_stepped_as_its_own_mean():
    batches = _batches(5, 2)
    accumulated = _conv_trainer(2)
    accumulated.train_epoch(batches)
    assert accumulated.schedule.scheduler.last_epoch == 3  # updates after batches 2, 4 and 5
    merged = [
        (torch.cat([batches[i][0], batches[i + 1][0]]), torch.cat([batches[i][1], batches[i + 1][1]])) for i in (0, 2)
    ] + [batches[4]]
    reference = _conv_trainer(1)
    reference.train_epoch(merged)
    torch.testing.assert_close(_params(accumulated), _params(reference), rtol=1e-5, atol=1e-6)


def test_validate_reports_the_challenge_metric_after_each_postprocessing():
    trainer = _conv_trainer(1)
    batches = _batches(3, 4, seed=2)
    batches[0][1].zero_()  # some empty images too
    postprocessors = [Threshold(0.3), Threshold(0.5, min_area=4000), Triplet(top=0.7, min_area=2000, bottom=0.4)]
    metrics = trainer.validate(batches, postprocessors)
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(trainer.net(x)) for x, _ in batches])[:, 0].numpy()
    truth = torch.cat([m for _, m in batches])[:, 0].numpy() > 0.5
    preds = [np.stack([post(p) for p in probs]) for post in postprocessors]
    scores = [competition_dice(pred, truth) for pred in preds]
    assert len(set(scores)) > 1  # the strategies really differ here
    for post, score in zip(postprocessors, scores):
        assert metrics[f"dice[{post.label()}]"] == pytest.approx(score)
    best = int(np.argmax(scores))
    assert metrics["val_dice"] == pytest.approx(max(scores))
    assert metrics["val_postprocess"] == postprocessors[best].label()
    positive = truth.any((1, 2))
    assert metrics["val_dice_pos"] == pytest.approx(dice_per_image(preds[best][positive], truth[positive]).mean())
    losses = [trainer.loss_fn(trainer.net(x), m).item() * len(x) for x, m in batches]
    assert metrics["val_loss"] == pytest.approx(sum(losses) / 12, rel=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(
        {"name": "cosine", "params": {"warmup_epochs": 1, "warmup_start": 0.1, "min_lr_ratio": 0.01}}, optimizer, 4, 3
    )
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_update()
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(1.0)
    assert lrs[1:5] == sorted(lrs[1:5]) and lrs[4:] == sorted(lrs[4:], reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    mid = 4 + 4  # half-way through the 8 decay updates
    assert lrs[mid] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_plateau_schedule_follows_its_monitor():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_scheduler(
        {"name": "plateau", "params": {"monitor": "val_dice", "patience": 0, "factor": 0.5}}, optimizer, 4, 3
    )
    schedule.after_update()
    for score in (0.5, 0.6, 0.6):
        schedule.after_validation({"val_dice": score})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="monitor"):
        schedule.after_validation({"val_loss": 1.0})


def _payload(epoch, score):
    return lambda: {"state_dict": {}, "epoch": epoch, "score": score}


def test_best_checkpoints_keep_the_top_k_in_rank_order(tmp_path):
    best = BestCheckpoints(tmp_path, keep=3, mode="max", monitor="val_dice")
    ranks = [best.offer(e, s, _payload(e, s)) for e, s in enumerate([0.5, 0.7, 0.6, 0.4, 0.8, 0.7], start=1)]
    assert ranks == [1, 1, 2, None, 1, 3]
    table = pd.read_csv(tmp_path / "checkpoints.csv")
    assert table["epoch"].tolist() == [5, 2, 6] and table["file"].tolist() == ["best_1.pt", "best_2.pt", "best_3.pt"]
    assert [load_checkpoint(p)["epoch"] for p in best_files(tmp_path)] == [5, 2, 6]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best_1.pt", "best_2.pt", "best_3.pt"]
    # An epoch redone after a resume replaces its own entry.
    assert best.offer(6, 0.75, _payload(6, 0.75)) == 2
    assert pd.read_csv(tmp_path / "checkpoints.csv")["epoch"].tolist() == [5, 6, 2]


def test_best_checkpoints_rescan_repairs_an_interrupted_reranking(tmp_path):
    best = BestCheckpoints(tmp_path, keep=2, mode="min", monitor="val_loss")
    best.offer(1, 0.9, _payload(1, 0.9))
    best.offer(2, 0.5, _payload(2, 0.5))
    # A crash between renames: the files are shifted but a stale duplicate of epoch 2 is left behind.
    (tmp_path / "best_1.pt").rename(tmp_path / "best_3.pt")
    torch.save({"state_dict": {}, "epoch": 2, "score": 0.5}, tmp_path / "best_1.pt")
    fresh = BestCheckpoints(tmp_path, keep=2, mode="min", monitor="val_loss")
    fresh.rescan()
    assert [e["epoch"] for e in fresh.entries] == [2, 1]
    assert [load_checkpoint(p)["epoch"] for p in best_files(tmp_path)] == [2, 1]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best_1.pt", "best_2.pt"]


@pytest.mark.parametrize(
    "scores, monitor, expected",
    [([0.1, 0.5, 0.4, 0.3], "val_dice", 2), ([0.9, 0.5, 0.6], "val_loss", 1), ([], "val_dice", 0)],
)
def test_epochs_since_best(scores, monitor, expected):
    assert epochs_since_best([{monitor: s} for s in scores], monitor) == expected


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        (
            ["--config", "c.yaml", "--train.epochs", "3", "--fold", "0"],
            {},
            ["--config", "c.yaml", "--fold", "0", "train.epochs=3"],
        ),
        (["--model.params.encoder_name=resnet18", "a=1"], {}, ["a=1", "model.params.encoder_name=resnet18"]),
        (
            ["--seed", "7"],
            {"SM_MODEL_DIR": "/m", "SM_CHANNEL_TRAIN": "/in", "SM_OUTPUT_DATA_DIR": "/out"},
            ["seed=7", "paths.prepared_dir=/in", "paths.experiment_dir=/checkpoints"],
        ),
        (["--fold", "1"], {"SM_CHANNEL_TRAIN": "/in"}, ["--fold", "1"]),  # not inside a SageMaker job
    ],
)
def test_sagemaker_hyperparameters_become_overrides(argv, env, expected):
    assert sagemaker_arguments(argv, {"--config", "--fold", "--resume", "--force"}, env) == expected


def test_resume_flag_takes_an_optional_boolean():
    parser = train_stage.parser()
    assert parser.parse_args(["--resume"]).resume is True
    assert parser.parse_args(["--resume", "false"]).resume is False
    args = parser.parse_args(["--fold", "1", "--train.epochs", "2", "x=1"])
    assert args.fold == "1" and args.overrides == ["x=1", "train.epochs=2"] and args.resume == "auto"


# --- the stage, end to end on a tiny synthetic dataset ------------------------------------------------------------

SIZE = 32


@pytest.fixture
def stage_cfg(tiny_cfg, tmp_path):
    """The tiny config at 32 px over a synthetic prepared dataset of 16 images in 2 folds."""

    def make(*overrides):
        cfg = tiny_cfg(f"data.image_size={SIZE}", "train.epochs=2", "train.keep_best=2", *overrides)
        if not (tmp_path / "output" / "prepared" / "tiny").exists():
            write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE,), n_folds=2)
        return cfg

    return make


def _log(cfg, fold):
    return pd.read_csv(layout.fold_log_path(layout.fold_dir(cfg, fold)))


@pytest.mark.slow
def test_stage_writes_every_output_and_skips_when_complete(stage_cfg, caplog):
    cfg = stage_cfg("train.oof_size=16")
    summary = train_stage.run(cfg)
    folder = layout.train_dir(cfg)
    assert summary["complete"] and (folder / "done.json").is_file() and (folder / "config.yaml").is_file()
    folds = pd.read_csv(folder / "folds.csv", dtype={"ImageId": str})
    for fold in (0, 1):
        fold_dir = folder / f"fold{fold}"
        log = pd.read_csv(fold_dir / "log.csv")
        assert log["epoch"].tolist() == [1, 2]
        assert {
            "lr",
            "train_loss",
            "val_loss",
            "dice[threshold:0.5:0]",
            "val_dice",
            "val_postprocess",
            "val_dice_pos",
            "seconds",
        } <= set(log)
        table = pd.read_csv(fold_dir / "checkpoints.csv")
        assert table["rank"].tolist() == [1, 2] and set(table["epoch"]) == {1, 2}
        assert (fold_dir / "last.pt").is_file() and (fold_dir / "done.json").is_file()
        store = ProbabilityStore(fold_dir / "oof")
        assert store.ids == folds.loc[folds["fold"] == fold, "ImageId"].tolist() and store.size == 16
        best = load_checkpoint(fold_dir / "best_1.pt")
        assert set(best) >= {"state_dict", "model", "epoch", "score", "image_size"} and "optimizer" not in best
        assert best["score"] == pytest.approx(log["val_dice"].max())  # train.monitor: val_dice
    assert len(load_fold_models(folder)) == 2
    with caplog.at_level("INFO"):
        again = train_stage.run(cfg)
    assert "skipping" in caplog.text and again["folds"][0] == summary["folds"][0]


@pytest.mark.slow
def test_same_seed_same_metrics_and_a_crashed_fold_resumes_to_the_same_end(stage_cfg, tmp_path, monkeypatch):
    first = stage_cfg()
    reference = train_stage.run(first, folds=[0])
    assert not reference["complete"]  # fold 1 not trained: no stage done.json
    assert not (layout.train_dir(first) / "done.json").exists()

    second = stage_cfg(f"paths.experiment_dir={tmp_path / 'again'}")
    run_killed_at_update(monkeypatch, lambda: train_stage.run(second, folds=[0]))
    assert _log(second, 0)["epoch"].tolist() == [1]
    resumed = train_stage.run(second, folds=[0], resume=True)

    pd.testing.assert_frame_equal(_log(first, 0).drop(columns="seconds"), _log(second, 0).drop(columns="seconds"))
    assert resumed["folds"][0]["weights_sha256"] == reference["folds"][0]["weights_sha256"]
    oof = [ProbabilityStore(layout.oof_dir(layout.fold_dir(c, 0))).maps for c in (first, second)]
    assert np.array_equal(oof[0], oof[1])


@pytest.mark.slow
def test_a_killed_training_process_resumes_with_no_clean_up(stage_cfg, tmp_path):
    overrides = [
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
        "train.epochs=4",
    ]
    cfg = stage_cfg(*overrides[2:])
    fold_dir = layout.fold_dir(cfg, 0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "03_train.py"),
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--fold",
            "0",
            *overrides,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (fold_dir / "last.pt").exists():  # the first epoch is done
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert not (fold_dir / "done.json").exists()

    summary = train_stage.run(cfg, folds=[0])  # a plain rerun continues
    assert summary["folds"][0]["epochs"] == 4 and (fold_dir / "done.json").is_file()
    assert _log(cfg, 0)["epoch"].tolist() == [1, 2, 3, 4]
    assert len(ProbabilityStore(fold_dir / "oof")) == 8
    assert not [p.name for p in fold_dir.rglob(".*")], "temporary files were left behind"


@pytest.mark.slow
def test_resume_refuses_the_state_of_another_config_and_a_plain_run_starts_afresh(stage_cfg):
    cfg = stage_cfg("train.epochs=1")
    train_stage.run(cfg, folds=[0])
    (layout.fold_dir(cfg, 0) / "done.json").unlink()
    with pytest.raises(ConfigError, match="different config"):
        train_stage.run(stage_cfg("train.epochs=1", "optimizer.params.lr=0.01"), folds=[0], resume=True)
    # Without --resume, a state of another config is set aside and the fold starts afresh.
    summary = train_stage.run(stage_cfg("train.epochs=1", "optimizer.params.lr=0.01"), folds=[0])
    assert summary["folds"][0]["epochs"] == 1
    with pytest.raises(ConfigError, match="give one of them"):
        train_stage.run(cfg, force=True, resume=True)


@pytest.mark.slow
def test_sagemaker_job_reads_its_channel_and_leaves_the_models_in_the_model_dir(stage_cfg, tmp_path, monkeypatch):
    prepared = stage_cfg().paths.prepared_dir
    model_dir, output_dir = tmp_path / "sm" / "model", tmp_path / "sm" / "output"
    monkeypatch.setenv("SM_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(output_dir))
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(prepared))
    monkeypatch.setenv("SM_NUM_GPUS", "0")
    config = ROOT / "configs" / "tiny.yaml"
    code = run_stage_script(
        train_stage.DESCRIPTION,
        train_stage.stage,
        train_stage.parser,
        argv=[
            "--config",
            str(config),
            "--fold",
            "all",
            "--data.image_size",
            str(SIZE),
            "--train.epochs",
            "1",
            "--paths.output_root",
            str(tmp_path / "elsewhere"),
        ],
    )
    assert code == 0
    assert (output_dir / "03_train" / "done.json").is_file()
    assert {p.name for p in model_dir.iterdir()} == {"config.yaml", "folds.csv", "fold0", "fold1"}
    assert sorted(p.name for p in (model_dir / "fold0").iterdir()) == ["best_1.pt", "checkpoints.csv"]
    models = load_fold_models(model_dir)
    assert [m.fold for m in models] == [0, 1] and models[0].image_size == SIZE
    resolved = (model_dir / "config.yaml").read_text()
    assert f"prepared_dir: {prepared}" in resolved and "epochs: 1" in resolved
    assert json.loads((output_dir / "03_train" / "done.json").read_text())["summary"]["folds"] == [0, 1]
    # output.tar.gz carries the logs and OOF maps, not the checkpoints; the job trained beside the model folder.
    assert (output_dir / "03_train" / "fold0" / "log.csv").is_file() and (
        output_dir / "03_train" / "fold1" / "oof"
    ).is_dir()
    assert not [p.name for p in output_dir.rglob("*") if p.suffix == ".pt" or p.name == "checkpoints.csv"]
    assert (tmp_path / "sm" / "checkpoints" / "03_train" / "fold0" / "last.pt").is_file()
