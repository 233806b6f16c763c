"""The package's layers, read from the source with ``ast``: scripts, then stages, then the rest.

Nothing outside ``stages/`` imports ``pneumoseg.stages``; inference and serving never import training; evaluation
and serving never import the scripts' command line (``pneumoseg.cli``); at most :data:`MAX_LOOSE_MODULES` modules
sit loose directly under ``src/pneumoseg/``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "pneumoseg"
MAX_LOOSE_MODULES = 8
# Subpackage -> the pneumoseg subpackages it must not import.
FORBIDDEN = {"inference": ("pneumoseg.training", "pneumoseg.stages"),
             "serve": ("pneumoseg.training", "pneumoseg.stages", "pneumoseg.cli"),
             "evaluation": ("pneumoseg.stages", "pneumoseg.cli")}


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
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
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


@pytest.mark.parametrize("where, source, expected", [
    ("pneumoseg/reports/oof.py", "from pneumoseg.stages import search\n",
     "pneumoseg.reports.oof imports pneumoseg.stages"),
    ("pneumoseg/serve/handler.py", "from ..training.trainer import fit_fold\n",
     "pneumoseg.serve.handler imports pneumoseg.training"),
    ("pneumoseg/inference/tta.py", "import pneumoseg.training.checkpoints as c\n",
     "pneumoseg.inference.tta imports pneumoseg.training.checkpoints"),
    ("pneumoseg/inference/__init__.py", "from pneumoseg import training\n",
     "pneumoseg.inference imports pneumoseg.training"),
    ("pneumoseg/serve/server.py", "from pneumoseg.modeling import models\n",
     "pneumoseg.serve.server imports pneumoseg.training.trainer"),
    ("pneumoseg/evaluation/leaderboard.py", "from pneumoseg.cli import setup_logging\n",
     "pneumoseg.evaluation.leaderboard imports pneumoseg.cli"),
])
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
