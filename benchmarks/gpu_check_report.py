"""The GPU check's reports: gpu_check.md / .json rewritten after every step, and the one-screen summary with each
step's few telling numbers (benchmarks/gpu_check.py runs the steps)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, env: dict, results: dict, total_s: float, pending: list[str] | None = None,
                 budget_s: float = 360.0, stem: str = "gpu_check") -> None:
    """<stem>.md (+ .json): every step so far, then the ones not run yet; rewritten after each step."""
    state = f"{total_s:.0f} s of the {budget_s:.0f} s budget" + (" so far (still running)" if pending else "")
    lines = [f"# GPU check ({env['device']}, {env['date']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}; `bash benchmarks/run_gpu_speed.sh`, {state}.", "",
             "| step | result | seconds | numbers | note |", "|---|---|---:|---|---|"]
    for name, r in results.items():
        nums = json.dumps(r.get("numbers", {}), default=str).replace("|", "/")[:1500]
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.0f} | `{nums}` | {r.get('note', '')[:400]} |")
    lines += [f"| {name} | not run yet | | | |" for name in pending or []]
    speed = out / "gpu_speed.md"
    if results.get("speed", {}).get("status") in ("PASS", "FAIL") and speed.is_file():  # this run's tables only
        lines += ["", speed.read_text()]
    _write_atomic(out / f"{stem}.md", "\n".join(lines) + "\n")
    _write_atomic(out / f"{stem}.json", json.dumps({"env": env, "results": results, "total_s": total_s,
                                                      "pending": pending or []}, indent=1, default=str))


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def brief(name: str, r: dict) -> str:
    """A step's few telling numbers for the one-screen summary."""
    n = r.get("numbers") or {}
    if "command_lines" in n:  # --dry-run
        return f"{n['command_lines']} command line(s) parse; limit {n['limit_s']:.0f} s"
    try:
        if name == "train_amp":
            return f"{n['epochs']} epochs, mAP50 {n['map50']}, box loss {n['box']}, {n['seconds']} s"
        if name == "predict":
            ms = ", ".join(f"{k} {v['ms_per_image']}" for k, v in n.items() if "ms_per_image" in v)
            ious = [v["min_iou"] for v in n.values() if "min_iou" in v]
            return f"ms/img {ms}" + (f"; min IoU {min(ious)}" if ious else "")
        if name == "val":
            maps = ", ".join(f"{k} {v['map']}" for k, v in n.items() if "map" in v)
            diffs = [abs(v["map_diff"]) for v in n.values() if "map_diff" in v]
            return f"mAP50-95 {maps}" + (f"; max |diff| {max(diffs)}" if diffs else "")
        if name == "speed":
            out = []
            for row in n.get("rows", []):
                c = _cells(row)
                out.append(f"{c[0]} b1 {c[1]} ms, graph {c[4]} ms" if len(c) >= 10 else f"{c[0]} train {c[3]} img/s")
            return "; ".join(out)
        if name == "torchrun":
            m = n.get("mismatch", {})
            return (f"DDP train {n.get('train_s')} s, sharded val max diff {n.get('val_single_vs_sharded_maxdiff')}, "
                    f"mismatch line x{m.get('lines')}")
        if name == "export":
            return ", ".join(f"{k} IoU {v.get('min_iou')}" for k, v in n.items())
        if name == "autobatch":
            return f"batch {n['batch_640']} @640, {n['batch_multi_scale_960']} @960 (multi-scale)"
        if name == "compile":
            p16 = n.get("predict", {}).get("fp16_compile", {})
            return (f"train compiled {n.get('compiled')}, predict fp16 {p16.get('ms_per_image', '-')} ms/img, "
                    f"ensemble mAP diff {n.get('val', {}).get('ensemble_compile', {}).get('map_diff', '-')}")
        if name == "pytest_gpu":
            return str(n.get("summary", ""))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        pass
    return json.dumps(n, default=str)[:90]


def print_summary(env: dict, results: dict, total_s: float, budget_s: float, report: Path) -> None:
    """One screen: a line per step (result, seconds, numbers), a line per failure's reason, the totals."""
    print(f"\n== GPU check on {env['device']} (torch {env['torch']}, CUDA {env['cuda']}): {total_s:.0f} s of the "
          f"{budget_s:.0f} s budget")
    print(f"{'step':12s} {'result':6s} {'s':>4s}  numbers")
    for name, r in results.items():
        print(f"{name:12s} {r['status']:6s} {r.get('seconds', 0):4.0f}  {brief(name, r)[:96]}")
        if r["status"] != "PASS" and r.get("note"):
            print(f"{'':24s}{r['note'].splitlines()[0][:96]}")
    counts = {k: sum(r["status"] == k for r in results.values()) for k in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP; report {report}")
