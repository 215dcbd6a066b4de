"""Device selection and timing helpers shared by the scripts and the engine."""
from __future__ import annotations

import re
import time

import torch

from utils.general import LOGGER, UserError
from utils.threads import ThreadGovernor, cpu_time_sample


def select_device(device: str | int | torch.device | None = "", batch_size: int = 0,
                  typed: str | None = None) -> torch.device:
    """Turn a --device string into a torch.device, with a clear error when the request cannot be met.

    Accepted: '' / None (first CUDA GPU if any, else CPU), 'cpu', 'mps', '0', '0,1' (first listed GPU is
    returned; several GPUs are used through torchrun/DDP), 'cuda', 'cuda:1'. With several GPUs the batch size
    must be a multiple of their number. CUDA_VISIBLE_DEVICES is never modified here: changing it after CUDA
    has started has no effect and silently misleads.

    A CUDA device also becomes the current device (torch.cuda.set_device): calls that take no device
    (default streams, CUDA-graph capture, synchronize, memory statistics) then act on the chosen GPU instead
    of opening a context on GPU 0. `typed` is the --device flag as the user wrote it, for the messages (under
    torchrun each process is handed one id of the user's list).
    """
    if isinstance(device, torch.device):
        return _make_current(device)
    shown = device if typed is None else typed
    spec = str(device if device is not None else "").strip().lower().replace(" ", "")
    spec = spec.removeprefix("cuda:") if spec.startswith("cuda:") else spec
    if spec in ("", "cuda"):
        if spec == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {shown}: CUDA requested but torch.cuda.is_available() is False "
                            f"(torch {torch.__version__}); use --device cpu")
        dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        LOGGER.info(f"Using device {_describe(dev)}")
        return _make_current(dev)
    if spec == "cpu":
        LOGGER.info("Using device CPU")
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {shown}: Apple MPS requested but not available; use --device cpu")
        return torch.device("mps")
    if not re.fullmatch(r"\d+(,\d+)*", spec):
        raise UserError(f"--device {shown!r}: expected '', 'cpu', 'mps', a GPU index like 0 or a list like 0,1")
    ids = [int(x) for x in spec.split(",")]
    if not torch.cuda.is_available():
        raise UserError(f"--device {shown}: CUDA requested but torch.cuda.is_available() is False "
                        f"(torch {torch.__version__}); use --device cpu")
    n = torch.cuda.device_count()
    bad = [i for i in ids if i >= n]
    if bad:
        raise UserError(f"--device {shown}: GPU index {bad[0]} does not exist ({n} CUDA device(s) visible)")
    if len(ids) > 1 and batch_size > 0 and batch_size % len(ids):
        raise UserError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
    dev = torch.device(f"cuda:{ids[0]}")
    LOGGER.info(f"Using device {_describe(dev)}")
    return _make_current(dev)


def _make_current(dev: torch.device) -> torch.device:
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def _describe(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"CUDA:{dev.index} ({p.name}, {p.total_memory / 2**20:.0f}MiB)"
    return dev.type.upper()


def sync(device: torch.device | None = None) -> None:
    """Wait for the work queued on a CUDA `device` (no-op for other devices). Without a device: the current
    CUDA device, if CUDA has started."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sync(device: torch.device | None = None) -> float:
    """time.time() after waiting for the work queued on `device`, so GPU timings are real."""
    sync(device)
    return time.time()


def cuda_memory_gb(device: torch.device) -> float:
    """Memory the caching allocator holds on a CUDA `device`, in GB (0 for other devices): the progress-bar
    figure, read from the GPU that trains rather than from the current one."""
    return torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0


def cpu_bf16_native() -> bool:
    """True when this CPU computes bfloat16 in hardware (x86: AVX512-BF16 or AMX; ARM: the BF16 extension).

    Why: bf16 autocast on a CPU without these units is emulated and slower than fp32, so --half / --amp on such
    a CPU fall back to fp32 with one note instead.
    """
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if caps.get("architecture", "").startswith(("x86", "amd64", "i686")):
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    try:  # other architectures: oneDNN's own check (cpuinfo's BF16 flag on aarch64)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16(requested: bool, what: str = "--half") -> bool:
    """Whether a CPU run asked for reduced precision gets bf16: only with native support, else one note."""
    if not requested:
        return False
    if cpu_bf16_native():
        return True
    LOGGER.warning(f"WARNING: {what} on CPU needs native bfloat16 (AVX512-BF16 / AMX / ARM BF16), which this CPU "
                   f"lacks; running in fp32")
    return False


def cpu_thread_governor() -> ThreadGovernor | None:
    """A ThreadGovernor over torch's intra-op threads (CPU training calls its step() every batch): fewer threads
    while another program holds cores, back up to today's count when they free. None with one thread or where the
    kernel's accounting cannot be read."""
    n = torch.get_num_threads()
    if n <= 1 or cpu_time_sample() is None:
        return None
    return ThreadGovernor(torch.set_num_threads, n, n, log=LOGGER.info)
