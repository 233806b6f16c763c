"""Training phases (train.phases): each phase from the last one's best weights, at its own size and settings;
resumable; the last phase is the fold's model."""

import json

import pytest
import torch

from pneumoseg import layout
from pneumoseg.errors import ConfigError
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint
from pneumoseg.stages import train as train_stage
from pneumoseg.training.phases import PHASE_DONE, phase_config, plan_phases
from synthetic import write_prepared

PHASES = (
    "train.phases=[{name: small, train: {image_size: 32, epochs: 1}},"
    " {name: full, train: {epochs: 2, freeze_encoder_epochs: 1}, optimizer: {params: {lr: 1.0e-4}},"
    " scheduler: {name: cosine_restarts, params: {T_0: 1}}, sampler: {params: {start: 0.5, end: 0.5}}}]"
)


def _cfg(tiny_cfg, *overrides):
    return tiny_cfg(
        "data.image_size=48",
        "prepare.sizes=[32, 48]",
        "train.folds=[0]",
        "train.oof_size=16",
        "predict.top_k=1",
        *overrides,
    )


def test_a_phase_is_the_config_with_its_changes(tiny_cfg):
    cfg = _cfg(tiny_cfg, PHASES)
    small, full = plan_phases(cfg)
    first = phase_config(cfg, small, None)
    assert (first.train.image_size, first.train.epochs, first.train.phases) == (32, 1, None)
    assert first.optimizer == cfg.optimizer and first.train.init_from is None
    last = phase_config(cfg, full, "phases/0_small/best_1.pt")
    assert (last.train.image_size, last.train.freeze_encoder_epochs, last.optimizer.params.lr) == (48, 1, 1.0e-4)
    assert last.scheduler == {"name": "cosine_restarts", "params": {"T_0": 1}}  # renamed: the phase's params only
    assert last.sampler.params == {**cfg.sampler.params, "start": 0.5, "end": 0.5}
    assert last.train.init_from == {"checkpoint": "phases/0_small/best_1.pt", "partial": False}


@pytest.mark.parametrize(
    "phases, message",
    [
        ("[{train: {epochs: 1}}]", "needs a name"),
        ("[{name: a}, {name: a}]", "unique"),
        ("[{name: a, tta: {hflip: false}}]", "a phase changes only"),
        ("[{name: a, data: {image_size: 32}}]", "a phase changes only"),
        ("[{name: a, train: {epohcs: 3}}]", r"train.phases\[0\].train.epohcs: no such key"),
        ("[{name: a, train: {epochs: 0}}]", "at least 1"),
        ("[{name: a}, {name: b, train: {image_size: 32}}]", "the last phase trains at 32 px"),
    ],
)
def test_bad_phases_are_config_errors(tiny_cfg, phases, message):
    with pytest.raises(ConfigError, match=message):
        plan_phases(_cfg(tiny_cfg, f"train.phases={phases}"))


@pytest.mark.slow
def test_phases_run_in_order_each_from_the_last_and_resume(tiny_cfg, monkeypatch):
    cfg = _cfg(tiny_cfg, PHASES)
    write_prepared(cfg.paths.prepared_dir, n_images=12, sizes=(32, 48), n_folds=2)
    starts = []
    from pneumoseg.training import trainer as trainer_module

    original = trainer_module.Trainer.from_config.__func__

    def recording(cls, cfg, ctx, updates_per_epoch, seed, initial=None):
        trainer = original(cls, cfg, ctx, updates_per_epoch, seed, initial)
        starts.append((int(cfg.train.image_size), initial, {k: v.clone() for k, v in trainer.net.state_dict().items()}))
        return trainer

    monkeypatch.setattr(trainer_module.Trainer, "from_config", classmethod(recording))
    summary = train_stage.run(cfg)["folds"][0]
    fold = layout.fold_dir(cfg, 0)
    small = fold / "phases" / "0_small"
    assert [p["name"] for p in summary["phases"]] == ["small", "full"] and summary["epochs"] == 2
    assert json.loads((small / PHASE_DONE).read_text())["summary"]["epochs"] == 1
    assert not (small / "oof").exists() and (fold / "oof").is_dir()
    # the full phase started from the small phase's best weights, at 48 px
    (size0, initial0, _), (size1, initial1, weights1) = starts
    assert (size0, initial0, size1, initial1) == (32, None, 48, best_files(small)[0])
    source = load_checkpoint(best_files(small)[0])["state_dict"]
    assert all(torch.equal(weights1[k], v) for k, v in source.items())
    assert load_checkpoint(best_files(fold)[0])["image_size"] == 48
    # a rerun after a kill in the last phase: the finished phase is not retrained, the last one resumes
    (fold / "done.json").unlink()
    (layout.train_dir(cfg) / "done.json").unlink()
    starts.clear()
    again = train_stage.run(cfg)["folds"][0]
    assert [size for size, _, _ in starts] == [48]
    assert again["weights_sha256"] == summary["weights_sha256"]
