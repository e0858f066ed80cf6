"""Tests for vkd_shim.config: parsing, precedence, validation messages and the import budget."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import msgspec
import pytest

from vkd_shim import env
from vkd_shim.config import (
    ResolvedConfig,
    VisualKDConfig,
    load_block,
    read_document,
    resolve,
    split_inline,
)
from vkd_shim.errors import ConfigError
from vkd_shim.schema import MAX_WEIGHT
from vkd_shim.validation import from_block

ENV_CONFIG = env.CONFIG
ENV_WEIGHT = env.WEIGHT
ENV_TARGETS = env.TARGETS
ENV_DISTANCE = env.DISTANCE

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("visual_kd_base.yaml", "stage3_visual_kd.yaml")


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def block_file(tmp_path: Path, body: str, name: str = "vkd.yaml") -> str:
    """A VKD_CONFIG file whose custom.visual_kd block is ``body`` (YAML, one key per line)."""
    indented = "".join(f"    {line}\n" for line in textwrap.dedent(body).strip().splitlines())
    return write(tmp_path, name, f"custom:\n  visual_kd:\n{indented}")


def resolve_block(tmp_path: Path, body: str) -> ResolvedConfig:
    return resolve(environ={ENV_CONFIG: block_file(tmp_path, body)})


# --- defaults -------------------------------------------------------------------------------------------


def test_no_sources_gives_defaults():
    resolved = resolve(environ={})
    assert resolved.config == VisualKDConfig()
    assert resolved.config.to_dict() == {
        "enabled": True,
        "mode": "anchor",
        "weight": 1.0,
        "share": None,
        "targets": {"merger": 1.0, "deepstack": 1.0},
        "optional_targets": ["deepstack"],
        "deepstack_layers": None,
        "distance": "mse",
        "warmup_steps": 0,
        "nonfinite": "skip",
        "teacher_nonfinite": "raise",
        "no_visual": "raise",
        "no_visual_steps": 50,
    }
    assert dict(resolved.sources) == dict.fromkeys(resolved.config.to_dict(), "default")
    assert resolved.files == ()
    assert resolved.notes == ()
    assert resolved.config.active is True
    assert resolved.config.kinds == ("merger", "deepstack")
    assert resolved.config.kind_weights == {"merger": 1.0, "deepstack": 1.0}


def test_environ_none_reads_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CONFIG, block_file(tmp_path, "weight: 0.25"))
    for name in (ENV_WEIGHT, ENV_TARGETS, ENV_DISTANCE, env.INLINE, env.INLINE_SOURCE):
        monkeypatch.delenv(name, raising=False)
    assert resolve().config.weight == 0.25


def test_inline_block_travels_through_the_environment(tmp_path):
    # What the CLI process leaves for the re-exec'd training processes: the block as JSON and its file.
    path = block_file(tmp_path, "weight: 0.5")
    environ = {
        env.INLINE: json.dumps({"distance": "cosine", "weight": 3.0}),
        env.INLINE_SOURCE: "/jobs/train.yaml",
        ENV_CONFIG: path,
    }
    resolved = resolve(environ=environ)
    assert (resolved.config.distance, resolved.config.weight) == ("cosine", 0.5)
    assert resolved.sources["distance"] == "inline:/jobs/train.yaml"
    assert resolved.sources["weight"] == path
    # An explicit inline block replaces what the environment carries.
    assert resolve(environ=environ, inline={"warmup_steps": 3}).sources["distance"] == "default"
    with pytest.raises(ConfigError) as caught:
        resolve(environ={env.INLINE: json.dumps({"weight": -1}), env.INLINE_SOURCE: "/jobs/train.yaml"})
    assert caught.value.source == "inline:/jobs/train.yaml"
    assert resolve(environ={env.INLINE: json.dumps({"weight": 2.0})}).sources["weight"] == "inline"


# --- valid forms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("merger", (("merger", 1.0),)),
        ("DeepStack", (("deepstack", 1.0),)),
        ("[deepstack, merger]", (("merger", 1.0), ("deepstack", 1.0))),
        ("[MERGER]", (("merger", 1.0),)),
        ("{deepstack: 0.5, Merger: 2}", (("merger", 2.0), ("deepstack", 0.5))),
        ("{deepstack: 0}", (("deepstack", 0.0),)),
    ],
)
def test_targets_forms_normalize_to_canonical_pairs(tmp_path, yaml_value, expected):
    config = resolve_block(tmp_path, f"targets: {yaml_value}").config
    assert config.targets == expected
    assert all(isinstance(weight, float) for _, weight in config.targets)


def test_int_weight_becomes_float(tmp_path):
    config = resolve_block(tmp_path, "weight: 2").config
    assert config.weight == 2.0
    assert type(config.weight) is float


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [("2", (2,)), ("[3, 1, 3, 0]", (0, 1, 3)), ("null", None), ("~", None)],
)
def test_deepstack_layers_forms(tmp_path, yaml_value, expected):
    assert resolve_block(tmp_path, f"deepstack_layers: {yaml_value}").config.deepstack_layers == expected


@pytest.mark.parametrize(("yaml_value", "expected"), [("mse", "mse"), ("MSE", "mse"), ("Cosine", "cosine")])
def test_distance_values(tmp_path, yaml_value, expected):
    assert resolve_block(tmp_path, f"distance: {yaml_value}").config.distance == expected


@pytest.mark.parametrize(("yaml_value", "expected"), [("skip", "skip"), ("RAISE", "raise"), ("Skip", "skip")])
def test_nonfinite_values(tmp_path, yaml_value, expected):
    assert resolve_block(tmp_path, f"nonfinite: {yaml_value}").config.nonfinite == expected


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ("teacher_nonfinite: Skip", "teacher_nonfinite", "skip"),
        ("teacher_nonfinite: raise", "teacher_nonfinite", "raise"),
        ("no_visual: WARN", "no_visual", "warn"),
        ("no_visual: raise", "no_visual", "raise"),
        ("no_visual_steps: 1", "no_visual_steps", 1),
        ("no_visual_steps: 500", "no_visual_steps", 500),
    ],
)
def test_policy_values(tmp_path, body, field, expected):
    assert getattr(resolve_block(tmp_path, body).config, field) == expected


@pytest.mark.parametrize(("yaml_value", "expected"), [("true", True), ("yes", True), ("false", False), ("no", False)])
def test_enabled_accepts_yaml_booleans(tmp_path, yaml_value, expected):
    assert resolve_block(tmp_path, f"enabled: {yaml_value}").config.enabled is expected


def test_every_field_at_once_and_sources(tmp_path):
    path = block_file(
        tmp_path,
        """
        enabled: true
        mode: monitor
        weight: 0.5
        share: 0.25
        targets: {merger: 1.5, deepstack: 0.25}
        deepstack_layers: [2, 0]
        distance: cosine
        warmup_steps: 100
        nonfinite: raise
        teacher_nonfinite: skip
        no_visual: warn
        no_visual_steps: 7
        """,
    )
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config == VisualKDConfig(
        enabled=True,
        mode="monitor",
        weight=0.5,
        share=0.25,
        targets=(("merger", 1.5), ("deepstack", 0.25)),
        optional_targets=(),
        deepstack_layers=(0, 2),
        distance="cosine",
        warmup_steps=100,
        nonfinite="raise",
        teacher_nonfinite="skip",
        no_visual="warn",
        no_visual_steps=7,
    )
    assert set(resolved.sources.values()) == {path}
    assert resolved.files == (path,)


def test_empty_block_keeps_defaults_but_records_the_file(tmp_path):
    path = write(tmp_path, "empty.yaml", "custom:\n  visual_kd: {}\n")
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config == VisualKDConfig()
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.files == (path,)


def test_swift_args_keys_beside_the_block_are_ignored(tmp_path):
    path = write(
        tmp_path,
        "stage3.yaml",
        """
        rlhf_type: gkd
        model: /models/student
        lmbda: 0.5
        custom:
          other_tool: {x: 1}
          visual_kd:
            weight: 0.75
        """,
    )
    assert load_block(path) == {"weight": 0.75}
    assert resolve(environ={ENV_CONFIG: path}).config.weight == 0.75


# --- invalid field values -------------------------------------------------------------------------------


WEIGHTS = "a number from 0 to 10000"
TARGETS_ALLOWED = f"merger, deepstack, vit (one name, a list of names, or a mapping name -> {WEIGHTS})"
LAYERS_ALLOWED = "null (every deepstack merger), an int >= 0, or a list of ints >= 0"
FINITE = " (it must be finite: NaN and Inf compare false with every bound)"
OVERFLOW = " (larger weights overflow the fp32 gradient norm; see MAX_WEIGHT in vkd_shim.schema)"
YAML_NUMBER = (
    " (PyYAML reads quoted numbers and exponents without a decimal point, such as 1e-3, as strings: write 1.0e-3)"
)
QUOTED_BOOL = " (a quoted boolean is a string: write true or false without quotes)"


@pytest.mark.parametrize(
    ("body", "field", "value", "problem", "allowed"),
    [
        ("enabled: 'true'", "enabled", "'true'", "Expected `bool`, got `str`" + QUOTED_BOOL, "true, false"),
        ("enabled: 1", "enabled", "1", "Expected `bool`, got `int`", "true, false"),
        ("weight: -1", "weight", "-1", "Expected `float` >= 0.0", WEIGHTS),
        ("weight: .nan", "weight", "nan", "Expected `float` >= 0.0" + FINITE, WEIGHTS),
        ("weight: .inf", "weight", "inf", "Expected `float` <= 10000.0" + FINITE, WEIGHTS),
        ("weight: -.inf", "weight", "-inf", "Expected `float` >= 0.0" + FINITE, WEIGHTS),
        ("weight: true", "weight", "True", "Expected `float`, got `bool`", WEIGHTS),
        ("weight: '0.5'", "weight", "'0.5'", "Expected `float`, got `str`" + YAML_NUMBER, WEIGHTS),
        ("weight: [1]", "weight", "[1]", "Expected `float`, got `array`", WEIGHTS),
        ("weight: 10001", "weight", "10001", "Expected `float` <= 10000.0" + OVERFLOW, WEIGHTS),
        ("targets: []", "targets", "[]", "selects no target", TARGETS_ALLOWED),
        ("targets: {}", "targets", "{}", "selects no target", TARGETS_ALLOWED),
        ("targets: ''", "targets", "''", "Invalid enum value ''", TARGETS_ALLOWED),
        ("targets: 3", "targets", "3", "Expected `str | object | array`, got `int`", TARGETS_ALLOWED),
        ("targets: [merger, pixels]", "targets[1]", "'pixels'", "Invalid enum value 'pixels'", TARGETS_ALLOWED),
        (
            "targets: [merger, mergr]",
            "targets[1]",
            "'mergr'",
            "Invalid enum value 'mergr' (did you mean 'merger'?)",
            TARGETS_ALLOWED,
        ),
        (
            "targets: [merger, merger]",
            "targets",
            "['merger', 'merger']",
            "target kind 'merger' is given twice",
            TARGETS_ALLOWED,
        ),
        (
            "targets: [merger, Merger]",
            "targets",
            "['merger', 'Merger']",
            "target kind 'merger' is given twice",
            TARGETS_ALLOWED,
        ),
        (
            "targets: [merger, [deepstack]]",
            "targets[1]",
            "['deepstack']",
            "Expected `str`, got `array`",
            TARGETS_ALLOWED,
        ),
        ("targets: {merger: -1}", "targets.merger", "-1", "Expected `float` >= 0.0", TARGETS_ALLOWED),
        (
            "targets: {merger: 1, deepstack: .nan}",
            "targets.deepstack",
            "nan",
            "Expected `float` >= 0.0" + FINITE,
            TARGETS_ALLOWED,
        ),
        ("targets: {merger: false}", "targets.merger", "False", "Expected `float`, got `bool`", TARGETS_ALLOWED),
        ("targets: {merger: 1.0e+5}", "targets.merger", "100000.0", "Expected `float` <= 10000.0", TARGETS_ALLOWED),
        ("targets: {pixels: 1}", "targets", "'pixels'", "Invalid enum value 'pixels'", TARGETS_ALLOWED),
        (
            "targets: {mergr: 1}",
            "targets",
            "'mergr'",
            "Invalid enum value 'mergr' (did you mean 'merger'?)",
            TARGETS_ALLOWED,
        ),
        ("deepstack_layers: -1", "deepstack_layers", "-1", "Expected `int` >= 0", LAYERS_ALLOWED),
        ("deepstack_layers: [0, -2]", "deepstack_layers[1]", "-2", "Expected `int` >= 0", LAYERS_ALLOWED),
        ("deepstack_layers: [true]", "deepstack_layers[0]", "True", "Expected `int`, got `bool`", LAYERS_ALLOWED),
        (
            "deepstack_layers: '1'",
            "deepstack_layers",
            "'1'",
            "Expected `int | array | null`, got `str`",
            LAYERS_ALLOWED,
        ),
        (
            "deepstack_layers: 1.5",
            "deepstack_layers",
            "1.5",
            "Expected `int | array | null`, got `float`",
            LAYERS_ALLOWED,
        ),
        (
            "deepstack_layers: []",
            "deepstack_layers",
            "[]",
            "an empty list selects no layer (use null for every deepstack merger)",
            LAYERS_ALLOWED,
        ),
        ("distance: 3", "distance", "3", "Expected `str`, got `int`", "mse, cosine, nmse, relation"),
        ("nonfinite: ignore", "nonfinite", "'ignore'", "Invalid enum value 'ignore'", "skip, raise"),
        ("teacher_nonfinite: ignore", "teacher_nonfinite", "'ignore'", "Invalid enum value 'ignore'", "raise, skip"),
        ("no_visual: wran", "no_visual", "'wran'", "Invalid enum value 'wran' (did you mean 'warn'?)", "raise, warn"),
        ("no_visual_steps: 0", "no_visual_steps", "0", "Expected `int` >= 1", "an int >= 1"),
        ("no_visual_steps: 1.5", "no_visual_steps", "1.5", "Expected `int`, got `float`", "an int >= 1"),
        ("warmup_steps: -1", "warmup_steps", "-1", "Expected `int` >= 0", "an int >= 0"),
        ("warmup_steps: 1.5", "warmup_steps", "1.5", "Expected `int`, got `float`", "an int >= 0"),
        ("warmup_steps: true", "warmup_steps", "True", "Expected `int`, got `bool`", "an int >= 0"),
    ],
)
def test_invalid_values_name_field_file_value_and_allowed(tmp_path, body, field, value, problem, allowed):
    path = block_file(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    error = caught.value
    assert error.field == f"custom.visual_kd.{field}"
    assert error.source == path
    assert error.allowed == allowed
    assert str(error) == (
        f"invalid vision-KD config in {path}: custom.visual_kd.{field} = {value}: {problem}; allowed values: {allowed}"
    )


@pytest.mark.parametrize(
    ("yaml_value", "value", "problem"),
    [
        ("1.0e+300", "1e+300", "Expected `float` <= 10000.0" + OVERFLOW),
        ("1.0e+38", "1e+38", "Expected `float` <= 10000.0" + OVERFLOW),
        ("1.0e+5", "100000.0", "Expected `float` <= 10000.0" + OVERFLOW),
        ("10000.001", "10000.001", "Expected `float` <= 10000.0" + OVERFLOW),
        ("1.0e+309", "inf", "Expected `float` <= 10000.0" + FINITE),  # overflows to inf when parsed
        ("1e300", "'1e300'", "Expected `float`, got `str`" + YAML_NUMBER),  # YAML 1.1: a string, still refused
    ],
)
def test_weight_above_the_ceiling_is_refused(tmp_path, yaml_value, value, problem):
    # A weight of 1e38 gives an infinite fp32 grad norm: every update dropped while the run exits 0.
    path = block_file(tmp_path, f"weight: {yaml_value}")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == "custom.visual_kd.weight"
    assert caught.value.allowed == WEIGHTS
    assert str(caught.value) == (
        f"invalid vision-KD config in {path}: custom.visual_kd.weight = {value}: {problem}; allowed values: {WEIGHTS}"
    )


@pytest.mark.parametrize("raw", ["1e300", "1e38", "1e5", "10000.5", "nan", "inf", "-inf", "Infinity"])
def test_weight_ceiling_and_finiteness_hold_for_the_env_override(raw):
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_WEIGHT: raw})
    assert caught.value.field == ENV_WEIGHT
    assert str(caught.value).startswith(f"invalid vision-KD config in env:VKD_WEIGHT: VKD_WEIGHT = {float(raw)!r}: ")
    assert str(caught.value).endswith(f"; allowed values: {WEIGHTS}")


@pytest.mark.parametrize("weight", [1e300, 1e38, 1e5, float("nan"), float("inf")])
def test_weight_ceiling_holds_for_the_inline_block(weight):
    with pytest.raises(ConfigError) as caught:
        resolve(environ={}, inline={"weight": weight}, inline_source="/jobs/train.yaml")
    assert (caught.value.field, caught.value.source) == ("custom.visual_kd.weight", "inline:/jobs/train.yaml")
    assert caught.value.allowed == WEIGHTS


def test_weight_at_the_ceiling_is_accepted(tmp_path):
    assert MAX_WEIGHT == 1e4
    assert resolve_block(tmp_path, "weight: 1.0e+4").config.weight == 10000.0
    assert resolve_block(tmp_path, "weight: 10000").config.weight == 10000.0
    assert resolve(environ={ENV_WEIGHT: "1e4"}).config.weight == 10000.0
    assert resolve(environ={ENV_TARGETS: "merger:1e4"}).config.targets == (("merger", 10000.0),)
    assert resolve(environ={}, inline={"weight": MAX_WEIGHT}).config.weight == MAX_WEIGHT


def test_error_message_has_the_documented_shape(tmp_path):
    path = block_file(tmp_path, "distance: l2")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert str(caught.value) == (
        f"invalid vision-KD config in {path}: custom.visual_kd.distance = 'l2': Invalid enum value 'l2'; "
        "allowed values: mse, cosine, nmse, relation"
    )


def test_close_misspelling_of_a_choice_is_suggested(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'cosine'\?"):
        resolve_block(tmp_path, "distance: cosin")


def test_exponent_without_decimal_point_explains_the_yaml_trap(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; 1.0e-3 is a float.
    with pytest.raises(ConfigError, match=r"write 1\.0e-3"):
        resolve_block(tmp_path, "weight: 1e-3")
    assert resolve_block(tmp_path, "weight: 1.0e-3").config.weight == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("body", "hint", "present"),
    [
        ("weight: '0.5'", "write 1.0e-3", True),
        ("weight: abc", "write 1.0e-3", False),
        ("enabled: 'yes'", "quoted boolean", True),
        ("enabled: maybe", "quoted boolean", False),
    ],
)
def test_string_hints_only_for_strings_that_look_right(tmp_path, body, hint, present):
    with pytest.raises(ConfigError) as caught:
        resolve_block(tmp_path, body)
    assert (hint in str(caught.value)) is present


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("targets: [deepstack_0]", "custom.visual_kd.targets[0]"),
        ("targets: deepstack_1", "custom.visual_kd.targets"),
        ("targets: {deepstack_0: 0.5}", "custom.visual_kd.targets"),
    ],
)
def test_layer_name_as_target_kind_points_to_deepstack_layers(tmp_path, body, field):
    with pytest.raises(ConfigError) as caught:
        resolve_block(tmp_path, body)
    assert caught.value.field == field
    assert ": a kind names every layer: write deepstack and pick layers with deepstack_layers; " in str(caught.value)


@pytest.mark.parametrize(("key", "suggestion"), [("wieght", "weight"), ("Weight", "weight"), ("target", "targets")])
def test_unknown_key_suggests_the_close_match_and_lists_keys(tmp_path, key, suggestion):
    path = block_file(tmp_path, f"{key}: 0.5")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    message = str(caught.value)
    assert caught.value.field == f"custom.visual_kd.{key}"
    assert path in message
    assert f"did you mean '{suggestion}'?" in message
    assert message.endswith(
        "allowed keys: enabled, mode, weight, share, targets, optional_targets, deepstack_layers, distance,"
        " warmup_steps, nonfinite, teacher_nonfinite, no_visual, no_visual_steps"
    )


def test_unknown_key_without_close_match_still_lists_keys(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve_block(tmp_path, "learning_rate: 0.1")
    assert "did you mean" not in str(caught.value)
    assert "unknown key" in str(caught.value)
    assert caught.value.allowed.startswith("enabled, mode, weight")


# --- file-level errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == ENV_CONFIG
    assert caught.value.source == path
    assert str(caught.value) == f"invalid vision-KD config in {path}: VKD_CONFIG: file not found"


def test_missing_relative_file_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"relative to {tmp_path}"):
        resolve(environ={ENV_CONFIG: "configs/missing.yaml"})


NOT_REGULAR = "VKD_CONFIG: cannot read the file: not a regular file (a directory, FIFO or device)"


def test_directory_instead_of_file_is_unreadable(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: str(tmp_path)})
    assert caught.value.source == str(tmp_path)
    assert caught.value.field == ENV_CONFIG
    assert str(caught.value) == f"invalid vision-KD config in {tmp_path}: {NOT_REGULAR}"


def test_fifo_is_refused_without_blocking(tmp_path):
    # open() on a FIFO blocks until a writer appears: every Python process that activates the shim would hang.
    fifo = tmp_path / "vkd.yaml"
    os.mkfifo(fifo)
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            resolve(environ={ENV_CONFIG: str(fifo)})
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        # The regression: the worker is stuck opening the FIFO; be its writer so the thread can end.
        with open(fifo, "w", encoding="utf-8"):
            pass
        worker.join(timeout=20)
        pytest.fail("resolve() blocked on a FIFO named by VKD_CONFIG")
    error = outcome["error"]
    assert isinstance(error, ConfigError), error
    assert error.source == str(fifo)
    assert str(error) == f"invalid vision-KD config in {fifo}: {NOT_REGULAR}"


def test_read_document_parses_one_file_safely(tmp_path):
    path = write(tmp_path, "train.yaml", "rlhf_type: gkd\ncustom:\n  visual_kd:\n    weight: 0.5\n")
    assert read_document(path) == {"rlhf_type": "gkd", "custom": {"visual_kd": {"weight": 0.5}}}
    assert read_document(write(tmp_path, "empty.yaml", "")) is None
    with pytest.raises(ConfigError, match="not a regular file"):
        read_document(str(tmp_path))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "custom:\n  visual_kd:\n    weight: 0.1\n    weight: 50.0\n",
            "broken YAML at line 4, column 5: duplicate key 'weight' (first given on line 3)",
        ),
        (
            "custom:\n  visual_kd:\n    weight: 0.1\ncustom:\n  visual_kd:\n    weight: 50.0\n",
            "broken YAML at line 4, column 1: duplicate key 'custom' (first given on line 1)",
        ),
        (
            # column 28: the second "merger" starts after 4 + len("targets: {merger: 1.0, ") = 27 characters
            "custom:\n  visual_kd:\n    targets: {merger: 1.0, merger: 2.0}\n",
            "broken YAML at line 3, column 28: duplicate key 'merger' (first given on line 3)",
        ),
    ],
)
def test_duplicate_keys_are_refused_naming_the_key_and_the_file(tmp_path, text, problem):
    # PyYAML would silently keep the last value: a weight of 50.0 the author thought was 0.1.
    path = write(tmp_path, "dup.yaml", text)
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == ENV_CONFIG
    assert caught.value.source == path
    assert str(caught.value) == f"invalid vision-KD config in {path}: VKD_CONFIG: {problem}"


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = write(
        tmp_path,
        "anchors.yaml",
        """
        base: &base
          weight: 0.5
          distance: cosine
        custom:
          visual_kd:
            <<: *base
            weight: 0.25
        """,
    )
    config = resolve(environ={ENV_CONFIG: path}).config
    assert (config.weight, config.distance) == (0.25, "cosine")


def test_non_utf8_file_is_unreadable(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"custom:\n  visual_kd:\n    distance: \xe9\n")
    with pytest.raises(ConfigError, match="cannot read the file"):
        resolve(environ={ENV_CONFIG: str(path)})


def test_broken_yaml_reports_line_and_column(tmp_path):
    # Line 3 ("b: : 2"): PyYAML stops at the second colon, 0-based column 3 -> column 4.
    path = write(tmp_path, "broken.yaml", "custom:\n  visual_kd: {}\nb: : 2\n")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    message = str(caught.value)
    assert caught.value.source == path
    assert "broken YAML at line 3, column 4: mapping values are not allowed here" in message
    assert "\n" not in message


def test_unsafe_yaml_tag_is_refused(tmp_path):
    path = write(tmp_path, "evil.yaml", "custom:\n  visual_kd: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="broken YAML at line 2"):
        resolve(environ={ENV_CONFIG: path})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "the top level is a list"),
        ("", "the file is empty"),
        ("42\n", "the top level is a int"),
    ],
)
def test_file_that_is_not_a_mapping(tmp_path, text, expected):
    path = write(tmp_path, "odd.yaml", text)
    with pytest.raises(ConfigError, match=expected) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == ENV_CONFIG


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("model: x\n", "a VKD_CONFIG file must hold a custom.visual_kd mapping"),
        ("custom:\n  visaul_kd:\n    weight: 1\n", "found 'custom.visaul_kd': did you mean 'custom.visual_kd'?"),
        ("custom:\n  visual-kd:\n    weight: 1\n", "found 'custom.visual-kd': did you mean 'custom.visual_kd'?"),
        ("Custom:\n  visual_kd:\n    weight: 1\n", "found top-level 'Custom': did you mean 'custom'?"),
        ("custon:\n  visual_kd:\n    weight: 1\n", "found top-level 'custon': did you mean 'custom'?"),
        ("custom:\n  other: 1\n", "a VKD_CONFIG file must hold a custom.visual_kd mapping"),
        ("visual_kd:\n  weight: 1\n", "found top-level 'visual_kd': nest it under 'custom:'"),
        ("custom: yes\n", "'custom' is a bool, not a mapping"),
    ],
)
def test_file_without_the_block_suggests_where_it_is(tmp_path, text, hint):
    path = write(tmp_path, "args.yaml", text)
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == "custom.visual_kd"
    assert str(caught.value) == f"invalid vision-KD config in {path}: custom.visual_kd: block not found; {hint}"


@pytest.mark.parametrize("value", ["", "[weight]", "0.5"])
def test_block_that_is_not_a_mapping(tmp_path, value):
    path = write(tmp_path, "args.yaml", f"custom:\n  visual_kd: {value}\n")
    with pytest.raises(ConfigError, match="expected a mapping") as caught:
        load_block(path)
    assert caught.value.field == "custom.visual_kd"


# --- precedence -----------------------------------------------------------------------------------------


def test_stage_overlay_merges_fields_and_replaces_selections(tmp_path):
    base = block_file(
        tmp_path,
        """
        weight: 0.5
        distance: cosine
        targets: {merger: 0.5, deepstack: 0.25}
        deepstack_layers: [0, 1]
        warmup_steps: 100
        """,
        name="base.yaml",
    )
    stage = block_file(tmp_path, "weight: 2\ntargets: {deepstack: 2}\ndeepstack_layers: 2", name="stage3.yaml")
    resolved = resolve(environ={ENV_CONFIG: os.pathsep.join([base, stage])})
    config = resolved.config
    assert config.weight == 2.0
    assert config.distance == "cosine"
    assert config.warmup_steps == 100
    # Replaced whole: the base's merger entry and layers 0 and 1 are gone, not merged in.
    assert config.targets == (("deepstack", 2.0),)
    assert config.deepstack_layers == (2,)
    assert resolved.files == (base, stage)
    assert dict(resolved.sources) == {
        "enabled": "default",
        "mode": "default",
        "weight": stage,
        "share": "default",
        "targets": stage,
        "optional_targets": stage,  # a source naming targets makes them required
        "deepstack_layers": stage,
        "distance": base,
        "warmup_steps": base,
        "nonfinite": "default",
        "teacher_nonfinite": "default",
        "no_visual": "default",
        "no_visual_steps": "default",
    }


def test_overlay_order_decides(tmp_path):
    first = block_file(tmp_path, "weight: 0.1", name="a.yaml")
    second = block_file(tmp_path, "weight: 0.2", name="b.yaml")
    assert resolve(environ={ENV_CONFIG: os.pathsep.join([first, second])}).config.weight == 0.2
    assert resolve(environ={ENV_CONFIG: os.pathsep.join([second, first])}).config.weight == 0.1


def test_empty_entries_in_config_path_are_ignored(tmp_path):
    base = block_file(tmp_path, "weight: 0.1", name="a.yaml")
    stage = block_file(tmp_path, "distance: cosine", name="b.yaml")
    sep = os.pathsep
    resolved = resolve(environ={ENV_CONFIG: f"{sep}{base}{sep}{sep}{stage}{sep}"})
    assert resolved.files == (base, stage)
    assert (resolved.config.weight, resolved.config.distance) == (0.1, "cosine")


def test_error_in_overlay_names_the_overlay(tmp_path):
    base = block_file(tmp_path, "weight: 0.1", name="base.yaml")
    stage = block_file(tmp_path, "weight: -0.1", name="stage3.yaml")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: os.pathsep.join([base, stage])})
    assert caught.value.source == stage


def test_env_overrides_beat_files(tmp_path):
    path = block_file(tmp_path, "weight: 0.5\ndistance: mse\ntargets: [merger]\nwarmup_steps: 7")
    resolved = resolve(
        environ={
            ENV_CONFIG: path,
            ENV_WEIGHT: "0.25",
            ENV_TARGETS: "merger:1.0, deepstack:0.5",
            ENV_DISTANCE: " COSINE ",
        }
    )
    config = resolved.config
    assert config.weight == 0.25
    assert config.targets == (("merger", 1.0), ("deepstack", 0.5))
    assert config.distance == "cosine"
    assert config.warmup_steps == 7
    assert resolved.sources["weight"] == "env:VKD_WEIGHT"
    assert resolved.sources["targets"] == "env:VKD_TARGETS"
    assert resolved.sources["distance"] == "env:VKD_DISTANCE"
    assert resolved.sources["warmup_steps"] == path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("deepstack,merger", (("merger", 1.0), ("deepstack", 1.0))),
        ("Deepstack", (("deepstack", 1.0),)),
        ("merger,", (("merger", 1.0),)),
        ("deepstack:0.5,merger", (("merger", 1.0), ("deepstack", 0.5))),
    ],
)
def test_env_targets_forms(raw, expected):
    assert resolve(environ={ENV_TARGETS: raw}).config.targets == expected


def test_empty_env_values_are_unset(tmp_path):
    path = block_file(tmp_path, "weight: 0.5\ndistance: cosine\ntargets: merger")
    resolved = resolve(environ={ENV_CONFIG: path, ENV_WEIGHT: "", ENV_TARGETS: " ", ENV_DISTANCE: ""})
    assert (resolved.config.weight, resolved.config.distance) == (0.5, "cosine")
    assert resolved.config.targets == (("merger", 1.0),)
    assert set(resolved.sources.values()) == {"default", path}
    assert resolve(environ={ENV_CONFIG: ""}).files == ()


@pytest.mark.parametrize(
    ("name", "raw", "value", "problem", "allowed"),
    [
        (ENV_WEIGHT, "abc", "'abc'", "not a number", WEIGHTS),
        (ENV_WEIGHT, "nan", "nan", "Expected `float` >= 0.0" + FINITE, WEIGHTS),
        (ENV_WEIGHT, "inf", "inf", "Expected `float` <= 10000.0" + FINITE, WEIGHTS),
        (ENV_WEIGHT, "-1", "-1.0", "Expected `float` >= 0.0", WEIGHTS),
        (ENV_TARGETS, "merger:x", "'x'", "not a number", WEIGHTS),
        (ENV_TARGETS, "merger:-1", "-1.0", "Expected `float` >= 0.0", TARGETS_ALLOWED),
        (ENV_TARGETS, "merger:nan", "nan", "Expected `float` >= 0.0" + FINITE, TARGETS_ALLOWED),
        (ENV_TARGETS, "merger:1e5", "100000.0", "Expected `float` <= 10000.0", TARGETS_ALLOWED),
        (ENV_TARGETS, "pixels", "'pixels'", "Invalid enum value 'pixels'", TARGETS_ALLOWED),
        (ENV_TARGETS, "merger,Merger", "'merger,Merger'", "target kind 'merger' is given twice", TARGETS_ALLOWED),
        (
            ENV_TARGETS,
            "merger:1,merger:2",
            "'merger:1,merger:2'",
            "target kind 'merger' is given twice",
            TARGETS_ALLOWED,
        ),
        (ENV_TARGETS, ",", "{}", "selects no target", TARGETS_ALLOWED),
        (ENV_DISTANCE, "l1", "'l1'", "Invalid enum value 'l1'", "mse, cosine, nmse, relation"),
        (env.MODE, "watch", "'watch'", "Invalid enum value 'watch'", "anchor, monitor"),
    ],
)
def test_env_errors_name_the_variable(name, raw, value, problem, allowed):
    with pytest.raises(ConfigError) as caught:
        resolve(environ={name: raw})
    error = caught.value
    assert error.field == name
    assert error.source == f"env:{name}"
    assert error.allowed == allowed
    assert (
        str(error) == f"invalid vision-KD config in env:{name}: {name} = {value}: {problem}; allowed values: {allowed}"
    )


def test_monitor_mode_is_active_at_any_weight_and_adds_no_weight_notes(tmp_path):
    """VKD_MODE=monitor on a run's existing config: the shim attaches and measures whatever the weight,
    so `weight: 0` or all-zero target weights are not "the term is off" there."""
    path = block_file(tmp_path, "weight: 0\ntargets: {merger: 0}")
    anchored = resolve(environ={ENV_CONFIG: path})
    assert not anchored.config.active and anchored.notes
    monitored = resolve(environ={ENV_CONFIG: path, env.MODE: " Monitor "})
    assert monitored.config.mode == "monitor" and monitored.config.monitor and monitored.config.active
    assert monitored.sources["mode"] == "env:VKD_MODE"
    assert monitored.notes == ()
    disabled = resolve(environ={ENV_CONFIG: path, env.MODE: "monitor"}, inline={"enabled": False})
    assert not disabled.config.active  # enabled: false turns monitoring off too


def test_inline_block_loses_to_files_and_is_recorded(tmp_path):
    path = block_file(tmp_path, "weight: 0.5")
    inline = {"weight": 3, "distance": "Cosine", "warmup_steps": 5}
    resolved = resolve(environ={ENV_CONFIG: path}, inline=inline, inline_source="/jobs/train.yaml")
    assert resolved.config.weight == 0.5
    assert resolved.config.distance == "cosine"
    assert resolved.config.warmup_steps == 5
    assert resolved.sources["weight"] == path
    assert resolved.sources["distance"] == "inline:/jobs/train.yaml"
    assert resolved.sources["warmup_steps"] == "inline:/jobs/train.yaml"
    assert resolved.files == (path,)


def test_inline_alone_and_env_over_inline():
    resolved = resolve(environ={ENV_WEIGHT: "0.125"}, inline={"weight": 2.0, "targets": "merger"})
    assert resolved.config.weight == 0.125
    assert resolved.config.targets == (("merger", 1.0),)
    assert resolved.sources["targets"] == "inline"


def test_inline_errors_name_the_inline_source():
    with pytest.raises(ConfigError) as caught:
        resolve(environ={}, inline={"weight": -1}, inline_source="/jobs/train.yaml")
    assert caught.value.source == "inline:/jobs/train.yaml"
    assert str(caught.value).startswith("invalid vision-KD config in inline:/jobs/train.yaml: custom.visual_kd.weight")


def test_inline_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping, got a list"):
        resolve(environ={}, inline=["weight"], inline_source="x.yaml")


# --- notes ----------------------------------------------------------------------------------------------


def test_note_when_enabled_with_weight_zero(tmp_path):
    path = block_file(tmp_path, "weight: 0")
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config.active is False
    assert resolved.notes == (f"weight = 0 ({path}) while enabled: the term is off",)


def test_note_when_disabled(tmp_path):
    path = block_file(tmp_path, "enabled: false")
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config.active is False
    assert resolved.notes == (f"enabled = false ({path}): the vision-KD term is off for this run",)


def test_note_when_every_target_weight_is_zero():
    resolved = resolve(environ={ENV_TARGETS: "merger:0,deepstack:0"})
    assert resolved.config.active is True
    assert resolved.notes == ("every target weight is 0 (env:VKD_TARGETS): the term adds nothing",)


def test_note_when_layers_given_without_deepstack_target(tmp_path):
    path = block_file(tmp_path, "targets: merger\ndeepstack_layers: [1]")
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.notes == (f"deepstack_layers = [1] ({path}) is ignored: 'deepstack' is not among targets ({path})",)


# --- VisualKDConfig behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("warmup_steps", "step", "expected"),
    [
        (0, 0, 1.0),
        (0, 50, 1.0),
        (4, 0, 0.0),
        (4, 1, 0.25),  # 1 / 4
        (4, 3, 0.75),  # 3 / 4
        (4, 4, 1.0),
        (4, 100, 1.0),  # past the end: clamped
    ],
)
def test_warmup_factor(warmup_steps, step, expected):
    assert VisualKDConfig(warmup_steps=warmup_steps).warmup_factor(step) == expected


def test_kinds_and_kind_weights_follow_the_canonical_targets():
    config = from_block({"targets": {"deepstack": 0.5, "merger": 2}})[0]
    assert config.kinds == ("merger", "deepstack")
    assert config.kind_weights == {"merger": 2.0, "deepstack": 0.5}
    only_deepstack = from_block({"targets": "deepstack", "deepstack_layers": [1]})[0]
    assert only_deepstack.kinds == ("deepstack",)
    assert only_deepstack.kind_weights == {"deepstack": 1.0}


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({}, True),
        ({"weight": 0.001}, True),
        ({"weight": 0}, False),
        ({"enabled": False}, False),
        ({"enabled": False, "weight": 2.0}, False),
        # every target weight 0 is active (and noted): the term exists, it just adds nothing
        ({"targets": {"merger": 0}}, True),
    ],
)
def test_active(block, expected):
    assert from_block(block)[0].active is expected


def test_from_block_validates_normalizes_and_reports_the_keys_it_set():
    config, keys = from_block(
        {"weight": 3, "targets": ["Deepstack", "merger"], "deepstack_layers": 4, "distance": "COSINE"}
    )
    assert config == VisualKDConfig(
        weight=3.0, targets=(("merger", 1.0), ("deepstack", 1.0)), deepstack_layers=(4,), distance="cosine"
    )
    assert type(config.weight) is float
    assert keys == ("weight", "targets", "deepstack_layers", "distance")
    assert from_block({}) == (VisualKDConfig(), ())
    with pytest.raises(ConfigError) as caught:
        from_block({"weight": float("nan")})
    assert caught.value.field == "custom.visual_kd.weight"
    assert caught.value.source == "python"
    assert str(caught.value).startswith(
        "invalid vision-KD config in python: custom.visual_kd.weight = nan: Expected `float` >= 0.0 (it must be finite"
    )
    with pytest.raises(ConfigError) as caught:
        from_block({"weight": -1}, "env:VKD_WEIGHT", label="VKD_WEIGHT")
    assert caught.value.field == "VKD_WEIGHT"
    assert str(caught.value).startswith("invalid vision-KD config in env:VKD_WEIGHT: VKD_WEIGHT = -1: ")


@pytest.mark.parametrize("raw", [None, [], "weight: 1", 0.5])
def test_from_block_refuses_what_is_not_a_mapping(raw):
    with pytest.raises(ConfigError, match="expected a mapping, got a") as caught:
        from_block(raw, "/x.yaml")
    assert (caught.value.field, caught.value.source) == ("custom.visual_kd", "/x.yaml")


def test_direct_construction_canonicalizes_shorthand():
    # The constructor does not check types (from_block does), but it does put shorthand in canonical form.
    config = VisualKDConfig(targets=["deepstack", "merger"], deepstack_layers=[3, 1, 3])
    assert config.targets == (("merger", 1.0), ("deepstack", 1.0))
    assert config.deepstack_layers == (1, 3)
    assert VisualKDConfig(targets={"deepstack": 0.5}, deepstack_layers=2) == VisualKDConfig(
        targets=(("deepstack", 0.5),), deepstack_layers=(2,)
    )


def test_config_is_frozen_hashable_and_round_trips_through_to_dict():
    config = VisualKDConfig(
        weight=0.5, targets=(("deepstack", 0.25),), deepstack_layers=(0, 3), warmup_steps=9, no_visual="warn"
    )
    with pytest.raises(AttributeError):
        config.weight = 2.0  # type: ignore[misc]
    assert config.weight == 0.5
    assert hash(config) == hash(VisualKDConfig(**msgspec.structs.asdict(config)))
    assert config == VisualKDConfig(**msgspec.structs.asdict(config))
    as_dict = config.to_dict()
    assert as_dict["targets"] == {"deepstack": 0.25}
    assert as_dict["deepstack_layers"] == [0, 3]
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert resolve(environ={}, inline=as_dict).config == config


# --- digest, event, pickling ----------------------------------------------------------------------------


def test_digest_is_stable_for_equal_configs_and_differs_otherwise(tmp_path):
    one = resolve(environ={}, inline={"weight": 1, "targets": ["Merger", "deepstack"], "distance": "MSE"})
    two = resolve(environ={ENV_CONFIG: block_file(tmp_path, "targets: {deepstack: 1, merger: 1.0}")})
    defaults = resolve(environ={})
    assert one.digest() == two.digest() != defaults.digest()  # named targets are required; the defaults' deepstack not
    assert resolve(
        environ={}, inline={"targets": ["merger", "deepstack"], "optional_targets": ["deepstack"]}
    ).digest() == (defaults.digest())
    assert len(one.digest()) == 12
    assert int(one.digest(), 16) >= 0
    assert resolve(environ={ENV_WEIGHT: "0.5"}).digest() != defaults.digest()
    assert resolve(environ={ENV_TARGETS: "merger"}).digest() != defaults.digest()


def test_digest_is_the_same_in_a_fresh_interpreter():
    code = "from vkd_shim.config import resolve; print(resolve(environ={'VKD_WEIGHT': '0.5'}).digest())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == resolve(environ={ENV_WEIGHT: "0.5"}).digest()


def test_to_event_is_json_ready(tmp_path):
    path = block_file(tmp_path, "weight: 0")
    resolved = resolve(environ={ENV_CONFIG: path, ENV_DISTANCE: "cosine"})
    event = json.loads(json.dumps(resolved.to_event()))
    assert event == {
        "config": resolved.config.to_dict(),
        "sources": {
            "enabled": "default",
            "mode": "default",
            "weight": path,
            "share": "default",
            "targets": "default",
            "optional_targets": "default",
            "deepstack_layers": "default",
            "distance": "env:VKD_DISTANCE",
            "warmup_steps": "default",
            "nonfinite": "default",
            "teacher_nonfinite": "default",
            "no_visual": "default",
            "no_visual_steps": "default",
        },
        "files": [path],
        "notes": [f"weight = 0 ({path}) while enabled: the term is off"],
        "digest": resolved.digest(),
    }


def test_resolved_config_and_errors_survive_pickling(tmp_path):
    resolved = resolve(environ={ENV_CONFIG: block_file(tmp_path, "weight: 0.5")})
    restored = pickle.loads(pickle.dumps(resolved))
    assert restored == resolved
    assert restored.digest() == resolved.digest()
    error = ConfigError("boom", field="custom.visual_kd.weight", source="/x.yaml", allowed="a finite number >= 0")
    copy_of_error = pickle.loads(pickle.dumps(error))
    assert (str(copy_of_error), copy_of_error.field, copy_of_error.source, copy_of_error.allowed) == (
        "boom",
        "custom.visual_kd.weight",
        "/x.yaml",
        "a finite number >= 0",
    )


# --- split_inline ---------------------------------------------------------------------------------------


def test_split_inline_removes_block_and_empty_custom():
    document = {"rlhf_type": "gkd", "custom": {"visual_kd": {"weight": 0.5, "targets": ["merger"]}}}
    before = copy.deepcopy(document)
    block, rest = split_inline(document)
    assert block == {"weight": 0.5, "targets": ["merger"]}
    assert rest == {"rlhf_type": "gkd"}
    assert document == before
    block["targets"].append("deepstack")
    assert document == before


def test_split_inline_keeps_other_custom_keys():
    document = {"model": "m", "custom": {"visual_kd": {"weight": 1}, "other": {"x": [1]}}}
    before = copy.deepcopy(document)
    block, rest = split_inline(document)
    assert block == {"weight": 1}
    assert rest == {"model": "m", "custom": {"other": {"x": [1]}}}
    rest["custom"]["other"]["x"].append(2)
    assert document == before


@pytest.mark.parametrize("document", [{"model": "m"}, {"custom": {"other": 1}}, {"custom": "text"}])
def test_split_inline_without_block(document):
    block, rest = split_inline(document)
    assert block is None
    assert rest == document
    assert rest is not document


def test_split_inline_refuses_a_block_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping, got a null") as caught:
        split_inline({"custom": {"visual_kd": None}}, source="/jobs/train.yaml")
    assert caught.value.source == "/jobs/train.yaml"
    assert caught.value.field == "custom.visual_kd"


def test_split_inline_output_feeds_resolve(tmp_path):
    import yaml

    path = write(tmp_path, "train.yaml", "rlhf_type: gkd\ncustom:\n  visual_kd:\n    distance: cosine\n")
    with open(path, encoding="utf-8") as handle:
        block, rest = split_inline(yaml.safe_load(handle), source=path)
    resolved = resolve(environ={}, inline=block, inline_source=path)
    assert rest == {"rlhf_type": "gkd"}
    assert resolved.config.distance == "cosine"
    assert resolved.sources["distance"] == f"inline:{path}"


# --- import budget --------------------------------------------------------------------------------------


def test_import_is_cheap_and_yaml_loads_only_for_files(tmp_path):
    path = block_file(tmp_path, "weight: 0.5")
    code = textwrap.dedent(
        f"""
        import json, sys
        heavy = ("yaml", "torch", "swift", "structlog", "wrapt", "transformers")
        import vkd_shim.config as config
        after_import = [name for name in heavy if name in sys.modules]
        config.resolve(environ={{}})
        after_defaults = [name for name in heavy if name in sys.modules]
        config.resolve(environ={{"VKD_CONFIG": {path!r}}})
        print(json.dumps([after_import, after_defaults, "yaml" in sys.modules]))
        """
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("VKD_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    # The last flag proves the check can fail: yaml is importable and does load once a file is read.
    assert json.loads(out.stdout) == [[], [], True]


# --- share: the term as a fraction of the GKD part ---------------------------------------------------------


def test_a_share_replaces_the_weight_and_says_so(tmp_path):
    path = block_file(tmp_path, "weight: 0.1\nshare: 0.1")
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config.share == 0.1 and resolved.config.active
    assert resolved.notes == (
        f"weight = 0.1 ({path}) is not used: share = 0.1 ({path}) holds the term at 10% of the GKD part",
    )
    # weight 0 turns a plain term off, not a share; enabled: false turns both off.
    assert resolve(environ={"VKD_SHARE": "0.01", "VKD_WEIGHT": "0"}).config.active
    assert not resolve(
        environ={ENV_CONFIG: block_file(tmp_path, "enabled: false\nshare: 0.1", name="off.yaml")}
    ).config.active
    assert resolve(environ={"VKD_SHARE": "2"}).notes == (
        "share = 2 (env:VKD_SHARE): the term is larger than the GKD part",
    )
    assert resolve(environ={"VKD_SHARE": "0.1", "VKD_MODE": "monitor"}).notes == ()  # monitoring adds nothing


def test_the_share_env_override_wins_and_none_clears_a_files_share(tmp_path):
    path = block_file(tmp_path, "share: 0.5")
    assert resolve(environ={ENV_CONFIG: path}).sources["share"] == path
    overridden = resolve(environ={ENV_CONFIG: path, "VKD_SHARE": "0.01"})
    assert overridden.config.share == 0.01 and overridden.sources["share"] == "env:VKD_SHARE"
    cleared = resolve(environ={ENV_CONFIG: path, "VKD_SHARE": "none"})
    assert cleared.config.share is None and cleared.sources["share"] == "env:VKD_SHARE"
    assert resolve(environ={ENV_CONFIG: path, "VKD_SHARE": " "}).config.share == 0.5  # empty: unset


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "Expected `float` > 0.0"),
        ("-0.1", "> 0.0"),
        (".nan", "it must be finite"),
        ("11", "<= 10.0"),
        ("'ten'", "Expected `float | null`"),
    ],
)
def test_a_share_out_of_range_names_the_field_the_file_and_the_allowed_values(value, problem, tmp_path):
    path = block_file(tmp_path, f"share: {value}")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    message = str(caught.value)
    assert "custom.visual_kd.share" in message and path in message and problem in message, message
    assert caught.value.allowed.startswith("null, or a number above 0 and up to 10"), caught.value.allowed


def test_a_share_env_value_that_is_not_a_number_names_the_variable():
    with pytest.raises(ConfigError, match=r"env:VKD_SHARE: VKD_SHARE = 'ten percent': not a number"):
        resolve(environ={"VKD_SHARE": "ten percent"})


# --- optional targets -----------------------------------------------------------------------------------


def test_optional_targets_survive_an_overlay_that_leaves_targets_alone_and_not_one_that_names_them(tmp_path):
    base = block_file(tmp_path, "targets: {merger: 1, deepstack: 0.5}\noptional_targets: [Deepstack]", name="b.yaml")
    keeps = block_file(tmp_path, "weight: 0.1", name="keeps.yaml")
    names = block_file(tmp_path, "targets: [merger, deepstack]", name="names.yaml")
    kept = resolve(environ={ENV_CONFIG: os.pathsep.join([base, keeps])})
    assert kept.config.optional_targets == ("deepstack",) and kept.config.required == ("merger",)
    assert kept.sources["optional_targets"] == base
    named = resolve(environ={ENV_CONFIG: os.pathsep.join([base, names])})
    assert named.config.optional_targets == () and named.config.required == ("merger", "deepstack")
    assert named.sources["optional_targets"] == names
    by_env = resolve(environ={ENV_CONFIG: base, ENV_TARGETS: "merger,deepstack"})
    assert by_env.config.optional_targets == () and by_env.sources["optional_targets"] == "env:VKD_TARGETS"


def test_the_shipped_configs_leave_deepstack_optional_and_an_unselected_optional_kind_is_a_note(tmp_path):
    shipped = resolve(environ={ENV_CONFIG: os.pathsep.join(str(REPO_ROOT / "configs" / f) for f in SHIPPED)})
    assert shipped.config.optional_targets == ("deepstack",) and shipped.config.required == ("merger",)
    resolved = resolve_block(tmp_path, "targets: [merger]\noptional_targets: [vit]")
    assert resolved.config.optional_targets == ("vit",)
    assert any(note.startswith("optional_targets ['vit']") and "not among targets" in note for note in resolved.notes)


def test_optional_targets_names_the_field_and_the_kinds_when_wrong(tmp_path):
    path = block_file(tmp_path, "optional_targets: [deepstak]")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    message = str(caught.value)
    assert caught.value.field.startswith("custom.visual_kd.optional_targets") and path in message
    assert "did you mean 'deepstack'?" in message and "merger, deepstack, vit" in message
