"""The design rules of docs/DESIGN.md, checked on the source: who may import whom, module size, event names.

Read from the files (ast), so a rule broken anywhere fails here, not only where a test happens to pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vkd_shim import env, telemetry

PACKAGE = Path(__file__).resolve().parents[1] / "vkd_shim"
STDLIB_ONLY = {"env", "errors", "swift_layouts", "families", "cli", "bootstrap", "bootstrap.sitecustomize", "examples"}
# module -> what it may import besides the stdlib (vkd_shim modules by short name, third parties by top name).
# Imports inside functions count too: the rule is about what a module can pull in, not when.
ALLOWED: dict[str, set[str]] = {
    "__init__": {"bootstrap"},
    "__main__": {"doctor"},
    "env": {"errors"},
    "errors": set(),
    "swift_layouts": set(),
    "schema": {"msgspec"},
    "validation": {"msgspec", "errors", "schema"},
    "config": {"msgspec", "yaml", "env", "errors", "schema", "validation"},
    "bootstrap": {"env", "errors", "swift_layouts", "wrapt", "patches"},
    "bootstrap.sitecustomize": {"bootstrap"},
    "cli": {"env"},
    "families": set(),
    "pairing": {"config", "families"},
    "preflight": {"config", "swift_layouts", "pairing"},
    "targets": {"torch", "errors"},
    "capture": {"torch", "errors", "targets"},
    "loss": {"torch", "errors"},
    "telemetry": {"structlog", "env"},
    "runtime": {
        "torch",
        "transformers",
        "config",
        "capture",
        "loss",
        "telemetry",
        "preflight",
        "pairing",
        "targets",
        "errors",
        "swift_layouts",
        "metrics",
        "schema",
    },
    "metrics": set(),
    "patches": {"wrapt", "__init__", "config", "env", "preflight", "swift_layouts", "telemetry", "errors", "runtime"},
    "examples": set(),
    "doctor": {
        "bootstrap",
        "examples",
        "env",
        "errors",
        "swift_layouts",
        "config",
        "patches",
        "preflight",
        "telemetry",
        "wrapt",
        "swift",
        "doctor_tree",
    },
    "doctor_tree": {
        "torch",
        "transformers",
        "peft",
        "swift",
        "families",
        "pairing",
        "preflight",
        "swift_layouts",
        "targets",
    },
    "demo": {"examples", "testing.launch"},
    "testing": set(),
    "testing.tokenizers": {"tokenizers", "transformers"},
    "testing.models": {"torch", "transformers", "testing.tokenizers"},
    "testing.inputs": {"torch", "testing.models"},
    "testing.data": {"PIL", "av"},
    "testing.qwen_families": {"torch", "transformers", "testing.models", "testing.tokenizers"},
    "testing.other_families": {"torch", "transformers", "tokenizers", "testing.models", "testing.tokenizers"},
    "testing.kits": {"testing.models", "testing.qwen_families", "testing.other_families"},
    "testing.launch": {"testing.data", "testing.kits", "testing.models"},
}
#: (module, bootstrap modules) that must never be imported by product code.
NEVER_IMPORTED = {"cli", "doctor", "doctor_tree", "demo", "testing"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """vkd_shim modules (short names) and third-party top-level names a file imports, anywhere in it."""
    found: set[str] = set()
    stdlib = set(__import__("sys").stdlib_module_names)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "vkd_shim" or node.module.removeprefix("vkd_shim.") in MODULES:
                # `from vkd_shim.testing import launch`: a submodule when one has that name
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("vkd_shim"):
                short = name.removeprefix("vkd_shim").removeprefix(".")
                while short and short not in MODULES:
                    short = short.rpartition(".")[0]
                found.add(short or "__init__")
            elif name.split(".")[0] not in stdlib and name != "__future__":
                found.add(name.split(".")[0])
    return found


def test_the_table_covers_every_module():
    assert set(MODULES) == set(ALLOWED), set(MODULES) ^ set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_table(module):
    extra = imports_of(MODULES[module]) - ALLOWED[module] - {module}
    assert not extra, f"vkd_shim.{module} imports {sorted(extra)}; docs/DESIGN.md allows {sorted(ALLOWED[module])}"


def test_product_code_never_imports_the_side_tools():
    for module, path in MODULES.items():
        if module.split(".")[0] in NEVER_IMPORTED or module == "__main__":
            continue
        used = {name.split(".")[0] for name in imports_of(path)}
        assert not used & NEVER_IMPORTED, (module, used & NEVER_IMPORTED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_product_module_over_400_lines(module):
    assert len(MODULES[module].read_text(encoding="utf-8").splitlines()) <= 400


def test_every_emitted_event_name_is_registered():
    emitted = set()
    for path in MODULES.values():
        emitted |= set(re.findall(r'\.(?:info|warning|error|event)\(\s*"(vkd\.[a-z_.]+)"', path.read_text()))
    assert emitted, "the scan found no event at all"
    assert emitted <= set(telemetry.EVENTS), emitted - set(telemetry.EVENTS)


def test_sitecustomize_files_spell_the_switch_as_env_does():
    for path in (
        PACKAGE / "bootstrap" / "sitecustomize.py",
        PACKAGE.parent / "sitecustomize_example" / "sitecustomize.py",
    ):
        assert f'os.environ.get("{env.ENABLE}")' in path.read_text(encoding="utf-8"), path
