#!/usr/bin/env bash
# The prepared GPU check, one command on a fresh GPU machine (a copy of this repository, torch with CUDA):
#   bash benchmarks/run_gpu_speed.sh [--device 0] [--budget 360] [--only train_amp,predict] [--dry-run]
# Runs every CUDA path once, most valuable first (AMP training, detection, validation, the speed tables, then
# torchrun with nccl, TorchScript/ONNX exports run on the GPU, autobatch, torch.compile, the GPU tests): each step
# prints PASS/FAIL with its numbers, a failure never stops the run, gpu_check.md is rewritten after every step,
# and the whole check keeps to a 6-minute budget (--budget, setup included). It ends with a one-screen
# PASS/FAIL/SKIP summary. Results: gpu_check.md, gpu_check.json and gpu_speed.md under $OUT when set, else
# benchmarks/results/. See benchmarks/gpu_check.py for the steps.
# Nothing is installed here (an install would eat the loan): missing packages are named, and the steps that
# need them fail. `--device cpu` runs the same steps on CPU (GPU-only ones skipped) to check the script itself;
# `--dry-run` goes through the whole run checking only each step's command lines.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
missing=$("$PY" -c "
import importlib.util
mods = ['torch', 'torchvision', 'cv2', 'yaml', 'pandas', 'scipy', 'onnx', 'onnxruntime', 'pytest']
print(' '.join(m for m in mods if importlib.util.find_spec(m) is None))" 2>&1)
if [ -n "$missing" ]; then
  echo "WARNING: missing: $missing (pip install -r requirements-test.txt before the timed run); the steps that need them will FAIL"
fi
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
# the orchestrator keeps to its budget and kills a step's whole process group at its limit; the outer
# timeout only guards against the orchestrator itself hanging
timeout 420 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "FAIL  gpu_check.py did not finish within 420 s"
exit "$rc"
