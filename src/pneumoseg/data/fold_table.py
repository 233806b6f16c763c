"""The fold table a training folder was trained on (``03_train/folds.csv``, stage 02's copied when training starts):
its one reader, which checks its columns. Read by stage 04, the ensemble checks and the predictor (so the server
too): this module needs pandas only, not scikit-learn as the fold split does (:mod:`pneumoseg.data.folds`)."""

from __future__ import annotations

import pandas as pd

from pneumoseg import layout
from pneumoseg.data.labels import ID_COLUMN
from pneumoseg.errors import DataError
from pneumoseg.stage_table import command, run_first

FOLD_COLUMN = "fold"


def read_trained_folds(where: layout.Where) -> pd.DataFrame:
    """The ``folds.csv`` a training folder was trained on (:func:`pneumoseg.layout.train_folds_path`), checked:
    its ``ImageId`` (as text) and ``fold`` (whole numbers) columns, one row per image, in the file's order.

    Args:
        where: the config (its ``03_train``) or a folder laid out like it (a SageMaker model folder, say).

    Raises:
        DataError: the file is missing (the folder holds no trained models), unreadable, or lacks those columns.
    """
    path = layout.train_folds_path(where)
    if not path.is_file():
        raise DataError(f"{path} not found: no trained models in {path.parent}; {run_first('03')}")
    try:
        table = pd.read_csv(path, dtype={ID_COLUMN: str})
        missing = [column for column in (ID_COLUMN, FOLD_COLUMN) if column not in table.columns]
        if not missing:
            table[FOLD_COLUMN] = table[FOLD_COLUMN].astype(int)
    except (ValueError, TypeError, pd.errors.ParserError) as exc:
        raise DataError(
            f"{path} is not a readable fold table ({type(exc).__name__}); retrain ({command('03')} --force)"
        ) from None
    if missing:
        raise DataError(f"{path} lacks the column(s) {missing}; retrain ({command('03')} --force)")
    return table
