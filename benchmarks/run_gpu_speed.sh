#!/usr/bin/env bash
# GPU checks in one go (written without a GPU machine: NOT yet run on one).
#  1. CUDA-graph / torch.compile predictions equal eager (boxes within 1e-3), fp32 and --half.
#  2. Tables: batch-1 fp16 latency eager / CUDA graph / compile vs batch-16 per image; AMP training img/s at
#     batch 8 vs channels_last at the autobatch size (+ compile), next to the data loader's img/s.
# Usage: bash benchmarks/run_gpu_speed.sh [extra bench_gpu.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q tests/test_speed.py -k "gpu" -p no:cacheprovider
# each command is sized for the device tool's 10-minute limit (torch.compile takes minutes per model)
python benchmarks/bench_gpu.py --speed --no-compile \
  --models yolov9-c,yolov9-c-MMQARepNCSPELAN4,yolov9-c-MMQA-P4P5,yolov9-t \
  --train-models yolov9-c,yolov9-c-MMQARepNCSPELAN4,yolov9-c-MMQA-P4P5 \
  --loader-workers 8 16 --md benchmarks/results/gpu_speed.md "$@"
python benchmarks/bench_gpu.py --speed --models yolov9-c --train-models yolov9-c --runs 20 \
  --loader-workers 16 --md benchmarks/results/gpu_speed_compile.md "$@"
