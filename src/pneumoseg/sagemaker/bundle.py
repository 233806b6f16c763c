"""The source bundle of a SageMaker training job: the ``source_dir`` the SDK packs and uploads with every job.

The SDK packs every entry of ``source_dir``, so the project root would send ``input/`` (DICOMs), ``output/``
(prepared data, checkpoints) and ``.git`` to S3. The bundle holds only what the job runs::

    src/pneumoseg/**.py   the package (the job sets PYTHONPATH=/opt/ml/code/src)
    scripts/*.py          the entry point scripts/03_train.py and the other stage scripts
    configs/*.yaml        the experiment configs
    requirements.txt      what the PyTorch training container lacks (TRAINING_REQUIREMENTS)
    bundle.json           what was bundled: every file with its size and SHA-256

The toolkit pip-installs ``requirements.txt`` at job start; pinning torch there would replace the container's
CUDA build (gigabytes, or a failure offline), so it lists compatible ranges of the few packages stage 03 imports
that the container does not ship, and never torch, torchvision, numpy, OpenCV or test tools.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pneumoseg.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST_FILE = "bundle.json"
# (folder relative to the project root, file pattern) of everything the job needs.
CONTENTS = (("src/pneumoseg", "**/*.py"), ("scripts", "*.py"), ("configs", "*.yaml"))
# What stage 03 imports beyond the SageMaker PyTorch training container (which has torch, torchvision, numpy,
# OpenCV, pandas, Pillow and PyYAML): ranges around the versions tested here (requirements.txt).
# albumentations requires opencv-python-headless, which pip adds beside the container's OpenCV if absent.
TRAINING_REQUIREMENTS = {
    "segmentation-models-pytorch": ">=0.5,<0.7",
    "timm": ">=1.0.15,<2",
    "albumentations": ">=2.0.8,<2.1",
    "omegaconf": ">=2.3,<2.5",
}


def requirements_text() -> str:
    """The bundle's ``requirements.txt``."""
    lines = [
        "# Installed by the SageMaker training toolkit at job start, on top of the PyTorch training container.",
        "# Ranges only, and never torch, torchvision, numpy or OpenCV: the container's own builds stay.",
        *(f"{name}{spec}" for name, spec in TRAINING_REQUIREMENTS.items()),
    ]
    return "\n".join(lines) + "\n"


def bundle_files(root: str | os.PathLike) -> dict[str, Path]:
    """Name in the bundle -> file of the project at ``root``, for every file of :data:`CONTENTS`.

    Raises:
        ConfigError: ``root`` lacks one of the folders (it is not a pneumoseg checkout).
    """
    root = Path(root)
    files = {}
    for folder, pattern in CONTENTS:
        if not (root / folder).is_dir():
            raise ConfigError(f"{root / folder} not found: give the root of a pneumoseg checkout (--root)")
        for path in sorted((root / folder).glob(pattern)):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path
    return files


def _manifest(folder: Path) -> dict:
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        data = path.read_bytes()
        entries[path.relative_to(folder).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"files": entries, "total_bytes": sum(e["bytes"] for e in entries.values())}


def _check_target(root: Path, target: Path) -> None:
    """Refuse a target that would swallow the checkout or overwrite a folder that is not a bundle."""
    if target.resolve() == root.resolve() or root.resolve().is_relative_to(target.resolve()):
        raise ConfigError(f"{target} holds the project itself; give a folder of its own, e.g. output/sagemaker/source")
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise ConfigError(
            f"{target} exists and is not a source bundle (no {MANIFEST_FILE}); give an empty or new "
            f"folder, or remove it"
        )


def write_bundle(root: str | os.PathLike, target: str | os.PathLike) -> dict:
    """Write the source bundle of the project at ``root`` into ``target``, replacing an older bundle there.

    Built beside ``target`` and renamed into place, so a failed build leaves the old bundle.

    Returns:
        The manifest (also ``target/bundle.json``): every file with its size and SHA-256, and ``total_bytes``.

    Raises:
        ConfigError: ``root`` is not a checkout, or ``target`` is the checkout or a folder that is not a bundle.
    """
    root, target = Path(root), Path(target)
    _check_target(root, target)
    files = bundle_files(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, path in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, staging / name)
        (staging / "requirements.txt").write_text(requirements_text())
        manifest = _manifest(staging)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("source bundle: %d files, %.1f KiB -> %s", len(manifest["files"]), manifest["total_bytes"] / 1024, target)
    return manifest
