#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that benchmarks/gpu_check.sh installs offline on the GPU machine
# (Python 3.12, x86_64; it has torch 2.11 CUDA, torch-geometric, numpy, pyyaml, pytest but not zarr, numcodecs,
# google-crc32c, obstore or their own dependencies), into gpu_wheels/ (ignored by git; about 9 MB).
#
#     bash benchmarks/gpu_wheels.sh            # or: make gpu-wheels
#
# Then it checks that the offline install gpu_check.sh does would resolve from that folder alone.
# numpy is not downloaded: the GPU machine's own numpy (2.5) satisfies zarr and numcodecs, and a second one would
# be installed over the one its torch was built against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${GPU_WHEELS:-gpu_wheels}
# The versions, pinned: the newest that pyproject.toml allows as of 2026-12 (zarr 3.4 needs Python >= 3.12).
PINS=(zarr==3.4.2 numcodecs==0.17.1 google-crc32c==1.9.0 obstore==0.12.1 donfig==0.8.1.post1 msgspec==0.23.0
      typing-extensions==4.16.0 packaging==26.4 pyyaml==6.0.4 setuptools==84.2.1)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform any)
mkdir -p "$DEST"
# --no-deps with every dependency named: exactly one version of each, and none of what the machine has
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$DEST" "${PINS[@]}"
ls -l "$DEST"
du -sh "$DEST"
# The install step of gpu_check.sh, resolved by a Python 3.12 from the folder alone plus the GPU machine's numpy
# (2.5.2, fetched beside it only for this check, never carried). PIP_CONFIG_FILE=/dev/null: no configured index
# or find-links may help it.
PY312=${PY312:-python3.12}
if ! "$PY312" -c pass 2>/dev/null; then
    PY312=$(ls "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)
fi
[ -n "$PY312" ] || { echo "gpu_wheels.sh: no Python 3.12 here to check the install with; set PY312=..."; exit 1; }
NUMPY=/tmp/gpu-wheels-numpy
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$NUMPY" numpy==2.5.2
PIP_CONFIG_FILE=/dev/null "$PY312" -m pip install --dry-run --ignore-installed --no-index --find-links "$DEST" \
    --find-links "$NUMPY" --only-binary=:all: --target /tmp/gpu-wheels-dry-run zarr numcodecs google-crc32c obstore \
    || { echo "gpu_wheels.sh: the offline install would not resolve from $DEST"; exit 1; }
