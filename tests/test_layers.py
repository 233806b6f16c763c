"""The package's layers, read from the source with ``ast``: scripts, then stages, then the rest.

Nothing outside ``stages/`` imports ``pneumoseg.stages``; inference and serving never import training; evaluation
and serving never import the scripts' command line (``pneumoseg.cli``); at most :data:`MAX_LOOSE_MODULES` modules
sit loose directly under ``src/pneumoseg/``; no code outside the stage table (:mod:`pneumoseg.stage_table`) names a
stage's folder or script.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pneumoseg"
MAX_LOOSE_MODULES = 9  # 9 with commands.py, the `pneumoseg` command's entry point ([project.scripts])
# Subpackage -> the pneumoseg subpackages it must not import.
FORBIDDEN = {
    "inference": ("pneumoseg.training", "pneumoseg.stages"),
    "serve": ("pneumoseg.training", "pneumoseg.stages", "pneumoseg.cli"),
    "evaluation": ("pneumoseg.stages", "pneumoseg.cli"),
}


def module_name(path: Path, root: Path = SRC) -> str:
    """``pneumoseg.data.rle`` for ``src/pneumoseg/data/rle.py`` (``pneumoseg.serve`` for its ``__init__.py``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = SRC) -> set[str]:
    """Every module ``path`` imports, relative imports made absolute; ``from a import b`` gives ``a`` and ``a.b``
    (``b`` may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def layer_violations(root: Path = SRC) -> list[str]:
    """Each import that breaks a rule of the module docstring, as ``module imports target``. For inference and
    serving the imports are followed through the other pneumoseg modules (``serve -> modeling -> training``)."""
    graph = {module_name(path, root): imported_modules(path, root) for path in (root / "pneumoseg").rglob("*.py")}
    problems = []
    for name in sorted(graph):
        sub = name.split(".")[1] if name.count(".") else ""
        forbidden = () if sub == "stages" else ("pneumoseg.stages",)
        direct = graph[name]
        for target in sorted(direct | _reachable(name, graph) if sub in FORBIDDEN else direct):
            if any(target == f or target.startswith(f + ".") for f in (*forbidden, *FORBIDDEN.get(sub, ()))):
                problems.append(f"{name} imports {target}")
    return problems


def _reachable(name: str, graph: dict[str, set[str]]) -> set[str]:
    """Every module imported by ``name`` or, recursively, by the pneumoseg modules it imports."""
    seen, todo = set(), [name]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def loose_modules(root: Path = SRC) -> list[str]:
    return sorted(p.stem for p in (root / "pneumoseg").glob("*.py") if p.name != "__init__.py")


def test_layers_run_one_way():
    assert layer_violations() == []


def test_few_loose_modules():
    loose = loose_modules()
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} loose modules: {loose}; move some into a subpackage"


@pytest.mark.parametrize(
    "where, source, expected",
    [
        (
            "pneumoseg/reports/oof.py",
            "from pneumoseg.stages import search\n",
            "pneumoseg.reports.oof imports pneumoseg.stages",
        ),
        (
            "pneumoseg/serve/handler.py",
            "from ..training.trainer import fit_fold\n",
            "pneumoseg.serve.handler imports pneumoseg.training",
        ),
        (
            "pneumoseg/inference/tta.py",
            "import pneumoseg.training.checkpoints as c\n",
            "pneumoseg.inference.tta imports pneumoseg.training.checkpoints",
        ),
        (
            "pneumoseg/inference/__init__.py",
            "from pneumoseg import training\n",
            "pneumoseg.inference imports pneumoseg.training",
        ),
        (
            "pneumoseg/serve/server.py",
            "from pneumoseg.modeling import models\n",
            "pneumoseg.serve.server imports pneumoseg.training.trainer",
        ),
        (
            "pneumoseg/evaluation/leaderboard.py",
            "from pneumoseg.cli import setup_logging\n",
            "pneumoseg.evaluation.leaderboard imports pneumoseg.cli",
        ),
    ],
)
def test_a_bad_import_is_found(tmp_path, where, source, expected):
    """The checker itself: a planted bad import in a copy of the layout is reported, also one step removed."""
    path = tmp_path / where
    path.parent.mkdir(parents=True)
    path.write_text(source)
    (tmp_path / "pneumoseg" / "modeling").mkdir(exist_ok=True)
    (tmp_path / "pneumoseg" / "modeling" / "models.py").write_text("from pneumoseg.training import trainer\n")
    assert any(problem.startswith(expected) for problem in layer_violations(tmp_path))
    (tmp_path / "pneumoseg" / "stages").mkdir()
    (tmp_path / "pneumoseg" / "stages" / "train.py").write_text("from pneumoseg.stages.record import DONE_FILE\n")
    assert not any(p.startswith("pneumoseg.stages") for p in layer_violations(tmp_path))


def test_loose_modules_are_counted(tmp_path):
    (tmp_path / "pneumoseg").mkdir()
    for name in ["__init__", *(f"m{k}" for k in range(MAX_LOOSE_MODULES + 1))]:
        (tmp_path / "pneumoseg" / f"{name}.py").write_text("")
    assert len(loose_modules(tmp_path)) == MAX_LOOSE_MODULES + 1


def _stage_names() -> list[str]:
    """Every stage folder's name and every stage script, as the stage table lists them."""
    from pneumoseg import stage_table

    rows = [*stage_table.STAGES, stage_table.ENSEMBLE_TRAINING]
    return sorted({row.folder_name for row in rows if row.folder_name} | {row.script for row in rows})


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """The string constants of a Python file that are no docstring (f-strings' literal parts included), by line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def stage_name_uses(root: Path = SRC.parent) -> list[str]:
    """Each place outside the stage table whose code names a stage's folder or script, as ``file:line: name``: the
    string constants of ``src/`` and ``scripts/`` (docstrings and comments may name them) and the commands of
    ``run_all.sh``."""
    names = _stage_names()
    found = []
    python = [*sorted((root / "src").rglob("*.py")), *sorted((root / "scripts").glob("*.py"))]
    for path in python:
        if path.name == "stage_table.py":
            continue
        for line, text in _code_strings(path):
            found += [f"{path.relative_to(root)}:{line}: {name}" for name in names if name in text]
    shell = root / "run_all.sh"
    if shell.is_file():
        for number, line in enumerate(shell.read_text().splitlines(), 1):
            code = line.split("#")[0]
            found += [f"run_all.sh:{number}: {name}" for name in names if name in code]
    return found


def test_only_the_stage_table_names_stage_folders_and_scripts():
    assert stage_name_uses() == []


def test_a_stage_folder_named_outside_the_table_is_found(tmp_path):
    (tmp_path / "src" / "pneumoseg").mkdir(parents=True)
    source = (
        '"""Reads 03_train/folds.csv."""\n# 04_search too\n'
        'FOLDER = "05_predict"\nHINT = f"run scripts/03_train.py {1}"\n'
    )
    (tmp_path / "src" / "pneumoseg" / "x.py").write_text(source)
    (tmp_path / "run_all.sh").write_text('# scripts/06_package_model.py\nSTAGES=("00 scripts/00_make_demo_data.py")\n')
    assert stage_name_uses(tmp_path) == [
        "src/pneumoseg/x.py:3: 05_predict",
        "src/pneumoseg/x.py:4: 03_train",
        "src/pneumoseg/x.py:4: scripts/03_train.py",
        "run_all.sh:2: scripts/00_make_demo_data.py",
    ]
