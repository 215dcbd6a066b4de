#!/usr/bin/env bash
# The prepared GPU check, one command on a fresh GPU machine (a copy of this repository, torch with CUDA):
#   bash benchmarks/run_gpu_speed.sh [--device 0] [--budget 440] [--only train_amp,predict] [--dry-run]
# Runs every CUDA path once (training with AMP and --compile, autobatch, --half / --cuda-graph capture|compile
# detection and validation, TorchScript/ONNX exported on CPU and run on the GPU, torchrun with nccl, the speed
# tables): each step prints PASS/FAIL with its numbers, a failure never stops the run, and the whole check fits
# in 8 minutes on one H100 (the step budget, --budget, is 440 s). Results: gpu_check.md, gpu_check.json and
# gpu_speed.md under $OUT when set, else benchmarks/results/. See benchmarks/gpu_check.py for the steps.
# `--device cpu` runs the same steps on CPU (GPU-only parts skipped) to check the script itself.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, torchvision, cv2, yaml, pandas, scipy, onnx, onnxruntime, pytest" 2>/dev/null; then
  echo "some requirements are missing: pip install -r requirements-test.txt"
  "$PY" -m pip install -q -r requirements-test.txt || echo "WARNING: pip install failed; steps that need the missing packages will FAIL"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA available:', torch.cuda.is_available())"
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
# the orchestrator keeps to its budget and kills a step's whole process group at its limit; the outer
# timeout only guards against the orchestrator itself hanging
timeout 540 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "FAIL  gpu_check.py did not finish within 540 s"
exit "$rc"
