"""Tests for vkd_shim.telemetry: JSON lines read back from real sinks, real torch and ms-swift metrics."""

from __future__ import annotations

import gc
import io
import json
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import weakref
from datetime import datetime, timezone
from pathlib import Path

import pytest
import structlog
import torch
import torch.distributed as dist

from vkd_shim import env
from vkd_shim.runtime import MetricBuffer
from vkd_shim.telemetry import (
    EVENTS,
    EventLogger,
    RateLimiter,
    get_logger,
    probe_log_file,
    rank_info,
    reset_logger,
)

ENV_LOG_FILE = env.LOG_FILE

REPO = Path(__file__).resolve().parents[1]
FIXED_KEYS = ["timestamp", "level", "event", "pid", "rank", "local_rank", "world_size", "logger"]
UTC_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def _reject_constant(token: str) -> None:
    raise AssertionError(f"non-standard JSON constant {token} in a log line")


def parse_lines(text: str) -> list[dict]:
    """Parse strictly: NaN/Infinity tokens would be rejected by log shippers, so they fail here too."""
    return [json.loads(line, parse_constant=_reject_constant) for line in text.splitlines()]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (ENV_LOG_FILE, "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    reset_logger()
    yield
    reset_logger()


# --- event lines ---------------------------------------------------------------------------------


def test_every_line_is_json_with_fixed_keys_first_then_context_then_fields():
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.bind(run_id="run-7", config_digest="abc123")
    log.info("vkd.patch", status="applied", target="compute_loss")
    log.warning("vkd.skip", reason="shape mismatch", student=[4, 8], teacher=[4, 16])
    log.error("vkd.refuse", reason="remote teacher", fix="unset VKD_ENABLE")

    lines = parse_lines(sink.getvalue())
    assert [line["event"] for line in lines] == ["vkd.patch", "vkd.skip", "vkd.refuse"]
    assert [line["level"] for line in lines] == ["info", "warning", "error"]
    assert list(lines[1]) == [*FIXED_KEYS, "run_id", "config_digest", "reason", "student", "teacher"]
    for line in lines:
        assert UTC_ISO.match(line["timestamp"]), line["timestamp"]
        assert line["logger"] == "vkd_shim"
        assert line["pid"] == os.getpid()
        assert (line["rank"], line["local_rank"], line["world_size"]) == (0, 0, 1)
        assert (line["run_id"], line["config_digest"]) == ("run-7", "abc123")
    assert lines[1]["student"] == [4, 8]


def test_timestamp_is_current_utc():
    sink = io.StringIO()
    before = datetime.now(timezone.utc)
    EventLogger(sink=sink).info("vkd.activate")
    after = datetime.now(timezone.utc)
    stamp = parse_lines(sink.getvalue())[0]["timestamp"]
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before <= parsed <= after


def test_bind_accumulates_and_later_values_win():
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.info("vkd.activate")
    log.bind(run_id="a")
    log.bind(run_id="b", config_digest="d1")
    log.info("vkd.config", weight=0.5)
    first, second = parse_lines(sink.getvalue())
    assert "run_id" not in first
    assert (second["run_id"], second["config_digest"], second["weight"]) == ("b", "d1", 0.5)


def test_caller_keys_colliding_with_fixed_keys_are_kept_with_underscore():
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.bind(rank=5)
    log.info("vkd.skip", event="user value", pid="x", timestamp=1)
    (line,) = parse_lines(sink.getvalue())
    assert (line["event"], line["rank"]) == ("vkd.skip", 0)
    assert (line["rank_"], line["event_"], line["pid_"], line["timestamp_"]) == (5, "user value", "x", 1)


def test_unknown_level_is_written_as_info_and_warn_means_warning():
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.event("vkd.config.note", "loud")
    log.event("vkd.patch", "warn")
    first, second = parse_lines(sink.getvalue())
    assert (first["event"], first["level"], first["level_"]) == ("vkd.config.note", "info", "loud")
    assert (second["event"], second["level"]) == ("vkd.patch", "warning")
    assert "level_" not in second


@pytest.mark.parametrize("name", ["vkd.note", "vkd.aligner_frozen", "vkd.Skip", "skip", ""])
def test_unregistered_event_names_are_a_programming_error(name):
    # Every emitted name is read against EVENTS, so a typo cannot ship as a line nobody alerts on.
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    for emit in (log.info, log.warning, log.error, lambda n: log.event(n, "info")):
        with pytest.raises(ValueError, match=re.escape(f"unregistered vision-KD event {name!r}")):
            emit(name)
    assert sink.getvalue() == ""
    assert log.dropped == 0
    log.info("vkd.summary", steps_with_term={"train": 3})
    assert parse_lines(sink.getvalue())[0]["steps_with_term"] == {"train": 3}


def test_values_json_cannot_hold_are_rendered_not_raised():
    class NoRepr:
        def __repr__(self):
            raise RuntimeError("broken repr")

    class Opaque:
        def __repr__(self):
            return "<Opaque>"

    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.warning(
        "vkd.nonfinite",
        obj=Opaque(),
        broken=NoRepr(),
        nan=float("nan"),
        inf=float("-inf"),
        nested={"loss": float("inf"), (1, 2): {3}},
        path=Path("/tmp/x.yaml"),
        count=torch.tensor(3),
        value=torch.tensor(0.25),
        shape=torch.Size([2, 8]),
        raw=b"3",
        exc=ValueError("bad"),
    )
    (line,) = parse_lines(sink.getvalue())
    assert line["obj"] == "<Opaque>"
    assert line["broken"] == "<unrepresentable NoRepr>"
    assert (line["nan"], line["inf"]) == ("nan", "-inf")
    assert line["nested"] == {"loss": "inf", "(1, 2)": [3]}
    assert line["path"] == "/tmp/x.yaml"
    assert (line["count"], line["value"], line["shape"]) == (3, 0.25, [2, 8])
    assert line["raw"] == "b'3'"
    assert line["exc"] == "ValueError('bad')"
    assert log.dropped == 0


def test_sink_errors_are_dropped_and_counted():
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(28, "No space left on device")

    closed = io.StringIO()
    closed.close()
    for sink in (FullDisk(), closed):
        log = EventLogger(sink=sink)
        log.info("vkd.activate")
        log.error("vkd.refuse", reason="x")
        assert log.dropped == 2


def test_default_sink_is_stderr_looked_up_at_emit_time(capsys, monkeypatch):
    log = get_logger()
    log.info("vkd.activate", hooks=2)
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = parse_lines(captured.err)
    assert (line["event"], line["hooks"]) == ("vkd.activate", 2)

    redirected = io.StringIO()
    monkeypatch.setattr(sys, "stderr", redirected)
    log.info("vkd.unpatch", count=1)
    assert parse_lines(redirected.getvalue())[0]["event"] == "vkd.unpatch"


def test_log_file_env_appends_to_file_created_lazily_and_nothing_to_stderr(tmp_path, monkeypatch, capsys):
    path = tmp_path / "logs" / "deep" / "vkd.jsonl"
    monkeypatch.setenv(ENV_LOG_FILE, str(path))
    log = get_logger()
    assert not path.parent.exists()  # nothing touched until the first line

    log.info("vkd.activate")
    reset_logger()  # closes the file; the next logger must append, not truncate
    get_logger().warning("vkd.version", swift_version="9.0.0")

    lines = parse_lines(path.read_text(encoding="utf-8"))
    assert [line["event"] for line in lines] == ["vkd.activate", "vkd.version"]
    assert capsys.readouterr().err == ""


def test_unwritable_log_file_falls_back_to_stderr_and_says_so(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("", encoding="utf-8")
    log = EventLogger(path=str(blocker / "vkd.jsonl"))  # parent is a file: makedirs fails
    log.info("vkd.activate")
    log.info("vkd.attach", targets=["merger"])

    lines = parse_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["vkd.activate", "vkd.log_file_error", "vkd.attach"]
    assert lines[1]["level"] == "warning"  # the run goes on, its lines on stderr
    assert lines[1]["path"] == str(blocker / "vkd.jsonl")
    assert lines[1]["error"].startswith(("FileExistsError", "NotADirectoryError"))
    assert log.dropped == 0
    assert log.file_error == lines[1]["error"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_file_that_opens_but_takes_no_write_moves_the_run_to_stderr(capsys):
    """/dev/full opens for append like any file; only a write fails (ENOSPC), as a full disk would."""
    run = EventLogger(path="/dev/full")  # the run's logger: one warning, then stderr
    run.info("vkd.attach")
    assert [line["event"] for line in parse_lines(capsys.readouterr().err)] == ["vkd.attach", "vkd.log_file_error"]
    assert "No space left on device" in run.file_error


def test_the_doctor_probe_judges_a_log_file_without_writing_or_creating_anything(tmp_path):
    existing = tmp_path / "events.jsonl"
    existing.write_text("kept\n", encoding="utf-8")
    stamp = existing.stat().st_mtime_ns
    assert probe_log_file(str(existing)) == (True, "appendable")
    assert existing.read_text(encoding="utf-8") == "kept\n" and existing.stat().st_mtime_ns == stamp
    assert probe_log_file(str(tmp_path / "a" / "b" / "events.jsonl")) == (True, "can be created")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl"]  # no scratch directory left
    blocked, why = probe_log_file(str(existing / "below.jsonl"))  # a regular file where a directory must be
    assert blocked is False and why.startswith("NotADirectoryError")
    assert probe_log_file(str(tmp_path))[0] is False
    if os.path.exists("/dev/full"):
        assert probe_log_file("/dev/full")[0] is None  # only a write could tell; the probe writes nothing
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere: the mode proves nothing there
        assert probe_log_file(str(read_only / "events.jsonl"))[0] is False


WRITER = """
import sys
from vkd_shim.telemetry import EventLogger

log = EventLogger(path=sys.argv[1])
for i in range(int(sys.argv[3])):
    log.info("vkd.summary", writer=sys.argv[2], i=i, padding="x" * 20000)
"""


def test_ranks_sharing_one_log_file_never_interleave_inside_a_line(tmp_path):
    """Lines of 20 kB (longer than a text file's 8 kB buffer, which splits them into several writes) from
    four processes at once into one file: every line is one whole JSON object."""
    path = tmp_path / "events.jsonl"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(w), "150"], env={**os.environ, "VKD_LOG_FILE": ""}
        )
        for w in range(4)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 600
    records = [json.loads(line) for line in lines]
    assert sorted((r["writer"], r["i"]) for r in records) == sorted((str(w), i) for w in range(4) for i in range(150))


def test_get_logger_is_a_lazy_singleton_and_reset_drops_it():
    first = get_logger()
    assert get_logger() is first
    reset_logger()
    assert get_logger() is not first


def test_logger_pickles_with_its_path_and_context(tmp_path):
    path = tmp_path / "vkd.jsonl"
    log = EventLogger(path=str(path))
    log.bind(run_id="r1")
    log.info("vkd.activate")
    clone = pickle.loads(pickle.dumps(log))
    clone.info("vkd.attach")
    log.close()
    clone.close()
    lines = parse_lines(path.read_text(encoding="utf-8"))
    assert [(line["event"], line["run_id"]) for line in lines] == [
        ("vkd.activate", "r1"),
        ("vkd.attach", "r1"),
    ]


def test_event_table_names_are_namespaced_and_described():
    required = {
        "vkd.activate", "vkd.config", "vkd.config.invalid", "vkd.config.note", "vkd.disabled", "vkd.version",
        "vkd.patch", "vkd.unpatch", "vkd.refuse", "vkd.attach", "vkd.skip", "vkd.nonfinite",
        "vkd.no_visual", "vkd.summary", "vkd.log_file_error", "vkd.monitor_error",
    }  # fmt: skip
    assert set(EVENTS) == required
    assert all(name.startswith("vkd.") for name in EVENTS)
    assert all(EVENTS[name].strip() and "\n" not in EVENTS[name] for name in EVENTS)
    with pytest.raises(TypeError):
        EVENTS["vkd.new"] = "read-only"  # type: ignore[index]


def test_every_registered_event_can_be_emitted():
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    for name in EVENTS:
        log.info(name)
    assert [line["event"] for line in parse_lines(sink.getvalue())] == list(EVENTS)


def test_global_structlog_config_does_not_reach_our_lines():
    def explode(_logger, _name, _event_dict):
        raise RuntimeError("the application's processor ran on our line")

    sink = io.StringIO()
    log = EventLogger(sink=sink)
    structlog.configure(processors=[explode])
    try:
        log.info("vkd.activate")
    finally:
        structlog.reset_defaults()
    (line,) = parse_lines(sink.getvalue())
    assert line["event"] == "vkd.activate"


# --- rank info -----------------------------------------------------------------------------------


def test_rank_info_from_env_and_defaults(monkeypatch):
    assert rank_info({}) == {"rank": 0, "local_rank": 0, "world_size": 1}
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    assert rank_info(env) == {"rank": 5, "local_rank": 1, "world_size": 8}
    assert rank_info({"RANK": "", "WORLD_SIZE": "many"}) == {"rank": 0, "local_rank": 0, "world_size": 1}

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_info() == {"rank": 3, "local_rank": 0, "world_size": 4}
    sink = io.StringIO()
    EventLogger(sink=sink).info("vkd.activate")
    (line,) = parse_lines(sink.getvalue())
    assert (line["rank"], line["world_size"]) == (3, 4)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_initialized_process_group_wins_over_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    sink = io.StringIO()
    log = EventLogger(sink=sink)
    log.info("vkd.activate")  # before init: env is all there is
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert rank_info() == {"rank": 0, "local_rank": 2, "world_size": 1}
        assert rank_info({"RANK": "7", "WORLD_SIZE": "9"}) == {"rank": 0, "local_rank": 0, "world_size": 1}
        log.info("vkd.attach")  # same logger, after init: the group's rank
    finally:
        dist.destroy_process_group()
    before, after = parse_lines(sink.getvalue())
    assert (before["rank"], before["local_rank"], before["world_size"]) == (3, 2, 8)
    assert (after["rank"], after["local_rank"], after["world_size"]) == (0, 2, 1)


# --- rate limiting -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_emits_once_per_window_and_counts_suppressed_exactly():
    clock = FakeClock()
    limiter = RateLimiter(window_s=60.0, clock=clock)
    assert limiter.allow("nan:merger") == (True, 0)
    assert limiter.allow("nan:merger") == (False, 1)
    assert limiter.allow("nan:deepstack_0") == (True, 0)  # keys are independent
    clock.now = 159.9  # 59.9 s after the emit: still inside the window
    assert limiter.allow("nan:merger") == (False, 2)
    assert limiter.allow("nan:merger") == (False, 3)
    clock.now = 160.0  # exactly one window later
    assert limiter.allow("nan:merger") == (True, 3)
    assert limiter.allow("nan:merger") == (False, 1)  # count restarts after an emit
    clock.now = 1000.0
    assert limiter.allow("nan:deepstack_0") == (True, 0)


def test_rate_limiter_rejects_bad_windows():
    assert RateLimiter(window_s=0.0).allow("k") == (True, 0)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="window_s"):
            RateLimiter(window_s=bad)


