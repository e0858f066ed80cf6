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
import contextlib
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

    def warning(self, text: str) -> None:
        """Something the user should know that does not stop the run (so not in the verdict)."""
        print(f"  WARNING: {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vkd-shim", description="vkd_shim tools")
    sub = parser.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="check what a launch would do (config, models, patch points); start nothing")
    doc.add_argument("launch", nargs=argparse.REMAINDER, help="-- swift rlhf ARGS... (the launch to check)")
    sub.add_parser(
        "configs",
        help="print the shipped Stage-3 recipe (base config and overlay) as a VKD_CONFIG value",
        description='export VKD_CONFIG="$(vkd-shim configs)" uses the configs the package ships (copy them to tune).',
    )
    opts = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if opts.command == "configs":
        from vkd_shim import examples

        print(examples.stage3_value())
        return 0
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
        state = "on" if on else "off: a launch from this shell, as written, trains WITHOUT vision KD"
        report.line(f"{env.ENABLE}={os.environ.get(env.ENABLE, '')!r} ({state})")
    except ConfigError as exc:
        on = True
        report.problem(str(exc))
    if not on:
        report.line("checked below as the vision-KD run it becomes under vkd-run (or with VKD_ENABLE=1)")
    # The switch alone: no bootstrap directory on PYTHONPATH, so only the installed vkd_shim.pth can boot it.
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != env.bootstrap_dir()]
    alone = _child_activation({**os.environ, env.ENABLE: "1", "PYTHONPATH": os.pathsep.join(path)})
    report.line(
        f"a child Python process started with VKD_ENABLE=1 alone (vkd_shim.pth start-up hook) activates: {alone}"
    )
    launched = _child_activation(env.launch_env(os.environ))
    report.line(f"a child Python process started by vkd-run activates: {launched}")
    if on:
        child = _child_activation(os.environ)
        report.line(f"a child Python process started with this environment activates: {child}")
        if child != "yes":
            report.problem(
                "VKD_ENABLE is on but a child process would not activate (no vkd_shim.pth in this interpreter's"
                " site-packages, as after an editable install): launch under vkd-run, or pip install the wheel"
            )
    elif launched != "yes":
        report.problem("a process started by vkd-run would not activate: reinstall vkd-shim")
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
    _launch(report, launch, layout)

    report.section("result")
    print("  OK" if not report.problems else f"  {len(report.problems)} problem(s): the run would stop")
    return 1 if report.problems else 0


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _log_file(report: _Report, env: Any) -> None:
    """Where the run's events would go, checked without writing there (the user's log stays untouched)."""
    from vkd_shim import telemetry

    path = os.environ.get(env.LOG_FILE)
    if not path:
        report.line(f"{env.LOG_FILE} unset: events go to stderr, mixed with ms-swift's output (set it to a file)")
        return
    writable, why = telemetry.probe_log_file(path)
    if writable:
        report.line(f"{env.LOG_FILE}={path} ({why}; nothing was written there)")
    elif writable is None:
        report.line(
            f"{env.LOG_FILE}={path}: {why}; if a write fails, the run writes its events to stderr instead, with a"
            " vkd.log_file_error warning"
        )
    else:
        report.warning(
            f"{env.LOG_FILE}={path} cannot be written ({why}): the run would write its events to stderr instead,"
            " with a vkd.log_file_error warning"
        )


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


