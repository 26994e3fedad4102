"""Suite-wide settings.

- Markers: `gpu` tests skip where torch sees no CUDA device, `tensorrt` tests where TensorRT is not
  installed, `slow` ones are left out of `make test-fast`: every test that starts the real server (it
  uses the `tritonserver` fixture) is `slow`, and so are those marked where they are (training runs,
  the real dataset, extra exports).
- With CI=true (`.ci/run`), a test may skip only for a missing GPU or TensorRT: any other skip (a missing
  server, Python, dataset or tool) fails the run, naming the test and its reason, so a broken install can
  never turn a layer of the suite into skips with the run green.
- `tritonserver`: tests that start the real server skip only where nvidia-pytriton is not installed;
  a server that is installed but cannot start fails them, so a broken server never leaves the suite green.
- hypothesis runs derandomized, so every run explores the same examples.
- Triton kernels run interpreted when there is no CUDA device (below).
- torch's intra-op thread count is process-global state; each test starts from the same count
  (2, the CI machine's cores) unless it asks for another with `@pytest.mark.threads(n)`. Bitwise
  comparisons between two training runs need 1: multi-threaded CPU GEMMs may sum in a different
  order from run to run.
"""

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The switch is read when
# a @triton.jit function is defined, so it must be set before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["pytester"]  # tests/test_ci_skips.py runs the hooks below in a session of their own

settings.register_profile("mmrank", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("mmrank")

DEFAULT_THREADS = 2
NO_GPU = "needs a CUDA GPU"
NO_TENSORRT = "needs TensorRT (pip install -e '.[gpu]')"
CI_SKIPS = (NO_GPU, NO_TENSORRT)  # the only skips a CI run accepts


def pytest_configure(config):
    config.addinivalue_line("markers", "threads(n): run the test with n torch intra-op threads")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    missing = {
        "gpu": None if torch.cuda.is_available() else NO_GPU,
        "tensorrt": None if importlib.util.find_spec("tensorrt") else NO_TENSORRT,
    }
    for item in items:
        if "tritonserver" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        for marker, reason in missing.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


def skip_reason(report) -> str:
    """The reason of a skipped test's report ("Skipped: " and the location dropped)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CI=true, a skip other than CI_SKIPS becomes a failure that names the test and the reason."""
    report = (yield).get_result()
    if os.environ.get("CI", "").lower() != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if reason not in CI_SKIPS:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skipped ({reason}), but with CI=true a test may skip only for a missing GPU "
            "or TensorRT: install what it needs"
        )


@pytest.fixture(autouse=True)
def torch_threads(request):
    marker = request.node.get_closest_marker("threads")
    before = torch.get_num_threads()
    torch.set_num_threads(marker.args[0] if marker else DEFAULT_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tritonserver():
    from common.errors import MMRankError
    from export.triton_launcher import TritonDistribution, check_can_start

    if not TritonDistribution.installed():
        pytest.skip("nvidia-pytriton (the tritonserver) is not installed")
    try:
        check_can_start()
    except MMRankError as e:
        pytest.fail(f"tritonserver is installed but cannot start: {e}")