# --- metric buffer -------------------------------------------------------------------------------


def mean_metrics():
    from swift.metrics.utils import MeanMetric

    return {mode: {k: MeanMetric(nan_value=None, device="cpu") for k in KEYS} for mode in ("train", "eval")}


KEYS = ("vision_kd_loss", "vision_kd/merger")


def test_running_sums_are_exact_and_flush_feeds_meanmetric():
    metrics = mean_metrics()
    buffer = MetricBuffer()
    for v in (0.5, 0.25, 1.75):
        buffer.add("train", "vision_kd_loss", torch.tensor(v, requires_grad=True) * 1.0)
    buffer.add("train", "vision_kd/merger", torch.tensor(2.0, dtype=torch.bfloat16))
    buffer.add("train", "vision_kd/merger", 1)
    assert buffer.pending("train") and not buffer.pending("eval")

    result = buffer.flush("train", metrics, KEYS)
    # 0.5 + 0.25 + 1.75 = 2.5 over 3; 2.0 + 1 = 3.0 over 2
    assert result == {"vision_kd_loss": (2.5, 3), "vision_kd/merger": (3.0, 2)}
    assert all(type(total) is float for total, _ in result.values())
    assert metrics["train"]["vision_kd_loss"].count == 3
    assert metrics["train"]["vision_kd_loss"].compute()["value"] == pytest.approx(2.5 / 3)
    assert metrics["train"]["vision_kd/merger"].compute()["value"] == 1.5
    assert not buffer.pending("train")


