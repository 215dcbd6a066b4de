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


# Modules that load the mobile converters and runtimes (litert-torch with TensorFlow/XLA/JAX, ExecuTorch,
# coremltools, pnnx/ncnn) into the test process run last. Why: with all of them and OpenVINO/ONNX Runtime loaded
# into one long-lived process, a later test's subprocess read crashed in malloc (heap damaged by native code we
# do not own; each module alone, and every smaller combination we tried, passes). Users load one runtime per
# process; the suite loads all of them, so it loads them after everything else.
LAST_MODULES = ("test_format_coreml.py", "test_format_executorch.py", "test_format_litert.py", "test_format_ncnn.py")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in LAST_MODULES)  # stable: the order within each group is kept
