"""The suite's skip rule (tests/conftest.py), run on a small test file in a pytest session of its own: with
CI=true only a missing GPU or TensorRT may skip a test; without it every skip stays a skip."""

from pathlib import Path

import pytest

CASES = """
import pytest

def test_skips_itself():
    pytest.skip("no dataset here")

@pytest.fixture
def server():
    pytest.skip("no server here")

def test_skips_in_a_fixture(server):
    pass

@pytest.mark.gpu
def test_needs_a_gpu():
    import torch
    assert torch.cuda.is_available()

@pytest.mark.tensorrt
def test_needs_tensorrt():
    import tensorrt  # noqa: F401

@pytest.mark.xfail(reason="a known failure")
def test_expected_to_fail():
    assert False
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: x\n    tensorrt: x\n")
    pytester.makepyfile(test_cases=CASES)
    return pytester


def _outcomes(suite, ci: str | None, monkeypatch):
    """The inner session's result and its outcome counts, with CI set to `ci` (None: unset)."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = suite.runpytest("-p", "no:cacheprovider", "-rA")
    return result, result.parseoutcomes()


def test_in_ci_a_skip_for_anything_but_a_gpu_or_tensorrt_fails_naming_the_test(suite, monkeypatch):
    import importlib.util

    import torch

    result, outcomes = _outcomes(suite, "true", monkeypatch)
    allowed = (not torch.cuda.is_available()) + (importlib.util.find_spec("tensorrt") is None)
    assert outcomes.get("failed") == 1 and outcomes.get("errors") == 1 and outcomes.get("xfailed") == 1
    assert outcomes.get("skipped", 0) == allowed
    text = result.stdout.str()
    for name, reason in (
        ("test_skips_itself", "no dataset here"),
        ("test_skips_in_a_fixture", "no server here"),
    ):
        assert f"test_cases.py::{name} skipped ({reason}), but with CI=true a test may skip only" in text


def test_outside_ci_every_skip_is_a_skip(suite, monkeypatch):
    _, outcomes = _outcomes(suite, None, monkeypatch)
    assert outcomes.get("failed") is None and outcomes.get("errors") is None
    assert outcomes.get("skipped", 0) >= 2 and outcomes.get("xfailed") == 1
