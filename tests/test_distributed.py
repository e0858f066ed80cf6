"""Distributed launches: two CPU ranks under torchrun, a model DDP cannot take whole, DeepSpeed's multi-node
environment (FSDP2: tests/test_fsdp.py; DeepSpeed ZeRO on CPU ranks: tests/test_deepspeed.py).

Why these tests exist: users launch Stage-3 GKD with `NPROC_PER_NODE=8 swift rlhf ...`, torchrun or
DeepSpeed's multi-node runner. Activation must reach every worker, every rank must log its own events, the
metric must be the mean over all ranks' micro-batches (a rank with a text-only micro-batch adds nothing and
waits for nobody), and the ranks must stay one data-parallel job. CI has no GPU, so the multi-process run
uses gloo on CPU, which needs `--use_cpu true` (see docs/DISTRIBUTED.md for why).

Cost on 2 shared CPU cores: two real 2-rank `swift rlhf` training runs (about 60-120 s and 45-90 s), one
torchrun of a 2-rank probe without models (15-30 s), one `vkd-shim doctor` and a few interpreter starts.

The `test_deepspeed_env_*` tests exercise `deepspeed_env_lines`, `write_deepspeed_env`,
`deepspeed_env_problems` (in `vkd_shim.env`) and `vkd-run --write-deepspeed-env`, which carry the
`VKD_*` settings through DeepSpeed's `.deepspeed_env`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_support import VKD_RUN, VKD_SHIM, free_port, read_jsonl
from e2e_support import swift_env as offline_env
from two_ranks import SHIPPED_CONFIGS, run_two_ranks

from vkd_shim import patches, swift_layouts
from vkd_shim.bootstrap import BOOTSTRAP_DIR
from vkd_shim.testing import launch as kit

REPO = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT_S = 600
FAIL_FAST_TIMEOUT_S = 240
# Each patch point a training process applies once: all but swift's CLI (the launcher's) and Megatron's.
TRAINING_POINTS = [
    f"{module}:{name}"
    for role, (module, name) in patches.LAYOUT.points.items()
    if role not in (swift_layouts.CLI_YAML, swift_layouts.MEGATRON_PREFLIGHT)
]

TAP_DIR_ENV = "DIST_TAP_DIR"
# A user's own sitecustomize.py, later on PYTHONPATH than the bootstrap (which chains to it). It observes
# each process from outside the shim, writing one file per torch.distributed rank under $DIST_TAP_DIR:
# - `loader-<pid>.jsonl`: "armed" when ms-swift's RLHF pipeline is imported, "loading" on every entry into
#   its per-model loader (so "armed" without "loading" means: stopped before any model loaded);
# - `metrics-rank<r>.jsonl`: per log call, this rank's own vision-KD MeanMetric state and count before
#   ms-swift all-reduces them, and the values ms-swift computed from the all-reduce;
# - `checksum-rank<r>.json`: after GKDTrainer.train, every trainable parameter's sum and one sha256 over
#   their bytes, before and after training, with the rank, world size and the wrapper around the model.
TAP_SITECUSTOMIZE = f'''
import hashlib
import json
import os

if os.environ.get("{TAP_DIR_ENV}"):
    from wrapt import when_imported, wrap_function_wrapper

    def _path(name):
        return os.path.join(os.environ["{TAP_DIR_ENV}"], name)

    def _rank():
        import torch.distributed as dist

        return dist.get_rank(), dist.get_world_size()

    def _loader_event(what):
        with open(_path(f"loader-{{os.getpid()}}.jsonl"), "a", encoding="utf-8") as sink:
            sink.write(json.dumps({{"pid": os.getpid(), "event": what}}) + "\\n")

    def _prepare_single_model(wrapped, instance, args, kwargs):
        _loader_event("loading")
        return wrapped(*args, **kwargs)

    def _trainable(trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        sums, digest = {{}}, hashlib.sha256()
        for name, param in model.named_parameters():
            if param.requires_grad:
                tensor = param.detach().cpu().contiguous()
                sums[name] = float(tensor.double().sum())
                digest.update(name.encode())
                digest.update(tensor.numpy().tobytes())
        return {{"sums": sums, "sha256": digest.hexdigest()}}

    def _train(wrapped, instance, args, kwargs):
        before = _trainable(instance)
        result = wrapped(*args, **kwargs)
        rank, world_size = _rank()
        record = {{
            "pid": os.getpid(),
            "rank": rank,
            "world_size": world_size,
            "wrapper": type(instance.model_wrapped).__name__,
            "parallel_mode": str(instance.args.parallel_mode),
            "before": before,
            "after": _trainable(instance),
        }}
        with open(_path(f"checksum-rank{{rank}}.json"), "w", encoding="utf-8") as sink:
            json.dump(record, sink)
        return result

    def _compute_custom_metrics(wrapped, instance, args, kwargs):
        metrics = args[0]
        local = {{k: [float(m.state), int(m.count)] for k, m in metrics.items() if "vision_kd" in k}}
        logs = wrapped(*args, **kwargs)
        rank, _ = _rank()
        with open(_path(f"metrics-rank{{rank}}.jsonl"), "a", encoding="utf-8") as sink:
            shared = {{k: v for k, v in logs.items() if "vision_kd" in k}}
            sink.write(json.dumps({{"local": local, "logs": shared}}) + "\\n")
        return logs

    @when_imported("swift.pipelines.train.rlhf")
    def _on_pipeline(module):
        _loader_event("armed")
        wrap_function_wrapper(module, "SwiftRLHF._prepare_single_model", _prepare_single_model)

    @when_imported("swift.rlhf_trainers.gkd_trainer")
    def _on_trainer(module):
        wrap_function_wrapper(module, "GKDTrainer.train", _train)
        mixin = "swift.trainers.mixin"
        wrap_function_wrapper(mixin, "SwiftMixin.compute_custom_metrics", _compute_custom_metrics)
'''


# --- helpers ---------------------------------------------------------------------------------------


def swift_env(cache: Path, tap_dir: Path, **extra: str) -> dict:
    """the kit's offline CPU env with the tap on PYTHONPATH and nothing of ours from the test process."""
    env = kit.gkd_env(cache_dir=cache)
    for name in [k for k in env if k.startswith("VKD_")]:
        del env[name]
    env.update({"PYTHONPATH": str(tap_dir), TAP_DIR_ENV: str(tap_dir), **extra})
    return env


