"""``vkd-shim doctor [-- swift rlhf ARGS...]``: what a run would do, without loading a model.

Given the user's launch, it runs every check that needs no weights through the same code the run
uses: ms-swift's own argument parsing (and YAML expansion), the inline ``custom.visual_kd`` block, the
config precedence of :func:`vkd_shim.config.resolve`, and :func:`vkd_shim.preflight.check` on the parsed
arguments and both ``config.json`` files. Its exit code is the run's verdict: 0 when the run would
train with vision KD (or, by decision, without it), 1 when the run would stop. Read-only: it patches
nothing and starts no training. Heavy modules are imported inside the command only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from importlib import metadata
from typing import Any

DISTRIBUTIONS = ("ms-swift", "torch", "transformers", "trl", "peft", "deepspeed", "msgspec", "wrapt", "structlog")


class _Report:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, title: str) -> None:
        print(f"[{title}]")

    def line(self, text: str) -> None:
        print(f"  {text}")

    def problem(self, text: str) -> None:
        print(f"  PROBLEM: {text}")
        self.problems.append(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-shim", description="vkd_shim tools")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="check what a launch would do (config, models, patch points); start nothing")
    doc.add_argument("launch", nargs=argparse.REMAINDER, help="-- swift rlhf ARGS... (the launch to check)")
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    launch = opts.launch[1:] if opts.launch[:1] == ["--"] else opts.launch
    return doctor(launch)


def doctor(launch: list[str]) -> int:
    from vkd_shim import bootstrap, env
    from vkd_shim.errors import ConfigError

    # Read-only: when this process itself booted with the gate on, looking the patch points up must not
    # patch ms-swift (nor print event lines into the report).
    bootstrap.deactivate()
    report = _Report()
    report.section("activation")
    try:
        on = env.gate()
        report.line(f"{env.ENABLE}={os.environ.get(env.ENABLE, '')!r} ({'on' if on else 'off'})")
    except ConfigError as exc:
        on = True
        report.problem(str(exc))
    child = _child_activation()
    report.line(f"a child Python process started with this environment activates: {child}")
    if on and child != "yes":
        report.problem("VKD_ENABLE is on but a child process would not activate (launch under vkd-run)")
    for problem in env.deepspeed_env_problems(os.environ):
        report.problem(problem)
    _log_file(report, env)

    report.section("versions")
    from vkd_shim import swift_layouts

    for name in DISTRIBUTIONS:
        report.line(f"{name}: {_version(name)}")
    version = swift_layouts.installed_version()
    layout = swift_layouts.for_version(version)
    report.line(
        f"ms-swift layout: {layout.series}.x (tested with {layout.stack}): {swift_layouts.layout_reason(version)}"
    )
    guard = swift_layouts.version_problem()
    if guard:
        report.problem(guard)
    _patch_points(report, layout)

    report.section("launch" if launch else "config")
    _launch(report, launch, layout, on)

    report.section("result")
    print("  OK" if not report.problems else f"  {len(report.problems)} problem(s): the run would stop")
    return 1 if report.problems else 0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _log_file(report: _Report, env: Any) -> None:
    path = os.environ.get(env.LOG_FILE)
    if not path:
        report.line(f"{env.LOG_FILE} unset: events go to stderr")
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
        report.line(f"{env.LOG_FILE}={path} (writable)")
    except OSError as exc:
        report.problem(f"{env.LOG_FILE}={path} cannot be written ({exc.strerror}); events would go to stderr")


def _patch_points(report: _Report, layout: Any) -> None:
    """Import each patch point's module and resolve the attribute; patch nothing."""
    import importlib.util

    import wrapt

    from vkd_shim import swift_layouts

    for role, (module_name, qualname) in layout.points.items():
        name = f"{module_name}:{qualname}"
        needs = swift_layouts.OPTIONAL_ROLES.get(role)
        if needs and importlib.util.find_spec(needs) is None:
            # ms-swift 3.12's swift.megatron clones Megatron-LM from the network on import.
            report.line(f"[optional] {name}: needs {needs} (not installed)")
            continue
        try:
            wrapt.resolve_path(importlib.import_module(module_name), qualname)
        except Exception as exc:
            if needs:
                report.line(f"[optional] {name}: {exc!r}")
            else:
                report.problem(f"patch point {name} does not resolve: {exc!r}")
            continue
        report.line(f"[ok] {name}")


def _launch(report: _Report, launch: list[str], layout: Any, on: bool) -> None:
    from vkd_shim import config, patches, preflight
    from vkd_shim.errors import ConfigError, VisionKDError

    inline = source = args = None
    if launch:
        if len(launch) < 2 or os.path.basename(launch[0]) != "swift" or launch[1] != "rlhf":
            report.problem(f"the launch to check must be `swift rlhf ...`, got {' '.join(launch[:2])!r}")
            return
        argv = launch[2:]
        source = layout.config_source(argv)
        cli_module, cli_function = layout.points["cli_yaml"]
        try:
            getattr(importlib.import_module(cli_module), cli_function)(argv)  # ms-swift's own YAML expansion
            inline = patches.extract_inline(argv, source=source)
        except (VisionKDError, OSError, ValueError) as exc:
            report.problem(str(exc))
            return
        args = _parse_swift_args(report, layout, argv)
    try:
        resolved = config.resolve(inline=inline, inline_source=source) if launch else config.resolve()
    except ConfigError as exc:
        report.problem(str(exc))
        return
    report.line(f"files: {list(resolved.files) or 'none'}; inline block: {source if inline is not None else 'none'}")
    for name, value in resolved.config.to_dict().items():
        report.line(f"{name}: {value!r}  <- {resolved.sources[name]}")
    for note in resolved.notes:
        report.line(f"note: {note}")
    if on and not resolved.config.active:
        report.line("DECISION: VKD_ENABLE is on but the config turns the term off: the run trains without vision KD")
    if args is None or not (on and resolved.config.active):
        return
    for name in ("rlhf_type", "tuner_type", "freeze_vit", "freeze_aligner", "teacher_model", "teacher_deepspeed"):
        report.line(f"{name}: {getattr(args, name, None)!r}")
    for refusal in preflight.check(args, resolved.config):
        report.problem(f"vision KD refused: {refusal.reason}. Fix: {refusal.fix}.")


def _parse_swift_args(report: _Report, layout: Any, argv: list[str]) -> Any:
    """ms-swift's RLHF arguments for ``argv``, parsed the way ``swift rlhf`` parses them."""
    from swift.utils import parse_args

    module_name, qualname = layout.points["pipeline_preflight"]
    pipeline = getattr(importlib.import_module(module_name), qualname.split(".")[0])
    try:
        args, remaining = parse_args(pipeline.args_class, list(argv))
    except (Exception, SystemExit) as exc:
        report.problem(f"ms-swift rejects the arguments: {exc!r}")
        return None
    if remaining:
        report.problem(f"ms-swift rejects the arguments: remaining_argv: {remaining}")
        return None
    return args


def _child_activation() -> str:
    """Start a real child interpreter with this environment and ask whether the shim booted in it."""
    probe = "import sys; b = sys.modules.get('vkd_shim.bootstrap'); print('yes' if b and b.is_active() else 'no')"
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or f"unknown (exit {out.returncode}: {out.stderr.strip()[-200:]})"