def test_mean_is_over_micro_batches_across_flushes_and_buffers():
    metrics = mean_metrics()
    rank_a, rank_b = MetricBuffer(), MetricBuffer()
    rank_a.add("eval", "vision_kd_loss", torch.tensor(1.0))
    rank_a.add("eval", "vision_kd_loss", torch.tensor(2.0))
    rank_b.add("eval", "vision_kd_loss", torch.tensor(6.0))
    rank_a.flush("eval", metrics, KEYS)
    rank_b.flush("eval", metrics, KEYS)
    # (1 + 2 + 6) / 3 = 3.0, not the mean of per-buffer means (1.5 + 6) / 2 = 3.75
    assert metrics["eval"]["vision_kd_loss"].compute()["value"] == 3.0
    assert metrics["train"]["vision_kd_loss"].count == 0  # other mode untouched

    rank_a.add("eval", "vision_kd_loss", torch.tensor(7.0))
    rank_a.flush("eval", metrics, KEYS)
    # second log interval on the same metric: (9 + 7) / 4 = 4.0
    assert metrics["eval"]["vision_kd_loss"].compute()["value"] == 4.0


def test_keys_never_added_update_with_nothing():
    metrics = mean_metrics()
    buffer = MetricBuffer()
    buffer.add("train", "vision_kd_loss", 0.5)
    result = buffer.flush("train", metrics, KEYS)
    assert result["vision_kd/merger"] == (0.0, 0)
    assert metrics["train"]["vision_kd/merger"].compute()["value"] is None
    # flushing an empty buffer still touches every key (same keys on every rank) and adds nothing
    assert buffer.flush("train", metrics, KEYS) == {"vision_kd_loss": (0.0, 0), "vision_kd/merger": (0.0, 0)}
    assert metrics["train"]["vision_kd_loss"].compute()["value"] == 0.5


