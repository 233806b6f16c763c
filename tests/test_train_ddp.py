import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pneumoseg.data.probstore import ProbabilityStore

from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_cpu_processes_train_identical_weights_and_complete_outputs(tmp_path):
    output = tmp_path / "output"
    write_prepared(output / "prepared" / "tiny", n_images=16, sizes=(32,), n_folds=2)
    results = tmp_path / "ranks"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "ddp_worker.py"), str(ROOT / "configs" / "tiny.yaml"), str(results),
               f"paths.output_root={output}", "data.image_size=32", "train.epochs=2", "train.device=cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

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
