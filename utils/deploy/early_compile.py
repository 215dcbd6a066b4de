"""Compile a fixed-size OpenVINO export in a thread while the rest of detect_dual.py is still starting.

Why: on 2 cores `import torch` is ~1.2 s of a detect run's start-up, and compiling the OpenVINO model for the CPU
another 0.2 s (bf16) to 0.6 s (INT8) after it. OpenVINO compiles with the GIL released, so when detect_dual.py
starts the compilation first, it runs on the other core during the import (INT8: ready 0.45 s sooner,
benchmarks/results/video_vs_ultralytics.md). The OpenVINO runner adopts it only when its own settings are the
same (file, precision, threads, streams); otherwise it compiles as it would have and the early one is dropped.
Nothing here imports torch or the format registry (that is the point).
"""
from __future__ import annotations

import threading
from pathlib import Path

from utils.deploy.signal_stack import same_signal_stack
from utils.threads import MAX_FRAME_WORKERS, torch_default_threads

_lock = threading.Lock()
_pending: dict[Path, threading.Thread] = {}
_done: dict[Path, tuple[dict, object, object]] = {}  # xml -> (config, core, compiled model)


def compile_config(precision: str, threads: int, streams: int) -> dict:
    """The CPU plugin's settings: one stream with every thread for single calls (latency), or `streams`
    streams of threads // streams threads for frames run that many at a time."""
    common = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(threads)}
    if streams <= 1:
        return {**common, "PERFORMANCE_HINT": "LATENCY"}
    return {**common, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": int(streams)}


def precision(core, meta: dict, half: bool) -> str:
    """The inference precision a CPU run uses: bf16 for --half, and for an INT8 file whose float layers were
    chosen and timed in bf16 when it was made (`int8_float` in its metadata: utils/deploy/int8_layers.py), both
    only on a CPU with native bf16; else f32."""
    from utils.deploy.int8_layers import cpu_float_precision
    return cpu_float_precision(core) if half or meta.get("int8_float") == "bf16" else "f32"


def model_meta(model) -> dict:
    """The metadata export.py stores in the IR ({} when it is missing or not JSON)."""
    import json
    if not model.has_rt_info(["yolo", "metadata"]):
        return {}
    try:
        meta = json.loads(model.get_rt_info(["yolo", "metadata"]).astype(str))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def model_xml(weights: str | Path) -> Path | None:
    """The .xml of an OpenVINO export given as its folder or its .xml file; None for anything else."""
    p = Path(weights)
    if p.suffix == ".xml" and p.is_file():
        return p.resolve()
    found = sorted(p.glob("*.xml")) if p.is_dir() and p.name.endswith("_openvino_model") else []
    return found[0].resolve() if len(found) == 1 else None


def start(weights: str | Path, half: bool) -> bool:
    """Begin compiling `weights` for the frames-in-flight settings a video or folder run will ask for; True if a
    compilation was started (an OpenVINO export; the thread itself skips a dynamic-shape one)."""
    xml = model_xml(weights)
    if xml is None:
        return False
    t = threading.Thread(target=_compile, args=(xml, half), name="openvino-early-compile", daemon=True)
    with _lock:
        _pending[xml] = t
    t.start()
    return True


def _compile(xml: Path, half: bool) -> None:
    try:
        import openvino as ov
        core = ov.Core()
        model = core.read_model(str(xml))
        if not model.input(0).get_partial_shape().is_static:
            return  # compiled later, for the letterboxed frame shape
        threads = torch_default_threads()
        streams = min(threads, MAX_FRAME_WORKERS)  # what Predictor.frame_workers will ask for
        config = compile_config(precision(core, model_meta(model), half), threads, streams)
        with same_signal_stack():
            compiled = core.compile_model(model, "CPU", config)
        with _lock:
            _done[xml] = (config, core, compiled)
    except Exception:  # noqa: BLE001  the runner compiles again and reports what is wrong in its own words
        return


def wait() -> None:
    """Until every compilation started here has finished (OpenVINO's binding is not safe to enter from two
    threads at once for the first time: utils/deploy/formats/openvino.py _FIRST_CALLS)."""
    with _lock:
        threads = list(_pending.values())
    for t in threads:
        t.join()


def take(xml: str | Path, config: dict):
    """The early compilation of `xml` if it was made with exactly `config` (waits for it to finish), else None.
    Handed out once."""
    xml = Path(xml).resolve()
    with _lock:
        t = _pending.pop(xml, None)
    if t is None:
        return None
    t.join()
    with _lock:
        made = _done.pop(xml, None)
    return made[2] if made is not None and made[0] == config else None
