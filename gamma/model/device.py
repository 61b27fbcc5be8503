"""Where weights live and where they compute.

The host holds the model in its own dtype (``model.dtype``); a phase moves one piece at a time (a
block, the embedding, the head) to the compute device (``model.device``) in float32, computes, and
moves it back exactly as it was: bfloat16 -> float32 -> bfloat16 is lossless, and buffers that a
model keeps in float32 (rotary frequencies) stay float32.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPUTE_DTYPE = torch.float32


class DeviceError(ValueError):
    """The configured device or dtype cannot be used here; the message names the value."""


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; ``cuda:N`` checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"model.device={name!r}, but this machine has no CUDA device: use auto or cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"model.device={name!r}, but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s)")
    return device


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


@contextmanager
def on_device(module: nn.Module, device: torch.device | str, dtype: torch.dtype = COMPUTE_DTYPE):
    """``module`` with its floating-point tensors on ``device`` in ``dtype`` for the duration, then
    every tensor back where and as it was (a no-op when all of them are there already, so that
    nested uses cost nothing). The module is read-only inside: the host tensors come back as they
    were, so a change made to a moved tensor is dropped."""
    device = torch.device(device)
    moved = [(t, t.data) for t in _tensors(module)
             if t.is_floating_point() and (t.device != device or t.dtype != dtype)]
    for t, data in moved:
        t.data = data.to(device=device, dtype=dtype)
    try:
        yield module
    finally:
        for t, data in moved:
            t.data = data
