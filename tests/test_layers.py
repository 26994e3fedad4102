"""Imports run one way: data -> trainer -> export -> serving runtime <- clients, `common` beneath them all,
the CLI package `mmrank` and the benchmarks on top. Read from the source, so a lazy import inside a
function counts too."""

from __future__ import annotations

from pathlib import Path

import pytest
from project_imports import PACKAGES, defined_names, module_path, project_imports

# package -> module prefixes it must not import ("trainer.model" forbids trainer.model and below).
FORBIDDEN = {
    "common": tuple(p for p in PACKAGES if p != "common"),
    "trainer": ("export", "clients", "benchmarks", "mmrank"),
    "export": ("clients", "benchmarks", "mmrank"),
    # The runtime is deployed alone, with a copy of common.errors: nothing else of the project.
    "model_repository": (
        "trainer",
        "export",
        "clients",
        "benchmarks",
        "mmrank",
        "common.atomic",
        "common.provenance",
    ),
    "clients": ("benchmarks", "mmrank", "export", "trainer.train", "trainer.model"),
    "benchmarks": ("mmrank",),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package):
    wrong = [
        str(imp)
        for imp in project_imports(package)
        if any(_under(imp.module, prefix) for prefix in FORBIDDEN[package])
    ]
    assert not wrong, "\n".join(wrong)


def test_the_serving_runtime_imports_only_itself_and_the_shared_errors():
    wrong = [
        str(imp)
        for imp in project_imports("model_repository")
        if imp.top in PACKAGES and not (imp.top == "model_repository" or imp.module == "common.errors")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The scan finds an import inside a function and resolves a relative one (else the tests above could
    pass on code they do not read)."""
    import project_imports as pi

    package = tmp_path / "clients" / "sub"
    package.mkdir(parents=True)
    (package / "mod.py").write_text("def f():\n    import benchmarks.locust\n\nfrom ..loadtest import x\n")
    monkeypatch.setattr(pi, "ROOT", tmp_path)
    assert sorted(imp.module for imp in pi.project_imports("clients")) == [
        "benchmarks.locust",
        "clients.loadtest",
    ]


def test_the_load_test_runs_the_locustfile_that_lives_with_the_client():
    import clients
    from clients import loadtest

    assert loadtest.LOCUSTFILE.parent == Path(clients.__file__).resolve().parent
    assert loadtest.LOCUSTFILE.is_file()


def test_every_project_import_names_something_that_exists():
    """A module that moved or was removed leaves no import behind (it would fail only when that code runs:
    many imports here are lazy)."""
    missing = []
    for imp in project_imports(*PACKAGES, "tests"):
        if imp.top not in PACKAGES:
            continue
        path = module_path(imp.module)
        if path is None:
            missing.append(str(imp))
            continue
        names = defined_names(path) if imp.names else set()
        for name in imp.names:
            if name != "*" and name not in names and module_path(f"{imp.module}.{name}") is None:
                missing.append(f"{imp}: no {name}")
    assert not missing, "\n".join(missing)