def test_flush_clears_only_its_mode():
    metrics = mean_metrics()
    buffer = MetricBuffer()
    buffer.add("train", "vision_kd_loss", 1.0)
    buffer.add("eval", "vision_kd_loss", 3.0)
    buffer.flush("train", metrics, KEYS)
    assert not buffer.pending("train")
    assert buffer.pending("eval")
    assert buffer.flush("eval", metrics, KEYS)["vision_kd_loss"] == (3.0, 1)
    assert buffer.flush("train", metrics, KEYS)["vision_kd_loss"] == (0.0, 0)


def test_nonfinite_values_reach_the_caller():
    metrics = mean_metrics()
    buffer = MetricBuffer()
    buffer.add("train", "vision_kd_loss", torch.tensor(1.0))
    buffer.add("train", "vision_kd_loss", torch.tensor(float("nan")))
    total, count = buffer.flush("train", metrics, KEYS)["vision_kd_loss"]
    assert math.isnan(total) and count == 2


def test_add_keeps_no_autograd_graph_alive():
    features = torch.ones(64, 8, requires_grad=True)
    saved = weakref.ref(features)
    buffer = MetricBuffer()
    buffer.add("train", "vision_kd_loss", (features * features).mean())  # MulBackward saves `features`
    del features
    gc.collect()
    assert saved() is None  # a buffered graph would have kept the features alive
    assert buffer.flush("train", mean_metrics(), KEYS)["vision_kd_loss"] == (1.0, 1)


