"""Shared test fixtures: the real challenge files (when present) and small configs in temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pneumoseg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# PNEUMOSEG_SHARED points elsewhere, e.g. from a git worktree that has no ../shared beside it.
SHARED_SIIM = Path(os.environ.get("PNEUMOSEG_SHARED", ROOT.parent / "shared")) / "siim"
SAMPLE_IMAGES = SHARED_SIIM / "sample_images"
STAGE2_TRAIN_CSV = SHARED_SIIM / "stage_2_train.csv"


@pytest.fixture
def siim_dir() -> Path:
    """``../shared/siim``: real challenge files; the test is skipped when the folder is absent."""
    if not STAGE2_TRAIN_CSV.is_file():
        pytest.skip(f"real challenge files not found at {SHARED_SIIM}")
    return SHARED_SIIM


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory for the tiny config with every path inside ``tmp_path``; extra ``key=value`` overrides."""

    def make(*overrides: str):
        return load_config(
            ROOT / "configs" / "tiny.yaml",
            [f"paths.input_dir={tmp_path / 'input'}", f"paths.output_root={tmp_path / 'output'}", *overrides],
        )

    return make
