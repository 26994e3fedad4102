"""Suite-wide settings.

- `tritonserver`: tests that start the real server skip only where nvidia-pytriton is not installed;
  a server that is installed but cannot start fails them, so a broken server never leaves the suite green.
- hypothesis runs derandomized, so every run explores the same examples.
- Triton kernels run interpreted when there is no CUDA device (below).
- torch's intra-op thread count is process-global state; each test starts from the same count
  (2, the CI machine's cores) unless it asks for another with `@pytest.mark.threads(n)`. Bitwise
  comparisons between two training runs need 1: multi-threaded CPU GEMMs may sum in a different
  order from run to run.
"""

import os

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. The switch is read when
# a @triton.jit function is defined, so it must be set before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("mmrank", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("mmrank")

DEFAULT_THREADS = 2


def pytest_configure(config):
    config.addinivalue_line("markers", "threads(n): run the test with n torch intra-op threads")


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
