"""train.torch_threads: stage 03's intra-op thread count, set before any training (configs/scale.yaml)."""
import pytest
import torch

from pneumoseg.errors import ConfigError, DataError
from pneumoseg.stages import train


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stage_03_sets_the_configured_thread_count(tiny_cfg, restore_threads):
    torch.set_num_threads(2)
    # no prepared data: the stage stops at its inputs, after setting the threads
    with pytest.raises(DataError):
        train.run(tiny_cfg("+train.torch_threads=1"))
    assert torch.get_num_threads() == 1


def test_without_the_key_torch_keeps_its_threads(tiny_cfg, restore_threads):
    torch.set_num_threads(2)
    with pytest.raises(DataError):
        train.run(tiny_cfg())
    assert torch.get_num_threads() == 2


def test_a_thread_count_below_one_is_refused(tiny_cfg, restore_threads):
    with pytest.raises(ConfigError, match="train.torch_threads"):
        train.run(tiny_cfg("+train.torch_threads=0"))
