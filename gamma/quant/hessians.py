"""The Hessians GPTQ needs: ``2 X^T X / n`` of each linear module's real inputs, taken block by
block along the one block walk (``on_block`` lets the caller quantize a block before it makes the
next block's inputs: GPTQ's sequential Hessians)."""

from __future__ import annotations

import torch
from torch import nn

from gamma.model.blocks import BlockRunner, linear_inputs, walk_blocks
from gamma.model.loading import block_index, quantizable_modules
from gamma.progress import track


class HessianAccumulator:
    """Running ``2 X^T X / n`` over every token seen by one linear module."""

    def __init__(self, in_features: int, token_clip: float = 0.0, sink_weight: float = 1.0):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.tokens = 0
        self.token_clip = token_clip
        self.sink_weight = sink_weight

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().to(torch.float32)
        if self.sink_weight != 1.0 and x.dim() == 3:
            # The first position (attention sink) is read by every later token through attention:
            # its error matters far more than one token's share of H says.
            x = x.clone()
            x[:, 0] *= self.sink_weight**0.5
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        if self.token_clip > 0:
            # A few tokens (attention sinks) carry inputs 10-100x larger than the rest and would
            # dominate H: cap each token's norm at token_clip x the median so all tokens count.
            norms = x.norm(dim=1)
            cap = self.token_clip * norms.median()
            x = x * (cap / norms.clamp_min(1e-12)).clamp(max=1.0)[:, None]
        self.hessian = self.hessian.to(x.device)  # accumulates where the inputs are
        self.hessian *= self.tokens / (self.tokens + n)
        self.tokens += n
        # float32 products (fast), float64 running sum (no drift over many batches)
        self.hessian += (x.T @ x).to(torch.float64) * (2.0 / self.tokens)

    def result(self) -> torch.Tensor:
        return self.hessian.to("cpu", torch.float32)


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int = 8,
    modules: set[str] | None = None,
    token_clip: float = 0.0,
    sink_weight: float = 1.0,
    on_block=None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Hessians of every quantizable module's full-precision inputs on the calibration sequences.

    ``on_block(index, hessians)`` runs after each block's Hessians are taken and before the block
    makes the next block's inputs: quantizing the block there gives GPTQ's sequential Hessians
    (each block sees the inputs the quantized prefix really produces); with ``on_block`` the
    Hessians are handed over block by block and not kept (an 8B model's are 33 GB), and the
    result is empty. Each block runs on ``device``; the Hessians are accumulated there (float64)
    and handed over on the host in float32."""
    runner = BlockRunner(model, device)
    wanted = modules or set(quantizable_modules(model))
    deepest = max(block_index(n) for n in wanted)
    hessians: dict[str, torch.Tensor] = {}
    walk = walk_blocks(runner, calibration, batch_size)
    for index, block, hidden in track(walk, "calibration capture (Hessians)", total=len(runner.blocks)):
        accs: dict[str, HessianAccumulator] = {}
        # q/k/v (and gate/up) read the very same input tensor: accumulate X^T X once and share it.
        shares: dict[str, str] = {}
        last: dict = {"x": None, "name": None}

        def add(name: str, x: torch.Tensor, accs=accs, shares=shares, last=last) -> None:
            if name not in wanted:
                return
            if x is last["x"]:
                shares[name] = last["name"]
                return
            last["x"], last["name"] = x, name
            accs.setdefault(name, HessianAccumulator(x.shape[-1], token_clip, sink_weight)).add(x)

        prefix = f"model.layers.{index}"
        with linear_inputs(block, prefix).attach(add):
            runner.run_block_all(index, hidden, batch_size)
        results = {n: a.result() for n, a in accs.items()}
        results.update({n: results[leader] for n, leader in shares.items()})
        # an expert the router never chose saw no token: its Hessian is zero (GPTQ: see gptq.py)
        for name, module in block.named_modules(prefix=prefix):
            if name in wanted and name not in results and isinstance(module, nn.Linear):
                results[name] = torch.zeros(module.in_features, module.in_features)
        if on_block is not None:
            on_block(index, results)
        else:
            hessians.update(results)
        if index >= deepest:
            break  # no wanted module deeper down: skip the rest of the walk
    return hessians
