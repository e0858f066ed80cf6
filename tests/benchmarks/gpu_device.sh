#!/usr/bin/env bash
# The one command the lent GPU machine runs, so that a machine start (minutes of a 15-minute budget) is never
# spent on a missing package or a path typo: the device tool's `run` with carry [".whl"] and timeout_s 590,
#
#   tests/benchmarks/gpu_device.sh
#
# 1. installs the carried wheelhouse (.whl, made here by `make gpu-wheelhouse`) on top of the image's python3
#    with tests/benchmarks/gpu_install.sh (offline, about 15 s);
# 2. runs tests/benchmarks/gpu_suite.sh --device cuda (bench_step on the 4B preset, then the real `swift rlhf`
#    GPU variants; at most 300 s + 240 s by the suite's own limits, about 6 minutes expected) with PIP_NO_INDEX=1,
#    so that a variant's optional install fails at once instead of waiting on a network that is not there;
# 3. copies what the reader needs into OUT (default $OUT): the device tool brings back at most 8 files, two
#    folders down, so the suite writes into a scratch folder and only SUMMARY.md, BENCHMARKS.md, step.json,
#    RUNS.md, runs.json, env.txt and logs.tar.gz (every log and logging.jsonl) come back.
#
# `--python BASE --device cpu` runs the same steps on CPU: tests/benchmarks/gpu_image_dry.sh does so on an
# image-like Python 3.12 venv, which is how this command is proven before any device time is spent.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BASE=python3
DEVICE=cuda
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --python) BASE=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "gpu_device.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT_DIR=$1; shift ;;
    esac
done
[ -n "$OUT_DIR" ] || { echo "gpu_device.sh: name the output folder (or set OUT, as the device tool does)" >&2; exit 2; }
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

SCRATCH=$(mktemp -d)
ENV_DIR=$SCRATCH/env
SUITE=$SCRATCH/suite
mkdir -p "$SUITE"
keep() {  # whatever happened, bring back the summary and every log
    local name
    for name in SUMMARY.md BENCHMARKS.md step.json RUNS.md runs.json env.txt; do
        [ -f "$SUITE/$name" ] && cp "$SUITE/$name" "$OUT_DIR/"
    done
    # Text only (logs, logging.jsonl, events, configs): the runs' models and checkpoints would pass 16 MiB.
    (cd "$SCRATCH" && find install.log suite -path suite/work -prune -o -type f -size -4M \( -name '*.log' \
        -o -name '*.jsonl' -o -name '*.json' -o -name '*.md' -o -name '*.txt' \) -print0 |
        tar --null -T - -czf "$OUT_DIR/logs.tar.gz") || true
    rm -rf "$SCRATCH"
}
trap keep EXIT

rc=0
"$HERE/gpu_install.sh" --python "$BASE" "$ENV_DIR" > "$SCRATCH/install.log" 2>&1 || rc=$?
if [ $rc -ne 0 ]; then
    tail -n 25 "$SCRATCH/install.log" >&2
    echo "gpu_device.sh: the wheelhouse did not install (exit $rc); nothing was run" >&2
    exit $rc
fi
PYTHON=$ENV_DIR/bin/python PIP_NO_INDEX=1 "$HERE/gpu_suite.sh" --device "$DEVICE" "$SUITE" || rc=$?
echo "gpu_device.sh: gpu_suite.sh --device $DEVICE exited $rc"
exit $rc