def launch(argv: list, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run in a session of its own, so a hang kills torchrun and every worker, and fails the test."""
    proc = subprocess.Popen(
        [str(a) for a in argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: no exit after {timeout} s\n--- stderr tail ---\n{err[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def report(proc: subprocess.CompletedProcess) -> str:
    tails = f"--- stdout tail ---\n{proc.stdout[-3000:]}\n--- stderr tail ---\n{proc.stderr[-5000:]}"
    return f"exit {proc.returncode}\n{tails}"


def image_tokens(row: dict) -> int:
    """Merged visual tokens of a one-image row: one per 32 x 32 pixel square (the kit's geometry)."""
    from PIL import Image

    with Image.open(row["images"][0]) as image:
        width, height = image.size
    return (width // 32) * (height // 32)


@pytest.fixture
def tap_dir(tmp_path) -> Path:
    path = tmp_path / "tap"
    path.mkdir()
    (path / "sitecustomize.py").write_text(TAP_SITECUSTOMIZE, encoding="utf-8")
    return path


# --- 1. two CPU ranks are one data-parallel job ------------------------------------------------------

# What each rank's micro-batch holds at each optimizer step (1 micro-batch per rank per step): 4 and 6 are
# the visual tokens of a 64x64 and a 96x64 image, None a text-only row.
DDP_PLAN = {1: (4, 6), 2: (4, None), 3: (None, 6), 4: (None, None)}

DDP_PROBE = """
import json, os, sys
import torch
from transformers import TrainingArguments

# One file per rank: ranks that share a pipe interleave their lines (two records on one line, seen in CI).
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[2], f"probe-rank{rank}.jsonl"), "w", encoding="utf-8") as sink:
    for flags in ({}, {"ddp_backend": "gloo"}, {"use_cpu": True, "ddp_backend": "gloo"}):
        args = TrainingArguments(output_dir=sys.argv[1], report_to=[], **flags)
        sink.write(json.dumps({
            "flags": flags,
            "rank": rank,
            "distributed_type": str(args.distributed_state.distributed_type),
            "parallel_mode": str(args.parallel_mode),
            "world_size": args.world_size,
            "process_index": args.process_index,
        }) + "\\n")
"""


def test_cpu_processes_form_one_ddp_job_only_with_use_cpu(tmp_path):
    """Pins the finding docs/DISTRIBUTED.md builds on: ms-swift hands the device setup to transformers'
    TrainingArguments, whose accelerate state picks a DDP backend only for an accelerator or `use_cpu`.

    On a machine without CUDA, two torchrun workers with no flag each train alone (world size 1, both
    "process 0", so both log, with different gradient norms); `--ddp_backend gloo` alone shards the data
    across a gloo group but never wraps the model in DDP (gradients are not averaged); `--use_cpu true`
    makes them one MULTI_CPU job. If an upgrade changes this, the doc's recipe must be revisited.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE, encoding="utf-8")
    env = kit.gkd_env()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    argv += ["--master_port", str(free_port()), str(probe), str(tmp_path / "out"), str(tmp_path)]
    proc = launch(argv, env, timeout=FAIL_FAST_TIMEOUT_S)
    assert proc.returncode == 0, report(proc)
    lines = [json.loads(x) for rank in (0, 1) for x in (tmp_path / f"probe-rank{rank}.jsonl").read_text().splitlines()]
    by_case = {}
    for line in lines:
        by_case.setdefault(json.dumps(line.pop("flags"), sort_keys=True), []).append(line)
    assert len(by_case) == 3 and all(len(v) == 2 for v in by_case.values()), lines

    for line in by_case["{}"]:
        assert line["distributed_type"] == "DistributedType.NO"
        assert line["parallel_mode"] == "ParallelMode.NOT_PARALLEL"
        assert (line["world_size"], line["process_index"]) == (1, 0)
    for line in by_case['{"ddp_backend": "gloo"}']:
        assert line["distributed_type"] == "DistributedType.NO"
        assert line["parallel_mode"] == "ParallelMode.NOT_PARALLEL"
        assert (line["world_size"], line["process_index"]) == (2, line["rank"])
    for line in by_case['{"ddp_backend": "gloo", "use_cpu": true}']:
        assert line["distributed_type"] == "DistributedType.MULTI_CPU"
        assert line["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert (line["world_size"], line["process_index"]) == (2, line["rank"])


def ddp_dataset(assets: dict, path: Path) -> Path:
    """Write the train rows in the order that puts DDP_PLAN on the two ranks, and return the file.

    The GKD trainer's train sampler is trl's RepeatSampler seeded with `--seed` (it always shuffles:
    GKDTrainer never sets `shuffle_dataset`), over generation batches of per_device_train_batch_size (1)
    x world size (2) x steps_per_generation (1) rows; accelerate gives the j-th row of that order to rank
    j % 2 at step j // 2 + 1. With `--dataset_shuffle false` ms-swift keeps the file order, so row
    `order[j]` of the file is what that rank trains on. Video rows are left out (only images and text).
    """
    from trl.trainer.utils import RepeatSampler

    rows = [json.loads(x) for x in Path(assets["train"]).read_text(encoding="utf-8").splitlines()]
    images = {4: [], 6: []}
    texts = []
    for row in rows:
        if "images" in row:
            images[image_tokens(row)].append(row)
        elif "videos" not in row:
            texts.append(row)
    wanted = [images[tokens].pop() if tokens else texts.pop() for step in sorted(DDP_PLAN) for tokens in DDP_PLAN[step]]
    rest = [*images[4], *images[6], *texts]
    size = len(wanted) + len(rest)
    order = list(
        RepeatSampler(
            range(size),
            mini_repeat_count=1,
            batch_size=2,
            repeat_count=1,
            shuffle=True,
            seed=kit.DEFAULT_SEED,
        )
    )
    placed: list[dict | None] = [None] * size
    for position, row in enumerate(wanted):
        placed[order[position]] = row
    out = [row if row is not None else rest.pop() for row in placed]
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in out), encoding="utf-8")
    return path


@pytest.mark.e2e
def test_two_cpu_ranks_train_as_one_ddp_job_with_vision_kd(gkd_assets, swift_cache, tap_dir, tmp_path):
    """`NPROC_PER_NODE=2 vkd-run ... swift rlhf --use_cpu true --ddp_backend gloo`: each rank activates
    and logs its own events with its torch.distributed rank; the logged `vision_kd_loss` is the mean over
    both ranks' visual micro-batches, so a step where one rank is text-only neither hangs nor is diluted
    by it (and a step where only rank 1 saw an image still logs rank 1's value, written by rank 0); and
    the two ranks, which trained on different rows, end with bit-identical adapters: one DDP job.
    """
    train = ddp_dataset(gkd_assets, tmp_path / "train.jsonl")
    events_file = tmp_path / "events.jsonl"
    out = tmp_path / "out"
    argv = kit.gkd_command(
        {**gkd_assets, "train": str(train)},
        out,
        "--use_cpu", "true",
        "--ddp_backend", "gloo",
        "--per_device_train_batch_size", "1",
        "--max_steps", str(len(DDP_PLAN)),
        "--dataset_shuffle", "false",
        "--eval_strategy", "no",
    )  # fmt: skip
    env = swift_env(swift_cache, tap_dir, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    proc = launch([VKD_RUN, "--log-file", events_file, *argv], env, timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == 0, report(proc)

    # One job: DDP-wrapped on both ranks, different rows, bit-identical adapters at the end.
    checksums = [json.loads((tap_dir / f"checksum-rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(checksums):
        assert (record["rank"], record["world_size"]) == (rank, 2)
        assert record["wrapper"] == "DistributedDataParallel"
        assert record["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert record["after"]["sha256"] != record["before"]["sha256"], "training changed no adapter"
    assert checksums[0]["after"]["sha256"] == checksums[1]["after"]["sha256"]
    assert checksums[0]["after"]["sums"] == checksums[1]["after"]["sums"]

    # Each worker's event lines carry its own torch.distributed rank and the world size.
    events = read_jsonl(events_file)
    for record in checksums:
        own = [e for e in events if e["pid"] == record["pid"]]
        assert {(e["rank"], e["world_size"]) for e in own} == {(record["rank"], 2)}, own
        applied = [e["target"] for e in own if e["event"] == "vkd.patch" and e["status"] == "applied"]
        assert sorted(applied) == sorted(TRAINING_POINTS), applied
        assert [e["event"] for e in own].count("vkd.attach") == 1
    assert not [e for e in events if e["level"] == "error" or e["event"] == "vkd.skip"], events

    # One writer: rank 0 logs each step once.
    rows = {}
    for row in kit.read_logging_jsonl(out):
        if "loss" in row:
            step = int(row["global_step/max_steps"].split("/")[0])
            assert step not in rows, f"step {step} logged twice: the ranks did not train as one job"
            rows[step] = row
    assert sorted(rows) == sorted(DDP_PLAN)

    per_rank = [read_jsonl(tap_dir / f"metrics-rank{r}.jsonl") for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(DDP_PLAN) + 1  # every step, then the train summary
    for step, tokens in DDP_PLAN.items():
        local = [per_rank[r][step - 1]["local"] for r in (0, 1)]
        counts = [local[r]["vision_kd_loss"][1] for r in (0, 1)]
        assert counts == [int(t is not None) for t in tokens], (step, local)
        assert [local[r]["vision_kd/tokens"][0] for r in (0, 1)] == [float(t or 0) for t in tokens]
        row = rows[step]
        if not any(counts):
            assert not [k for k in row if "vision_kd" in k], row  # nothing visual anywhere: no value at all
            continue
        visual = [t for t in tokens if t is not None]
        assert row["vision_kd/tokens"] == sum(visual) / len(visual)
        mean = sum(local[r]["vision_kd_loss"][0] for r in (0, 1)) / sum(counts)
        assert math.isfinite(row["vision_kd_loss"]) and row["vision_kd_loss"] > 0
        # ms-swift all-reduces state and count in float32 and logging.jsonl keeps 8 decimals.
        assert row["vision_kd_loss"] == pytest.approx(mean, rel=1e-6, abs=1e-8), (step, local, row)
        assert per_rank[0][step - 1]["logs"] == per_rank[1][step - 1]["logs"]  # every rank computed the same


# --- 2. a deepstack merger the language model never reads ----------------------------------------------


@pytest.mark.e2e
def test_a_deepstack_merger_the_language_model_never_reads_is_left_out_under_ddp(gkd_assets, swift_cache, tmp_path):
    """Teacher and student with 3 deepstack mergers and 2 text layers: Qwen3-VL adds deepstack feature i after
    text layer i, so the third merger runs and is dropped. Under 2-rank DDP (find_unused_parameters, set for
    PEFT models) a term on it died in backward ("marked as ready twice": DDP marks the unused merger's LoRA
    weights ready when the forward ends, then the term's gradient reaches them). The shim leaves it out, says
    so in both ranks' `vkd.attach` (and the doctor says it before anything runs), and trains on the others.
    """
    from vkd_shim.testing.models import save_qwen3_vl

    shape = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"deepstack_visual_indexes": [0, 1, 2]}}
    models = {
        role: save_qwen3_vl(tmp_path / role, seed=seed, **shape) for role, seed in (("teacher", 0), ("student", 1))
    }
    assets = {**gkd_assets, **{role: str(path) for role, path in models.items()}}
    run = run_two_ranks(assets, swift_cache, tmp_path / "run" / "out", vkd=True).trained()
    attach = run.named("vkd.attach")
    assert sorted(e["rank"] for e in attach) == [0, 1], run.events
    note = attach[0]["note"]
    assert note.startswith("deepstack_2 left out") and "never reads" in note, attach
    assert all(e["targets"] == ["merger", "deepstack_0", "deepstack_1"] and e["note"] == note for e in attach), attach
    assert all(math.isfinite(r["vision_kd_loss"]) for r in run.train) and run.train[-1]["vision_kd_loss"] > 0
    assert not [k for r in run.train + run.evals for k in r if "deepstack_2" in k]

    config = os.pathsep.join(str(p) for p in SHIPPED_CONFIGS)
    argv = kit.gkd_command(assets, tmp_path / "doctor_out")
    doctor = [VKD_RUN, "--config", config, VKD_SHIM, "doctor", "--", *argv]
    verdict = launch(doctor, offline_env(swift_cache), FAIL_FAST_TIMEOUT_S)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert f"note: {note}" in verdict.stdout, verdict.stdout


# --- 3. DeepSpeed's multi-node environment ----------------------------------------------------------

# What DeepSpeed's multi-node runner (deepspeed/launcher/runner.py, main) forwards to the workers: variables
# whose names start with these prefixes (EXPORT_ENVS plus the CUDA accelerator's export_envs), then every
# `KEY=VALUE` line of `.deepspeed_env` in the home directory and in the launch directory.
DEEPSPEED_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
DEEPSPEED_QUOTED = re.compile(r"[^\w@%+=:,./-]")

PROBE_ACTIVATION = (
    "import json, os, sys; b = sys.modules.get('vkd_shim.bootstrap'); "
    "print('REPORT' + json.dumps({'active': bool(b and b.is_active()), "
    "'errors': list(b.errors) if b else [], 'VKD_CONFIG': os.environ.get('VKD_CONFIG'), "
    "'VKD_LOG_FILE': os.environ.get('VKD_LOG_FILE')}))"
)


def deepspeed_exports(env: dict, launch_dir: Path, home: Path) -> dict[str, str]:
    """The runner's exports, reimplemented from deepspeed/launcher/runner.py and multinode_runner.py.

    The runner prepends the launch directory to PYTHONPATH, keeps the variables named with an exported
    prefix, then reads `.deepspeed_env` from the home and the launch directory (`key, val =
    line.split("=", 1)`); `add_export` strips both and wraps a value in double quotes when it holds a
    character outside `[\\w@%+=:,./-]`.
    """
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(launch_dir), env.get("PYTHONPATH")]))
    exports: dict[str, str] = {}

    def add_export(key: str, value: str) -> None:
        value = value.strip()
        exports[key.strip()] = f'"{value}"' if DEEPSPEED_QUOTED.search(value) else value

    for name, value in env.items():
        if name.startswith(DEEPSPEED_EXPORT_PREFIXES):
            add_export(name, value)
    for directory in (home, launch_dir):
        path = directory / ".deepspeed_env"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                key, value = line.split("=", maxsplit=1)
                add_export(key, value)
    return exports


def start_worker(exports: dict[str, str], runner: str, launch_dir: Path, home: Path) -> dict:
    """Start a Python process on a "remote node" the way each runner would, and ask it what it sees.

    pdsh runs `export K=V; ...; cd <launch dir>; python ...` in the remote login shell; mpirun sets each
    `-x K=V` as given, without a shell. The remote environment starts nearly empty (PATH, HOME).
    """
    base = {"PATH": os.defpath, "HOME": str(home)}
    worker = [sys.executable, "-c", PROBE_ACTIVATION]
    if runner == "pdsh":
        script = "".join(f"export {k}={v}; " for k, v in exports.items())
        script += f"cd {shlex.quote(str(launch_dir))}; {shlex.join(worker)}"
        argv, env = ["/bin/sh", "-c", script], base
    else:
        argv, env = worker, {**base, **exports}
    proc = subprocess.run(argv, env=env, cwd=launch_dir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def launch_node_env(tmp_path: Path) -> dict:
    """The launch node's environment under `vkd-run --config <shipped configs> --log-file ...`."""
    from vkd_shim.env import launch_env

    base = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    config = os.pathsep.join(str(p) for p in SHIPPED_CONFIGS)
    return launch_env(base, config=config, log_file=str(tmp_path / "vkd_events.jsonl"))


@pytest.fixture
def nodes(tmp_path) -> tuple[Path, Path]:
    """A launch directory and a home directory of their own (the real home is never read)."""
    launch_dir, home = tmp_path / "launch", tmp_path / "home"
    launch_dir.mkdir()
    home.mkdir()
    return launch_dir, home


@pytest.mark.parametrize("runner", ["pdsh", "openmpi"])
def test_deepspeed_multinode_worker_activates_only_with_deepspeed_env_lines(runner, nodes, tmp_path):
    """The mechanism docs/DISTRIBUTED.md documents: PYTHONPATH (with the bootstrap dir) reaches the
    worker by itself, VKD_ENABLE and VKD_CONFIG do not, so without `.deepspeed_env` the worker starts
    with the bootstrap but the gate off (a silent no-op); with the documented lines it activates and sees
    the config.
    """
    launch_dir, home = nodes
    env = launch_node_env(tmp_path)
    exports = deepspeed_exports(env, launch_dir, home)
    assert exports["PYTHONPATH"].split(os.pathsep)[:2] == [str(launch_dir), BOOTSTRAP_DIR]
    assert not [k for k in exports if k.startswith("VKD_")]
    alone = start_worker(exports, runner, launch_dir, home)
    assert alone == {"active": False, "errors": [], "VKD_CONFIG": None, "VKD_LOG_FILE": None}

    lines = [f"VKD_CONFIG={env['VKD_CONFIG']}", "VKD_ENABLE=1", f"VKD_LOG_FILE={env['VKD_LOG_FILE']}"]
    (launch_dir / ".deepspeed_env").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    worker = start_worker(deepspeed_exports(env, launch_dir, home), runner, launch_dir, home)
    assert worker == {
        "active": True,
        "errors": [],
        "VKD_CONFIG": env["VKD_CONFIG"],
        "VKD_LOG_FILE": env["VKD_LOG_FILE"],
    }


def test_deepspeed_env_lines_carry_every_vkd_setting_with_absolute_paths(tmp_path, monkeypatch):
    """Every VKD_* variable and nothing else, sorted, one `KEY=VALUE` per line, with config and log paths
    absolute: the workers may start in another directory."""
    from vkd_shim.env import deepspeed_env_lines

    monkeypatch.chdir(tmp_path)
    environ = {
        "VKD_ENABLE": "1",
        "VKD_CONFIG": os.pathsep.join(["configs/base.yaml", "/abs/stage3.yaml"]),
        "VKD_LOG_FILE": "logs/vkd.jsonl",
        "VKD_WEIGHT": "0.05",
        "PYTHONPATH": BOOTSTRAP_DIR,
        "NCCL_DEBUG": "INFO",
        "HOME": str(tmp_path),
    }
    assert deepspeed_env_lines(environ) == [
        f"VKD_CONFIG={tmp_path / 'configs' / 'base.yaml'}{os.pathsep}/abs/stage3.yaml",
        "VKD_ENABLE=1",
        f"VKD_LOG_FILE={tmp_path / 'logs' / 'vkd.jsonl'}",
        "VKD_WEIGHT=0.05",
    ]
    assert deepspeed_env_lines({"PYTHONPATH": BOOTSTRAP_DIR}) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("VKD_CONFIG", "/data/my configs/stage3.yaml"), ("VKD_INLINE_CONFIG", '{"weight": 0.1}')],
    ids=["space_in_path", "inline_json"],
)
def test_deepspeed_env_lines_refuse_values_deepspeed_would_quote(name, value):
    """DeepSpeed quotes such values; mpirun then hands the quotes to the worker, and pdsh's shell breaks on
    inner quotes: refuse, naming the variable, rather than write a line that activates nothing."""
    from vkd_shim.env import deepspeed_env_lines

    with pytest.raises(ValueError, match=rf"^{name}=.*\[A-Za-z0-9_@%\+=:,\./-\]"):
        deepspeed_env_lines({"VKD_ENABLE": "1", name: value})


def test_deepspeed_env_write_keeps_other_lines_and_replaces_ours(tmp_path):
    """An existing `.deepspeed_env` (NCCL settings, a stale weight) keeps its other lines in order; the
    blank line DeepSpeed's parser would stop on goes, and the file parses the way DeepSpeed parses it."""
    from vkd_shim.env import write_deepspeed_env

    path = tmp_path / ".deepspeed_env"
    path.write_text("NCCL_DEBUG=INFO\nVKD_WEIGHT=0.5\n\nNCCL_SOCKET_IFNAME=eth0\n", encoding="utf-8")
    written = write_deepspeed_env(path, {"VKD_ENABLE": "1", "VKD_WEIGHT": "0.1", "PATH": os.defpath})
    assert written == ["VKD_ENABLE=1", "VKD_WEIGHT=0.1"]
    assert path.read_text(encoding="utf-8") == (
        "NCCL_DEBUG=INFO\nNCCL_SOCKET_IFNAME=eth0\nVKD_ENABLE=1\nVKD_WEIGHT=0.1\n"
    )
    exports = deepspeed_exports({}, tmp_path, tmp_path / "no_home")
    assert {k: v for k, v in exports.items() if k != "PYTHONPATH"} == {
        "NCCL_DEBUG": "INFO",
        "NCCL_SOCKET_IFNAME": "eth0",
        "VKD_ENABLE": "1",
        "VKD_WEIGHT": "0.1",
    }


def test_deepspeed_env_vkd_run_option_writes_the_file_and_the_worker_activates(nodes, tmp_path):
    """`vkd-run --write-deepspeed-env --config ... deepspeed ...` is the one-command recipe: it writes
    `.deepspeed_env` in the launch directory, still execs the command (exit code kept), and a simulated
    multi-node worker started from the launch node's environment activates with that config.
    """
    launch_dir, home = nodes
    env = {k: v for k, v in os.environ.items() if not k.startswith("VKD_") and k != "PYTHONPATH"}
    config = os.pathsep.join(str(p) for p in SHIPPED_CONFIGS)
    code = "import json, os; print('CHILD' + json.dumps(os.environ['PYTHONPATH'])); raise SystemExit(3)"
    proc = subprocess.run(
        [str(VKD_RUN), "--write-deepspeed-env", "--config", config, sys.executable, "-c", code],
        env=env,
        cwd=launch_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert (launch_dir / ".deepspeed_env").read_text(encoding="utf-8") == f"VKD_CONFIG={config}\nVKD_ENABLE=1\n"
    child_pythonpath = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("CHILD"))[5:])
    assert child_pythonpath.split(os.pathsep)[0] == BOOTSTRAP_DIR

    launch_node = {**env, "PYTHONPATH": child_pythonpath}
    worker = start_worker(deepspeed_exports(launch_node, launch_dir, home), "pdsh", launch_dir, home)
    assert worker == {"active": True, "errors": [], "VKD_CONFIG": config, "VKD_LOG_FILE": None}


def test_deepspeed_env_doctor_check_names_the_file_that_lacks_our_lines(nodes):
    """`vkd-shim doctor`'s check: with the gate on, a `.deepspeed_env` that DeepSpeed would read but that
    lacks (or contradicts) our lines is a problem naming the file and the missing lines; later files
    override earlier ones as in DeepSpeed; no file, or the gate off, is not a problem."""
    from vkd_shim.env import deepspeed_env_problems, write_deepspeed_env

    launch_dir, home = nodes
    environ = {"VKD_ENABLE": "1", "VKD_WEIGHT": "0.1"}
    dirs = [str(home), str(launch_dir)]
    assert deepspeed_env_problems(environ, dirs) == []

    (home / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nVKD_WEIGHT=0.5\n", encoding="utf-8")
    (problem,) = deepspeed_env_problems(environ, dirs)
    assert str(home / ".deepspeed_env") in problem
    assert "VKD_ENABLE=1, VKD_WEIGHT=0.1" in problem and "--write-deepspeed-env" in problem
    assert deepspeed_env_problems({"VKD_WEIGHT": "0.1"}, dirs) == []

    write_deepspeed_env(launch_dir / ".deepspeed_env", environ)
    assert deepspeed_env_problems(environ, dirs) == []


def test_distributed_doc_lines_are_the_ones_the_tests_prove():
    """docs/DISTRIBUTED.md's `.deepspeed_env` block is the set of lines the mechanism test writes (same
    names, same order), and its CPU recipe names the flags the DDP test runs with."""
    doc = (REPO / "docs" / "DISTRIBUTED.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- deepspeed_env -->\n```text\n(.*?)```", doc, re.S)
    assert block, "the .deepspeed_env block is missing from docs/DISTRIBUTED.md"
    names = [line.split("=", 1)[0] for line in block.group(1).splitlines()]
    assert names == ["VKD_CONFIG", "VKD_ENABLE", "VKD_LOG_FILE"]
    assert all(re.fullmatch(r"VKD_[A-Z_]+=\S+", line) for line in block.group(1).splitlines())
    for flag in ("--use_cpu true", "--ddp_backend gloo", "NPROC_PER_NODE=2"):
        assert flag in doc, flag
