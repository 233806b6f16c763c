"""Stage bookkeeping: skip a stage whose outputs are complete for the same config, record it when done.

Each stage owns a folder (:mod:`pneumoseg.stage_table`). When it finishes it writes ``config.yaml`` (the resolved
config) and, last of all, ``done.json`` holding a fingerprint of the config sections it read and of the facts about
its inputs, and both (``sections``, ``inputs``), so that :func:`recorded_for` can tell for any config whether the
record is this config's. A later run with the same fingerprint skips the stage; a run killed before ``done.json``
was written starts the stage again, and the stage's own per-item resume (finished files are kept) makes that
restart cheap.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumoseg.config import fingerprint, save_config
from pneumoseg.io import write_json
from pneumoseg.stage_table import DONE_FILE

log = logging.getLogger(__name__)

FORCED_FILE = "forced.json"  # a forced run of this stage: its fingerprint, run and whether it finished
FORCE_RUN_ENV = "PNEUMOSEG_FORCE_RUN"  # run_all.sh's id of one forced command, kept across its reruns


def read_done(folder: str | Path) -> dict[str, Any] | None:
    """The content of ``folder/done.json``; None when it is missing or unreadable (a stage that has not finished)."""
    try:
        content = json.loads((Path(folder) / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def recorded_for(done: dict[str, Any], cfg: DictConfig) -> bool | None:
    """Whether a ``done.json`` (:func:`read_done`) was written for ``cfg``: its fingerprint recomputed from ``cfg``
    and the record's own sections and input facts. Input files that changed since are not seen here; the stage
    that wrote them finished later (see ``scripts/status.py``).

    Returns:
        True or False; None for a record that does not hold its input facts (written by an older version).
    """
    if done.get("inputs") is None or "sections" not in done:
        return None
    return fingerprint(cfg, done["sections"], done["inputs"]) == done.get("fingerprint")


def stored_summary(folder: str | Path) -> dict[str, Any]:
    """The summary a finished stage (or fold) left in ``folder/done.json``."""
    return json.loads((Path(folder) / DONE_FILE).read_text()).get("summary", {})


@dataclass
class StageRecord:
    """The completion record of one stage in one folder.

    Args:
        name: the stage's name, e.g. ``"01_convert_dicoms"``.
        folder: the folder the stage writes to.
        cfg: the resolved config.
        sections: the top-level config sections the stage reads; only they decide whether it is stale.
        inputs: extra facts the outputs depend on (hashes of input files, say).
    """

    name: str
    folder: Path
    cfg: DictConfig
    sections: Iterable[str]
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.sections = tuple(self.sections)
        self.key = fingerprint(self.cfg, self.sections, self.inputs)
        self._started = time.time()

    @property
    def done_path(self) -> Path:
        return self.folder / DONE_FILE

    def is_complete(self, folder: str | Path | None = None) -> bool:
        """True when ``done.json`` exists and was written for this same fingerprint.

        Args:
            folder: where to look for it (default the record's folder; the SageMaker import checks a staging
                folder before it becomes the stage's).
        """
        stored = read_done(self.folder if folder is None else folder)
        return stored is not None and stored.get("fingerprint") == self.key

    def start(self) -> None:
        """Clear an old completion mark and save the resolved config; call before writing outputs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.done_path.unlink(missing_ok=True)
        save_config(self.cfg, self.folder)
        self._started = time.time()

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Mark the stage complete; ``summary`` (counts, scores) is stored in ``done.json`` for the user."""
        write_json(
            self.done_path,
            {
                "stage": self.name,
                "fingerprint": self.key,
                "sections": list(self.sections),
                "inputs": self._stored_inputs(),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.time() - self._started, 1),
                "summary": summary or {},
            },
        )
        self.finish_forced_run()
        log.info("%s: done in %.1f s -> %s", self.name, time.time() - self._started, self.folder)

    def _stored_inputs(self) -> Any:
        """The input facts as ``done.json`` holds them: their JSON form, or None when that form does not give the
        same fingerprint back (then :func:`recorded_for` cannot judge the record)."""
        stored = json.loads(json.dumps(self.inputs, default=str))
        return stored if fingerprint(self.cfg, self.sections, stored) == self.key else None

    def stored_summary(self) -> dict[str, Any]:
        """The summary of the completed run (see :func:`stored_summary`); what a skipped stage returns."""
        return stored_summary(self.folder)

    def redo(self, force: bool, scope: str = "") -> bool:
        """``--force`` means "redo once": whether this run must start the stage afresh.

        A forced run leaves ``forced.json`` (this fingerprint; the forced command's run, :data:`FORCE_RUN_ENV`, which
        ``run_all.sh`` keeps across reruns of one command). Rerunning the same forced command after a kill or a
        failure finds it and continues that run where it stopped (False) instead of starting it again; a stage the
        forced command has already redone is then skipped. Call before :meth:`skip_if_complete`, with what it
        returns as ``force``.

        Args:
            force: the command's ``--force``.
            scope: what part of the stage the command redoes, when it can redo a part (stage 03's ``--fold``).
        """
        if not force:
            return False
        run = os.environ.get(FORCE_RUN_ENV, "")
        marker = self.folder / FORCED_FILE
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError):
            stored = {}
        if stored.get("fingerprint") == self.key and stored.get("run", "") == run and stored.get("scope", "") == scope:
            log.info(
                "%s: %s",
                self.name,
                "already redone by this forced command"
                if stored.get("finished")
                else "continuing the forced run of this config that stopped before it finished",
            )
            return False
        write_json(marker, {"fingerprint": self.key, "run": run, "scope": scope, "finished": False})
        return True

    def finish_forced_run(self) -> None:
        """After :meth:`finish` (or a part of the stage, :meth:`redo`'s ``scope``): a standalone forced run is over
        (its mark goes); one of ``run_all.sh`` is marked
        finished, so that a rerun of that command skips this stage."""
        marker = self.folder / FORCED_FILE
        try:
            stored = json.loads(marker.read_text())
        except (OSError, ValueError):
            return
        if stored.get("run"):
            write_json(marker, {**stored, "finished": True})
        else:
            marker.unlink(missing_ok=True)

    def skip_if_complete(self, force: bool) -> bool:
        """True (and a log line) when the stage can be skipped; ``force`` always reruns."""
        if not force and self.is_complete():
            log.info(
                "%s: outputs in %s are complete for this config; skipping (use --force to redo)", self.name, self.folder
            )
            return True
        return False
