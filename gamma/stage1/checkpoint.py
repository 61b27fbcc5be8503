"""Resumable Stage I: the logits, optimizer, multiplier and history, saved atomically every few
steps, resumed only by the run that wrote them (same model, text and settings: ``key``)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Checkpoint:
    path: Path
    key: str = ""  # identifies the Stage I run (model, text, settings): stage1_key
    stop_after: int | None = None  # stop, as if killed, after this many steps of this call (resumption tests)

    def resume(self, logits, optimizer, lagrangian) -> tuple[dict | None, int]:
        """Load a checkpoint of this run into the optimisation state: (history, steps done), or
        (None, 0) when there is none or it belongs to another run (said, then started over)."""
        path = Path(self.path)
        state = torch.load(path, weights_only=False) if path.exists() else None
        if state is not None and (state.get("key") != self.key or state["alpha"].shape != logits.alpha.shape):
            warnings.warn(f"{path} belongs to another Stage I run (other model, text or settings): starting over",
                          stacklevel=3)
            state = None
        if state is None:
            return None, 0
        logits.alpha.data.copy_(state["alpha"])
        optimizer.load_state_dict(state["optimizer"])
        lagrangian.load_state_dict(state["lagrangian"])
        return state["history"], state["step"]

    def save(self, logits, optimizer, lagrangian, history: dict, step: int) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".partial")
        torch.save({"alpha": logits.alpha.detach().clone(), "optimizer": optimizer.state_dict(),
                    "lagrangian": lagrangian.state_dict(), "history": history, "step": step, "key": self.key}, tmp)
        os.replace(tmp, path)
