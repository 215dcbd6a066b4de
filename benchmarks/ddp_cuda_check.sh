#!/usr/bin/env bash
# CUDA/nccl check of the distributed path, for a GPU session. Runs from the repo root:
#   bash benchmarks/ddp_cuda_check.sh [nproc]        (nproc defaults to the number of visible GPUs)
# 1) torchrun training with nccl and --sync-bn (torch SyncBatchNorm) on nproc GPUs, 2 epochs, tiny data;
# 2) val_dual.py under torchrun (sharded over nproc GPUs) against one plain process: metrics must match;
# 3) prints the per-epoch wall time. With one GPU (nproc 1) it still exercises nccl init, SyncBN conversion,
#    DDP and the gather code path (a world of one). Written without a GPU at hand: untested on CUDA so far.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
W=$(mktemp -d)
export PYTHONPATH=$PWD
python - "$W" <<'PY'
import sys, yaml
from pathlib import Path
from utils.data import generate_shapes
root = Path(sys.argv[1])
generate_shapes(root / "ds", n_train=64, n_val=32, seed=3)
(root / "d.yaml").write_text(yaml.safe_dump({"path": str(root / "ds"), "train": "images/train", "val": "images/val",
                                              "names": ["circle", "rectangle", "triangle", "star", "cross"]}))
PY
DEV=$(python -c "print(','.join(map(str, range($N))))")
t0=$(date +%s)
python -m torch.distributed.run --nproc-per-node "$N" --master-port 29531 train_dual.py --cfg gelan-t.yaml \
    --data "$W/d.yaml" --imgsz 160 --batch-size $((8 * N)) --epochs 2 --device "$DEV" --sync-bn --workers 2 \
    --project "$W/runs" --name ddp --noplots
echo "train: $(( $(date +%s) - t0 )) s for 2 epochs on $N GPU(s)"
test -f "$W/runs/ddp/weights/best.pt"
python tests/ddp_driver.py val "$W/single.json" --weights "$W/runs/ddp/weights/best.pt" --data "$W/d.yaml" \
    --imgsz 160 --batch-size 4 --device 0 --project "$W/val" --name single --exist-ok
python -m torch.distributed.run --nproc-per-node "$N" --master-port 29532 tests/ddp_driver.py val "$W/ddp.json" \
    --weights "$W/runs/ddp/weights/best.pt" --data "$W/d.yaml" --imgsz 160 --batch-size 4 --device "$DEV" \
    --project "$W/val" --name ddp --exist-ok
python - "$W" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("single", "ddp"))
bad = [k for k in ("mp", "mr", "map50", "map") if abs(a[k] - b[k]) > 1e-6] + (["seen"] if a["seen"] != b["seen"] else [])
print("single:", {k: a[k] for k in ("seen", "mp", "mr", "map50", "map")})
print("sharded:", {k: b[k] for k in ("seen", "mp", "mr", "map50", "map")})
print("sharded validation equals single process" if not bad else f"MISMATCH in {bad}")
sys.exit(1 if bad else 0)
PY
