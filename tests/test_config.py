"""Tests for vkd_shim.config: parsing, precedence, validation messages and the import budget."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vkd_shim.config import (
    DISTANCES,
    ENV_CONFIG,
    ENV_DISTANCE,
    ENV_TARGETS,
    ENV_WEIGHT,
    KINDS,
    NONFINITE,
    ConfigError,
    ResolvedConfig,
    VisualKDConfig,
    load_block,
    resolve,
    schema,
    split_inline,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


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
        "weight": 1.0,
        "targets": {"merger": 1.0, "deepstack": 1.0},
        "deepstack_layers": None,
        "distance": "mse",
        "warmup_steps": 0,
        "nonfinite": "skip",
    }
    assert dict(resolved.sources) == dict.fromkeys(resolved.config.to_dict(), "default")
    assert resolved.files == ()
    assert resolved.notes == ()
    assert resolved.config.active is True
    assert resolved.config.kinds == ("merger", "deepstack")


def test_environ_none_reads_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_CONFIG, block_file(tmp_path, "weight: 0.25"))
    for name in (ENV_WEIGHT, ENV_TARGETS, ENV_DISTANCE):
        monkeypatch.delenv(name, raising=False)
    assert resolve().config.weight == 0.25


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
    ("yaml_value", "expected"), [("true", True), ("yes", True), ("false", False), ("no", False)]
)
def test_enabled_accepts_yaml_booleans(tmp_path, yaml_value, expected):
    assert resolve_block(tmp_path, f"enabled: {yaml_value}").config.enabled is expected


def test_every_field_at_once_and_sources(tmp_path):
    path = block_file(
        tmp_path,
        """
        enabled: true
        weight: 0.5
        targets: {merger: 1.5, deepstack: 0.25}
        deepstack_layers: [2, 0]
        distance: cosine
        warmup_steps: 100
        nonfinite: raise
        """,
    )
    resolved = resolve(environ={ENV_CONFIG: path})
    assert resolved.config == VisualKDConfig(
        enabled=True,
        weight=0.5,
        targets=(("merger", 1.5), ("deepstack", 0.25)),
        deepstack_layers=(0, 2),
        distance="cosine",
        warmup_steps=100,
        nonfinite="raise",
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


@pytest.mark.parametrize(
    ("body", "field", "quoted", "allowed"),
    [
        ("enabled: 'true'", "custom.visual_kd.enabled", "'true'", "true, false"),
        ("enabled: 1", "custom.visual_kd.enabled", "= 1", "true, false"),
        ("weight: -1", "custom.visual_kd.weight", "= -1", "a finite number >= 0"),
        ("weight: .nan", "custom.visual_kd.weight", "= nan", "a finite number >= 0"),
        ("weight: .inf", "custom.visual_kd.weight", "= inf", "a finite number >= 0"),
        ("weight: -.inf", "custom.visual_kd.weight", "= -inf", "a finite number >= 0"),
        ("weight: true", "custom.visual_kd.weight", "= True", "a finite number >= 0"),
        ("weight: '0.5'", "custom.visual_kd.weight", "'0.5'", "a finite number >= 0"),
        ("weight: [1]", "custom.visual_kd.weight", "[1]", "a finite number >= 0"),
        ("targets: []", "custom.visual_kd.targets", "[]", "merger, deepstack"),
        ("targets: {}", "custom.visual_kd.targets", "{}", "merger, deepstack"),
        ("targets: ''", "custom.visual_kd.targets", "''", "merger, deepstack"),
        ("targets: 3", "custom.visual_kd.targets", "= 3", "merger, deepstack"),
        ("targets: [merger, pixels]", "custom.visual_kd.targets[1]", "'pixels'", "merger, deepstack"),
        ("targets: [merger, merger]", "custom.visual_kd.targets[1]", "'merger'", "merger, deepstack"),
        ("targets: [merger, Merger]", "custom.visual_kd.targets[1]", "'Merger'", "merger, deepstack"),
        (
            "targets: [merger, [deepstack]]",
            "custom.visual_kd.targets[1]",
            "['deepstack']",
            "merger, deepstack",
        ),
        ("targets: {merger: -1}", "custom.visual_kd.targets.merger", "= -1", "a finite number >= 0"),
        ("targets: {merger: .nan}", "custom.visual_kd.targets.merger", "= nan", "a finite number >= 0"),
        ("targets: {merger: false}", "custom.visual_kd.targets.merger", "= False", "a finite number >= 0"),
        ("targets: {pixels: 1}", "custom.visual_kd.targets.pixels", "'pixels'", "merger, deepstack"),
        ("deepstack_layers: -1", "custom.visual_kd.deepstack_layers", "= -1", "list of ints >= 0"),
        ("deepstack_layers: [0, -2]", "custom.visual_kd.deepstack_layers[1]", "= -2", "list of ints >= 0"),
        ("deepstack_layers: [true]", "custom.visual_kd.deepstack_layers[0]", "= True", "list of ints >= 0"),
        ("deepstack_layers: '1'", "custom.visual_kd.deepstack_layers", "'1'", "list of ints >= 0"),
        ("deepstack_layers: 1.5", "custom.visual_kd.deepstack_layers", "= 1.5", "list of ints >= 0"),
        ("deepstack_layers: []", "custom.visual_kd.deepstack_layers", "[]", "list of ints >= 0"),
        ("distance: 3", "custom.visual_kd.distance", "= 3", "mse, cosine"),
        ("nonfinite: ignore", "custom.visual_kd.nonfinite", "'ignore'", "skip, raise"),
        ("warmup_steps: -1", "custom.visual_kd.warmup_steps", "= -1", "an int >= 0"),
        ("warmup_steps: 1.5", "custom.visual_kd.warmup_steps", "= 1.5", "an int >= 0"),
        ("warmup_steps: true", "custom.visual_kd.warmup_steps", "= True", "an int >= 0"),
    ],
)
def test_invalid_values_name_field_file_value_and_allowed(tmp_path, body, field, quoted, allowed):
    path = block_file(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    error = caught.value
    message = str(error)
    assert error.field == field
    assert error.source == path
    assert allowed in error.allowed
    assert message.startswith(f"invalid vision-KD config in {path}: {field}")
    assert quoted in message
    assert allowed in message
    assert "\n" not in message


def test_error_message_has_the_documented_shape(tmp_path):
    path = block_file(tmp_path, "distance: l2")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert str(caught.value) == (
        f"invalid vision-KD config in {path}: custom.visual_kd.distance = 'l2': allowed values: mse, cosine"
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


def test_layer_name_as_target_kind_points_to_deepstack_layers(tmp_path):
    with pytest.raises(ConfigError, match="deepstack_layers") as caught:
        resolve_block(tmp_path, "targets: [deepstack_0]")
    assert caught.value.field == "custom.visual_kd.targets[0]"


@pytest.mark.parametrize(
    ("key", "suggestion"), [("wieght", "weight"), ("Weight", "weight"), ("target", "targets")]
)
def test_unknown_key_suggests_the_close_match_and_lists_keys(tmp_path, key, suggestion):
    path = block_file(tmp_path, f"{key}: 0.5")
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    message = str(caught.value)
    assert caught.value.field == f"custom.visual_kd.{key}"
    assert path in message
    assert f"did you mean '{suggestion}'?" in message
    assert (
        "allowed keys: enabled, weight, targets, deepstack_layers, distance, warmup_steps, nonfinite"
        in message
    )


def test_unknown_key_without_close_match_still_lists_keys(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve_block(tmp_path, "learning_rate: 0.1")
    assert "did you mean" not in str(caught.value)
    assert "unknown key" in str(caught.value)
    assert caught.value.allowed.startswith("enabled, weight")


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


def test_directory_instead_of_file_is_unreadable(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file") as caught:
        resolve(environ={ENV_CONFIG: str(tmp_path)})
    assert caught.value.source == str(tmp_path)


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
        ("custom:\n  visaul_kd:\n    weight: 1\n", "did you mean 'custom.visaul_kd'?"),
        ("custom:\n  visual-kd:\n    weight: 1\n", "did you mean 'custom.visual-kd'?"),
        ("Custom:\n  visual_kd:\n    weight: 1\n", "did you mean 'Custom'?"),
        ("visual_kd:\n  weight: 1\n", "found top-level 'visual_kd': nest it under 'custom:'"),
        ("custom: yes\n", "'custom' is a bool, not a mapping"),
    ],
)
def test_file_without_the_block_suggests_where_it_is(tmp_path, text, hint):
    path = write(tmp_path, "args.yaml", text)
    with pytest.raises(ConfigError) as caught:
        resolve(environ={ENV_CONFIG: path})
    assert caught.value.field == "custom.visual_kd"
    assert (
        str(caught.value) == f"invalid vision-KD config in {path}: custom.visual_kd: block not found; {hint}"
    )


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
    stage = block_file(
        tmp_path, "weight: 2\ntargets: {deepstack: 2}\ndeepstack_layers: 2", name="stage3.yaml"
    )
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
        "weight": stage,
        "targets": stage,
        "deepstack_layers": stage,
        "distance": base,
        "warmup_steps": base,
        "nonfinite": "default",
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
    ("name", "raw", "quoted", "allowed"),
    [
        (ENV_WEIGHT, "abc", "'abc'", "a finite number >= 0"),
        (ENV_WEIGHT, "nan", "nan", "a finite number >= 0"),
        (ENV_WEIGHT, "inf", "inf", "a finite number >= 0"),
        (ENV_WEIGHT, "-1", "-1.0", "a finite number >= 0"),
        (ENV_TARGETS, "merger:x", "'merger:x'", "merger, deepstack"),
        (ENV_TARGETS, "merger:-1", "-1.0", "merger, deepstack"),
        (ENV_TARGETS, "merger:nan", "nan", "merger, deepstack"),
        (ENV_TARGETS, "pixels", "'pixels'", "merger, deepstack"),
        (ENV_TARGETS, "merger,Merger", "'Merger'", "merger, deepstack"),
        (ENV_TARGETS, ",", "','", "merger, deepstack"),
        (ENV_DISTANCE, "l1", "'l1'", "mse, cosine"),
    ],
)
def test_env_errors_name_the_variable(name, raw, quoted, allowed):
    with pytest.raises(ConfigError) as caught:
        resolve(environ={name: raw})
    error = caught.value
    assert error.field == name
    assert error.source == f"env:{name}"
    assert str(error).startswith(f"invalid vision-KD config in env:{name}: {name} = ")
    assert quoted in str(error)
    assert allowed in str(error)


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
    assert str(caught.value).startswith(
        "invalid vision-KD config in inline:/jobs/train.yaml: custom.visual_kd.weight"
    )


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
    assert resolved.notes == (
        f"deepstack_layers = [1] ({path}) is ignored: 'deepstack' is not among targets ({path})",
    )


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


def test_target_weight_by_capture_target():
    config = VisualKDConfig(targets=(("merger", 2.0), ("deepstack", 0.5)))
    assert config.target_weight("merger") == 2.0
    assert config.target_weight("deepstack") == 0.5
    assert config.target_weight("deepstack_0") == 0.5
    assert config.target_weight("deepstack_2") == 0.5


@pytest.mark.parametrize(
    ("config", "target"),
    [
        (VisualKDConfig(targets=(("merger", 1.0),)), "deepstack_0"),
        (VisualKDConfig(deepstack_layers=(1,)), "deepstack_0"),
        (VisualKDConfig(), "pixels"),
        (VisualKDConfig(), "merger_1"),
        (VisualKDConfig(), "deepstack_x"),
    ],
)
def test_target_weight_refuses_unselected_targets(config, target):
    with pytest.raises(KeyError, match=target):
        config.target_weight(target)


def test_target_weight_honours_selected_layers():
    assert (
        VisualKDConfig(deepstack_layers=(1,), targets=(("deepstack", 0.3),)).target_weight("deepstack_1")
        == 0.3
    )


def test_direct_construction_validates_and_normalizes():
    config = VisualKDConfig(weight=3, targets=["Deepstack", "merger"], deepstack_layers=4, distance="COSINE")
    assert config == VisualKDConfig(
        weight=3.0, targets=(("merger", 1.0), ("deepstack", 1.0)), deepstack_layers=(4,), distance="cosine"
    )
    with pytest.raises(ConfigError) as caught:
        VisualKDConfig(weight=float("nan"))
    assert caught.value.field == "weight"
    assert caught.value.source is None
    assert str(caught.value).startswith("invalid vision-KD config: weight = nan: must be finite")


def test_config_is_frozen_hashable_and_round_trips_through_to_dict():
    config = VisualKDConfig(
        weight=0.5, targets=(("deepstack", 0.25),), deepstack_layers=(0, 3), warmup_steps=9
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.weight = 2.0  # type: ignore[misc]
    assert hash(config) == hash(VisualKDConfig(**dataclasses.asdict(config)))
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
    assert one.digest() == two.digest() == defaults.digest()
    assert len(one.digest()) == 12
    assert int(one.digest(), 16) >= 0
    assert resolve(environ={ENV_WEIGHT: "0.5"}).digest() != defaults.digest()
    assert resolve(environ={ENV_TARGETS: "merger"}).digest() != defaults.digest()


def test_digest_is_the_same_in_a_fresh_interpreter():
    code = "from vkd_shim.config import resolve; print(resolve(environ={'VKD_WEIGHT': '0.5'}).digest())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == resolve(environ={ENV_WEIGHT: "0.5"}).digest()


def test_to_event_is_json_ready(tmp_path):
    path = block_file(tmp_path, "weight: 0")
    resolved = resolve(environ={ENV_CONFIG: path, ENV_DISTANCE: "cosine"})
    event = json.loads(json.dumps(resolved.to_event()))
    assert event == {
        "config": resolved.config.to_dict(),
        "sources": {
            "enabled": "default",
            "weight": path,
            "targets": "default",
            "deepstack_layers": "default",
            "distance": "env:VKD_DISTANCE",
            "warmup_steps": "default",
            "nonfinite": "default",
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
    error = ConfigError(
        "boom", field="custom.visual_kd.weight", source="/x.yaml", allowed="a finite number >= 0"
    )
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


# --- schema ---------------------------------------------------------------------------------------------


def test_schema_describes_every_field_once():
    specs = schema()
    assert [spec.name for spec in specs] == [f.name for f in dataclasses.fields(VisualKDConfig)]
    assert {spec.name: spec.default for spec in specs} == VisualKDConfig().to_dict()
    assert all(spec.type_name and spec.allowed and spec.description for spec in specs)
    by_name = {spec.name: spec for spec in specs}
    assert by_name["distance"].allowed == ", ".join(DISTANCES)
    assert by_name["nonfinite"].allowed == ", ".join(NONFINITE)
    assert all(kind in by_name["targets"].allowed for kind in KINDS)


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
