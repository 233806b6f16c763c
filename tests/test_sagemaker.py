"""The SageMaker training-job glue without the toolkit: boolean hyperparameters, the failure file, the source
bundle and its requirements, safe unpacking of a job's archives."""

from __future__ import annotations

import io
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pneumoseg.cli import run_stage_script, stage_parser, switch_arguments
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.sagemaker import job
from pneumoseg.sagemaker.bundle import MANIFEST_FILE, bundle_files, requirements_text, write_bundle
from pneumoseg.serve.archive import extract_archive
from pneumoseg.stages import train as train_stage
from pneumoseg.stages.import_job import JOB_ARCHIVE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--force", "True", "a=1"], ["--force", "a=1"]),
        (["--force", "true"], ["--force"]),
        (["--force", "False", "a=1"], ["a=1"]),
        (["--force=false"], []),
        (["--force=YES"], ["--force"]),
        (["--force", "a=1"], ["--force", "a=1"]),  # an override after a plain switch stays an override
        (["--resume", "True"], ["--resume", "True"]),  # not a store_true switch: its own parser reads the value
    ],
)
def test_switches_take_sagemakers_boolean_values(argv, expected):
    assert switch_arguments(argv, {"--force"}) == expected


def test_a_switch_with_a_value_that_is_not_boolean_is_an_error():
    with pytest.raises(ConfigError, match="--force takes true or false"):
        switch_arguments(["--force=maybe"], {"--force"})


@pytest.mark.parametrize(
    "argv, force, resume",
    [
        (["--force", "True"], True, "auto"),
        (["--force", "true"], True, "auto"),
        (["--force", "False"], False, "auto"),
        (["--force"], True, "auto"),
        (["--resume", "True"], False, True),
        (["--resume", "false"], False, False),
    ],
)
def test_train_parser_reads_boolean_hyperparameters(argv, force, resume):
    # As the toolkit passes them: sorted --key value pairs, config keys among them.
    args = train_stage.parser().parse_args(["--config", "c.yaml", "--fold", "all", *argv, "--train.epochs", "1"])
    assert (args.force, args.resume, args.overrides) == (force, resume, ["train.epochs=1"])


def test_every_stage_parser_reads_force_true():
    assert stage_parser("x").parse_args(["--force", "True", "a=1"]).force is True
    assert stage_parser("x").parse_args(["--force", "False", "a=1"]).overrides == ["a=1"]


def _environ(tmp_path, **extra):
    return {"SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DIR": str(tmp_path / "output"), **extra}


def test_failure_file_holds_one_line_naming_the_error_and_the_fix(tmp_path):
    error = DataError("labels.csv not found;\n run scripts/02_prepare_labels.py first")
    path = job.report_failure(error, _environ(tmp_path))
    assert path == tmp_path / "output" / "failure"
    assert path.read_text() == "DataError: labels.csv not found; run scripts/02_prepare_labels.py first\n"
    assert not [p for p in path.parent.iterdir() if p.name != "failure"], "temporary files were left behind"


@pytest.mark.parametrize("extra", [{"LOCAL_RANK": "1"}, {"SM_MODEL_DIR": ""}])
def test_failure_file_is_written_by_the_first_process_of_a_job_only(tmp_path, extra):
    assert job.report_failure(ConfigError("x"), _environ(tmp_path, **extra)) is None
    assert not (tmp_path / "output").exists()


