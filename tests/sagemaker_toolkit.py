"""Run stage 03 as a SageMaker training job through AWS's real training toolkits, locally (see
../shared/sagemaker/README.md): ``sagemaker-training`` and ``sagemaker-pytorch-training`` in their own virtualenv
(``.venv-sagemaker/``, from tests/requirements-sagemaker.txt, reusing this environment's torch), the container's
start-up command ``train`` with ``SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main``, and
``/opt/ml`` laid out as SageMaker writes it, mounted in a private mount namespace (``unshare -m``) together with an
``/etc/hosts`` that resolves ``algo-1``, so nothing reaches the real ``/opt/ml`` and jobs can run side by side.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "tests" / "requirements-sagemaker.txt"
VENV = ROOT / ".venv-sagemaker"
HOST = "algo-1"
INSTANCE_TYPE = "ml.c5.xlarge"


class Unavailable(RuntimeError):
    """The toolkits or a private mount namespace cannot be had here; the message says why."""


def _stamp() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes() + sys.prefix.encode()).hexdigest()[:16]


def toolkit_venv() -> Path:
    """The toolkits' virtualenv (made once per requirements file): its site-packages first, then this
    environment's (a ``.pth`` file), so that torch and the project's packages are not downloaded again."""
    stamp = VENV / ".installed"
    if stamp.is_file() and stamp.read_text() == _stamp():
        return VENV
    shutil.rmtree(VENV, ignore_errors=True)
    commands = [
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(VENV)],
        [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise Unavailable(f"cannot install the SageMaker toolkits ({' '.join(command)}): {result.stderr[-800:]}")
    target = Path(
        subprocess.check_output(
            [str(VENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # Every site folder this environment sees, also those a layered environment adds (a .pth naming another venv).
    folders = dict.fromkeys([*site.getsitepackages(), *(p for p in sys.path if p.endswith("site-packages"))])
    (target / "pneumoseg-env.pth").write_text("\n".join(folders) + "\n")
    # The toolkit runs torchrun from PATH; this one runs with the toolkits' python.
    torchrun = VENV / "bin" / "torchrun"
    torchrun.write_text(f'#!/bin/sh\nexec "{VENV / "bin" / "python"}" -m torch.distributed.run "$@"\n')
    torchrun.chmod(0o755)
    stamp.write_text(_stamp())
    return VENV


def source_tarball(bundle: Path, path: Path) -> Path:
    """``sourcedir.tar.gz`` as the SDK packs ``source_dir``: every entry of the folder at the archive's root."""
    with tarfile.open(path, "w:gz") as tar:
        for entry in sorted(bundle.iterdir()):
            tar.add(entry, arcname=entry.name)
    return path


def layout_opt_ml(opt_ml: Path, hyperparameters: dict, channels: dict[str, Path]) -> None:
    """``/opt/ml/input/config/*.json`` as SageMaker writes them (hyperparameter values JSON-encoded) and the
    channels' data under ``input/data/<name>``."""
    config = opt_ml / "input" / "config"
    config.mkdir(parents=True)
    groups = [{"instance_group_name": "homogeneousCluster", "instance_type": INSTANCE_TYPE, "hosts": [HOST]}]
    files = {
        "hyperparameters.json": {key: json.dumps(value) for key, value in hyperparameters.items()},
        "resourceconfig.json": {
            "current_host": HOST,
            "hosts": [HOST],
            "current_instance_type": INSTANCE_TYPE,
            "network_interface_name": "lo",
            "current_group_name": "homogeneousCluster",
            "instance_groups": groups,
        },
        "inputdataconfig.json": {
            name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
            for name in channels
        },
    }
    for name, content in files.items():
        (config / name).write_text(json.dumps(content))
    for name, source in channels.items():
        shutil.copytree(source, opt_ml / "input" / "data" / name)
    for folder in ("model", "output/data", "code"):
        (opt_ml / folder).mkdir(parents=True, exist_ok=True)


# In a private mount namespace: /opt/ml (an overlay on /opt gives it a mount point when /opt/ml does not exist),
# and /etc/hosts with algo-1, as the container's own hosts file has.
_NAMESPACE_SCRIPT = """set -e
mount --make-rprivate /
if [ ! -d /opt/ml ]; then
  mount -t overlay overlay -o lowerdir=/opt,upperdir="$SCRATCH/upper",workdir="$SCRATCH/work" /opt
  mkdir -p /opt/ml
fi
mount --bind "$SCRATCH/opt_ml" /opt/ml
mount --bind "$SCRATCH/hosts" /etc/hosts
cd /opt/ml
exec "$@"
"""


def _namespace_command(scratch: Path, command: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run ``command`` with ``scratch/opt_ml`` as ``/opt/ml`` and ``algo-1`` in
    ``/etc/hosts``, privately."""
    for folder in ("upper", "work", "opt_ml"):
        (scratch / folder).mkdir(parents=True, exist_ok=True)
    (scratch / "hosts").write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {HOST}\n")
    return ["unshare", "-m", "sh", "-c", _NAMESPACE_SCRIPT, "sh", *command], {**env, "SCRATCH": str(scratch)}


def _in_namespace(scratch: Path, command: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    argv, env = _namespace_command(scratch, command, env)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _job_command(scratch: Path, venv: Path) -> tuple[list[str], dict[str, str]]:
    """The container's ``train`` on ``scratch/opt_ml`` (made by :func:`layout_opt_ml`) as ``/opt/ml``."""
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
        "PYTHONPATH": "/opt/ml/code/src",  # the SDK's environment={"PYTHONPATH": ...}
        "PIP_NO_INDEX": "1",  # requirements.txt must need no download
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("VIRTUAL_ENV", "PYTHONHOME", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return _namespace_command(scratch, [str(venv / "bin" / "train")], env)


def run_job(scratch: Path, venv: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the container's ``train`` on ``scratch/opt_ml`` as ``/opt/ml`` to its end."""
    argv, env = _job_command(scratch, venv)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def start_job(scratch: Path, venv: Path) -> subprocess.Popen:
    """Start the same job in its own process group (``os.killpg`` stops all of it, as a spot interruption does)."""
    argv, env = _job_command(scratch, venv)
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def check_namespace(scratch: Path) -> None:
    """Raise :class:`Unavailable` unless the private mounts of :func:`run_job` can be made here (root, unshare,
    and an overlay on /opt where /opt/ml does not exist)."""
    probe = 'test "$(cat /opt/ml/probe)" = ok && grep -q " algo-1$" /etc/hosts'
    (scratch / "opt_ml").mkdir(parents=True, exist_ok=True)
    (scratch / "opt_ml" / "probe").write_text("ok")
    try:
        result = _in_namespace(scratch, ["sh", "-c", probe], dict(os.environ), timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"unshare cannot run: {exc}") from exc
    if result.returncode != 0:
        raise Unavailable(f"no private /opt/ml mount (unshare -m, mount --bind): {result.stderr.strip()[-400:]}")
