"""What a SageMaker training job of stage 03 leaves: the fold models in ``SM_MODEL_DIR`` (``model.tar.gz``), laid
out like ``03_train/`` so that :func:`pneumoseg.inference.fold_models.load_fold_models` reads either, and the rest of
the training folder (logs, OOF maps, tables, configs, completion records) in ``SM_OUTPUT_DATA_DIR/03_train/``
(``output.tar.gz``). Each checkpoint travels once; ``last.pt`` (weights plus optimizer state) stays behind.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from pneumoseg import layout
from pneumoseg.io import atomic_path
from pneumoseg.modeling.checkpoints import CHECKPOINTS_FILE, best_files

log = logging.getLogger(__name__)

# What the output data leaves out of a training folder: the checkpoints' table, which the model folder
# carries with the checkpoints, and every checkpoint (best_<rank>.pt, last.pt).
_MODEL_FILES = (CHECKPOINTS_FILE,)
_CHECKPOINT_SUFFIX = ".pt"


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def export_models(folder: Path, model_dir: Path) -> list[Path]:
    """Copy what inference needs (config, folds, each fold's checkpoints of every set in
    :data:`pneumoseg.layout.CHECKPOINT_SETS` and their tables) from the training folder ``folder`` to
    ``model_dir``, laid out as in ``folder`` -> the files written."""
    copies = [folder / "config.yaml", layout.train_folds_path(folder)]
    for fold_folder in layout.fold_dirs(folder).values():
        for checkpoints in layout.CHECKPOINT_SETS:
            where = layout.checkpoints_dir(fold_folder, checkpoints)
            files = best_files(where)
            copies += [*files, where / CHECKPOINTS_FILE] if files else []
    written = []
    for path in copies:
        written.append(model_dir / path.relative_to(folder))
        _copy(path, written[-1])
    log.info("fold models copied to %s", model_dir)
    return written


def is_output_data(path: Path) -> bool:
    """True for the files of a training folder that belong in the job's output data: everything but the
    checkpoints (``*.pt``), their table and temporary files (``.<name>.tmp...``)."""
    return not (path.suffix == _CHECKPOINT_SUFFIX or path.name in _MODEL_FILES or path.name.startswith("."))


def export_output_data(folder: Path, output_data_dir: Path) -> list[Path]:
    """Copy the training folder's logs, OOF maps, tables, configs and completion records (see
    :func:`is_output_data`) to ``output_data_dir/<folder name>/`` -> the files written."""
    written = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if all(is_output_data(Path(part)) for part in relative.parts):
            written.append(output_data_dir / folder.name / relative)
            _copy(path, written[-1])
    log.info("logs and OOF maps copied to %s", output_data_dir / folder.name)
    return written


def export_outputs(folder: Path, environ: Mapping[str, str] | None = None) -> None:
    """At the end of stage 03 in a job: the models to ``SM_MODEL_DIR``, the rest to ``SM_OUTPUT_DATA_DIR``."""
    environ = os.environ if environ is None else environ
    export_models(folder, Path(environ["SM_MODEL_DIR"]))
    if environ.get("SM_OUTPUT_DATA_DIR"):
        export_output_data(folder, Path(environ["SM_OUTPUT_DATA_DIR"]))
