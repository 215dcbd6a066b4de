"""Mobile MQA: fused-kernel path vs an attention that materialises the full [B, h, L, P] matrix.

Why: the spec requires the attention layer never to build the L x P matrix when a fused kernel can avoid
it. This script measures, side by side in one run, median latency and peak memory of
`MultiQueryAttentionLayerWithDownSampling` (SDPA path) and of the same module with `.explicit = True`
(q @ k^T, softmax, @ v: the materialising reference with identical weights), and checks with
torch.profiler which aten kernels our forward really executes.

Every measurement runs in a fresh subprocess so that its peak RSS growth (ru_maxrss after the run minus
ru_maxrss right before the first forward) belongs to that configuration alone. Benchmarks are not tests:
numbers depend on the machine and its load, which is printed with the table.

Usage:
    python benchmarks/bench_mqa.py [--sizes 20,40,80] [--channels 64,128,256] [--md out.md] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import mem_baseline, mem_peak_growth, run_worker as _run_worker, write_md  # noqa: E402


def run_worker(kind: str, cfg: dict, timeout: float) -> dict:
    return _run_worker(__file__, kind, cfg, timeout)

FLASH_HINT = "flash"  # CPU fused kernel: aten::_scaled_dot_product_flash_attention_for_cpu in torch 2.x
MATERIALISING_OPS = ("aten::_scaled_dot_product_attention_math", "aten::bmm", "aten::baddbmm",
                     "aten::matmul", "aten::softmax", "aten::_softmax", "aten::_safe_softmax")


def _ints(s: str) -> list[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def _build(cfg: dict):
    """Module + input for one configuration; same seed -> identical weights in every subprocess."""
    import torch
    from models.attention import MultiQueryAttentionLayerWithDownSampling
    torch.manual_seed(0)
    m = MultiQueryAttentionLayerWithDownSampling(cfg["c"], cfg["heads"], cfg["key_dim"], cfg["key_dim"],
                                                 1, 1, cfg["kv_strides"]).eval()
    m.explicit = cfg["impl"] == "materialised"
    x = torch.randn(cfg["batch"], cfg["c"], cfg["size"], cfg["size"])
    return m, x


def worker_latency(cfg: dict) -> dict:
    """Runs inside the subprocess: warm-up, timed repeats, peak RSS growth of the forwards."""
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    m, x = _build(cfg)
    base = mem_baseline()
    times = []
    with torch.inference_mode():
        for _ in range(cfg["warmup"]):
            m(x)
        t_start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            y = m(x)
            times.append(time.perf_counter() - t0)
            done = len(times) >= cfg["repeats"] or (time.perf_counter() - t_start > cfg["max_seconds"]
                                                    and len(times) >= cfg["min_repeats"])
            if done:
                break
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "runs": len(times),
            "peak_mib": mem_peak_growth(base), "checksum": float(y.double().abs().sum()),
            "threads": torch.get_num_threads()}


def worker_ops(cfg: dict) -> dict:
    """Runs inside the subprocess: aten ops of one eval forward and of one train forward+backward."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    m, x = _build(cfg)

    def ops(fn) -> dict:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        counts: dict = {}
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                counts[e.key] = {"calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                                 "cpu_mem_mib": max(e.cpu_memory_usage, 0) / 2 ** 20}
        return counts

    with torch.inference_mode():
        fwd = ops(lambda: m(x))
    m.train()
    s = cfg["bwd_size"]
    xb = torch.randn(cfg["batch"], cfg["c"], s, s, requires_grad=True)
    bwd = ops(lambda: m(xb).sum().backward())
    # numerical agreement of the two paths on the same weights (eval mode, small map)
    m.eval()
    xs = torch.randn(cfg["batch"], cfg["c"], 20, 20)
    with torch.inference_mode():
        m.explicit = False
        a = m(xs)
        m.explicit = True
        b = m(xs)
    return {"forward": fwd, "train": bwd, "max_abs_diff": float((a - b).abs().max()),
            "ref_scale": float(b.abs().max())}


def load_str() -> str:
    try:
        return "load avg " + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "load avg n/a"


def check_report(res: dict) -> tuple[bool, list[str]]:
    """Turn the profiled op lists into a verdict: fused kernel present, no materialising op."""
    lines, ok = [], True
    for phase in ("forward", "train"):
        ops = res[phase]
        fused = sorted(k for k in ops if FLASH_HINT in k)
        bad = sorted(k for k in ops if k in MATERIALISING_OPS)
        ok &= bool(fused) and not bad
        lines.append(f"{phase}: fused kernels {fused or 'NONE'}; materialising ops {bad or 'none'}")
        top = sorted(ops.items(), key=lambda kv: -kv[1]["self_cpu_ms"])[:6]
        lines.append("  top ops by self CPU: " + ", ".join(f"{k} {v['self_cpu_ms']:.0f} ms" for k, v in top))
    lines.append(f"SDPA vs explicit, same weights: max |diff| {res['max_abs_diff']:.2e} "
                 f"(output scale {res['ref_scale']:.2e})")
    return ok, lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Mobile MQA fused vs materialised attention benchmark")
    ap.add_argument("--sizes", default="20,40,80", help="square map sizes (160 only runs our path: matrix too big)")
    ap.add_argument("--channels", default="64,128,256", help="channel counts C")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--key-dim", type=int, default=48)
    ap.add_argument("--kv-strides", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--min-repeats", type=int, default=3, help="at least this many even past --max-seconds")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop repeating after this long")
    ap.add_argument("--omp-active", action="store_true",
                    help="keep OpenMP's spin-waiting (default: workers run with OMP_WAIT_POLICY=PASSIVE)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    ap.add_argument("--mem-limit-gib", type=float, default=6.0, help="skip the materialised path above this matrix size")
    ap.add_argument("--check-size", type=int, default=80, help="map size of the profiled fused-kernel check (0: skip)")
    ap.add_argument("--csv", default="", help="write the table as CSV")
    ap.add_argument("--md", default="", help="write the table and checks as markdown")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    opt = ap.parse_args(argv)

    if opt._worker:
        kind, cfg = opt._worker[0], json.loads(opt._worker[1])
        out = worker_latency(cfg) if kind == "latency" else worker_ops(cfg)
        print("RESULT " + json.dumps(out), flush=True)
        return

    from utils.general import LOGGER, UserError
    sizes, chans = _ints(opt.sizes), _ints(opt.channels)
    if not sizes or not chans or min(sizes + chans) < 1:
        raise UserError("bench_mqa.py: --sizes and --channels need positive integers")
    import torch
    header = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"threads {opt.threads or torch.get_num_threads()}, "
              f"OMP_WAIT_POLICY {'default' if opt.omp_active else 'PASSIVE'}, batch {opt.batch}, heads {opt.heads}, "
              f"key_dim=value_dim {opt.key_dim}, kv_strides {opt.kv_strides}, fp32, "
              f"median of <= {opt.repeats} runs after {opt.warmup} warm-up")
    LOGGER.info(header + f"\nstart: {load_str()}")
    base = dict(heads=opt.heads, key_dim=opt.key_dim, kv_strides=opt.kv_strides, batch=opt.batch,
                warmup=opt.warmup, repeats=opt.repeats, min_repeats=opt.min_repeats,
                max_seconds=opt.max_seconds, threads=opt.threads, omp_passive=not opt.omp_active)

    rows = []
    for s in sizes:
        for c in chans:
            p_side = s if opt.kv_strides == 1 else (s - 1) // opt.kv_strides + 1
            L, P = s * s, p_side * p_side
            matrix_gib = opt.batch * opt.heads * L * P * 4 / 2 ** 30
            row = {"size": f"{s}x{s}", "C": c, "L": L, "P": P, "matrix_gib": matrix_gib}
            for impl in ("ours", "materialised"):
                if impl == "materialised" and matrix_gib > opt.mem_limit_gib:
                    row[impl] = {"error": f"skipped: matrix {matrix_gib:.1f} GiB > {opt.mem_limit_gib} GiB"}
                    continue
                cfg = dict(base, impl=impl, size=s, c=c)
                row[impl] = run_worker("latency", cfg, timeout=opt.max_seconds * 6 + 600)
                r = row[impl]
                LOGGER.info(f"{s}x{s} C={c} {impl:>12}: " + (r["error"] if "error" in r else
                            f"{r['median_ms']:.1f} ms (n={r['runs']}), peak +{r['peak_mib']:.1f} MiB  [{load_str()}]"))
            rows.append(row)

    table = format_table(rows)
    LOGGER.info("\n" + "\n".join(table))
    verdict = targets(rows, opt)
    for v in verdict:
        LOGGER.info(v)

    check_lines: list[str] = []
    if opt.check_size:
        cfg = dict(base, impl="ours", size=opt.check_size, c=chans[0], bwd_size=min(opt.check_size, 40))
        res = run_worker("ops", cfg, timeout=1800)
        if "error" in res:
            check_lines = [f"fused-kernel check failed to run: {res['error']}"]
        else:
            ok, check_lines = check_report(res)
            check_lines.insert(0, f"Fused-kernel check (B={opt.batch}, C={chans[0]}, {opt.check_size}x{opt.check_size} "
                                  f"eval forward; train forward+backward at {cfg['bwd_size']}x{cfg['bwd_size']}): "
                                  + ("PASS" if ok else "FAIL"))
        for ln in check_lines:
            LOGGER.info(ln)
    end_load = load_str()
    LOGGER.info(f"end: {end_load}")

    if opt.csv:
        write_csv(rows, Path(opt.csv))
    if opt.md:
        md = ["# Mobile MQA: fused (SDPA) vs materialised attention", "", header, "",
              f"Machine load during the run (shared machine): {end_load} at the end.", "", *table, "",
              *[f"- {v}" for v in verdict], "", "## Fused-kernel check", "", *[f"    {ln}" for ln in check_lines], ""]
        write_md(opt.md, "\n".join(md))
        LOGGER.info(f"wrote {opt.md}")


def _fmt(r: dict, key: str, f: str) -> str:
    return "-" if "error" in r else format(r[key], f)


def _ratio(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b or a[key] <= 0:
        return "-"
    return f"{b[key] / a[key]:.1f}x"


def format_table(rows: list[dict]) -> list[str]:
    """Markdown table: latency, peak memory and ratios (materialised / ours)."""
    out = ["| map | C | L | P | [B,h,L,P] GiB | ours ms | materialised ms | speed-up | ours peak MiB "
           "| materialised peak MiB | memory ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["ours"], r["materialised"]
        out.append(f"| {r['size']} | {r['C']} | {r['L']} | {r['P']} | {r['matrix_gib']:.2f} | {_fmt(a, 'median_ms', '.1f')} "
                   f"| {_fmt(b, 'median_ms', '.1f') if 'error' not in b else b['error']} | {_ratio(a, b, 'median_ms')} "
                   f"| {_fmt(a, 'peak_mib', '.1f')} | {_fmt(b, 'peak_mib', '.1f')} | {_ratio(a, b, 'peak_mib')} |")
    return out


def targets(rows: list[dict], opt) -> list[str]:
    """Targets at 2x64x80x80: >= 20x less peak memory and >= 3x faster than materialised."""
    for r in rows:
        if r["size"] == "80x80" and r["C"] == 64 and opt.batch == 2:
            a, b = r["ours"], r["materialised"]
            if "error" in a or "error" in b:
                return ["targets at 2x64x80x80: not measured"]
            sp, mem = b["median_ms"] / a["median_ms"], b["peak_mib"] / max(a["peak_mib"], 1e-9)
            return [f"target speed-up >= 3x at 2x64x80x80: {sp:.1f}x -> {'MET' if sp >= 3 else 'NOT MET'}",
                    f"target memory ratio >= 20x at 2x64x80x80: {mem:.1f}x -> {'MET' if mem >= 20 else 'NOT MET'}"]
    return ["targets at 2x64x80x80: configuration not in this run"]


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["map", "C", "L", "P", "matrix_gib", "ours_ms", "materialised_ms", "ours_peak_mib",
                    "materialised_peak_mib", "note"])
        for r in rows:
            a, b = r["ours"], r["materialised"]
            w.writerow([r["size"], r["C"], r["L"], r["P"], f"{r['matrix_gib']:.3f}",
                        a.get("median_ms", ""), b.get("median_ms", ""), a.get("peak_mib", ""),
                        b.get("peak_mib", ""), "; ".join(x["error"] for x in (a, b) if "error" in x)])


if __name__ == "__main__":
    from utils.general import cli
    cli(main)()
