"""Stage 03 as a SageMaker training job, through AWS's real training toolkits run locally (tests/sagemaker_toolkit.py):
the code-only source bundle as source_dir, a single-process job, a 2-process torch_distributed job on the CPU, a
failing job whose failure file names the error, and a managed-spot job killed mid-fold that a second job, given the
same checkpoint folder, continues to the weights of an uninterrupted job. Skipped where unshare or the toolkits
cannot run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import sagemaker_toolkit as toolkit
from pneumoseg.inference.fold_models import load_fold_models
from pneumoseg.sagemaker.bundle import write_bundle
from synthetic import write_prepared

pytestmark = pytest.mark.slow

SIZE = 32
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """(toolkit venv, sourcedir.tar.gz of the bundle, a prepared folder for the train channel)."""
    folder = tmp_path_factory.mktemp("job_inputs")
    try:
        toolkit.check_namespace(folder / "probe")
        venv = toolkit.toolkit_venv()
    except toolkit.Unavailable as exc:
        pytest.skip(str(exc))
    bundle = folder / "source"
    write_bundle(ROOT, bundle)
    prepared = folder / "prepared"
    write_prepared(prepared, n_images=16, sizes=(SIZE,), n_folds=2)
    return venv, toolkit.source_tarball(bundle, folder / "sourcedir.tar.gz"), prepared


def _job(job_inputs, scratch: Path, **hyperparameters):
    """Run one job with the tiny config plus ``hyperparameters`` -> (result, /opt/ml as it was left, seconds)."""
    venv, tarball, prepared = job_inputs
    scratch.mkdir()
    opt_ml = scratch / "opt_ml"
    toolkit.layout_opt_ml(
        opt_ml,
        {
            "config": "configs/tiny.yaml",
            "fold": "all",
            "data.image_size": SIZE,
            "train.epochs": 1,
            "force": True,  # arrives as --force True
            "sagemaker_program": "scripts/03_train.py",
            "sagemaker_submit_directory": str(tarball),
            **hyperparameters,
        },
        {"train": prepared},
    )
    started = time.time()
    result = toolkit.run_job(scratch, venv)
    return result, opt_ml, time.time() - started


def _assert_trained(result, opt_ml: Path):
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert (opt_ml / "output" / "success").is_file() and not (opt_ml / "output" / "failure").exists()
    model_dir = opt_ml / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.yaml", "fold0", "fold1", "folds.csv"]
    assert [m.fold for m in load_fold_models(model_dir)] == [0, 1]
    data = opt_ml / "output" / "data" / "03_train"
    assert (
        (data / "done.json").is_file() and (data / "fold0" / "oof").is_dir() and (data / "fold1" / "log.csv").is_file()
    )
    assert not [p for p in data.rglob("*") if p.suffix == ".pt" or p.name == "checkpoints.csv"]
    # requirements.txt was installed from nothing but what is there (PIP_NO_INDEX): no torch download.
    assert "Requirement already satisfied: segmentation-models-pytorch" in log
    return log


def test_single_process_job_leaves_the_models_once(job_inputs, tmp_path):
    result, opt_ml, seconds = _job(job_inputs, tmp_path / "single")
    _assert_trained(result, opt_ml)
    print(f"single-process job: {seconds:.1f} s")


def test_torch_distributed_job_on_two_cpu_processes(job_inputs, tmp_path):
    result, opt_ml, seconds = _job(
        job_inputs,
        tmp_path / "ddp",
        sagemaker_torch_distributed_enabled=True,
        sagemaker_mpi_num_of_processes_per_host=2,
    )
    log = _assert_trained(result, opt_ml)
    assert "torchrun --nnodes 1 --nproc_per_node 2" in log
    print(f"2-process torch_distributed job: {seconds:.1f} s")


def test_failing_job_names_the_error_as_its_failure_reason(job_inputs, tmp_path):
    result, opt_ml, _ = _job(job_inputs, tmp_path / "failing", **{"train.epochs": 0})
    assert result.returncode != 0
    reason = (opt_ml / "output" / "failure").read_text()
    assert reason.startswith("ConfigError: train.epochs must be at least 1, got 0"), reason
    assert reason.count("\n") == 1 and not (opt_ml / "output" / "success").exists()


def _spot_job(job_inputs, scratch: Path, checkpoints: Path | None = None) -> Path:
    """Lay out a 2-fold, 3-epoch job in ``scratch`` (without --force: a restarted spot job must not start over);
    ``checkpoints``: a checkpoint folder to restore first, as SageMaker copies ``checkpoint_s3_uri`` back."""
    _, tarball, prepared = job_inputs
    opt_ml = scratch / "opt_ml"
    toolkit.layout_opt_ml(
        opt_ml,
        {
            "config": "configs/tiny.yaml",
            "fold": "all",
            "data.image_size": SIZE,
            "train.epochs": 3,
            "sagemaker_program": "scripts/03_train.py",
            "sagemaker_submit_directory": str(tarball),
        },
        {"train": prepared},
    )
    if checkpoints is not None:
        shutil.copytree(checkpoints, opt_ml / "checkpoints")
    return opt_ml


def _final_weights(opt_ml: Path) -> dict[str, str]:
    summaries = json.loads((opt_ml / "output" / "data" / "03_train" / "done.json").read_text())["summary"]
    return {fold: summary["weights_sha256"] for fold, summary in summaries["fold_summaries"].items()}


def test_a_spot_job_restarted_with_its_checkpoint_folder_ends_as_one_uninterrupted_job(job_inputs, tmp_path):
    venv = job_inputs[0]
    whole = _spot_job(job_inputs, tmp_path / "whole")
    _assert_trained(toolkit.run_job(tmp_path / "whole", venv), whole)

    interrupted = _spot_job(job_inputs, tmp_path / "interrupted")
    fold0 = interrupted / "checkpoints" / "03_train" / "fold0"
    job = toolkit.start_job(tmp_path / "interrupted", venv)
    deadline = time.monotonic() + 600
    while not (fold0 / "log.csv").is_file() or len((fold0 / "log.csv").read_text().splitlines()) < 3:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the spot instance is reclaimed mid-fold (epoch 2 of 3)
    job.wait()
    assert not (fold0 / "done.json").exists() and not (interrupted / "output" / "success").exists()

    restarted = _spot_job(job_inputs, tmp_path / "restarted", checkpoints=interrupted / "checkpoints")
    result = toolkit.run_job(tmp_path / "restarted", venv)
    log = _assert_trained(result, restarted)
    assert re.search(r"fold0/last.pt: resuming after epoch [12]\b", log), log[-3000:]
    assert pd.read_csv(restarted / "output" / "data" / "03_train" / "fold0" / "log.csv")["epoch"].tolist() == [1, 2, 3]
    assert _final_weights(restarted) == _final_weights(whole)
