"""Before any module of this package imports torch: OpenMP settings for a shared CPU (see utils/threads.py)."""
from utils.threads import configure_openmp

configure_openmp()
