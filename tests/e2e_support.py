"""What the end-to-end tests share: the launchers, the offline environment of a `swift` child, a user's
own sitecustomize that watches a run from outside the shim (the probe), and readers for ms-swift's
`logging.jsonl` rows and the shim's event lines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from vkd_shim.testing import launch as kit

GKD_MODULE = "swift.rlhf_trainers.gkd_trainer"
VKD_RUN = Path(sys.executable).with_name("vkd-run")
VKD_SHIM = Path(sys.executable).with_name("vkd-shim")
#: tests/poison_harness: with E2E_POISON_FEATURES=1, what the shim reads turns non-finite (its docstring).
POISON_HARNESS = Path(__file__).resolve().parent / "poison_harness"

#: The shipped base + Stage-3 overlay, as a user's VKD_CONFIG lists them.
SHIPPED_CONFIGS = tuple(
    Path(__file__).resolve().parents[1] / "configs" / name for name in ("visual_kd_base.yaml", "stage3_visual_kd.yaml")
)
TRAIN_TIMEOUT_S = 600
FAIL_FAST_TIMEOUT_S = 240


PROBE_FILE_ENV = "E2E_PROBE_FILE"
LOADER_MARKER = "E2E-PROBE: model loader entered"
# A user's own sitecustomize.py, later on PYTHONPATH than the bootstrap (which chains to it). It watches
# the run from outside the shim. It prints a marker on every entry into ms-swift's model loaders: the RLHF
# pipeline's per-model step and the ModelLoader behind every student and teacher load (transformers'
# from_pretrained cannot be wrapped: ms-swift swaps it out and back around each load). It also records
# what every GKD compute_loss call was given (mode, step, visual inputs, on-policy or dataset rows), so
# tests know which steps carried pixels without asking the shim.
PROBE_SITECUSTOMIZE = f'''
import json
import os
import sys

if os.environ.get("{PROBE_FILE_ENV}"):
    from wrapt import when_imported, wrap_function_wrapper

    def _emit(**record):
        with open(os.environ["{PROBE_FILE_ENV}"], "a", encoding="utf-8") as sink:
            sink.write(json.dumps({{"pid": os.getpid(), **record}}) + "\\n")

    def _loader(wrapped, instance, args, kwargs):
        print("{LOADER_MARKER}", getattr(wrapped, "__qualname__", wrapped), file=sys.stderr, flush=True)
        return wrapped(*args, **kwargs)

    def _compute_loss(wrapped, instance, args, kwargs):
        inputs = args[1] if len(args) > 1 else kwargs["inputs"]
        model_inputs = inputs.get("model_inputs", inputs)
        source = getattr(inputs.get("gkd_batch"), "data_source", None)
        _emit(
            mode="train" if instance.model.training else "eval",
            step=instance.state.global_step,
            image=model_inputs.get("pixel_values") is not None,
            video=model_inputs.get("pixel_values_videos") is not None,
            source=getattr(source, "value", None),
        )
        return wrapped(*args, **kwargs)

    @when_imported("swift.pipelines.train.rlhf")
    def _on_pipeline(module):
        wrap_function_wrapper(module, "SwiftRLHF._prepare_single_model", _loader)

    @when_imported("swift.model.register")
    def _on_model_loader(module):
        wrap_function_wrapper(module, "ModelLoader.load", _loader)

    @when_imported("{GKD_MODULE}")
    def _on_trainer(module):
        wrap_function_wrapper(module, "GKDTrainer.compute_loss", _compute_loss)
'''


def swift_env(cache: Path, *pythonpath: str | os.PathLike[str], **extra: str | os.PathLike[str]) -> dict:
    """the kit's offline single-process env, minus anything of ours the test process may carry."""
    env = kit.gkd_env(cache_dir=cache)
    for name in [k for k in env if k.startswith("VKD_")] + ["PYTHONPATH", PROBE_FILE_ENV]:
        env.pop(name, None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    env.update({name: str(value) for name, value in extra.items()})
    return env


def launch(argv: list, env: dict, timeout: int = TRAIN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout, check=False)


def report(proc: subprocess.CompletedProcess) -> str:
    return (
        f"exit {proc.returncode}\n--- stdout tail ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr tail ---\n{proc.stderr[-5000:]}"
    )


def trained(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, report(proc)


def free_port() -> int:
    """A port for torchrun's rendezvous, so parallel test sessions on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


def numbers(rows: list[dict]) -> list[dict]:
    """Every logged value but the clocks (throughput, run time, elapsed time)."""
    clocks = ("speed", "per_second", "runtime", "_time")
    return [{k: v for k, v in r.items() if not any(c in k for c in clocks)} for r in rows]


def write_config(path: Path, **block) -> Path:
    path.write_text(yaml.safe_dump({"custom": {"visual_kd": block}}), encoding="utf-8")
    return path


def run_dir(output_dir: Path, version: int = 0) -> Path:
    (found,) = output_dir.glob(f"v{version}-*")
    return found


def step_of(row: dict) -> int:
    return int(row["global_step/max_steps"].split("/")[0])


def train_rows(rows: list[dict]) -> dict[int, dict]:
    return {step_of(r): r for r in rows if "loss" in r}


def trajectory(output_dir: Path) -> list[tuple]:
    """(step, loss, grad_norm, learning_rate) of every train row: what knob-off equality compares."""
    rows = train_rows(kit.read_logging_jsonl(output_dir))
    return [(s, r["loss"], r["grad_norm"], r["learning_rate"]) for s, r in rows.items()]


def eval_rows(rows: list[dict]) -> dict[int, dict]:
    return {step_of(r): r for r in rows if "eval_loss" in r}


def without(argv: list[str], *flags: str) -> list[str]:
    """Drop `--flag value` pairs (the command's flags all take one value)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in flags:
            skip = True
        else:
            out.append(item)
    return out
