"""Test-only failure injection, later on PYTHONPATH than the shim's bootstrap (which chains to it).

With ``E2E_POISON_FEATURES=1``, what the shim *reads* turns non-finite: the first row of the teacher's
merger features and of the student's deepstack_0 features, in every capture window. The model's own
tensors are untouched (the shim gets clones), so a monitored run must train exactly as a plain one
while it meets NaN on both sides. Without the variable, or without the shim, this file does nothing.
"""

import os

if os.environ.get("E2E_POISON_FEATURES") == "1":
    from wrapt import when_imported, wrap_function_wrapper

    POISONED = {"teacher": "merger", "student": "deepstack_0"}

    def _take(wrapped, instance, args, kwargs):
        taken = wrapped(*args, **kwargs)
        for role, name in POISONED.items():
            for target, features in list(taken.get(role, {}).items()):
                if target.name == name:
                    poisoned = features.clone()
                    poisoned[0] = float("nan")
                    taken[role][target] = poisoned
        return taken

    @when_imported("vkd_shim.capture")
    def _poison(module):
        wrap_function_wrapper(module, "FeatureCapture.take", _take)
