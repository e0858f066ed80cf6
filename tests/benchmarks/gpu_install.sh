#!/usr/bin/env bash
# Install the carried wheelhouse on top of an interpreter that cannot reach a package index: the lent GPU
# machine's image (Python 3.12, torch, transformers, ..., no ms-swift), or its CPU stand-in for the dry run
# (tests/benchmarks/gpu_image_dry.sh). Both go through this one script, so the dry run proves what the machine runs.
#
#   tests/benchmarks/gpu_install.sh [--python BASE] [--wheels DIR] ENV_DIR
#
# BASE (default: python3) is left untouched. ENV_DIR is created afresh as a virtual environment of BASE's
# interpreter that also reads BASE's site-packages (a `_vkd_image.pth` there calls site.addsitedir, which works
# when BASE is itself a venv, where `venv --system-site-packages` would reach the interpreter below it instead),
# and the wheels of DIR (default: .whl at the repository root, filled by gpu_wheelhouse.sh) go into ENV_DIR with
# `pip install --no-index --no-deps`: a carried wheel takes precedence over BASE's copy of the same package.
# Console scripts (swift, vkd-run) land in ENV_DIR/bin next to ENV_DIR/bin/python, where gpu_runs.py and
# vkd_shim.testing.launch look for them, and the shim's vkd_shim.pth is processed as in a normal install.
# Prints the versions that ENV_DIR/bin/python imports and from where; exits non-zero when one does not import.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BASE=python3
WHEELS=$REPO/.whl
ENV_DIR=
while [ $# -gt 0 ]; do
    case "$1" in
        --python) BASE=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "gpu_install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) ENV_DIR=$1; shift ;;
    esac
done
die() { echo "gpu_install.sh: $*" >&2; exit 1; }
[ -n "$ENV_DIR" ] || die "name the environment to create, e.g. gpu_install.sh /tmp/vkd-gpu (see --help)"
command -v "$BASE" > /dev/null || die "no interpreter '$BASE' (pass --python)"
compgen -G "$WHEELS/*.whl" > /dev/null || die "no wheels in $WHEELS: run tests/benchmarks/gpu_wheelhouse.sh here, and carry it"

rm -rf "$ENV_DIR"
"$BASE" -m venv --without-pip "$ENV_DIR" || die "'$BASE -m venv' failed: BASE needs the venv module"
PY=$ENV_DIR/bin/python
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
# BASE's own site directories, in its order; addsitedir also runs the .pth files there (BASE's own hooks).
"$BASE" - > "$SITE/_vkd_image.pth" <<'EOF'
import site, sys, sysconfig
dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
seen = set()
for d in dirs:
    if d not in seen and d in sys.path:
        seen.add(d)
        print(f"import site; site.addsitedir({d!r})")
EOF
[ -s "$SITE/_vkd_image.pth" ] || die "found no site-packages of $BASE to read"
"$PY" -c 'import pip' 2> /dev/null || die "$BASE has no pip: cannot install the wheels"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    "$WHEELS"/*.whl || die "pip could not install the wheels of $WHEELS into $ENV_DIR"

# From /, so that a checkout in the working directory cannot stand in for the installed vkd_shim.
(cd / && "$PY" -) <<'EOF'
import importlib, sys
from importlib import metadata
failed = []
for dist, module in [("ms-swift", "swift"), ("vkd-shim", "vkd_shim"), ("trl", "trl"), ("transformers", "transformers"),
                     ("peft", "peft"), ("torch", "torch"), ("torchvision", "torchvision"), ("wrapt", "wrapt"),
                     ("datasets", "datasets"), ("qwen-vl-utils", "qwen_vl_utils")]:
    try:
        mod = importlib.import_module(module)
        print(f"{dist:14} {metadata.version(dist):16} {mod.__file__}")
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit non-zero
        failed.append(f"{dist}: {type(exc).__name__}: {exc}")
for line in failed:
    print("gpu_install.sh: does not import:", line, file=sys.stderr)
sys.exit(1 if failed else 0)
EOF
for script in swift vkd-run; do
    [ -x "$ENV_DIR/bin/$script" ] || die "no $script console script in $ENV_DIR/bin"
done
echo "gpu_install.sh: ready: $PY"
