"""Test-session settings: passive OpenMP waiting so the many small torch jobs (and the training
subprocesses the tests start) do not spin against each other on a 2-core machine."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Many small convolutions: one intra-op thread avoids OpenMP contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
