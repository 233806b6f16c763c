"""End to end: ``bash run_all.sh`` on the tiny config, stages 00 to 06, then again to see every stage skipped, then
``--from 05 --to 05 --force`` to see stage 05 alone redone. The tiny phantoms are not learnt in one epoch, so
scores are only checked for form here; tests/test_learning.py checks that the pipeline learns."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from pneumoseg import layout
from pneumoseg.config import load_config
from pneumoseg.data import testset
from pneumoseg.evaluation.submission import validate_submission
from pneumoseg.stages import predict

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["00", "01", "02", "03", "04", "05", "06"]


def _run_all(tmp_path: Path, *args: str) -> str:
    command = [
        "bash",
        str(ROOT / "run_all.sh"),
        "configs/tiny.yaml",
        f"paths.input_dir={tmp_path / 'input'}",
        f"paths.output_root={tmp_path / 'output'}",
        *args,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _stages_run(output: str) -> list[str]:
    return re.findall(r"^=== stage (\d\d): ", output, flags=re.MULTILINE)


def _done_files(tmp_path: Path) -> dict[str, str]:
    """Every stage's done.json (the per-fold ones included) and its content."""
    return {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("done.json"))}


def test_run_all_on_the_tiny_config(tmp_path):
    output = _run_all(tmp_path)
    assert _stages_run(output) == STAGES
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"paths.input_dir={tmp_path / 'input'}", f"paths.output_root={tmp_path / 'output'}"],
    )
    test, expected = testset.test_set(cfg)
    submission = layout.submission_path(cfg)
    assert validate_submission(submission, expected, testset.image_sizes(test)) == []
    assert len(expected) == int(cfg.demo.n_test)
    scores = json.loads((layout.predict_dir(cfg) / predict.TEST_SCORE_FILE).read_text())
    assert 0.0 <= scores["test_score"] <= 1.0 and scores["oof_score"] is not None

    done = _done_files(tmp_path)
    assert len(done) >= len(STAGES)
    again = _run_all(tmp_path)
    assert _stages_run(again) == STAGES
    assert again.count("skipping (use --force to redo)") == len(STAGES), again[-4000:]
    assert _done_files(tmp_path) == done

    submission_time = submission.stat().st_mtime_ns
    forced = _run_all(tmp_path, "--from", "05", "--to", "05", "--force")
    assert _stages_run(forced) == ["05"]
    after = _done_files(tmp_path)
    changed = [name for name in done if after[name] != done[name]]
    assert changed == [str((layout.predict_dir(cfg) / "done.json").relative_to(tmp_path))]
    assert submission.stat().st_mtime_ns != submission_time
    assert validate_submission(submission, expected, testset.image_sizes(test)) == []
