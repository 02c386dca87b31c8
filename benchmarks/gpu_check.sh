#!/usr/bin/env bash
# The GPU check of issue 14, in one command for the GPU machine (under 8 minutes on an H200):
#
#     bash benchmarks/gpu_check.sh [gpu_check.py options]      # e.g. --parts h2d,step
#
# That machine has Python 3.12 with its own CUDA build of torch (2.11), torch-geometric, numpy and pytest, and no
# package index. This script
#   1. installs what it lacks (zarr, numcodecs, google-crc32c, obstore and their own dependencies) offline from
#      gpu_wheels/ (made here by benchmarks/gpu_wheels.sh; ignored by git, so the device call carries it:
#      carry=["gpu_wheels"]), leaving torch and numpy as they are;
#   2. installs this project with --no-deps (and puts src/ first on PYTHONPATH, so the tree is what runs);
#   3. runs benchmarks/gpu_check.py, which prints the table and writes benchmarks/results/gpu.md;
#   4. copies the table and the log to $OUT when that is set (the device tool brings $OUT back).
# Here, without CUDA: `python benchmarks/gpu_check.py --cpu-dry-run` checks every part at tiny shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu_wheels}
LIMIT_S=${GPU_CHECK_LIMIT_S:-470}
export PYTHONUNBUFFERED=1
LOG=$(mktemp /tmp/gpu_check.XXXXXX.log)
notes=()
say() { echo "gpu_check.sh: $*" | tee -a "$LOG"; }

missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(p for m, p in [("zarr", "zarr"), ("numcodecs", "numcodecs"), ("google_crc32c", "google-crc32c"),
                              ("obstore", "obstore")] if importlib.util.find_spec(m) is None))
EOF
)
torch_before=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none)
if [ "$torch_before" = none ]; then
    say "$PY has no torch: run this with the Python that holds the machine's CUDA build of torch (PYTHON=...)"
    exit 2
fi
if [ -n "$missing" ]; then
    if [ ! -d "$WHEELS" ]; then
        say "missing $missing and no $WHEELS/ folder: run 'bash benchmarks/gpu_wheels.sh' on a machine with PyPI and carry $WHEELS"
        exit 2
    fi
    say "installing $missing from $WHEELS/ (offline)"
    # PIP_CONFIG_FILE=/dev/null: no configured index or constraint; what is installed and satisfies a dependency
    # (numpy, torch) stays
    if PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing 2>&1 | tee -a "$LOG"; then
        notes+=("Installed offline from $WHEELS/: $missing (and the dependencies they lacked).")
    else
        say "the offline install of $missing failed (see above)"
        exit 2
    fi
else
    notes+=("zarr, numcodecs, google-crc32c and obstore were already installed.")
fi
if PIP_CONFIG_FILE=/dev/null "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps . 2>&1 | tee -a "$LOG"; then
    notes+=("The project installed with pip install --no-deps . (setuptools from $WHEELS/).")
else
    notes+=("pip install --no-deps . FAILED (see the log); ran from src/ on PYTHONPATH.")
fi
torch_after=$("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo none)
say "torch before: $torch_before; after: $torch_after"
case "$torch_after" in "$torch_before"*) ;; *) notes+=("WARNING: torch changed from $torch_before to $torch_after");; esac

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
args=()
for n in "${notes[@]}"; do args+=(--note "$n"); done
timeout --signal=INT --kill-after=15 "$LIMIT_S" "$PY" benchmarks/gpu_check.py "${args[@]}" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || say "gpu_check.py exited $rc (124: past ${LIMIT_S} s; the table holds the parts that finished)"
if [ -n "${OUT:-}" ]; then
    cp -f benchmarks/results/gpu.md "$OUT/" 2>/dev/null || true
    cp -f "$LOG" "$OUT/gpu_check.log"
fi
exit "$rc"
