"""Peak-memory measurement shared by the benchmarks: peak RSS growth of this process (Linux /proc)."""
from __future__ import annotations


def _maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mib(key: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (None where /proc is unavailable)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def mem_baseline() -> float:
    """Start a peak-memory window: release freed heap, reset the kernel's high-water mark, return RSS now.

    Without the reset, ru_maxrss would still hold earlier peaks (model construction, imports) and hide a
    smaller forward's peak.
    """
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mib("VmRSS") or _maxrss_mib()
    except OSError:
        return _maxrss_mib()  # fallback: growth beyond the earlier high-water mark (a lower bound)


def mem_peak_growth(base: float) -> float:
    """Peak RSS since mem_baseline() minus the RSS at that point, in MiB."""
    hwm = _status_mib("VmHWM")
    return (hwm if hwm is not None else _maxrss_mib()) - base
