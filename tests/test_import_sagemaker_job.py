"""A model trained on SageMaker continues locally: a job's model.tar.gz and output.tar.gz (here from stage 03 run
in-process with a job's environment, packed as SageMaker packs SM_MODEL_DIR and SM_OUTPUT_DATA_DIR) are unpacked
by scripts/import_sagemaker_job.py, and stages 04 to 06 run on them as after a local stage 03."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pneumoseg import layout
from pneumoseg.cli import run_stage_script
from pneumoseg.data import rle
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.data.resize import resize_mask
from pneumoseg.evaluation.submission import validate_submission
from pneumoseg.io import read_png, write_csv
from pneumoseg.stages import import_job, package, predict, search
from pneumoseg.stages import train as train_stage
from synthetic import write_prepared

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
CONFIG = str(ROOT / "configs" / "tiny.yaml")


def _pack(folder: Path, archive: Path) -> Path:
    """A tar.gz of ``folder``'s contents at the archive's root, as SageMaker packs /opt/ml/model and output/data."""
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
    return archive


@pytest.fixture
def job_archives(tiny_cfg, tmp_path, monkeypatch):
    """(local config factory, model.tar.gz, output.tar.gz, the job's work folder) of a tiny 2-fold job."""

    def make(*overrides):
        return tiny_cfg(f"data.image_size={SIZE}", *overrides)

    prepared = make().paths.prepared_dir
    write_prepared(prepared, n_images=16, sizes=(SIZE,), n_folds=2, n_test=4)
    job = tmp_path / "opt_ml"
    with monkeypatch.context() as env:
        for name, value in {
            "SM_MODEL_DIR": job / "model",
            "SM_OUTPUT_DATA_DIR": job / "output" / "data",
            "SM_OUTPUT_DIR": job / "output",
            "SM_CHANNEL_TRAIN": prepared,
        }.items():
            env.setenv(name, str(value))
        assert (
            run_stage_script(
                train_stage.DESCRIPTION,
                train_stage.stage,
                train_stage.parser,
                argv=["--config", CONFIG, "--data.image_size", str(SIZE), "--fold", "all", "--force", "True"],
            )
            == 0
        )
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    return (
        make,
        _pack(job / "model", downloads / "model.tar.gz"),
        _pack(job / "output" / "data", downloads / "output.tar.gz"),
        job / "checkpoints",
    )


def _import(cfg_args: list[str], model: Path, output: Path, *extra: str) -> int:
    return run_stage_script(
        import_job.DESCRIPTION,
        import_job.stage,
        import_job.parser,
        argv=["--config", CONFIG, "--model", str(model), "--output", str(output), *cfg_args, *extra],
    )


def _write_label_file(cfg) -> None:
    """The training label file that stage 04 scores against: the prepared masks at the images' original size."""
    labels = pd.read_csv(layout.labels_path(cfg), dtype={"ImageId": str})
    rows = [
        (image_id, rle.encode(resize_mask(read_png(layout.masks_dir(cfg, SIZE) / f"{image_id}.png"), side) > 0))
        for image_id, side in zip(labels["ImageId"], labels["rows"])
    ]
    write_csv(Path(cfg.paths.input_dir) / "train-rle.csv", pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]))


def test_stages_04_to_06_run_on_a_sagemaker_jobs_archives(job_archives, tmp_path):
    make, model, output, work = job_archives
    cfg = make()
    _write_label_file(cfg)
    overrides = [
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
    ]
    assert _import(overrides, model, output) == 0
    folder = layout.train_dir(cfg)
    assert train_stage.stage_record(cfg).is_complete()  # stage 03 counts as done here
    assert sorted(p.name for p in layout.fold_dir(folder, 0).iterdir()) == [
        "best_1.pt",
        "checkpoints.csv",
        "done.json",
        "log.csv",
        "oof",
    ]
    assert not list(folder.parent.glob(".*"))  # no staging folder left
    job_oof = ProbabilityStore(layout.oof_dir(layout.fold_dir(work / "03_train", 1)))
    local_oof = ProbabilityStore(layout.oof_dir(layout.fold_dir(folder, 1)))
    assert list(local_oof.ids) == list(job_oof.ids) and len(local_oof) == 8

    search.run(cfg)
    assert layout.thresholds_path(cfg).is_file()
    predict.run(cfg)
    test, expected = predict.test_set(cfg)
    assert validate_submission(layout.submission_path(cfg), expected, predict.image_sizes(test)) == []
    package.run(cfg)  # loads and checks the package it writes
    assert layout.package_path(cfg).is_file()


def test_import_refuses_another_config_and_an_existing_training_folder(job_archives, tmp_path):
    make, model, output, _ = job_archives
    overrides = [
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        f"data.image_size={SIZE}",
    ]
    assert _import([*overrides, "train.epochs=3"], model, output) == 1  # the job trained 1 epoch
    assert _import([*overrides, f"paths.prepared_dir={tmp_path / 'nowhere'}"], model, output) == 1
    assert not layout.train_dir(make()).exists()
    assert _import(overrides, model, output) == 0
    assert _import(overrides, model, output) == 1  # 03_train/ is there: needs --force
    assert _import(overrides, model, output, "--force") == 0
    assert _import(overrides, output, model, "--force") == 1  # the archives swapped
