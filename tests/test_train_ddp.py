import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pneumoseg.config import load_config
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.modeling.checkpoints import load_checkpoint
from pneumoseg.stages import train
from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_cpu_processes_train_identical_weights_and_complete_outputs(tmp_path):
    output = tmp_path / "output"
    write_prepared(output / "prepared" / "tiny", n_images=16, sizes=(32,), n_folds=2)
    results = _torchrun(
        tmp_path, f"paths.output_root={output}", "data.image_size=32", "train.epochs=2", "train.device=cpu"
    )
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    for fold in ("0", "1"):
        assert ranks[0]["folds"][fold]["weights_sha256"] == ranks[1]["folds"][fold]["weights_sha256"]
        # Metrics are reduced over both ranks' halves of the validation images, so both ranks saw the same.
        assert ranks[0]["folds"][fold]["best"] == ranks[1]["folds"][fold]["best"]
    assert ranks[0]["complete"] and ranks[1]["complete"]

    folder = output / "tiny" / "03_train"
    assert (folder / "done.json").is_file()
    folds = pd.read_csv(folder / "folds.csv", dtype={"ImageId": str})
    for fold in (0, 1):
        fold_dir = folder / f"fold{fold}"
        assert pd.read_csv(fold_dir / "log.csv")["epoch"].tolist() == [1, 2]
        assert (fold_dir / "best_1.pt").is_file() and (fold_dir / "last.pt").is_file()
        store = ProbabilityStore(fold_dir / "oof")
        assert store.ids == folds.loc[folds["fold"] == fold, "ImageId"].tolist()
    assert not list(folder.rglob("*.tmp*")), "a rank left a temporary file behind"


def _torchrun(tmp_path: Path, *overrides: str) -> Path:
    """Stage 03 on the tiny config in 2 CPU processes; returns the folder of their rank<r>.json summaries."""
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
        str(ROOT / "configs" / "tiny.yaml"),
        str(results),
        *overrides,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return results


# BatchNorm mixes the images of a batch, so a batch split over two processes normalises differently (and CPU
# SyncBatchNorm does not exist): the comparison uses per-image GroupNorm and no decoder norm. BCE is a mean over
# pixels, so the mean of two equal halves' losses is the whole batch's; the batch Dice of the mixed loss is not.
# Plain SGD keeps the gradient's scale in the update (Adam would hide a gradient scaled by the world size).
SAME_GLOBAL_BATCH = (
    "data.image_size=32",
    "train.epochs=2",
    "train.device=cpu",
    "train.folds=[0]",
    "loss.name=bce",
    "optimizer.name=sgd",
    "optimizer.params={lr: 0.5}",
    "+model.params.norm_layer=groupnorm1",
    "+model.params.decoder_use_norm=false",
)


@pytest.mark.slow
def test_two_processes_of_batch_b_train_the_weights_of_one_process_of_batch_2b(tmp_path):
    write_prepared(tmp_path / "ddp" / "prepared" / "tiny", n_images=24, sizes=(32,), n_folds=2)
    shutil.copytree(tmp_path / "ddp" / "prepared", tmp_path / "single" / "prepared")
    _torchrun(tmp_path, f"paths.output_root={tmp_path / 'ddp'}", "train.batch_size=2", *SAME_GLOBAL_BATCH)
    train.run(
        load_config(
            ROOT / "configs" / "tiny.yaml",
            [f"paths.output_root={tmp_path / 'single'}", "train.batch_size=4", *SAME_GLOBAL_BATCH],
        )
    )

    def weights(root: str) -> dict[str, torch.Tensor]:
        last = load_checkpoint(tmp_path / root / "tiny" / "03_train" / "fold0" / "last.pt")
        return last["trainer"]["model"]

    ddp, single = weights("ddp"), weights("single")
    assert ddp.keys() == single.keys()
    for name, tensor in single.items():
        if tensor.is_floating_point():
            assert torch.allclose(ddp[name], tensor, atol=1e-5, rtol=1e-4), name
    # The test means something only if the second epoch moved the weights well beyond the tolerance (with
    # train.keep_best 2 of 2 epochs, one of the best files is epoch 1).
    best = [load_checkpoint(p) for p in (tmp_path / "single" / "tiny" / "03_train" / "fold0").glob("best_*.pt")]
    first = next(c["state_dict"] for c in best if c["epoch"] == 1)
    moved = max((single[k] - first[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-3
