"""Benchmark reporting code: the zoo accuracy table and the plot must report what the runs contain."""
import csv
import json
import re

import pytest

from benchmarks import plot_zoo, train_zoo

COLS = ["epoch", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"]


def _run(project, model, rows):
    d = project / model
    d.mkdir(parents=True)
    with open(d / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"{c:>20}" for c in COLS])  # padded like upstream results.csv headers
        w.writerows(rows)


def test_collect_best_epoch_at_epoch_and_mean_over_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "m1", [(0, 0.2, 0.1), (1, 0.6, 0.3), (2, 0.7, 0.2)])  # fitness: epoch 1 (0.33) beats epoch 2 (0.25)
    _run(b, "m1", [(0, 0.4, 0.2), (1, 0.8, 0.5)])
    _run(a, "m2", [(0, 0.5, 0.25)])  # too short for --at-epoch 1
    best = train_zoo.collect([str(a), str(b)], ["m1", "m2"], None)
    assert best[0]["model"] == "m1" and best[0]["best_epoch"] == "1/1"
    assert best[0]["mAP50"] == pytest.approx((0.6 + 0.8) / 2) and best[0]["mAP50_runs"] == "0.600/0.800"
    assert best[1]["mAP50"] == pytest.approx(0.5) and best[1]["runs"] == 1
    at0 = train_zoo.collect([str(a), str(b)], ["m1", "m2"], 0)
    assert at0[0]["mAP50-95"] == pytest.approx(0.15) and at0[0]["epochs_done"] == "3/2"
    at1 = train_zoo.collect([str(a), str(b)], ["m1", "m2"], 1)
    assert [r["model"] for r in at1] == ["m1"]  # m2 never reached epoch 1: left out, not zero


def test_collect_cli_writes_csv_that_plot_zoo_reads(tmp_path):
    proj = tmp_path / "zoo"
    _run(proj, "yolov9-t", [(0, 0.3, 0.1), (1, 0.5, 0.3)])
    _run(proj, "yolov9-t-MMQA", [(0, 0.4, 0.2), (1, 0.6, 0.35)])
    out = tmp_path / "map.csv"
    train_zoo.main(["--collect", str(proj), "--models", "yolov9-t,yolov9-t-MMQA", "--at-epoch", "1", "--csv", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], float(r["mAP50"])) for r in rows] == [("yolov9-t", 0.5), ("yolov9-t-MMQA", 0.6)]

    bench = tmp_path / "models.csv"
    with open(bench, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "imgsz", "latency_ms", "gflops_640"])
        w.writerows([("yolov9-t", 640, 276, 16.5), ("yolov9-t-MMQA", 640, 409, 17.3), ("gelan-c", 640, 1366, 103.5)])
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"latency": [{"model": "yolov9-t", "amp_b1": {"ms": 30.0}, "amp_b16": {"ms": 32.0}},
                                           {"model": "yolov9-t-MMQA", "amp_b1": {"ms": 40.0}, "amp_b16": {"ms": 48.0}}]}))
    assert plot_zoo.collect(list(csv.DictReader(open(bench))), rows, 640) == [("yolov9-t", 276.0, 0.5),
                                                                             ("yolov9-t-MMQA", 409.0, 0.6)]
    pts, label = plot_zoo.gpu_points(gpu, {"yolov9-t": 0.5, "yolov9-t-MMQA": 0.6})
    assert pts == [("yolov9-t", 2.0, 0.5), ("yolov9-t-MMQA", 3.0, 0.6)] and "batch 16" in label
    png = tmp_path / "zoo.png"
    plot_zoo.main(["--csv", str(bench), "--map", str(out), "--gpu-json", str(gpu), "--out", str(png)])
    import matplotlib.image as mpimg
    assert mpimg.imread(png).shape[1] > mpimg.imread(png).shape[0]  # two panels side by side


