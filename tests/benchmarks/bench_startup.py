"""Interpreter start-up cost of the shim in a process that never imports ms-swift.

Every Python process of an environment with the wheel installed runs ``vkd_shim.pth`` at start-up, and
every process launched by ``vkd-run`` runs its bootstrap ``sitecustomize``; with ``VKD_ENABLE=1``
exported in a shell, all of them boot the shim. Measured in the leanest setting, where any cost shows
most: bare virtual environments (no other ``.pth`` files) with vkd_shim installed from its wheel, or
non-editable into a ``--target`` directory for the sitecustomize variants, byte-compiled. Compared
against a trivial one-line ``sitecustomize`` (the floor of the mechanism), with the variants interleaved
run by run so machine noise hits all of them alike. Reported as the median of per-round ratios with a
bootstrap confidence interval. Writes a section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

MARK_BEGIN = "<!-- startup:begin -->"
MARK_END = "<!-- startup:end -->"


def time_start(python: str, env: dict, *flags: str) -> float:
    start = time.perf_counter()
    subprocess.run([python, *flags, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def bootstrap_ci(ratios: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    opts = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        # Wheel in a venv of its own: its vkd_shim.pth runs at every start, as after `pip install vkd-shim`.
        wheel_dir = root / "dist"
        build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir]
        subprocess.run([*build, str(REPO)], check=True, capture_output=True)
        venv.create(root / "wheel_venv", with_pip=False)
        wheel_python = str(root / "wheel_venv" / "bin" / "python")
        install = [sys.executable, "-m", "pip", "--python", wheel_python, "install", "-q", "--no-deps"]
        subprocess.run([*install, *map(str, wheel_dir.glob("*.whl"))], check=True, capture_output=True)
        # The sitecustomize variants: a venv without the wheel, the package in a --target dir.
        venv.create(root / "venv", with_pip=False)
        python = str(root / "venv" / "bin" / "python")
        site = root / "site"
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(REPO)]
        subprocess.run(pip, check=True, capture_output=True)
        trivial, control, example = root / "trivial", root / "control", root / "example"
        for directory in (trivial, control):  # the control is the floor again: what the method can resolve
            directory.mkdir()
            (directory / "sitecustomize.py").write_text("import os\n")
        shutil.copytree(REPO / "sitecustomize_example", example)
        bootstrap = site / "vkd_shim" / "bootstrap"
        on = {"VKD_ENABLE": "1"}
        variants = {
            "trivial sitecustomize (floor)": (python, trivial, {}),
            "A/A control: the same trivial sitecustomize, another copy": (python, control, {}),
            "wheel's vkd_shim.pth, switch unset": (wheel_python, None, {}),
            "wheel's vkd_shim.pth, VKD_ENABLE=1": (wheel_python, None, on),
            "vkd-run bootstrap (chains to the user's), switch unset": (python, bootstrap, {}),
            "vkd-run bootstrap, VKD_ENABLE=1": (python, bootstrap, on),
            "two-line sitecustomize_example, switch unset": (python, example, {}),
        }
        # Byte-compile everything, as a wheel install does (PYTHONDONTWRITEBYTECODE may be set).
        subprocess.run([python, "-m", "compileall", "-q", str(root)], check=True)
        runs = {
            name: (exe, {**env, **extra, **({"PYTHONPATH": f"{path}{os.pathsep}{site}"} if path else {})})
            for name, (exe, path, extra) in variants.items()
        }
        bare = []
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(10):  # warm the page cache and .pyc files
            for exe, run_env in runs.values():
                time_start(exe, run_env)
        order = list(variants)
        for i in range(opts.rounds):
            random.Random(i).shuffle(order)
            for name in order:
                times[name].append(time_start(*runs[name]))
            bare.append(time_start(python, env, "-S"))

    floor = times["trivial sitecustomize (floor)"]
    rows = []
    for name, values in times.items():
        ratios = [v / f for v, f in zip(values, floor, strict=True)]
        low, high = bootstrap_ci(ratios)
        extra = (statistics.median(values) - statistics.median(floor)) * 1e3
        rows.append(
            f"| {name} | {statistics.median(values) * 1e3:.2f} | {extra:+.2f} | {statistics.median(ratios):.3f} "
            f"| [{low:.3f}, {high:.3f}] |"
        )
    section = "\n".join(
        [
            MARK_BEGIN,
            "## Start-up cost of the shim in processes that do not train",
            "",
            f"Command: `python tests/benchmarks/bench_startup.py --rounds {opts.rounds}` (`make bench`).",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            "`python -c pass` (a process that never imports ms-swift) in bare venvs with vkd_shim installed "
            "from its wheel (the `.pth` rows) or non-editable into a `--target` directory on PYTHONPATH (the "
            "sitecustomize rows); variants interleaved in random order each round.",
            "",
            "| variant | median (ms) | vs floor (ms) | median ratio to floor | 95 % CI (bootstrap) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"For scale: `python -S -c pass` (no `site` at all) took {statistics.median(bare) * 1e3:.2f} ms.",
            "The A/A control row is the floor measured again as if it were a variant: its distance from 1.000 and"
            " its interval are what this method can resolve on this machine.",
            "Goals: ratio ≤ 1.03 against the trivial one-line sitecustomize with the switch unset; with"
            " `VKD_ENABLE=1` exported, only the stdlib-only bootstrap and a finder waiting for `import swift`"
            " (wrapt, the layouts and `importlib.metadata` load when ms-swift does).",
            MARK_END,
        ]
    )
    print(section)
    write_section(Path(opts.out), section)
    return 0


def write_section(
    path: Path, section: str, *, begin: str = MARK_BEGIN, end: str = MARK_END, title: str = "# Benchmarks"
) -> None:
    """Replace the text between ``begin`` and ``end`` in a generated doc (or append it), so each
    script rewrites only its own section and hand-written text around it stays."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else title + "\n"
    if begin in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def run_blocks(path: Path, begin: str, end: str, run_mark: str) -> dict[str, str]:
    """The per-run blocks of a generated section, by key (each stands behind ``run_mark``): a script that
    measures one device or model replaces its own block and keeps the others'."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if begin not in text:
        return {}
    body = text.partition(begin)[2].partition(end)[0]
    parts = re.split(re.escape(run_mark).replace(r"\{key\}", r"(\S+)"), body)
    return {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts) - 1, 2)}


def assemble(header: list[str], blocks: dict[str, str], run_mark: str, end: str) -> str:
    """A section made of its header and one marked block per run, in key order."""
    body = []
    for name in sorted(blocks):
        body += [run_mark.format(key=name), blocks[name], ""]
    return "\n".join([*header, *body, end])


if __name__ == "__main__":
    sys.exit(main())
