#!/usr/bin/env bash
# Proves the floors in requirements.txt: a fresh virtual environment (no system site packages, so the
# machine's own torch never leaks in) gets every direct requirement at the LOWEST version its floor allows
# (uv's --resolution lowest-direct; wheels only, so a floor without a wheel for this Python fails here
# rather than building from source on a user's machine), then an API probe and a quick subset of the suite
# run inside it. Transitive dependencies resolve to their newest allowed versions, as pip would give a user.
#   bash benchmarks/floor_venv.sh [--venv DIR] [--keep] [--probe-only]
# --venv: where to build it (default /work/venvs/floor, else $TMPDIR); --keep: leave the venv and the download
# cache (several GB: torch's CUDA wheels from the package index); --probe-only: skip the test subset.
# The outcome is recorded in docs/requirements.md.
set -u
cd "$(dirname "$0")/.."
VENV=""
KEEP=0
PROBE_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --probe-only) PROBE_ONLY=1; shift ;;
    *) echo "floor_venv.sh: unknown argument $1 (use --venv DIR, --keep, --probe-only)"; exit 2 ;;
  esac
done
if [ -z "$VENV" ]; then
  if [ -d /work/venvs ]; then VENV=/work/venvs/floor; else VENV="${TMPDIR:-/tmp}/yolo_floor_venv"; fi
fi
PY=${PYTHON:-python3}
CACHE="$VENV.cache"
REQS="$VENV.requirements.txt"
cleanup() {
  if [ "$KEEP" -eq 0 ]; then rm -rf "$VENV" "$CACHE" "$REQS"; fi
}
trap cleanup EXIT

echo "== floor venv in $VENV ($("$PY" --version 2>&1)); free disk: $(df -h --output=avail "$(dirname "$VENV")" | tail -1)"
"$PY" -m venv --clear "$VENV" || exit 1
VPY="$VENV/bin/python"
# uv only resolves and installs; it lives in the floor venv and leaves with it
PIP_CONSTRAINT="" "$VPY" -m pip install -q uv || exit 1
# the runtime requirements plus the test runner and the export extras the subset uses, each at its floor
{ echo "-r $(pwd)/requirements.txt"; grep -E '^(pytest|onnx|onnxruntime)[><=~ ]' requirements-test.txt; } > "$REQS"
t0=$(date +%s)
UV_CACHE_DIR="$CACHE" "$VPY" -m uv pip install --python "$VPY" --resolution lowest-direct --only-binary :all: \
  -r "$REQS" || { echo "FAIL  the floors do not install (see above)"; exit 1; }
echo "== installed in $(( $(date +%s) - t0 )) s; the direct requirements at their floors:"
# each direct requirement must land on its declared floor: a floor with no wheel for this Python, or one that
# cannot install together with the others, makes the resolver pick a higher version, and the file would lie
"$VPY" - "$REQS" <<'EOF' || { echo "FAIL  a direct requirement did not install at its floor"; exit 1; }
import re
import sys
from importlib.metadata import version
from pathlib import Path

lines = []
for ln in Path(sys.argv[1]).read_text().splitlines():
    lines += Path(ln[3:]).read_text().splitlines() if ln.startswith("-r ") else [ln]
bad = 0
for ln in lines:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", ln.split("#")[0].strip())
    if not m:
        continue
    name, floor = m.groups()
    got = version(name)
    nums = [int(x) for x in re.findall(r"\d+", got.split("+")[0])]
    ok = nums[:len(floor.split("."))] == [int(x) for x in floor.split(".")]  # 4.6 -> 4.6.0.66 is the floor's series
    bad += not ok
    print(f"  {name:24s} floor {floor:8s} installed {got:28s}{'' if ok else ' <- NOT THE FLOOR'}")
sys.exit(1 if bad else 0)
EOF

# the APIs that set the torch floor, called the way the code calls them
"$VPY" - <<'EOF' || { echo "FAIL  API probe"; exit 1; }
import inspect
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import batched_nms, box_iou

print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
assert torch.is_autocast_enabled("cpu") is False  # device argument: torch 2.4
torch.amp.GradScaler("cuda", enabled=False)  # torch.amp.GradScaler: torch 2.3
assert issubclass(torch.OutOfMemoryError, RuntimeError)  # torch.OutOfMemoryError: torch 2.5
assert "dynamo" in inspect.signature(torch.onnx.export).parameters  # export(..., dynamo=False): torch 2.5
q = torch.rand(1, 1, 6, 8)
F.scaled_dot_product_attention(q, q[:, :, :3], q[:, :, :3], scale=0.5)  # scale=: torch 2.1
torch._foreach_lerp_([torch.zeros(2)], [torch.ones(2)], 0.5)
assert issubclass(torch.distributed.DistError, RuntimeError)
print("API probe: OK")
EOF
[ "$PROBE_ONLY" -eq 1 ] && { echo "PASS  floors install and the API probe passes (tests skipped: --probe-only)"; exit 0; }

# a quick subset that runs every floor-setting API: attention (SDPA), loss, the CUDA paths on CPU stand-ins
# (GradScaler, OutOfMemoryError, compile fallback), ONNX/TorchScript export, a tiny training run and validation
# and the other floors: plots (matplotlib, seaborn, pandas), the tracker's assignment (scipy), the --evolve study
# (optuna) and TensorBoard event files next to results.csv (tensorboard)
SUBSET="tests/test_attention.py tests/test_loss.py tests/test_cuda_paths.py tests/test_export.py tests/test_nms.py
        tests/test_metrics.py tests/test_validator.py tests/test_data_labels.py tests/test_data_plots.py
        tests/test_track.py::test_assign_matches_brute_force tests/test_evolve.py::test_outputs_pick_the_best_finished_trial
        tests/test_train.py::test_tensorboard_events_match_results_csv"
# left out: the 'meta' device that stands in for a second GPU cannot run convolutions in torch 2.5's TorchScript
# interpreter (convolution_overrideable); the stand-in needs a newer torch, the product does not
DESELECT="tests/test_cuda_paths.py::test_torchscript_export_has_no_device_constants_and_runs_on_another_device"
t0=$(date +%s)
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 PYTHONPATH="$(pwd)" timeout 1800 "$VPY" -m pytest -q -p no:cacheprovider $SUBSET --deselect "$DESELECT" \
  2>&1 | tail -15
rc=${PIPESTATUS[0]}
echo "== subset ran in $(( $(date +%s) - t0 )) s"
if [ "$rc" -eq 0 ]; then echo "PASS  the floors install, the API probe passes and the subset passes"; else echo "FAIL  subset (rc $rc)"; fi
exit "$rc"