def test_collect_without_runs_is_one_clear_error(tmp_path, capsys):
    from utils.general import UserError
    with pytest.raises(UserError, match="no results.csv"):
        train_zoo.main(["--collect", str(tmp_path / "none")])


def test_train_small_report_from_curves(tmp_path):
    """The small-data report reads each run's results.csv: final/best mAP, ratio to 'old', epochs to target."""
    import argparse
    import csv as _csv

    from benchmarks import train_small
    curves = {"old": [0.0, 0.05, 0.1], "new": [0.1, 0.25, 0.3]}
    for s, c in curves.items():
        run = tmp_path / "runs" / f"{s}_s0"
        run.mkdir(parents=True)
        with open(run / "results.csv", "w", newline="") as f:
            w = _csv.writer(f)
            w.writerow(["epoch", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95"])
            w.writerows([[e, v, v / 2] for e, v in enumerate(c)])
    args = argparse.Namespace(settings=["old", "new"], seeds=[0], epochs=3, out=str(tmp_path / "rep"), title="t",
                              cfg="gelan-t.yaml", imgsz=128, batch=16, hyp="hyp.yaml", data_desc="d", jobs=1)
    train_small.report(args, tmp_path, {})
    md = (tmp_path / "rep.md").read_text()
    assert "**new / old final mAP50: 3.0x**" in md
    assert "| old | 1 | 0.100 (0.100) | 0.050 | 0.100 | never (target 0.150) |" in md
    assert "| new | 1 | 0.300 (0.300) | 0.150 | 0.300 | 2 (target 0.150) |" in md
    rows = list(_csv.reader(open(tmp_path / "rep.csv")))
    assert rows[0] == ["setting", "seed", "epoch", "mAP50", "mAP50-95"] and len(rows) == 7
    assert (tmp_path / "rep.png").stat().st_size > 0


# ---------------------------------------------------------------- the prepared GPU check (runs on CPU here)

def test_gpu_check_dry_run_goes_end_to_end_within_its_budget(tmp_path, capsys, monkeypatch):
    """--dry-run goes through the whole run (budget accounting, a report after every step, the one-screen summary)
    with each step checking its command lines against the real parsers. The steps come in order of value, their
    limits fit the 6-minute budget with the setup, and the shell wrapper installs nothing."""
    import subprocess
    from pathlib import Path

    from benchmarks import gpu_check
    sh = Path(gpu_check.ROOT) / "benchmarks" / "run_gpu_speed.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    assert not [ln for ln in sh.read_text().splitlines() if "pip install" in ln and not ln.lstrip().startswith(("#", "echo"))]
    names = list(gpu_check.STEPS)
    assert names[:4] == ["train_amp", "predict", "val", "speed"]
    assert sum(v[2] for v in gpu_check.STEPS.values()) + gpu_check.SETUP_S <= gpu_check.BUDGET_S <= 360
    assert all(f"  {name}" in gpu_check.__doc__ for name in names)  # every step documented
    written = []
    real = gpu_check.write_report
    monkeypatch.setattr(gpu_check, "write_report", lambda *a, **k: written.append(list(k.get("pending") or [])) or real(*a, **k))
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert written == [names[i + 1:] for i in range(len(names))] + [[]]  # after every step, then the final one
    summary = out[out.index("== GPU check"):].splitlines()
    assert re.search(r"\d+ s of the 360 s budget", summary[0])
    assert [ln.split()[0] for ln in summary[2:2 + len(names)]] == names
    assert all(ln.split()[1] == "PASS" for ln in summary[2:2 + len(names)])
    assert summary[-1].startswith(f"{len(names)} PASS, 0 FAIL, 0 SKIP") and len(summary) <= 24  # one screen
    md = (tmp_path / "gpu_check_dry_run.md").read_text()
    assert all(f"| {name} | PASS |" in md for name in names) and not (tmp_path / "gpu_check.md").exists()


def test_gpu_check_budget_every_step_runs_even_when_each_uses_its_whole_time(tmp_path, monkeypatch, capsys):
    """The orchestrator's budget on a fake clock: every step hangs until it is killed, and still every step runs
    with at least its own limit, and the whole run ends within the budget (the old limits summed to 2.6x the
    budget, so the speed step was skipped). A step that finishes early leaves its time to the next one."""
    from benchmarks import gpu_check
    clock = [1000.0]
    timeouts = {}

    def fake_run_cli(ctx, log, cmd, timeout):
        name = cmd[cmd.index("--step") + 1]
        timeouts[name] = timeout
        used = 1.0 if name == "predict" else timeout  # predict is quick; every other step hangs to its kill
        clock[0] += used
        return 124, f"TIMEOUT after {timeout:.0f} s"

    monkeypatch.setattr(gpu_check, "_now", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "run_cli", fake_run_cli)
    monkeypatch.setattr(gpu_check, "make_data", lambda work: None)
    monkeypatch.setattr(gpu_check, "environment", lambda d: {"date": "d", "torch": "t", "cuda": "c", "device": "GPU"})
    assert gpu_check.main(["--device", "0", "--out", str(tmp_path), "--work", str(tmp_path)]) == 1
    names = list(gpu_check.STEPS)
    assert list(timeouts) == names  # none skipped for lack of time
    assert all(timeouts[n] >= gpu_check.STEPS[n][2] for n in names)
    assert timeouts["val"] == gpu_check.STEPS["val"][2] + gpu_check.STEPS["predict"][2] - 1.0  # predict's time left over
    assert clock[0] - 1000.0 <= gpu_check.BUDGET_S
    out = capsys.readouterr().out
    assert f"0 PASS, {len(names)} FAIL, 0 SKIP" in out and "TIMEOUT" in out


def test_gpu_check_counts_the_torchrun_error_once_next_to_its_failure_summary():
    """Rank 0 prints the one-line error; torchrun's failure summary repeats it as 'traceback : ERROR: ...'. That
    is one line from the program, not two (the check used to count both and always failed)."""
    from benchmarks.gpu_check import error_lines
    line = "ERROR: --device 0,1 names 2 GPU(s) but torchrun started 1 process(es) on this node: give one GPU"
    text = "\n".join(["W1207 starting", line, "E1207 failed (exitcode: 1)", "Root Cause (first observed failure):",
                      "[0]:", "  time      : 2026-12-07_01:02:03", "  exitcode  : 1 (pid: 12)",
                      f"  traceback : {line}", "=" * 40])
    assert error_lines(text, "names 2 GPU(s) but torchrun started 1 process(es)") == (1, True)
    assert error_lines(line + "\n" + line, "names 2 GPU(s)") == (2, False)


def test_bench_gpu_times_models_in_the_layout_they_run():
    """detect, val and training run channels_last (NHWC) models, and training NHWC images: the GPU tables must time
    that, not NCHW models."""
    import inspect

    import torch
    import torch.nn as nn

    from benchmarks import bench_gpu
    for train in (False, True):
        m = bench_gpu._build("gelan-t", "cpu", train=train)
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1) and c.in_channels > 1]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert not any(c.weight.is_contiguous() for c in convs)
    assert inspect.signature(bench_gpu.train_cost).parameters["channels_last"].default is True


