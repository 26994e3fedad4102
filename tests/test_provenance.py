"""Provenance: the commit a result names is the checkout's own, marked when its code differs, and
'unknown' anywhere that is not the top of a checkout."""

import shutil
import subprocess

import pytest

from common.provenance import COMMIT_ENV, UNKNOWN, code_commit, cpu_name, record

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    return subprocess.run(
        ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(autouse=True)
def no_declared_commit(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "docs").mkdir()
    (root / "docs" / "notes.md").write_text("notes\n")
    (root / "benchmarks" / "results" / "table.md").write_text("| a |\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "first")
    return root


def test_a_clean_checkout_names_its_head(checkout):
    assert code_commit(checkout) == _git(checkout, "rev-parse", "--short", "HEAD")


def test_changed_code_is_marked_but_results_prose_and_untracked_files_are_not(checkout):
    head = _git(checkout, "rev-parse", "--short", "HEAD")
    (checkout / "benchmarks" / "results" / "table.md").write_text("| b |\n")
    (checkout / "docs" / "notes.md").write_text("other notes\n")
    (checkout / "scratch.py").write_text("y = 2\n")
    assert code_commit(checkout) == head
    (checkout / "code.py").write_text("x = 2\n")
    assert code_commit(checkout) == f"{head} (uncommitted changes)"


def test_a_folder_inside_a_checkout_or_outside_any_is_unknown(checkout, tmp_path):
    # An installed copy of the code in a .venv inside some checkout must not take that checkout's commit.
    inside = checkout / ".venv" / "site-packages"
    inside.mkdir(parents=True)
    outside = tmp_path / "copied"
    outside.mkdir()
    assert code_commit(inside) == UNKNOWN and code_commit(outside) == UNKNOWN


def test_a_declared_commit_wins_and_says_it_was_declared(checkout, tmp_path, monkeypatch):
    # A working tree copied to another machine may carry no or stale git metadata.
    monkeypatch.setenv(COMMIT_ENV, "abc1234")
    (checkout / "code.py").write_text("x = 3\n")
    for root in (checkout, tmp_path):
        assert code_commit(root) == f"abc1234 (declared by ${COMMIT_ENV})"


def test_record_names_command_commit_and_machine():
    r = record(["mmrank", "train", "--set", 'model.content.modalities=["text"]'])
    assert r["command"] == "mmrank train --set 'model.content.modalities=[\"text\"]'"
    assert r["commit"] and cpu_name() in r["machine"] and r["torch_threads"] >= 1
