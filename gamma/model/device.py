"""Where weights live and where they compute.

The host holds the model in its own dtype (``model.dtype``); a phase moves one piece at a time (a
block, the embedding, the head) to the compute device (``model.device``) in float32, computes, and
moves it back exactly as it was: bfloat16 -> float32 -> bfloat16 is lossless, and buffers that a
model keeps in float32 (rotary frequencies) stay float32.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPUTE_DTYPE = torch.float32


_PHASE: ContextVar[tuple[ComputeRecord, str] | None] = ContextVar("gamma_compute_phase", default=None)


class ComputeRecord:
    """The device each phase of a run computed on, noted by the code that moves the work there
    (``on_device``, the candidates and the quantization) rather than copied from the settings: a
    phase that stayed on the host while ``model.device`` names a GPU shows up, and so does a phase
    that computed nowhere it would note."""

    def __init__(self):
        self.devices: dict[str, set[str]] = {}
        self.modes: dict[str, str] = {}

    @contextmanager
    def phase(self, name: str):
        self.devices.setdefault(name, set())
        token = _PHASE.set((self, name))
        try:
            yield self
        finally:
            _PHASE.reset(token)

    def as_dict(self) -> dict[str, str]:
        """``{phase: "cuda:0"}``, with how it ran where that was a choice (``"cpu (block walk)"``);
        ``"none noted"`` for a phase that moved nothing anywhere."""
        return {phase: (", ".join(sorted(devices)) or "none noted") +
                (f" ({self.modes[phase]})" if phase in self.modes else "") for phase, devices in self.devices.items()}

    def line(self) -> str:
        return "; ".join(f"{phase}: {where}" for phase, where in self.as_dict().items())


def computed_on(device: torch.device | str, mode: str | None = None) -> None:
    """Note that the current phase (if one is open) computes on ``device``, ``mode`` saying how."""
    current = _PHASE.get()
    if current is not None:
        record, name = current
        record.devices[name].add(str(torch.device(device)))
        if mode:
            record.modes[name] = mode


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
def on_device(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = COMPUTE_DTYPE):
    """``module`` with its floating-point tensors on ``device`` in ``dtype`` (None: each in its own)
    for the duration, then every tensor back where and as it was (a no-op when all of them are
    there already, so that nested uses cost nothing). The module is read-only inside: the host
    tensors come back as they were, so a change made to a moved tensor is dropped."""
    device = torch.device(device)
    computed_on(device)
    moved = [(t, t.data) for t in _tensors(module)
             if t.is_floating_point() and (t.device != device or t.dtype != (dtype or t.dtype))]
    for t, data in moved:
        t.data = data.to(device=device, dtype=dtype or data.dtype)
    try:
        yield module
    finally:
        for t, data in moved:
            t.data = data
