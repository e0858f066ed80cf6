#!/usr/bin/env bash
# The GPU checks in one run (<= 10 min on one GPU), everything under one output folder.
#
#   tests/benchmarks/gpu_suite.sh [--device cuda|cpu] [OUT]      (OUT defaults to $OUT, then ./gpu-suite-out)
#
# --device cuda (default): bench_step.py on the Qwen3-VL-4B-shaped preset in bf16, 100 interleaved rounds of
#   off / off-again / shim / naive, host-device syncs per mode (torch.cuda.set_sync_debug_mode) and peak
#   memory per mode; then gpu_runs.py: real tiny `swift rlhf --rlhf_type gkd` runs in bf16 through vkd-run
#   with the shipped configs, plain and with --deepspeed zero3, --use_liger_kernel true, --padding_free true
#   and --offload_teacher_model true, each recorded as a finite vision-KD term or the exact error (a package
#   that is missing is pip-installed first; PIP_FIND_LINKS / PIP_NO_INDEX point pip at a wheelhouse offline).
# --device cpu: the dry run. The same scripts and code paths on the tiny preset, few rounds, fp32, no
#   installs; a few minutes on 2 CPU cores.
#
# Writes OUT/BENCHMARKS.md (the step section), OUT/step.json, OUT/RUNS.md, OUT/runs.json, OUT/env.txt,
# one log per part and OUT/SUMMARY.md. Exit status: non-zero when a part that must pass failed
# (bench_step, or the plain GKD run); the variants' failures are results, not suite failures.
set -u -o pipefail

DEVICE=cuda
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) OUT_DIR=$1; shift ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_suite.sh: --device must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT_DIR=${OUT_DIR:-$PWD/gpu-suite-out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "gpu_suite.sh: no interpreter at $PY (run 'make venv' or set PYTHON)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 MODELSCOPE_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$OUT_DIR/work
mkdir -p "$WORK"

if [ "$DEVICE" = cuda ]; then
    STEP_ARGS=(--device cuda --model 4b --steps 100 --warmup 5 --sync-steps 10)
    STEP_TIMEOUT=300
    RUN_ARGS=(--device cuda --timeout 90 --budget 225)
    RUNS_TIMEOUT=240
else
    STEP_ARGS=(--device cpu --model tiny --steps 2 --warmup 1 --memory-steps 1 --threads 1)
    STEP_TIMEOUT=300
    RUN_ARGS=(--device cpu --no-install --timeout 240 --budget 580)
    RUNS_TIMEOUT=600
fi

STARTED=$(date +%s)
: > "$OUT_DIR/status.txt"
part() {  # part NAME TIMEOUT COMMAND...: run with a time limit, log to OUT/NAME.log, record its status
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name: $*" | tee -a "$OUT_DIR/status.txt"
    timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc wall=$(( $(date +%s) - start ))s" | tee -a "$OUT_DIR/status.txt"
    return $rc
}

{
    echo "device: $DEVICE; started $(date -u +%FT%TZ); repo $REPO"
    "$PY" - <<'EOF'
import platform, torch
from importlib import metadata
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("ms-swift", "transformers", "trl", "peft", "accelerate", "deepspeed", "liger-kernel", "flash-attn"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT_DIR/env.txt" 2>&1

FAILED=0
part bench_step "$STEP_TIMEOUT" "$PY" "$HERE/bench_step.py" "${STEP_ARGS[@]}" \
    --work "$WORK/step" --out "$OUT_DIR/BENCHMARKS.md" --json "$OUT_DIR/step.json" || FAILED=1
part gkd_runs "$RUNS_TIMEOUT" "$PY" "$HERE/gpu_runs.py" "${RUN_ARGS[@]}" --out "$OUT_DIR" || FAILED=1

{
    echo "# GPU suite ($DEVICE), $(date -u +%FT%TZ), $(( $(date +%s) - STARTED )) s"
    echo
    echo '```'
    cat "$OUT_DIR/status.txt"
    echo '```'
    echo
    cat "$OUT_DIR/env.txt" | sed 's/^/    /'
    echo
    [ -f "$OUT_DIR/BENCHMARKS.md" ] && sed -n '/<!-- step:run /,/<!-- step:end -->/p' "$OUT_DIR/BENCHMARKS.md"
    echo
    [ -f "$OUT_DIR/RUNS.md" ] && cat "$OUT_DIR/RUNS.md"
} > "$OUT_DIR/SUMMARY.md"
cat "$OUT_DIR/SUMMARY.md"
exit $FAILED
