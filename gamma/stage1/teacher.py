"""Teacher forcing: record what the full-precision model does on the calibration sequences.

One forward (and, for the ``fisher`` loss and the Fisher proxy, one backward) of the full model
per sequence records:
- ``hidden[l]``: the input of block ``l`` (``hidden[l + 1]`` is its output), so that during
  Stage I every block sees full-precision inputs and must reproduce full-precision outputs;
- ``grads[l]``: ``dLoss/d hidden[l + 1]``, the final next-token loss's gradient at each block's
  output (the ``fisher`` weighting);
- ``fisher[m]``: the empirical Fisher diagonal of each module's weight, the mean over
  sequences of ``(dLoss/dW_m)^2`` (the sensitivity proxy).
Everything lives on the CPU; Stage I moves one block's slice to the compute device at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gamma.model.loading import decoder_blocks, quantizable_modules
from gamma.progress import track


@dataclass
class TeacherData:
    hidden: list[torch.Tensor]  # L + 1 tensors [N, T, H]
    grads: list[torch.Tensor] | None  # L tensors [N, T, H]
    fisher: dict[str, torch.Tensor] | None  # module -> [out, in]
    losses: torch.Tensor  # [N] next-token loss of each sequence

    @property
    def n_blocks(self) -> int:
        return len(self.hidden) - 1


def capture_teacher(model: nn.Module, sequences: torch.Tensor, with_grads: bool = True) -> TeacherData:
    blocks = decoder_blocks(model)
    modules = quantizable_modules(model)
    N = sequences.shape[0]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    grads: list[list[torch.Tensor]] = [[] for _ in range(len(blocks))]
    fisher = {name: torch.zeros_like(m.weight) for name, m in modules.items()} if with_grads else None
    outputs: list[torch.Tensor] = []

    def keep_input(index):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                hidden[0].append(x.detach().cpu())

        return hook

    def keep_output(_mod, _args, out):
        y = out[0] if isinstance(out, tuple) else out
        if with_grads:
            y.retain_grad()
        outputs.append(y)

    handles = [b.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(keep_output) for b in blocks]
    for m in modules.values():
        m.weight.requires_grad_(with_grads)
    losses = []
    try:
        for seq in track(sequences.split(1), "teacher capture" + (" + gradients" if with_grads else ""), total=N):
            outputs.clear()
            with torch.set_grad_enabled(with_grads):
                logits = model(input_ids=seq).logits
                loss = F.cross_entropy(logits[0, :-1].float(), seq[0, 1:])
                if with_grads:
                    loss.backward()
            losses.append(loss.detach())
            for i, y in enumerate(outputs):
                hidden[i + 1].append(y.detach().cpu())
                if with_grads:
                    grads[i].append(y.grad.detach().cpu())
            if with_grads:
                for name, m in modules.items():
                    fisher[name] += m.weight.grad.pow(2) / N
                    m.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for m in modules.values():
            m.weight.requires_grad_(False)
            m.weight.grad = None
    return TeacherData(
        hidden=[torch.cat(h) for h in hidden],
        grads=[torch.cat(g) for g in grads] if with_grads else None,
        fisher=fisher,
        losses=torch.stack(losses),
    )
