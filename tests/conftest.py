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


@pytest.fixture(scope="module", autouse=True)
def signal_stack_stays_mapped():
    """Every module leaves the main thread's signal stack in mapped memory (OpenVINO once left it on an unmapped
    one, and the whole session died of SIGSEGV minutes later in an unrelated test)."""
    from helpers import signal_stack_is_mapped
    yield
    assert signal_stack_is_mapped(), "this module left the main thread's signal stack (sigaltstack) unmapped"
