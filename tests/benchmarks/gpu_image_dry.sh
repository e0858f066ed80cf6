#!/usr/bin/env bash
# The GPU suite's dry run on the lent machine's software, here on CPU: proves that the carried wheelhouse (.whl,
# requirements/gpu-image.txt) completes the machine's image into a working ms-swift 4.6 + vkd_shim install before
# any device time is spent, since a missing or clashing package there costs a whole machine start.
#
#   tests/benchmarks/gpu_image_dry.sh [OUT]        (OUT defaults to .work/gpu-image-dry)
#
# 1. builds (once; again when requirements/gpu-image-base.txt changes) GPU_IMAGE_VENV, default .venv-gpu-image: a
#    Python 3.12 venv holding the image's versions (torch 2.11, transformers 5.17, ...) and nothing the image lacks.
#    Python 3.12 comes from PYTHON312, else `python3.12` on PATH (with pyenv: PYTHON312=$(pyenv root)/versions/3.12.X/
#    bin/python3.12). The first build downloads torch's CUDA build (about 4.7 GB on disk).
# 2. fills .whl with tests/benchmarks/gpu_wheelhouse.sh when it holds no wheels (`make gpu-wheelhouse` refreshes it).
# 3. runs tests/benchmarks/gpu_device.sh, the GPU machine's own command, with that venv as the image's python3 and
#    --device cpu: it installs .whl on top with gpu_install.sh into a fresh environment, runs gpu_suite.sh
#    --device cpu, and leaves in OUT the files the device tool would bring back; its exit status is ours.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
OUT_DIR=${1:-$REPO/.work/gpu-image-dry}
BASE_REQS=$REPO/requirements/gpu-image-base.txt
BASE_VENV=${GPU_IMAGE_VENV:-$REPO/.venv-gpu-image}
WHEELS=$REPO/.whl
die() { echo "gpu_image_dry.sh: $*" >&2; exit 1; }

find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" python3.12; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

STAMP=$BASE_VENV/.vkd-gpu-image
if [ ! -f "$STAMP" ] || [ "$BASE_REQS" -nt "$STAMP" ]; then
    PY312=$(find_python312) || die "no working Python 3.12: set PYTHON312 to one (with pyenv: PYTHON312=\$(pyenv root)/versions/3.12.X/bin/python3.12)"
    echo "gpu_image_dry.sh: building the image-like venv $BASE_VENV from $BASE_REQS with $PY312"
    rm -rf "$BASE_VENV"
    "$PY312" -m venv "$BASE_VENV" || die "$PY312 -m venv $BASE_VENV failed"
    LOG=$BASE_VENV/pip.log
    # Step 1, torch and torchvision with their dependencies (all in the image); step 2, the rest without any.
    STEP1=$(sed -e '/^# --- the rest/,$d' -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$BASE_REQS")
    sed -n '/^# --- the rest/,$p' "$BASE_REQS" > "$BASE_VENV/rest.txt"
    # shellcheck disable=SC2086 # one pin per word
    "$BASE_VENV/bin/python" -m pip install -q $STEP1 > "$LOG" 2>&1 \
        && "$BASE_VENV/bin/python" -m pip install -q --no-deps -r "$BASE_VENV/rest.txt" >> "$LOG" 2>&1 \
        || { grep -v '^WARNING: Location' "$LOG" | tail -n 25 >&2; die "pip install into $BASE_VENV failed; the whole log is $LOG"; }
    touch "$STAMP"
fi
"$BASE_VENV/bin/python" -c 'import sys, torch, transformers; print("gpu_image_dry.sh: image-like venv: python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)'

if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$HERE/gpu_wheelhouse.sh" "$WHEELS"
fi

STARTED=$(date +%s)
rc=0
"$HERE/gpu_device.sh" --python "$BASE_VENV/bin/python" --device cpu "$OUT_DIR" || rc=$?
echo "gpu_image_dry.sh: gpu_device.sh --device cpu exited $rc after $(( $(date +%s) - STARTED )) s; results in $OUT_DIR"
exit $rc
