"""Test-session settings: passive OpenMP waiting so the many small torch jobs (and the training
subprocesses the tests start) do not spin against each other on a 2-core machine."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
