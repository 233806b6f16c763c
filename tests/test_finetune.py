"""Fine-tuning: a fold starting from trained weights (train.init_from), a frozen encoder, frozen BatchNorm."""

import pandas as pd
import pytest
import torch

from pneumoseg import layout
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.modeling.checkpoints import best_files, load_checkpoint, save_checkpoint
from pneumoseg.stages import train as train_stage
from pneumoseg.training.distributed import DistContext
from pneumoseg.training.finetune import initial_weights_path, load_initial_weights
from pneumoseg.training.trainer import Trainer, weights_digest
from synthetic import write_prepared


def _batches(n=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 2, 1, size, size, generator=generator)
    masks = (torch.rand(n, 2, 1, size, size, generator=generator) > 0.8).float()
    return list(zip(images, masks))


def _trainer(tiny_cfg, *overrides, initial=None):
    cfg = tiny_cfg("optimizer.params.lr=0.05", *overrides)
    return Trainer.from_config(cfg, DistContext(), updates_per_epoch=3, seed=0, initial=initial)


def _encoder_state(trainer):
    return {k: v.clone() for k, v in trainer.net.encoder.state_dict().items()}


def _bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def test_a_frozen_encoder_keeps_its_weights_and_statistics_then_trains(tiny_cfg):
    trainer = _trainer(tiny_cfg, "train.freeze_encoder_epochs=1")
    encoder, decoder = _encoder_state(trainer), {k: v.clone() for k, v in trainer.net.decoder.state_dict().items()}
    trainer.start_epoch(0)
    trainer.train_epoch(_batches())
    after = trainer.net.encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in encoder.items())  # weights and BN statistics alike
    assert any(not torch.equal(trainer.net.decoder.state_dict()[k], v) for k, v in decoder.items())
    trainer.start_epoch(1)  # released
    trainer.train_epoch(_batches(seed=1))
    after = trainer.net.encoder.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in encoder.items() if "running_" not in k)
    assert any(not torch.equal(after[k], v) for k, v in encoder.items() if "running_" in k)


def test_freeze_bn_keeps_the_encoders_statistics_and_trains_its_weights(tiny_cfg):
    trainer = _trainer(tiny_cfg, "train.freeze_bn=true")
    statistics, encoder = _bn_buffers(trainer.net.encoder), _encoder_state(trainer)
    decoder_statistics = _bn_buffers(trainer.net.decoder)
    for epoch in range(2):
        trainer.start_epoch(epoch)
        trainer.train_epoch(_batches(seed=epoch))
    assert all(torch.equal(trainer.net.encoder.state_dict()[k], v) for k, v in statistics.items())
    assert any(
        not torch.equal(trainer.net.encoder.state_dict()[k], v)
        for k, v in encoder.items()
        if "running_" not in k and "num_batches" not in k
    )
    assert any(not torch.equal(trainer.net.decoder.state_dict()[k], v) for k, v in decoder_statistics.items())


def test_the_weights_at_the_start_equal_the_source_checkpoint(tiny_cfg, tmp_path):
    source = _trainer(tiny_cfg, "seed=7")
    source.train_epoch(_batches())
    path = tmp_path / "source.pt"
    save_checkpoint(path, {"state_dict": source.net.state_dict()})
    started = _trainer(tiny_cfg, initial=path)
    assert weights_digest(started.net) == weights_digest(source.net)
    assert weights_digest(_trainer(tiny_cfg).net) != weights_digest(source.net)


def test_a_new_head_loads_only_with_partial_and_the_load_is_reported(tiny_cfg, tmp_path):
    source = _trainer(tiny_cfg)
    path = tmp_path / "source.pt"
    state = source.net.state_dict()
    state["extra.weight"] = torch.zeros(2)
    state["segmentation_head.0.weight"] = torch.zeros(3, 4, 3, 3)  # another head's shape
    del state["segmentation_head.0.bias"]
    save_checkpoint(path, {"state_dict": state})
    net = _trainer(tiny_cfg).net
    with pytest.raises(
        ConfigError,
        match=r"1 missing \(segmentation_head.0.bias\), 1 unexpected \(extra.weight\), "
        r"1 mismatched "
        r"\(segmentation_head.0.weight\).*partial=true",
    ):
        load_initial_weights(net, path, partial=False)
    report = load_initial_weights(net, path, partial=True)
    assert report == {
        "missing": ["segmentation_head.0.bias"],
        "unexpected": ["extra.weight"],
        "mismatched": ["segmentation_head.0.weight"],
    }
    assert torch.equal(
        net.encoder.state_dict()["model.conv1.0.weight"], source.net.encoder.state_dict()["model.conv1.0.weight"]
    )


@pytest.mark.slow
def test_another_experiments_fold_k_starts_fold_k_and_other_folds_are_refused(tiny_cfg, tmp_path):
    source_cfg = tiny_cfg("experiment=source", "data.image_size=32")
    write_prepared(source_cfg.paths.prepared_dir, n_images=12, sizes=(32,), n_folds=2)
    train_stage.run(source_cfg)
    source_dir = layout.train_dir(source_cfg).parent
    cfg = tiny_cfg("experiment=tuned", "data.image_size=32", f"train.init_from={{experiment: {source_dir}}}")
    folds = pd.read_csv(layout.folds_path(cfg.paths.prepared_dir), dtype={"ImageId": str})
    for fold in (0, 1):
        expected = best_files(layout.fold_dir(source_cfg, fold))[0]
        assert initial_weights_path(cfg, fold, folds) == expected
        started = Trainer.from_config(cfg, DistContext(), 3, 0, expected)
        assert weights_digest(started.net) == _digest_of(expected, started.net)
    moved = folds.assign(fold=1 - folds["fold"])
    with pytest.raises(DataError, match="other folds"):
        initial_weights_path(cfg, 0, moved)


def _digest_of(path, net):
    net.load_state_dict(load_checkpoint(path)["state_dict"])
    return weights_digest(net)


@pytest.mark.parametrize(
    "block, message",
    [
        ("{checkpoint: nowhere.pt}", "nowhere.pt not found"),
        ("{experiment: nowhere}", "nowhere/03_train/folds.csv not found"),
        ("{checkpoint: a.pt, experiment: b}", "must be"),
        ("{checkpont: a.pt}", "must be"),
    ],
)
def test_bad_init_from_blocks_are_config_errors(tiny_cfg, block, message):
    cfg = tiny_cfg(f"train.init_from={block}")
    with pytest.raises(ConfigError, match=message):
        initial_weights_path(cfg, 0, pd.DataFrame({"ImageId": ["a"], "fold": [0]}))