def test_add_rejects_non_scalar_tensors():
    with pytest.raises(ValueError, match=r"0-d tensor.*shape \(2,\)"):
        MetricBuffer().add("train", "vision_kd_loss", torch.ones(2))


class SyncTrap(torch.Tensor):
    """A tensor that records, and while armed refuses, every way of reading its value on the host."""

    armed = True
    host_reads: list[str] = []  # noqa: RUF012

    def _read(self, how):
        SyncTrap.host_reads.append(how)
        if SyncTrap.armed:
            raise AssertionError(f"host sync via {how}")

    def __float__(self):
        self._read("__float__")
        return torch.Tensor.__float__(self.as_subclass(torch.Tensor))

    def item(self):
        self._read("item")
        return torch.Tensor.item(self.as_subclass(torch.Tensor))

    def __bool__(self):
        self._read("__bool__")
        return torch.Tensor.__bool__(self.as_subclass(torch.Tensor))


def test_add_never_reads_tensor_values_on_the_host():
    SyncTrap.armed, SyncTrap.host_reads = True, []
    buffer = MetricBuffer()
    for v in (0.5, 1.5, 4.0):
        buffer.add("train", "vision_kd_loss", torch.tensor(v).as_subclass(SyncTrap))
    buffer.add("train", "vision_kd/merger", torch.tensor(2.0, dtype=torch.float16).as_subclass(SyncTrap))
    assert SyncTrap.host_reads == []

    SyncTrap.armed = False
    result = buffer.flush("train", mean_metrics(), KEYS)
    # one host conversion per key, at log time only: 0.5 + 1.5 + 4.0 = 6.0 over 3
    assert SyncTrap.host_reads == ["__float__", "__float__"]
    assert result == {"vision_kd_loss": (6.0, 3), "vision_kd/merger": (2.0, 1)}


# --- import hygiene ------------------------------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_import_and_use_touch_no_global_logging_config():
    code = (
        "import logging, structlog\n"
        "before = (list(logging.root.handlers), logging.root.level, dict(structlog.get_config()))\n"
        "import vkd_shim.telemetry as t\n"
        "log = t.get_logger(); log.bind(run_id='r'); log.info('vkd.activate')\n"
        "after = (list(logging.root.handlers), logging.root.level, dict(structlog.get_config()))\n"
        "print(structlog.is_configured(), before == after, t._logger is log)\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "True"]
    assert parse_lines(proc.stderr)[0]["run_id"] == "r"


def test_import_loads_neither_torch_nor_swift_nor_a_logger():
    code = (
        "import sys\n"
        "import vkd_shim.telemetry as t\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'swift', 'transformers'})\n"
        "print(heavy, t._logger)\n"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] None"
