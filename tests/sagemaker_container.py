"""What SageMaker's PyTorch inference container brings, and which distributions a requirements list pulls in."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires

# The container's own libraries (its OpenCV is opencv-python; this project's environment has the headless build).
CONTAINER = {"torch", "torchvision", "numpy", "pandas", "pillow", "opencv-python", "opencv-python-headless"}
# Never in code/requirements.txt: pip would replace the container's build, or add a second cv2 beside its own.
NEVER_REQUIRED = CONTAINER | {"opencv-contrib-python", "opencv-contrib-python-headless"}


def normalise(name: str) -> str:
    """A distribution name in PEP 503's normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def required_names(requirements: str) -> set[str]:
    """The distributions a requirements.txt names."""
    return {
        normalise(re.split(r"[ <>=!~;\[]", line.strip(), maxsplit=1)[0])
        for line in requirements.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }


def with_dependencies(names: set[str]) -> set[str]:
    """``names`` and every distribution they require, recursively, as installed here (extras left out)."""
    seen, todo = set(), [normalise(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = requires(name) or []
        except PackageNotFoundError:
            continue
        todo += [
            normalise(re.split(r"[ ;<>=!~\[(]", line, maxsplit=1)[0]) for line in requirements if "extra ==" not in line
        ]
    return seen
