"""Load a checkpoint written under vision KD the way a user without the shim would, and print one JSON line.

Run as a script (`python tests/checkpoint_probe.py STUDENT CHECKPOINT`), never imported: the point is a
process in which vkd_shim is not loaded, so a checkpoint that needs the shim (an extra key, a missing one,
a ZeRO partition saved as an empty tensor) shows here. A LoRA checkpoint is loaded through ms-swift's
`Swift.from_pretrained`, a full one through ms-swift's own model loader, as `swift infer` does. An FSDP
SHARDED_STATE_DICT checkpoint of full fine-tuning (DCP shards only, nothing `from_pretrained` reads) is first
merged the way accelerate documents for it (`accelerate merge-weights`, `merge_fsdp_weights`) into a
directory beside the base model's config and processor files, then loaded like a full one.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

try:  # ms-swift 4.x
    from swift.model import get_model_processor
except ImportError:  # ms-swift 3.x: the same loader under its old name
    from swift.llm import get_model_tokenizer as get_model_processor

ALIGNER = (".visual.merger.", ".visual.deepstack_merger_list.")


def saved_tensors(directory: Path, pattern: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob(pattern)):
        out.update(load_file(path))
    return out


def lora(student: str, checkpoint: Path) -> dict:
    from swift.tuners import Swift

    model, _ = get_model_processor(student, model_type="qwen3_vl", torch_dtype=torch.float32)
    model = Swift.from_pretrained(model, str(checkpoint))
    state = model.state_dict()
    saved = saved_tensors(checkpoint, "adapter_model.safetensors")

    def restored(key: str, value: torch.Tensor) -> bool:
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.default.weight")
        return key in state and torch.equal(state[key], value)

    return {
        "model": type(model).__name__,
        "saved": len(saved),
        "restored_exactly": sorted(k for k, v in saved.items() if restored(k, v)),
        "nonzero_lora_b": sorted(k for k, v in saved.items() if "lora_B" in k and bool(v.count_nonzero())),
    }


def full(student: str, checkpoint: Path) -> dict:
    model, _ = get_model_processor(str(checkpoint), model_type="qwen3_vl", torch_dtype=torch.float32)
    state = model.state_dict()
    before, saved = saved_tensors(Path(student), "model*.safetensors"), saved_tensors(checkpoint, "model*.safetensors")
    common = saved.keys() & before.keys()
    return {
        "model": type(model).__name__,
        "saved": len(saved),
        "extra_keys": sorted(set(saved) - set(before)),
        "missing_keys": sorted(set(before) - set(saved)),
        "reshaped": sorted(k for k in common if saved[k].shape != before[k].shape),
        "restored_exactly": sorted(k for k, v in saved.items() if k in state and torch.equal(state[k], v)),
        "changed_aligner": sorted(
            k for k in common if any(a in f".{k}" for a in ALIGNER) and not torch.equal(saved[k], before[k])
        ),
    }


def sharded(student: str, checkpoint: Path) -> dict:
    from accelerate.utils import merge_fsdp_weights

    with tempfile.TemporaryDirectory(prefix="merged_") as tmp:
        merged = Path(tmp)
        for path in Path(student).iterdir():
            if path.is_file() and not path.name.startswith("model"):
                shutil.copy(path, merged)
        merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(merged), safe_serialization=True)
        return {**full(student, merged), "merged_from": "pytorch_model_fsdp_0"}


if __name__ == "__main__":
    student_dir, checkpoint_dir = sys.argv[1], Path(sys.argv[2])
    if (checkpoint_dir / "adapter_model.safetensors").exists():
        probe = lora
    else:
        probe = sharded if (checkpoint_dir / "pytorch_model_fsdp_0").is_dir() else full
    report = probe(student_dir, checkpoint_dir)
    print(json.dumps({**report, "vkd_shim_imported": "vkd_shim" in sys.modules}))
