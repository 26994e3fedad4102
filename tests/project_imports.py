"""Every import statement of the project's code, read from the source (AST), never by importing it.

Shared by the tests of the import direction between packages (test_layers.py) and of the declared
dependencies (test_dependencies.py). Imports inside functions count like module-level ones: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "trainer", "export", "model_repository", "clients", "benchmarks", "mmrank")


@dataclass(frozen=True)
class Import:
    file: Path  # relative to the repository root
    line: int
    module: str  # absolute dotted name: "trainer.data.schema", "numpy"
    names: tuple[str, ...] = ()  # of `from module import a, b`

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def _package_of(file: Path) -> list[str]:
    """The dotted package a module file belongs to: trainer/data/schema.py -> ["trainer", "data"]."""
    return list(file.relative_to(ROOT).parent.parts)


def imports_of(file: Path) -> list[Import]:
    """The modules `file` imports, relative imports resolved against its package."""
    tree = ast.parse(file.read_text(), filename=str(file))
    rel = file.relative_to(ROOT)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(file)[: len(_package_of(file)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(rel, node.lineno, module, tuple(a.name for a in node.names)))
    return found


def module_path(module: str) -> Path | None:
    """The file of a project module ("trainer.data" -> trainer/data/__init__.py), None if there is none."""
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defined_names(file: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def project_imports(*folders: str) -> list[Import]:
    return [imp for file in python_files(*folders) for imp in imports_of(file)]
