"""The stage table: every stage of the pipeline in one place, with the files that say how far a stage got.

One row per stage (:class:`Stage`): its number, name, title, folder (a function of the config), script and the
earlier stages it reads. Whatever lists the stages takes them from here: ``run_all.sh`` (``python -m
pneumoseg.stage_table CONFIG``), ``scripts/status.py``, the leaderboard, the SageMaker import, :mod:`pneumoseg.layout`
(the folder names) and every "run stage NN first" message (:func:`command`). Adding a stage is its module in
``stages/``, its script and one row of :data:`STAGES`.

An ensemble config trains no model of its own: its stage 03 is ``scripts/train_members.py``
(:data:`ENSEMBLE_TRAINING`), which runs stages 00-03 of every member in the member's own folders
(:func:`stages_for`).

The files a stage leaves in its folder (:func:`tracking` writes the last two, around the stage runner,
:func:`pneumoseg.cli.run_stage_script`, and around each ensemble member's training; ``scripts/status.py`` reads all
three):

* ``done.json`` (:data:`DONE_FILE`): the stage finished, for the config whose fingerprint it holds
  (:mod:`pneumoseg.stages.record`); what reads an earlier stage's outputs checks it with :func:`require_finished`;
* ``.running.<host>.<pid>.json`` (:func:`tracking`): a process is running the stage; removed when it exits, and
  ignored once that process is gone (a killed run's marker is stale, not a running stage);
* ``failed.json`` (:data:`FAILED_FILE`): the last run of the stage raised; the error's line. Removed when the stage
  runs again.

This module imports nothing heavier than the config: any layer may import it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pneumoseg.config import is_ensemble, load_config
from pneumoseg.errors import DataError, PneumosegError
from pneumoseg.io import write_json

Where = DictConfig | str | os.PathLike

DONE_FILE = "done.json"
FAILED_FILE = "failed.json"
_RUNNING_PREFIX = ".running."  # a dot-file: SageMaker's output data leaves it out
# The config path each kind of stage folder lies under.
_ROOTS = {"input": "input_dir", "prepared": "prepared_dir", "experiment": "experiment_dir"}


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Attributes:
        number: ``"00"`` to ``"06"``: the order the stages run in.
        name: the stage's name in logs and in its ``done.json`` (``STAGE_NAME`` of its module).
        title: a few words for ``scripts/status.py``.
        script: the script that runs it, relative to the checkout.
        root: which config path the folder lies in: ``input`` (``paths.input_dir``), ``prepared`` or ``experiment``.
        folder_name: the folder's name under that path ("" for the path itself).
        reads: the numbers of the earlier stages whose outputs it reads.
    """

    number: str
    name: str
    title: str
    script: str
    root: str
    folder_name: str
    reads: tuple[str, ...] = ()

    def folder(self, where: Where) -> Path:
        """The stage's folder.

        Args:
            where: the resolved config, or the folder its ``root`` path names (an experiment folder found on
                disk, say).
        """
        base = Path(where.paths[_ROOTS[self.root]]) if isinstance(where, DictConfig) else Path(where)
        return base / self.folder_name if self.folder_name else base


STAGES: tuple[Stage, ...] = (
    Stage("00", "00_demo_data", "demo data", "scripts/00_make_demo_data.py", "input", ""),
    Stage("01", "01_convert_dicoms", "DICOM to PNG", "scripts/01_convert_dicoms.py", "prepared", "01_convert", ("00",)),
    Stage(
        "02", "02_prepare_labels", "labels and folds", "scripts/02_prepare_labels.py", "prepared", "02_labels", ("01",)
    ),
    Stage("03", "03_train", "training", "scripts/03_train.py", "experiment", "03_train", ("01", "02")),
    Stage(
        "04",
        "04_search_thresholds",
        "threshold search",
        "scripts/04_search_thresholds.py",
        "experiment",
        "04_search",
        ("02", "03"),
    ),
    Stage(
        "05", "05_predict", "prediction", "scripts/05_predict.py", "experiment", "05_predict", ("01", "02", "03", "04")
    ),
    Stage(
        "06",
        "06_package_model",
        "model package",
        "scripts/06_package_model.py",
        "experiment",
        "06_package",
        ("03", "04"),
    ),
)
# An ensemble config's stage 03: stages 00-03 of each member, in the members' folders.
ENSEMBLE_TRAINING = Stage(
    "03", "03_train_members", "training", "scripts/train_members.py", "experiment", "03_train", ("01", "02")
)

_BY_NUMBER = {row.number: row for row in STAGES}


def stage(number: str) -> Stage:
    """The row of stage ``number`` (``"03"``: the single experiment's stage 03)."""
    return _BY_NUMBER[number]


def stages_for(cfg: DictConfig) -> list[Stage]:
    """The stages ``cfg`` runs, in order: every stage, or on an ensemble config :data:`ENSEMBLE_TRAINING` and
    stages 04 to 06."""
    if is_ensemble(cfg):
        return [ENSEMBLE_TRAINING, *(row for row in STAGES if row.number > "03")]
    return list(STAGES)


