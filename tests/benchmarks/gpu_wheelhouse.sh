#!/usr/bin/env bash
# Fill the wheelhouse that travels to the lent GPU machine. That machine starts bare from an image with Python 3.12,
# torch and transformers but no ms-swift, and reaches no package index: only the working tree goes there (64 MiB in
# all, a git-ignored folder named in the device tool's `carry` list included). Runs here, without a GPU.
#
#   tests/benchmarks/gpu_wheelhouse.sh [DIR]          (DIR defaults to .whl at the repository root)
#
# Downloads every pin of requirements/gpu-image.txt with --no-deps as a wheel for CPython 3.12 on x86-64 Linux,
# builds the pins marked `# sdist` (no wheel on PyPI) into pure-Python wheels, and builds the vkd_shim wheel from
# this checkout (what git would send: tracked and untracked-not-ignored files). DIR is replaced as a whole, so it
# never holds two versions of one package. Prints each wheel's size and the total, and fails when the wheels plus
# the rest of the travelling tree exceed LIMIT_MIB (default 60 of the 64 MiB). Needs network access and a Python
# with pip (PYTHON, default python3; its own version does not matter). On the machine, tests/benchmarks/gpu_install.sh
# installs DIR; tests/benchmarks/gpu_image_dry.sh proves the whole thing on CPU here first.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
REQS=$REPO/requirements/gpu-image.txt
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
DIR=${1:-$REPO/.whl}
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-60}
die() { echo "gpu_wheelhouse.sh: $*" >&2; exit 1; }
command -v "$PY" > /dev/null || die "no interpreter '$PY' (set PYTHON to a Python with pip)"
"$PY" -m pip --version > /dev/null 2>&1 || die "$PY has no pip (set PYTHON to a Python with pip)"
[ -f "$REQS" ] || die "missing $REQS"

mkdir -p "$(dirname "$DIR")"
DIR=$(cd "$(dirname "$DIR")" && pwd)/$(basename "$DIR")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
NEW=$TMP/wheels
mkdir -p "$NEW" "$TMP/src"
LOG=$TMP/pip.log
pip_or_die() {  # pip_or_die WHAT ARGS...: run pip quietly; on failure the end of its log and a clear message
    local what=$1
    shift
    "$PY" -m pip "$@" >> "$LOG" 2>&1 || { grep -v '^WARNING: Location' "$LOG" | tail -n 20 >&2; die "$what failed"; }
}

# Pins: `name==version` lines; a trailing `# sdist` marks one to build from source.
mapfile -t BINARY < <(sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' -e '/#[[:space:]]*sdist/d' -e 's/[[:space:]]*#.*//' "$REQS")
mapfile -t SDIST < <(sed -n -e '/^[[:space:]]*#/d' -e 's/[[:space:]]*#[[:space:]]*sdist.*//p' "$REQS")
for pin in "${BINARY[@]}" "${SDIST[@]}"; do
    [[ $pin =~ ^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+$ ]] || die "$REQS: '$pin' is not an exact name==version pin"
done

echo "gpu_wheelhouse.sh: downloading ${#BINARY[@]} wheels for CPython 3.12, x86-64 Linux"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
pip_or_die "downloading ${BINARY[*]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$NEW" "${BINARY[@]}"

for pin in "${SDIST[@]}"; do
    echo "gpu_wheelhouse.sh: building $pin from its sdist"
    pip_or_die "building a wheel of $pin" wheel -q --no-deps --no-binary "${pin%%==*}" -w "$TMP/built" "$pin"
done

echo "gpu_wheelhouse.sh: building the vkd_shim wheel from $REPO"
# A copy of what git would send, so a build here never touches the checkout's build/ or *.egg-info.
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$TMP/src"
pip_or_die "building the vkd_shim wheel" wheel -q --no-deps -w "$TMP/built" "$TMP/src"

if compgen -G "$TMP/built/*.whl" > /dev/null; then
    for wheel in "$TMP/built"/*.whl; do
        case "$wheel" in
            *-none-any.whl) mv "$wheel" "$NEW/" ;;
            *) die "$(basename "$wheel") is not a pure-Python wheel: build it with Python 3.12 on x86-64 instead" ;;
        esac
    done
fi

# One wheel per pin (and per distribution), then the sizes against the budget.
"$PY" - "$NEW" "$REPO" "$LIMIT_MIB" "${BINARY[@]}" "${SDIST[@]}" <<'EOF'
import os, re, subprocess, sys
from collections import Counter
from pathlib import Path

new, repo, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
norm = lambda name: re.sub(r"[-_.]+", "_", name).lower()
wheels = sorted(new.glob("*.whl"))
dists = Counter(norm(w.name.split("-")[0]) for w in wheels)
errors = [f"{name}: {count} wheels (keep one version)" for name, count in dists.items() if count > 1]
have = {(norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in wheels}
for pin in sys.argv[4:]:
    name, version = pin.split("==")
    if (norm(name), version) not in have:
        errors.append(f"{pin}: no wheel")
if "vkd_shim" not in dists:
    errors.append("vkd_shim: no wheel")
mib = 2**20
width = max(len(w.name) for w in wheels)
for w in sorted(wheels, key=lambda w: w.stat().st_size):
    print(f"  {w.name:<{width}}  {w.stat().st_size / mib:6.2f} MiB")
total = sum(w.stat().st_size for w in wheels)
listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
tree = sum((repo / p).stat().st_size for p in listed if p and (repo / p).is_file())
print(f"gpu_wheelhouse.sh: {len(wheels)} wheels, {total / mib:.2f} MiB; with the rest of the tree "
      f"({tree / mib:.2f} MiB) {(total + tree) / mib:.2f} MiB of the {limit:g} MiB allowed (the device takes 64)")
if (total + tree) / mib > limit:
    errors.append(f"over budget: {(total + tree) / mib:.2f} MiB > {limit:g} MiB; carry less (or raise LIMIT_MIB)")
for line in errors:
    print("gpu_wheelhouse.sh:", line, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF

rm -rf "$DIR"
mv "$NEW" "$DIR"
echo "gpu_wheelhouse.sh: wrote $DIR (carry it: the device tool's carry [\"$(basename "$DIR")\"])"
