"""torch_threads: one rule for training (stage 03), prediction (stage 05) and the server's predictions."""

import pytest
import torch

from pneumoseg.errors import ConfigError, DataError
from pneumoseg.modeling import device
from pneumoseg.stages import train


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "cores, reserved, sharers, expected",
    [
        (2, 1, 1, 1),
        (8, 1, 1, 7),
        (2, 4, 1, 1),
        (8, 0, 3, 2),
        (1, 0, 4, 1),
    ],
)
def test_auto_is_the_usable_cores_less_the_loader_workers_at_least_one(monkeypatch, cores, reserved, sharers, expected):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert device.cpu_threads("auto", "k", reserved, sharers) == expected


@pytest.mark.parametrize("setting", [0, -1, "two", 1.5, True])
def test_a_bad_setting_is_refused(setting):
    with pytest.raises(ConfigError, match="train.torch_threads must be auto"):
        device.cpu_threads(setting, "train.torch_threads")


def test_stage_03_sets_the_configured_thread_count(tiny_cfg, restore_threads):
    torch.set_num_threads(2)
    # no prepared data: the stage stops at its inputs, after setting the threads
    with pytest.raises(DataError):
        train.run(tiny_cfg("train.torch_threads=1"))
    assert torch.get_num_threads() == 1


def test_stage_03_defaults_to_auto(tiny_cfg, restore_threads, monkeypatch):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(6)))
    cfg = tiny_cfg("train.num_workers=2")
    assert cfg.train.torch_threads == "auto"
    with pytest.raises(DataError):
        train.run(cfg)
    assert torch.get_num_threads() == 4


def test_null_keeps_torchs_threads(tiny_cfg, restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(DataError):
        train.run(tiny_cfg("train.torch_threads=null"))
    assert torch.get_num_threads() == 2


def test_stage_05_sets_the_thread_count(tiny_cfg, restore_threads, monkeypatch):
    from pneumoseg.stages import predict

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: set(range(5)))
    monkeypatch.setattr(predict, "build_predictor", lambda cfg: (_ for _ in ()).throw(DataError("stop here")))
    monkeypatch.setattr(predict, "test_set", lambda cfg: (None, None))
    monkeypatch.setattr(predict, "_input_facts", lambda cfg, labels: {})
    with pytest.raises(DataError, match="stop here"):
        predict.run(tiny_cfg("predict.num_workers=1"))
    assert torch.get_num_threads() == 4


def test_the_server_refuses_a_bad_thread_count(capsys):
    from pneumoseg.serve import server

    with pytest.raises(SystemExit):
        server.main(["--model", "nothing.tar.gz", "--torch-threads", "0"])
    assert "--torch-threads must be auto" in capsys.readouterr().err