def test_a_failing_stage_script_in_a_job_writes_the_failure_file(tmp_path, monkeypatch):
    for name, value in _environ(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def failing(cfg, args):
        raise DataError("the train channel is empty; upload a prepared folder")

    assert run_stage_script("x", failing, train_stage.parser, argv=[]) == 1
    assert (tmp_path / "output" / "failure").read_text().startswith("DataError: the train channel is empty")


def test_a_usage_error_in_a_job_writes_the_failure_file(tmp_path, monkeypatch):
    for name, value in _environ(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit):
        train_stage.parser().parse_args(["--force=maybe"])
    assert "--force takes true or false" in (tmp_path / "output" / "failure").read_text()


def test_job_paths_are_the_train_channel_and_a_work_folder_beside_the_model_folder():
    environ = {
        "SM_MODEL_DIR": "/opt/ml/model",
        "SM_CHANNEL_TRAIN": "/opt/ml/input/data/train",
        "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data",
    }
    assert job.job_overrides(environ) == [
        "paths.prepared_dir=/opt/ml/input/data/train",
        "paths.experiment_dir=/opt/ml/checkpoints",
    ]
    assert job.job_overrides({"SM_CHANNEL_TRAIN": "/in"}) == []


def test_bundle_carries_only_the_package_scripts_configs_and_requirements(tmp_path):
    manifest = write_bundle(ROOT, tmp_path / "source")
    tops = {name.split("/")[0] for name in manifest["files"]}
    assert tops == {"src", "scripts", "configs", "requirements.txt"}
    assert {p.name for p in (tmp_path / "source").iterdir()} == {
        "src",
        "scripts",
        "configs",
        "requirements.txt",
        MANIFEST_FILE,
    }
    assert "scripts/03_train.py" in manifest["files"] and "src/pneumoseg/stages/train.py" in manifest["files"]
    assert not [n for n in manifest["files"] if "__pycache__" in n or n.endswith(".pyc")]
    assert set(manifest["files"]) - {"requirements.txt"} == set(bundle_files(ROOT))
    write_bundle(ROOT, tmp_path / "source")  # an older bundle is replaced
    with pytest.raises(ConfigError, match="holds the project itself"):
        write_bundle(ROOT, ROOT)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a source bundle"):
        write_bundle(ROOT, tmp_path / "other")


FORBIDDEN = {"torch", "torchvision", "numpy", "pytest", "hypothesis", "matplotlib"}


def test_bundle_requirements_are_ranges_that_keep_the_containers_torch():
    requirements = [Requirement(line) for line in requirements_text().splitlines() if line and line[0] != "#"]
    names = {r.name.lower() for r in requirements}
    assert not names & FORBIDDEN and not [n for n in names if "opencv" in n]
    for requirement in requirements:
        assert requirement.specifier and not [s for s in requirement.specifier if s.operator == "=="], requirement
        assert version(requirement.name) in requirement.specifier, f"{requirement} excludes the tested version"


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def test_extract_unpacks_regular_files_and_strips_a_prefix(tmp_path):
    archive = _tar(
        tmp_path / "a.tar.gz",
        [_file("03_train/fold0/log.csv", b"epoch\n"), _file("./03_train/done.json"), _file("other.txt")],
    )
    written = extract_archive(archive, tmp_path / "out", kind=JOB_ARCHIVE, prefix="03_train")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == ["done.json", "fold0/log.csv"]
    assert (tmp_path / "out" / "fold0" / "log.csv").read_bytes() == b"epoch\n"


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "fold0/../../evil", "symlink", "hardlink"])
def test_extract_refuses_what_could_write_outside_the_folder(tmp_path, member):
    if member in ("symlink", "hardlink"):
        info = tarfile.TarInfo("fold0/best_1.pt")
        info.type, info.linkname = (tarfile.SYMTYPE if member == "symlink" else tarfile.LNKTYPE), "/etc/passwd"
        members = [(info, None)]
    else:
        members = [_file(member)]
    with pytest.raises(DataError, match="download the job's archive again"):
        extract_archive(_tar(tmp_path / "a.tar.gz", members), tmp_path / "out", kind=JOB_ARCHIVE)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "fold0" / "best_1.pt").exists()


def test_extract_names_a_missing_or_broken_archive(tmp_path):
    with pytest.raises(DataError, match="SageMaker archive .*model.tar.gz not found; download the job's archive"):
        extract_archive(tmp_path / "model.tar.gz", tmp_path / "out", kind=JOB_ARCHIVE)
    (tmp_path / "model.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="cannot extract SageMaker archive .*download the job's archive again"):
        extract_archive(tmp_path / "model.tar.gz", tmp_path / "out", kind=JOB_ARCHIVE)
