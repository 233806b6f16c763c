"""Stage bookkeeping: skip a stage whose outputs are complete for the same config, record it when done.

Each stage owns a folder. When it finishes it writes ``config.yaml`` (the resolved config) and, last of
all, ``done.json`` holding a fingerprint of the config sections it read. A later run with the same
fingerprint skips the stage; a run killed before ``done.json`` was written starts the stage again, and
the stage's own per-item resume (finished files are kept) makes that restart cheap.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig

from pneumoseg.config import fingerprint, save_config
from pneumoseg.io import write_json
from pneumoseg import layout
from pneumoseg.layout import DONE_FILE

# Defined with the paths, where inference uses it too; the stages import it from here as before.
require_finished = layout.require_finished

log = logging.getLogger(__name__)

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

    def is_complete(self) -> bool:
        """True when ``done.json`` exists and was written for this same fingerprint."""
        try:
            stored = json.loads(self.done_path.read_text())
        except (OSError, ValueError):
            return False
        return stored.get("fingerprint") == self.key

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
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": round(time.time() - self._started, 1),
                "summary": summary or {},
            },
        )
        log.info("%s: done in %.1f s -> %s", self.name, time.time() - self._started, self.folder)

    def stored_summary(self) -> dict[str, Any]:
        """The summary of the completed run (see :func:`stored_summary`); what a skipped stage returns."""
        return stored_summary(self.folder)

    def skip_if_complete(self, force: bool) -> bool:
        """True (and a log line) when the stage can be skipped; ``force`` always reruns."""
        if not force and self.is_complete():
            log.info("%s: outputs in %s are complete for this config; skipping (use --force to redo)",
                     self.name, self.folder)
            return True
        return False