def command(number: str, ensemble: bool = False) -> str:
    """The script that runs stage ``number``, for messages (``scripts/03_train.py``).

    Args:
        number: the stage.
        ensemble: the script of an ensemble config's stage (only stage 03 has one of its own).
    """
    return ENSEMBLE_TRAINING.script if ensemble and number == ENSEMBLE_TRAINING.number else stage(number).script


def run_first(number: str) -> str:
    """The fix of most "stage NN has not finished" messages: ``run <its script> first``."""
    return f"run {command(number)} first"


def require_finished(folder: str | Path, number: str, stage_name: str | None = None, script: str | None = None) -> Path:
    """Refuse to go on when an earlier stage has not finished in ``folder``.

    Args:
        folder: the earlier stage's folder, where its ``done.json`` must be.
        number: the earlier stage, e.g. ``"03"``.
        stage_name: the earlier stage as the user knows it (default ``"stage <number>"``).
        script: what finishes it (default its script, :func:`command`).

    Returns:
        The path of that ``done.json``.

    Raises:
        DataError: ``done.json`` is missing; the message names it and the script to run.
    """
    done = Path(folder) / DONE_FILE
    if not done.is_file():
        raise DataError(
            f"{stage_name or f'stage {number}'} has not finished: {done} is missing. "
            f"Run {script or command(number)} first."
        )
    return done


# The files of a stage's progress: running and failed markers.


def _marker_name(host: str, pid: int) -> str:
    return f"{_RUNNING_PREFIX}{host}.{pid}.json"


@contextlib.contextmanager
def tracking(folder: str | os.PathLike, make: bool = True) -> Iterator[Path | None]:
    """Mark ``folder``'s stage as running in this process while the block runs (clearing its old failure), and
    leave ``failed.json`` (:func:`write_failure`) when the block raises.

    Only the first process of a distributed run marks it (``RANK`` 0 or unset).

    Args:
        folder: the stage's folder.
        make: make the folder if it is missing (else a missing folder is not marked: stage 00's is the input
            folder, which stage 01 must find missing when it is).

    Yields:
        The running marker, or None (another process, or no folder).
    """
    folder = Path(folder)
    if os.environ.get("RANK", "0") != "0" or not (make or folder.is_dir()):
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_FILE).unlink(missing_ok=True)
    marker = folder / _marker_name(socket.gethostname(), os.getpid())
    write_json(marker, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        yield marker
    except BaseException as exc:
        write_failure(folder, exc)
        raise
    finally:
        marker.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def running_markers(folder: str | os.PathLike, recent_s: float = 3600.0) -> list[dict]:
    """The processes running the stage of ``folder`` now: each marker of a live process of this host, and each
    marker of another host written less than ``recent_s`` seconds ago (its process cannot be checked from here).

    Args:
        folder: the stage's folder.
        recent_s: how long a marker of another host is believed.

    Returns:
        The markers' contents (``pid``, ``host``, ``started``).
    """
    found = []
    for path in sorted(Path(folder).glob(f"{_RUNNING_PREFIX}*.json")):
        try:
            marker = json.loads(path.read_text())
            pid, host = int(marker["pid"]), str(marker["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        here = host == socket.gethostname()
        if (here and _alive(pid)) or (not here and time.time() - path.stat().st_mtime < recent_s):
            found.append(marker)
    return found


def write_failure(folder: str | os.PathLike, exc: BaseException) -> Path | None:
    """Record in ``folder/failed.json`` that the stage raised ``exc``: its class and first line, and when.

    Only the first process of a distributed run writes it. A folder that is missing or cannot be written is left
    as it is (the error is in the log).

    Returns:
        The file written, or None.
    """
    if os.environ.get("RANK", "0") != "0":
        return None
    text = str(exc).strip().splitlines()
    path = Path(folder) / FAILED_FILE
    if not path.parent.is_dir():
        return None
    try:
        write_json(
            path,
            {
                "error": f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "),
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "time": time.time(),
            },
        )
    except OSError:
        return None
    return path


def read_failure(folder: str | os.PathLike) -> dict | None:
    """The content of ``folder/failed.json`` (``error``, ``at``, ``time``); None when there is none, or it is
    unreadable."""
    try:
        content = json.loads((Path(folder) / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and "error" in content else None


def main(argv: list[str] | None = None) -> int:
    """``python -m pneumoseg.stage_table CONFIG``: one line ``NN script`` per stage the config runs (for
    ``run_all.sh``). A config that does not load lists every stage: its first stage then reports the error."""
    parser = argparse.ArgumentParser(description="List the stages a config runs: one line 'NN script' each.")
    parser.add_argument("config", help="experiment YAML")
    args = parser.parse_args(argv)
    try:
        rows = stages_for(load_config(args.config))
    except PneumosegError:
        rows = list(STAGES)
    print("\n".join(f"{row.number} {row.script}" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
