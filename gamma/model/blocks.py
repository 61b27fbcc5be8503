"""The one block-by-block walk that GPTQ, Stage I's teacher forcing, the Fisher proxy and
evaluation share (GPTQ's ``llama.py`` pattern, written once).

Hidden states enter block 0 after the embedding; each block is called alone with the model's
rotary position embeddings, which reproduces the model's own hidden states exactly and stays
causal. The model stays on the host in its own dtype; each piece (embedding, block, head) computes
on the runner's device in float32 while it runs (``gamma.model.device.on_device``), and the
hidden states a walk keeps on the host are stored in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gamma.model.device import COMPUTE_DTYPE, computed_on, on_device
from gamma.model.loading import decoder_blocks


class BlockRunner:
    """Runs pieces of a decoder on ``device``: embedding, one block, the head. The ``*_all``
    methods take and return hidden states on the host in ``store_dtype`` (the model's dtype)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        self.model = model
        self.blocks = decoder_blocks(model)
        self.device = torch.device(device)
        self.store_dtype = model.model.embed_tokens.weight.dtype

    def resident(self, module: nn.Module):
        """``module`` on the compute device in float32 while the context lasts."""
        return on_device(module, self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.resident(self.model.model.embed_tokens) as embed:
            return embed(input_ids.to(self.device))

    def _positions(self, hidden: torch.Tensor):
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        with self.resident(self.model.model.rotary_emb) as rotary:
            return rotary(hidden, pos)

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``hidden`` (on the device, float32); the block moves there if it is not."""
        with self.resident(self.blocks[index]) as block:
            out = block(hidden, attention_mask=None, position_embeddings=self._positions(hidden))
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.resident(self.model.model.norm) as norm, self.resident(self.model.lm_head) as lm_head:
            return lm_head(norm(hidden))

    def to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.device, COMPUTE_DTYPE)

    def to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.detach().to("cpu", self.store_dtype)

    @torch.no_grad()
    def embed_all(self, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        return torch.cat([self.to_host(self.embed(b)) for b in input_ids.split(batch_size)])

    @torch.no_grad()
    def run_block_all(self, index: int, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        with self.resident(self.blocks[index]):
            return torch.cat([self.to_host(self.run_block(index, self.to_device(h))) for h in hidden.split(batch_size)])


def walk_blocks(
    runner: BlockRunner, input_ids: torch.Tensor, batch_size: int = 8
) -> Iterator[tuple[int, nn.Module, torch.Tensor]]:
    """Yield ``(index, block, inputs)`` for every block, in depth order.

    After the caller's loop body returns, the block is run on its inputs *as it is then* to make
    the next block's inputs: a caller that quantizes the block in between gets the sequential
    (quantized-prefix) inputs GPTQ uses; one that leaves it alone gets the full-precision ones.
    """
    hidden = runner.embed_all(input_ids, batch_size)
    for index, block in enumerate(runner.blocks):
        yield index, block, hidden
        hidden = runner.run_block_all(index, hidden, batch_size)


def linear_inputs(block: nn.Module, prefix: str):
    """Context manager-like helper: forward hooks that hand every nn.Linear's input to a callback."""
    return _LinearHooks(block, prefix)


class _LinearHooks:
    def __init__(self, block: nn.Module, prefix: str):
        self.block = block
        self.prefix = prefix
        self.handles: list = []

    def attach(self, callback) -> _LinearHooks:
        for name, m in self.block.named_modules():
            if isinstance(m, nn.Linear):
                full = f"{self.prefix}.{name}"
                self.handles.append(m.register_forward_hook(lambda _m, inp, _out, n=full: callback(n, inp[0])))
        return self

    def __enter__(self) -> _LinearHooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def whole_model_fits(model: nn.Module, device: torch.device | str, headroom: float = 0.8) -> bool:
    """Whether ``model()`` can run as it is: a float32 model on the CPU, or a model whose float32
    copy fits ``headroom`` of the CUDA device's free memory. Otherwise the walk streams it."""
    device = torch.device(device)
    params = list(model.parameters())
    if device.type == "cpu":
        return all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)
    if device.type != "cuda":
        return False
    return sum(p.numel() for p in params) * 4 < headroom * torch.cuda.mem_get_info(device)[0]


@torch.no_grad()
def batch_logits(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu"):
    """Float32 logits of every batch of token ids (right-padded; causal, no mask), in order: the
    whole model on ``device`` when it fits there, else the block walk (every batch through one
    resident block before the next block comes)."""
    if whole_model_fits(model, device):
        computed_on(device, "whole model")
        with on_device(model, device):
            for batch in batches:
                yield model(input_ids=batch.to(device)).logits.float()
        return
    computed_on(device, "block walk: the whole model does not fit")
    runner = BlockRunner(model, device)
    hidden = [runner.embed_all(b) for b in batches]
    for index in range(len(runner.blocks)):
        with runner.resident(runner.blocks[index]):
            hidden = [runner.run_block_all(index, h) for h in hidden]
    for h in hidden:
        yield runner.head(runner.to_device(h)).float()
