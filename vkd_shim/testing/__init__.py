"""A tiny Qwen3-VL kit for tests, the demo and the benchmarks: models, inputs, data and real launches.

Not imported by the shim itself. ``models``/``data``/``launch`` import torch, transformers and PIL inside
their functions only; ``inputs`` imports torch.
"""
