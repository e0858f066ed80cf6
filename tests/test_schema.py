"""Tests for vkd_shim.schema's declarations against the modules that consume them, and vkd_shim.errors.

The config's choices are declared once, as types on VisualKDConfig; loss and capture have their own
tables of what they implement. These tests hold the three to the same names, so a distance or a target
kind added on one side only fails here instead of at the first training step.
"""

from __future__ import annotations

import inspect
import pickle
import typing

import msgspec
import pytest

from vkd_shim import capture, errors, loss, schema, targets, validation
from vkd_shim.schema import MAX_WEIGHT, VisualKDConfig

HINTS = typing.get_type_hints(VisualKDConfig, include_extras=True)


def _strip(annotation: typing.Any) -> typing.Any:
    """The type under Annotated[...] wrappers."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _walk(annotation: typing.Any):
    """Every type nested in an annotation, Annotated metadata left out."""
    yield annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        args = args[:1]
    for arg in args:
        if not isinstance(arg, msgspec.Meta):
            yield from _walk(arg)


def _literals(annotation: typing.Any) -> list[tuple[str, ...]]:
    return [typing.get_args(t) for t in _walk(annotation) if typing.get_origin(t) is typing.Literal]


def _metas(annotation: typing.Any) -> list[msgspec.Meta]:
    found = []
    for t in _walk(annotation):
        if typing.get_origin(t) is typing.Annotated:
            found += [m for m in typing.get_args(t)[1:] if isinstance(m, msgspec.Meta)]
    return found


# --- schema, loss and capture agree -----------------------------------------------------------------


def test_distance_choices_are_the_distances_the_loss_implements():
    (choices,) = _literals(HINTS["distance"])
    assert choices == loss.DISTANCES == (*loss.ROW_DISTANCES, *loss.RELATION_DISTANCES) == schema.DISTANCES
    assert choices == ("mse", "cosine", "nmse", "relation")


def test_target_kinds_are_the_kinds_capture_resolves():
    # targets: kind | [kind] | {kind: weight}: every form names kinds through the same Literal.
    kinds = _literals(HINTS["targets"])
    assert len(kinds) == 3
    assert set(kinds) == {targets.KINDS}
    assert targets.KINDS == schema.KINDS == ("merger", "deepstack", "vit")
    assert typing.get_args(schema.Kind) == targets.KINDS


def test_every_weight_is_bounded_by_max_weight():
    weight_metas = [m for m in _metas(HINTS["weight"]) if m.le is not None]
    target_metas = [m for m in _metas(HINTS["targets"]) if m.le is not None]
    assert [(m.ge, m.le) for m in weight_metas] == [(0, MAX_WEIGHT)]
    assert [(m.ge, m.le) for m in target_metas] == [(0, MAX_WEIGHT)]
    assert MAX_WEIGHT == 1e4


def test_choices_are_lower_case_because_the_edge_folds_case():
    # _normalize lower-cases choices before msgspec sees them: an upper-case choice could never match.
    literals = [choice for name in VisualKDConfig.__struct_fields__ for lit in _literals(HINTS[name]) for choice in lit]
    assert (
        len(literals) == 2 + 3 * 3 + 3 + 4 + 3 * 2
    )  # mode, targets (three forms), optional_targets, distance, policies
    assert all(choice == choice.strip().lower() for choice in literals)


def test_allowed_text_of_a_choice_field_lists_exactly_its_choices():
    by_name = {spec["name"]: spec for spec in schema.schema()}
    checked = []
    for name in VisualKDConfig.__struct_fields__:
        annotation = _strip(HINTS[name])
        if typing.get_origin(annotation) is typing.Literal:
            assert by_name[name]["allowed"] == ", ".join(typing.get_args(annotation)), name
            checked.append(name)
    assert checked == ["mode", "distance", "nonfinite", "teacher_nonfinite", "no_visual"]


# --- schema() -------------------------------------------------------------------------------------


def test_schema_describes_every_field_once_in_declaration_order():
    specs = schema.schema()
    assert [spec["name"] for spec in specs] == list(VisualKDConfig.__struct_fields__) == list(schema.FIELDS)
    assert schema.FIELDS == (
        "enabled",
        "mode",
        "weight",
        "share",
        "targets",
        "optional_targets",
        "deepstack_layers",
        "distance",
        "warmup_steps",
        "nonfinite",
        "teacher_nonfinite",
        "no_visual",
        "no_visual_steps",
    )
    assert {spec["name"]: spec["default"] for spec in specs} == VisualKDConfig().to_dict()
    for spec in specs:
        assert set(spec) == {"name", "default", "allowed", "description"}
        assert spec["allowed"].strip() and "\n" not in spec["allowed"], spec["name"]
        assert spec["description"].strip() and "\n" not in spec["description"], spec["name"]
    by_name = {spec["name"]: spec for spec in specs}
    assert by_name["weight"]["allowed"] == "a number from 0 to 10000"
    assert all(kind in by_name["targets"]["allowed"] for kind in targets.KINDS)


def test_schema_defaults_are_valid_input():
    # What the doctor prints as defaults must read back as the default config.
    defaults = {spec["name"]: spec["default"] for spec in schema.schema()}
    config, keys = validation.from_block(defaults, "defaults")
    assert config == VisualKDConfig()
    assert keys == schema.FIELDS


# --- errors ---------------------------------------------------------------------------------------


def _error_classes() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    ]


def test_every_error_class_derives_from_vision_kd_error():
    classes = _error_classes()
    assert {cls.__name__ for cls in classes} == {
        "VisionKDError",
        "ConfigError",
        "PatchError",
        "RefusedError",
        "NonFiniteError",
        "NoVisualTokensError",
        "TargetResolutionError",
        "CaptureError",
        "RoleUnknownError",
        "FeatureMismatchError",
    }
    assert [cls.__name__ for cls in classes if not issubclass(cls, errors.VisionKDError)] == []
    assert issubclass(errors.VisionKDError, RuntimeError)


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.TargetResolutionError, LookupError),
        (errors.FeatureMismatchError, ValueError),
        (errors.RoleUnknownError, errors.CaptureError),
    ],
)
def test_errors_keep_the_builtin_bases_callers_catch(cls, builtin):
    assert issubclass(cls, builtin)
    assert issubclass(cls, errors.VisionKDError)


def test_modules_raise_the_classes_of_errors():
    # One class per kind of failure: capture and loss re-export, they do not redefine.
    assert capture.CaptureError is errors.CaptureError
    assert capture.RoleUnknownError is errors.RoleUnknownError
    assert capture.TargetResolutionError is targets.TargetResolutionError is errors.TargetResolutionError
    assert loss.FeatureMismatchError is errors.FeatureMismatchError
    assert validation.ConfigError is errors.ConfigError


@pytest.mark.parametrize(
    "error",
    [
        errors.ConfigError("bad weight", field="custom.visual_kd.weight", source="/x.yaml", allowed="0..1"),
        errors.RefusedError("remote teacher", "use a local teacher"),
        errors.FeatureMismatchError("merger", (4, 8), None),
        errors.TargetResolutionError("no merger"),
        errors.RoleUnknownError("no role"),
        errors.NonFiniteError("nan"),
        errors.NoVisualTokensError("text only"),
        errors.PatchError("missing"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_survive_pickling_with_their_attributes(error):
    # Errors raised in spawned workers travel back to the parent pickled.
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert str(restored) == str(error)
    assert {k: v for k, v in vars(restored).items() if not k.startswith("__")} == {
        k: v for k, v in vars(error).items() if not k.startswith("__")
    }


def test_refused_and_mismatch_messages():
    refused = errors.RefusedError("the teacher is served over an API", "pass --teacher_model")
    assert str(refused) == "vision KD refused: the teacher is served over an API. Fix: pass --teacher_model."
    assert (refused.reason, refused.fix) == ("the teacher is served over an API", "pass --teacher_model")
    mismatch = errors.FeatureMismatchError("deepstack_0", None, (2, 4))
    assert (
        str(mismatch) == "vision KD target 'deepstack_0': student features missing do not match teacher features [2, 4]"
    )
    assert (mismatch.target, mismatch.student_shape, mismatch.teacher_shape) == ("deepstack_0", None, (2, 4))
