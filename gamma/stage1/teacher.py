"""Teacher forcing: record what the full-precision model does on the calibration sequences,
streamed block by block so that one block is resident on the compute device at a time.

Forward, block by block: ``hidden[l]``, the input of block ``l`` (``hidden[l + 1]`` is its
output), kept on the host in the model's dtype, so that during Stage I every block sees
full-precision inputs and must reproduce full-precision outputs. With gradients, the next-token
loss at the head, then backward block by block in reverse, each block recomputed on the device
from its stored input (one sequence at a time, as the per-sequence Fisher needs):
- ``grads[l]``: ``dLoss/d hidden[l + 1]``, the loss's gradient at each block's output (the
  ``fisher`` weighting), on the host;
- each module's empirical Fisher diagonal, the mean over sequences of ``(dLoss/dW_m)^2``, handed
  block by block to ``on_fisher(block, {module: fisher})`` and freed: nothing model-sized is kept
  unless the callback keeps it (``proxy.FisherCosts`` turns it into a modules x candidates table).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gamma.model.blocks import BlockRunner
from gamma.model.loading import quantizable_modules
from gamma.progress import track

FisherConsumer = Callable[[int, dict[str, torch.Tensor]], None]


@dataclass
class TeacherData:
    hidden: list[torch.Tensor]  # L + 1 tensors [N, T, H], host, the model's dtype
    grads: list[torch.Tensor] | None  # L tensors [N, T, H], host
    losses: torch.Tensor  # [N] next-token loss of each sequence
    proxy_costs: np.ndarray | None = None  # [M, K] Fisher proxy costs of the capture's candidates, when taken
    tokens: torch.Tensor | None = None  # [N, T] the captured sequences (the next_token loss's labels)

    @property
    def n_blocks(self) -> int:
        return len(self.hidden) - 1


def capture_teacher(model, sequences: torch.Tensor, with_grads: bool = True, *, device: str | torch.device = "cpu",
                    on_fisher: FisherConsumer | None = None, batch_size: int = 8,
                    spill_dir: Path | None = None) -> TeacherData:
    """``spill_dir``: hold every hidden state and gradient in a memory-mapped file there instead of
    in host memory (the files are unlinked at once: they vanish with the capture)."""
    runner = BlockRunner(model, device)
    where = None if spill_dir is None else Path(spill_dir) / f"capture-{os.getpid()}-{id(sequences)}"
    keep = (lambda t, name: t) if where is None else (lambda t, name: _mapped(t, where / name))
    hidden = [keep(runner.embed_all(sequences, batch_size), "hidden-0")]
    for index in track(range(len(runner.blocks)), "teacher capture (forward)"):
        hidden.append(keep(runner.run_block_all(index, hidden[-1], batch_size), f"hidden-{index + 1}"))
    grad_out, losses = _head(runner, hidden[-1], sequences, with_grads)
    if not with_grads:
        return TeacherData(hidden=hidden, grads=None, losses=losses, tokens=sequences)
    grads: list[torch.Tensor] = [grad_out] * len(runner.blocks)
    modules = quantizable_modules(model)
    for index in track(range(len(runner.blocks) - 1, -1, -1), "teacher capture (backward)", total=len(grads)):
        grads[index] = keep(grad_out, f"grad-{index}")
        prefix = f"model.layers.{index}."
        linear = {name: m for name, m in modules.items() if name.startswith(prefix)}
        grad_out = _block_backward(runner, index, linear, hidden[index], grad_out, on_fisher,
                                   needs_input_grad=index > 0)
    return TeacherData(hidden=hidden, grads=grads, losses=losses, tokens=sequences)


def _mapped(t: torch.Tensor, path: Path) -> torch.Tensor:
    """``t`` copied into a memory-mapped file that is unlinked at once (freed when the tensor is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    path.unlink()
    if not any(path.parent.iterdir()):
        path.parent.rmdir()
    return mapped.copy_(t)


def _grad_dtype(runner: BlockRunner) -> torch.dtype:
    # float16 would flush the loss's small per-token gradients to zero; bfloat16 keeps float32's range
    return torch.float32 if runner.store_dtype == torch.float32 else torch.bfloat16


def _head(runner: BlockRunner, last: torch.Tensor, sequences: torch.Tensor, with_grads: bool):
    """Each sequence's next-token loss and, with gradients, ``dLoss/d last`` on the host."""
    losses, grads = [], []
    with runner.resident(runner.model.model.norm), runner.resident(runner.model.lm_head):
        for n in range(sequences.shape[0]):
            h = runner.to_device(last[n : n + 1]).requires_grad_(with_grads)
            with torch.set_grad_enabled(with_grads):
                logits = runner.head(h)
                loss = F.cross_entropy(logits[0, :-1], sequences[n, 1:].to(runner.device))
            if with_grads:
                loss.backward()
                grads.append(h.grad.to("cpu", _grad_dtype(runner)))
            losses.append(loss.detach().cpu())
    return (torch.cat(grads) if with_grads else None), torch.stack(losses)


def _block_backward(runner: BlockRunner, index: int, linear: dict, inputs: torch.Tensor, grad_out: torch.Tensor,
                    on_fisher: FisherConsumer | None, needs_input_grad: bool) -> torch.Tensor | None:
    """Recompute block ``index`` on each stored input and backpropagate ``grad_out`` through it:
    the gradient at its input (the previous block's output) and, to ``on_fisher``, the Fisher
    diagonals of its modules ``linear``."""
    block = runner.blocks[index]
    n = inputs.shape[0]
    grad_in = []
    with runner.resident(block):
        fisher = {name: torch.zeros_like(m.weight) for name, m in linear.items()} if on_fisher else {}
        for m in linear.values():
            m.weight.requires_grad_(on_fisher is not None)
        try:
            for s in range(n):
                x = runner.to_device(inputs[s : s + 1]).requires_grad_(needs_input_grad)
                with torch.enable_grad():
                    y = runner.run_block(index, x)
                    if not y.requires_grad:
                        break  # nothing to differentiate: no input gradient wanted, no Fisher
                    y.backward(runner.to_device(grad_out[s : s + 1]))
                for name, m in linear.items():
                    if on_fisher and m.weight.grad is not None:  # None: an expert no token was routed to
                        fisher[name] += m.weight.grad.pow(2) / n
                    m.weight.grad = None
                if needs_input_grad:
                    grad_in.append(x.grad.to("cpu", _grad_dtype(runner)))
        finally:
            for m in linear.values():
                m.weight.requires_grad_(False)
                m.weight.grad = None
        if on_fisher:
            on_fisher(index, fisher)
    return torch.cat(grad_in) if needs_input_grad else None
