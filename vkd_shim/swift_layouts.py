"""Where each supported ms-swift release keeps the things vision KD plugs into: the one module that
knows how the releases differ.

ms-swift 3.x and 4.x moved every module the shim touches (``swift.trainers.rlhf_trainer`` became
``swift.rlhf_trainers``, ``swift.llm.train`` became ``swift.pipelines.train``), renamed the YAML
entry of ``swift rlhf`` and wrapped the GKD batch in ``{"model_inputs": ...}``. Keeping those facts
here as data lets :mod:`vkd_shim.patches` stay version-free, lets the bootstrap register its hooks
for every release by name, and lets a test check that the two agree. A release outside
:data:`LAYOUTS` gets the layout of its major version plus a version-guard warning, never a guess
made silently.

Stdlib only: ``vkd-shim doctor`` and the bootstrap tests read it without importing torch or swift.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

#: Roles of the patch points; :mod:`vkd_shim.patches` maps each role to its wrapper.
CLI_YAML = "cli_yaml"
#: ``SwiftSft._prepare_model_tokenizer``, the base of every training pipeline: refuses ``swift sft`` and
#: ``swift pt`` (no teacher) before loading, where the user asked for vision KD.
TRAIN_PREFLIGHT = "train_preflight"
PIPELINE_PREFLIGHT = "pipeline_preflight"
TRAINER_INIT = "trainer_init"
TRAINER_COMPUTE_LOSS = "trainer_compute_loss"
TRAINER_LOG = "trainer_log"
MEGATRON_PREFLIGHT = "megatron_preflight"
ROLES = (
    CLI_YAML,
    TRAIN_PREFLIGHT,
    PIPELINE_PREFLIGHT,
    TRAINER_INIT,
    TRAINER_COMPUTE_LOSS,
    TRAINER_LOG,
    MEGATRON_PREFLIGHT,
)
#: Roles whose module works only with an optional dependency: role -> its top-level module
#: (Megatron needs megatron-core, imported as ``megatron``).
OPTIONAL_ROLES = {MEGATRON_PREFLIGHT: "megatron"}


@dataclass(frozen=True)
class SwiftLayout:
    """One supported ms-swift release series and the stack it was tested with."""

    #: ms-swift major.minor; every patch release of it is supported.
    series: str
    #: The tested stack, as README's matrix and the doctor print it.
    stack: str
    #: role -> (module, qualname inside the module).
    points: Mapping[str, tuple[str, str]]
    #: Where the YAML path sits in the argv the CLI function receives: ``None`` when it is the
    #: first item (``swift rlhf x.yaml``), else the flag that precedes it (``--config x.yaml``).
    config_flag: str | None
    #: Key of the GKD ``compute_loss`` batch that holds the model's inputs; ``None`` when the batch
    #: is the model's inputs itself.
    batch_key: str | None
    #: Trainer attribute holding ``{mode: {key: MeanMetric}}``, all-reduced and logged by ms-swift's
    #: ``log()`` (``key`` in train rows, ``eval_key`` in eval rows).
    metrics_attr: str
    #: Whether vision KD under FSDP2 (``--fsdp fsdp2``) is proven on this release (really sharded ranks against
    #: DDP, tests/test_fsdp.py); elsewhere the preflight refuses it before loading.
    fsdp2: bool = False

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules whose import must fire a hook, in patch-point order."""
        return tuple(dict.fromkeys(module for module, _ in self.points.values()))

    @property
    def trainer_module(self) -> str:
        return self.points[TRAINER_COMPUTE_LOSS][0]

    def matches(self, version: str) -> bool:
        return version == self.series or version.startswith(self.series + ".")

    def config_source(self, argv: list[str]) -> str | None:
        """The YAML file named in the CLI argv, read before ms-swift rewrites argv in place."""
        if self.config_flag is None:
            return argv[0] if argv and argv[0].endswith((".yaml", ".yml", ".json")) else None
        if self.config_flag in argv:
            at = argv.index(self.config_flag)
            return argv[at + 1] if at + 1 < len(argv) else None
        return None

    def model_inputs(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """What the student's forward receives, from the batch ``compute_loss`` was given."""
        return batch if self.batch_key is None else batch[self.batch_key]

    def metrics(self, trainer: Any) -> Mapping[str, Any]:
        return getattr(trainer, self.metrics_attr)


#: ms-swift 4.4, 4.5 and 4.6 keep every patch point in one place (checked on 4.4.2, 4.5.3, 4.6.0: the same
#: modules, qualnames and signatures, the YAML as argv[0], the batch under "model_inputs", the teacher
#: prepared in rollout_mixin._setup_teacher, custom_metrics).
_POINTS_4X = MappingProxyType(
    {
        CLI_YAML: ("swift.cli.main", "parse_yaml_args"),
        TRAIN_PREFLIGHT: ("swift.pipelines.train.sft", "SwiftSft._prepare_model_tokenizer"),
        PIPELINE_PREFLIGHT: ("swift.pipelines.train.rlhf", "SwiftRLHF._prepare_model_tokenizer"),
        TRAINER_INIT: ("swift.rlhf_trainers.gkd_trainer", "GKDTrainer.__init__"),
        TRAINER_COMPUTE_LOSS: ("swift.rlhf_trainers.gkd_trainer", "GKDTrainer.compute_loss"),
        TRAINER_LOG: ("swift.rlhf_trainers.gkd_trainer", "GKDTrainer.log"),
        # MegatronRLHF defines no __init__ of its own; _prepare_template runs inside MegatronSft's
        # __init__, after a meta-device model and before the trainer or any weights.
        MEGATRON_PREFLIGHT: ("swift.megatron.pipelines.train.rlhf", "MegatronRLHF._prepare_template"),
    }
)


def _layout_4x(series: str, stack: str, fsdp2: bool = False) -> SwiftLayout:
    return SwiftLayout(
        series,
        stack,
        _POINTS_4X,
        config_flag=None,
        batch_key="model_inputs",
        metrics_attr="custom_metrics",
        fsdp2=fsdp2,
    )


SWIFT_4_6 = _layout_4x("4.6", "transformers 5.19, trl 0.29, peft 0.20, torch 2.14.1", fsdp2=True)
# 4.5.3 (only .3) defaults dataloader_persistent_workers to True without 4.6's num_workers == 0 guard:
# runs with --dataloader_num_workers 0 need --dataloader_persistent_workers false (ms-swift, not the shim).
SWIFT_4_5 = _layout_4x("4.5", "transformers 5.16, trl 0.29, peft 0.20, torch 2.14.1")
# 4.4.0-4.4.2: on-policy GKD without vLLM (the default lmbda 0.5) dies in ms-swift itself at step 2
# ('GKDTrainer' object has no attribute 'dynamic_num_samples', fixed in 4.5.0): use --lmbda 0 there.
SWIFT_4_4 = _layout_4x("4.4", "transformers 5.12, trl 0.29, peft 0.19, torch 2.14.1")

SWIFT_3_12 = SwiftLayout(
    series="3.12",
    stack="transformers 4.57, trl 0.24, peft 0.18, torch 2.14.1",
    points={
        CLI_YAML: ("swift.cli.main", "prepare_config_args"),
        TRAIN_PREFLIGHT: ("swift.llm.train.sft", "SwiftSft._prepare_model_tokenizer"),
        PIPELINE_PREFLIGHT: ("swift.llm.train.rlhf", "SwiftRLHF._prepare_model_tokenizer"),
        TRAINER_INIT: ("swift.trainers.rlhf_trainer.gkd_trainer", "GKDTrainer.__init__"),
        TRAINER_COMPUTE_LOSS: ("swift.trainers.rlhf_trainer.gkd_trainer", "GKDTrainer.compute_loss"),
        TRAINER_LOG: ("swift.trainers.rlhf_trainer.gkd_trainer", "GKDTrainer.log"),
        MEGATRON_PREFLIGHT: ("swift.megatron.train.rlhf", "MegatronRLHF._prepare_template"),
    },
    config_flag="--config",
    batch_key=None,
    metrics_attr="custom_metrics",
)

#: Newest first: the supported matrix.
LAYOUTS = (SWIFT_4_6, SWIFT_4_5, SWIFT_4_4, SWIFT_3_12)
SUPPORTED = tuple(layout.series for layout in LAYOUTS)
#: Releases whose GKD trainer the shim cannot serve, and why (read in each release's source): a run that
#: asks for vision KD on them stops before loading instead of crashing after both models are loaded.
_FLAT_BATCH = (
    "its GKDTrainer.compute_loss receives a flat batch with private keys mixed in (_data_source, ...), not "
    "4.4+'s {model_inputs, gkd_batch, teacher_model_inputs}"
)
UNSUPPORTED = MappingProxyType(
    {
        "4.0": f"{_FLAT_BATCH}, and its YAML entry is 3.x's prepare_config_args (--config)",
        "4.1": f"{_FLAT_BATCH}, and the OPSD teacher inputs are a partial overlay of the student's",
        "4.2": f"{_FLAT_BATCH}, and the OPSD teacher inputs are a partial overlay of the student's",
        "4.3": f"{_FLAT_BATCH}, and the OPSD teacher inputs are a partial overlay of the student's",
    }
)


def installed_version() -> str | None:
    """ms-swift's version: the imported module's if loaded, else the installed distribution's."""
    version = getattr(sys.modules.get("swift"), "__version__", None)
    if version:
        return version
    from importlib import metadata  # deferred: it costs about 30 ms, and only ms-swift processes ask

    try:
        return metadata.version("ms-swift")
    except metadata.PackageNotFoundError:
        return None


def for_version(version: str | None) -> SwiftLayout:
    """The layout of a release: its series if supported, else the newest of its major version.

    An unknown version (not installed, unparsable) gets the newest layout; the version guard in
    :mod:`vkd_shim.patches` reports every release outside the matrix either way.
    """
    if version:
        for layout in LAYOUTS:
            if layout.matches(version):
                return layout
        major = version.split(".", 1)[0]
        for layout in LAYOUTS:
            if layout.series.split(".", 1)[0] == major:
                return layout
    return LAYOUTS[0]


def layout_reason(version: str | None) -> str:
    """Why :func:`for_version` picked the layout it picked, for the doctor and the activate event."""
    layout = for_version(version)
    if version and layout.matches(version):
        return f"ms-swift {version} is in the {layout.series}.x series"
    if version and layout.series.split(".")[0] == version.split(".")[0]:
        return f"ms-swift {version} is untested; {layout.series} is the newest layout of its major version"
    return f"ms-swift {version or '(not installed)'} is untested; {layout.series} is the newest layout"


def supported_text() -> str:
    return ", ".join(f"{series}.x" for series in SUPPORTED)


def hook_modules() -> tuple[str, ...]:
    """Every module whose import must reach the shim: ``swift`` itself (version guard), then each
    layout's patch-point modules. Hooks are registered for all releases; only the installed one's
    modules can ever be imported, and an import that fires a hook costs nothing until it does."""
    return tuple(dict.fromkeys(("swift", *(module for layout in LAYOUTS for module in layout.modules))))


#: ms-swift commands that train (``swift sft``, ``swift pt``, ``swift rlhf``, and Megatron's). Every other
#: command (infer, export, deploy, eval, ...) has nothing vision KD could do, so the shim stays out of it.
TRAINING_COMMANDS = ("sft", "pt", "rlhf")


def command_of(argv: list[str]) -> str | None:
    """The ms-swift command a process runs, read from its argv, or None when it is not an ms-swift
    command line (tests, notebooks, ``python -c``, a user's own script calling ``sft_main``).

    ``swift rlhf ...`` execs ``python .../swift/cli/rlhf.py ...`` (and torchrun runs that script on every
    rank), so both the CLI process and its re-exec name the command.
    """
    if not argv:
        return None
    name = argv[0].replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("swift", "megatron"):
        return argv[1].replace("_", "-") if len(argv) > 1 else None
    parts = argv[0].replace("\\", "/").split("/")
    if name.endswith(".py") and len(parts) >= 3 and parts[-3:-1] in (["swift", "cli"], ["cli", "_megatron"]):
        command = name[: -len(".py")].replace("_", "-")
        return None if command == "main" else command
    return None


def stays_out(argv: list[str]) -> bool:
    """True in processes of an ms-swift command that does not train: the shim neither patches nor logs."""
    command = command_of(argv)
    return command is not None and command not in TRAINING_COMMANDS


def installed() -> SwiftLayout:
    """The layout of the installed (or already imported) ms-swift."""
    return for_version(installed_version())


def incompatible(version: str | None = None) -> str | None:
    """Why vision KD cannot run on the given (default: installed) ms-swift at all, or None."""
    version = installed_version() if version is None else version
    series = ".".join((version or "").split(".")[:2])
    if series in UNSUPPORTED:
        return (
            f"ms-swift {version} is not supported: {UNSUPPORTED[series]}; supported: {supported_text()} "
            "(upgrade ms-swift to 4.4 or later)"
        )
    return None


def version_problem(version: str | None = None) -> str | None:
    """Why the given (default: installed) ms-swift is outside the tested matrix, or None."""
    version = installed_version() if version is None else version
    if not version:
        return "ms-swift is not installed"
    if incompatible(version):
        return incompatible(version)
    if not any(layout.matches(version) for layout in LAYOUTS):
        return f"ms-swift {version} is outside the supported matrix ({supported_text()})"
    return None


def aligner_paths(model: Any) -> list[str] | None:
    """ms-swift's own declaration of the architecture's aligner (swift/model/model_arch.py)."""
    return _declared(model, "aligner")


def vision_tower_paths(model: Any) -> list[str] | None:
    """ms-swift's declaration of the vision tower: what ``vit`` reads and every target depends on. The aligner's
    parent is no substitute: in the LLaVA layout (Gemma 3, InternVL) it is the whole model, language model and all."""
    return _declared(model, "vision_tower")


def _declared(model: Any, field: str) -> list[str] | None:
    paths = getattr(getattr(getattr(model, "model_meta", None), "model_arch", None), field, None)
    if not paths:
        return None
    return [paths] if isinstance(paths, str) else list(paths)
