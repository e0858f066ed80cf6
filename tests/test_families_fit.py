"""The fit criterion of the family table, measured: for every family the kit builds, the aligner ms-swift's registry
names emits exactly the feature rows the language model reads at the image placeholders, in order. That is what
lets the shim pair a student's aligner rows with a teacher's (vkd_shim/families.py). Loads each tiny checkpoint
through ms-swift's own loader and template, as GKD does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import pytest

from vkd_shim.testing import data, kits


def aligner_fit(
    model_dir: str | os.PathLike[str], model_type: str, rows: list[Mapping[str, Any]], template: str | None = None
) -> list[dict[str, Any]]:
    """Per row: image placeholders in ms-swift's encoding, the rows the aligner emitted, and whether the language
    model reads exactly those rows, in order, at the placeholders (``in_order``; None without placeholders).

    The shim pairs student and teacher aligner outputs row by row: a pairing of visual tokens only where that holds.
    Loads through ms-swift's own loader and template (train mode, as GKD encodes) and hooks the registry's aligner
    and language model. Text-only rows can still show aligner rows: GLM-4.1V's template feeds a dummy image.
    """
    import torch
    from swift.model import get_model_processor
    from swift.template import get_template

    model, processor = get_model_processor(str(model_dir), model_type=model_type, torch_dtype=torch.float32)
    encoder = get_template(processor, template_type=template)
    encoder.set_mode("train")
    encoder.model = model
    captured: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    arch = model.model_meta.model_arch
    handles = [
        model.get_submodule(arch.aligner[0]).register_forward_hook(lambda _m, _a, out: captured.append(out.detach())),
        model.get_submodule(arch.language_model[0]).register_forward_pre_hook(
            lambda _m, _a, kwargs: embeds.append(kwargs["inputs_embeds"].detach()), with_kwargs=True
        ),
    ]
    encoder.register_post_encode_hook([model])
    out = []
    try:
        for row in rows:
            captured.clear()
            encoded = encoder.encode(dict(row))
            with torch.no_grad():
                model(**encoder.data_collator([encoded]))
            mask = torch.as_tensor(encoded["input_ids"]) == model.config.image_token_id
            features = captured[-1].reshape(-1, captured[-1].shape[-1]) if captured else None
            read = embeds[-1][0, mask]
            in_order = features is not None and read.shape == features.shape and torch.equal(read, features)
            in_order = in_order if mask.any() else None
            shape = tuple(captured[-1].shape) if captured else None
            fit = {"aligner_shape": shape, "aligner_rows": 0 if features is None else len(features)}
            out.append({"placeholders": int(mask.sum()), **fit, "in_order": in_order})
    finally:
        encoder.remove_post_encode_hook()
        for handle in handles:
            handle.remove()
    return out


@pytest.mark.parametrize("family", sorted(kits.KITS))
def test_the_aligner_emits_the_rows_the_language_model_reads_in_order(family, tmp_path):
    kit = kits.KITS[family]
    model_dir = kit.save(tmp_path / "model")
    train = data.build_dataset(tmp_path / "data", n_image=4, n_text=0, n_video=0, seed=0)["train"]
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    template = kit.argv[kit.argv.index("--template") + 1] if "--template" in kit.argv else None
    fits = aligner_fit(model_dir, kit.model_type, rows[:2], template)
    assert all(fit["placeholders"] > 0 and fit["in_order"] for fit in fits), fits
    assert all(fit["aligner_rows"] == fit["placeholders"] for fit in fits), fits