def test_gpu_check_step_failure_is_a_result_and_the_report_lists_every_step(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    def broken(ctx, timeout):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.STEPS, "broken", (broken, (), 10, False))
    ctx = gpu_check.Ctx("cpu", tmp_path, tmp_path, tmp_path)
    gpu_check.run_one("broken", ctx, 10, tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ok"] is False and "illegal memory access" in r["note"]
    assert "RuntimeError" in (tmp_path / "broken.traceback.log").read_text()
    results = {"broken": {"status": "FAIL", "seconds": 1.0, **r},
               "speed": {"status": "SKIP", "note": "needs a GPU"},
               "train_amp": {"status": "PASS", "seconds": 20.0, "ok": True, "numbers": {"map50": 0.5}, "note": ""}}
    gpu_check.write_report(tmp_path, {"device": "CPU", "date": "d", "torch": "t", "cuda": None}, results, 21.0)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| broken | FAIL |" in md and "| speed | SKIP |" in md and '| train_amp | PASS | 20 | `{"map50": 0.5}`' in md
    assert json.loads((tmp_path / "gpu_check.json").read_text())["results"]["train_amp"]["numbers"]["map50"] == 0.5


def test_bench_formats_rows_follow_the_registry(monkeypatch):
    """bench_formats measures what utils/deploy/formats holds: a row per format (FP32, --half, INT8 where the
    format has it), and a format whose packages are missing is skipped with a note naming the pip package."""
    from benchmarks import bench_formats
    from utils.deploy import formats
    from utils.deploy.formats import base
    names = {r.name for r in bench_formats.registry_rows()}
    for f in formats.all_formats():
        runs = f.runs_here and f.load is not None
        assert f"{f.name} FP32" in names and (f"{f.name} bf16 (--half)" in names) == (runs and not f.half_file)
        assert (f"{f.name} fp16 (--half)" in names) == f.half_file
        assert (f"{f.name} INT8" in names) == (f.export_int8 is not None)
    real = base.find_spec
    monkeypatch.setattr(base, "find_spec", lambda m: None if m.split(".")[0] == "onnx" else real(m))
    bench_formats.NOTES.clear()
    kept = [f.name for f, _ in bench_formats.exportable(int8=True)]
    assert "onnx" not in kept and "openvino" not in kept  # OpenVINO converts from ONNX: needs onnx too
    assert any(n.startswith("onnx: skipped, needs onnx") and "pip install onnx" in n for n in bench_formats.NOTES)
    zen = bench_formats.cpu_summary("model name\t: AMD EPYC 9R45\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bf16\n")
    assert zen.startswith("AMD EPYC 9R45,") and "AVX512-BF16, AVX512-VNNI, AVX512, AVX2" in zen and "AMX" not in zen
    arm = bench_formats.cpu_summary("processor\t: 0\nFeatures\t: fp asimd asimddp bf16 i8mm\n")
    assert "ARM dot product, ARM BF16, ARM I8MM" in arm and "AVX" not in arm


def test_bench_formats_fp16_files_are_rows_and_core_ml_is_size_only(tmp_path):
    """A format whose --half writes another file (LiteRT) gets its own row without a bf16 check; a format that
    cannot run here (Core ML) is never loaded, its row in the table has the file size and where it runs."""
    from benchmarks import bench_formats
    from utils.deploy import formats
    bench_formats.ONLY.clear()
    files = {"litert": tmp_path / "m.tflite", "litert-fp16": tmp_path / "fp16" / "m.tflite",
             "coreml": tmp_path / "m.mlpackage", "coreml-fp16": tmp_path / "fp16" / "m.mlpackage"}
    rows = bench_formats.rows_for(files)  # the paths do not exist: loading one would fail
    assert [r.name for r in rows] == ["litert FP32", "litert fp16 (--half)"] and rows[1].half
    sizes_mb = {"pt FP32": 4.3, "litert FP32": 7.5, "litert fp16 (--half)": 3.8, "coreml FP32": 7.6,
                "coreml fp16 (--half)": 3.9}
    ms = {320: {"pt FP32": 30.0, "litert FP32": 20.0, "litert fp16 (--half)": 15.0}}
    lines = bench_formats.table("m", 128, [320], sizes_mb, ms, {"pt FP32": 0.5}).splitlines()
    where = formats.get("coreml").runs_on
    assert "| litert fp16 (--half) | 3.8 | 15.0 | 2.00 | - |" in lines
    assert f"| coreml fp16 (--half) | 3.9 | - | - | - (runs on {where}) |" in lines
    assert sum(ln.startswith("| coreml") for ln in lines) == 2
    assert not any(ln.startswith("| pt bf16") for ln in lines)  # not measured, no size: no row