def _launch(report: _Report, launch: list[str], layout: Any) -> None:
    """The launch as the vision-KD run would see it, whatever this shell's switch says: a user who asks
    the doctor is asking about vision KD."""
    from vkd_shim import config, patches, preflight, swift_layouts
    from vkd_shim import doctor_tree as tree
    from vkd_shim.errors import ConfigError, VisionKDError

    inline = source = args = None
    if launch:
        command = swift_layouts.command_of(launch)
        if os.path.basename(launch[0]) not in ("swift", "megatron") or command is None:
            report.problem(f"the launch to check must be an ms-swift command (`swift rlhf ...`), got {launch[0]!r}")
            return
        if command not in swift_layouts.TRAINING_COMMANDS:
            report.line(f"`{os.path.basename(launch[0])} {command}` does not train: the shim stays out of it")
            return
        if os.path.basename(launch[0]) == "megatron":
            report.problem("vision KD refused: Megatron-SWIFT is not supported yet. Fix: use `swift rlhf`.")
            return
        argv = launch[2:]
        source = layout.config_source(argv)
        cli_module, cli_function = layout.points[swift_layouts.CLI_YAML]
        try:
            getattr(importlib.import_module(cli_module), cli_function)(argv)  # ms-swift's own YAML expansion
            inline = patches.extract_inline(argv, source=source)
        except (VisionKDError, OSError, ValueError) as exc:
            report.problem(str(exc))
            return
        role = swift_layouts.PIPELINE_PREFLIGHT if command == "rlhf" else swift_layouts.TRAIN_PREFLIGHT
        args = _parse_swift_args(report, layout.points[role], argv)
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
    if not resolved.config.active:
        report.line("DECISION: the config turns the term off: the run trains without vision KD")
        return
    if resolved.config.monitor:
        report.line(
            "MONITOR: the run measures each target's distance and relative drift from the teacher"
            " (vision_kd/<target>, vision_kd/drift/<target>) and adds nothing to the loss"
        )
    elif resolved.config.share is not None:
        report.line(
            f"SHARE: the term is held at {resolved.config.share:.0%} of the GKD part of the loss by a scale recomputed"
            " every step from detached values (logged as vision_kd/scale); weight is not used"
        )
    if args is None:
        return
    for name in ("rlhf_type", "tuner_type", "freeze_vit", "freeze_aligner", "teacher_model", "teacher_deepspeed"):
        report.line(f"{name}: {getattr(args, name, None)!r}")
    report.line(f"engine: {_engine(args, preflight.fsdp_version(args))}")
    for refusal in preflight.check(args, resolved.config, layout):
        report.problem(f"vision KD refused: {refusal.reason}. Fix: {refusal.fix}.")
    tree.targets(report, args, resolved.config)
    for note in preflight.notes(args, resolved.config):
        report.line(f"note: {note}")
    chosen = preflight.chosen_by_name(args)
    if chosen and not resolved.config.monitor:
        tree.trainable_by_name(report, args, resolved.config, chosen)


def _engine(args: Any, fsdp_version: int | None) -> str:
    """Which data-parallel engine the parsed arguments select (what the ranks shard, and how)."""
    if fsdp_version is not None:
        options = getattr(args, "fsdp_config", None) or {}
        keys = ("reshard_after_forward", "activation_checkpointing", "state_dict_type")
        detail = ", ".join(f"{key}={options[key]}" for key in keys if key in options)
        return f"FSDP{fsdp_version} (fsdp={getattr(args, 'fsdp', None)!r}{'; ' + detail if detail else ''})"
    deepspeed = getattr(args, "deepspeed", None)
    if deepspeed:
        stage = deepspeed.get("zero_optimization", {}).get("stage") if isinstance(deepspeed, dict) else deepspeed
        return f"DeepSpeed ZeRO-{stage}"
    return "DDP under torchrun / NPROC_PER_NODE (on CPU with --use_cpu true), else a single process"


def _parse_swift_args(report: _Report, point: tuple[str, str], argv: list[str]) -> Any:
    """ms-swift's arguments for ``argv``, parsed by the pipeline class the run uses, leaving nothing behind.

    ms-swift's argument classes create ``<output_dir>/vN-<timestamp>/`` while parsing; the doctor removes
    every directory that parsing created, whatever form the arguments gave it in, so the next real run
    keeps its version number.
    """
    from swift.utils import parse_args

    module_name, qualname = point
    pipeline = getattr(importlib.import_module(module_name), qualname.split(".")[0])
    with _no_new_directories():
        try:
            args, remaining = parse_args(pipeline.args_class, list(argv))
        except (Exception, SystemExit) as exc:
            report.problem(f"ms-swift rejects the arguments: {exc!r}")
            return None
    if remaining:
        report.problem(f"ms-swift rejects the arguments: remaining_argv: {remaining}")
        return None
    return args


@contextlib.contextmanager
def _no_new_directories():
    """Remove, on the way out, every directory created inside the block that is still empty.

    Records ``os.mkdir`` itself (``os.makedirs`` and ``pathlib`` call it), so ``--output_dir X``,
    ``--output_dir=X``, an abbreviation, a YAML value or ms-swift's default all count alike.
    """
    created: list[str] = []
    mkdir = os.mkdir

    def recording_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        mkdir(path, *args, **kwargs)
        created.append(os.path.abspath(os.fspath(path)))

    os.mkdir = recording_mkdir
    try:
        yield
    finally:
        os.mkdir = mkdir
        for path in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(path)  # fails, and is kept, when something was put inside


def _child_activation(environ: Any) -> str:
    """Start a real child interpreter with ``environ`` and ask whether the shim booted in it."""
    probe = "import sys; b = sys.modules.get('vkd_shim.bootstrap'); print('yes' if b and b.is_active() else 'no')"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], env=dict(environ), capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or f"unknown (exit {out.returncode}: {out.stderr.strip()[-200:]})"
