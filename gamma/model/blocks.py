"""The one block-by-block walk that GPTQ, Stage I's teacher forcing, the Fisher proxy and
evaluation share (GPTQ's ``llama.py`` pattern, written once).

Hidden states enter block 0 after the embedding; each block is called alone exactly as the
model's own forward calls it: with the attention mask that transformers' mask utilities build for
the block's layer type under the model's attention implementation (causal, sliding window,
chunked), and with the rotary position embeddings of that layer type; the head applies the final
norm and the model's logit soft-capping. ``walk_error`` checks all of this against ``model()``
once per run. The model stays on the host in its own dtype; each piece (embedding, block, head)
computes on the runner's device in float32 while it runs (``gamma.model.device.on_device``), and
the hidden states a walk keeps on the host are stored in the model's dtype.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import nn

from gamma.model.device import COMPUTE_DTYPE, computed_on, on_device
from gamma.model.loading import decoder_blocks


def layer_types(config, n_blocks: int) -> list[str]:
    """Each block's attention type as the model's forward picks its mask: the config's
    ``layer_types`` where it has them, else a sliding window for all when it sets one (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:n_blocks]
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n_blocks


def _mask_builders() -> dict:
    from transformers import masking_utils as m

    return {"full_attention": m.create_causal_mask, "sliding_attention": m.create_sliding_window_causal_mask,
            "chunked_attention": m.create_chunked_causal_mask}


class BlockRunner:
    """Runs pieces of a decoder on ``device``: embedding, one block, the head. The ``*_all``
    methods take and return hidden states on the host in ``store_dtype`` (the model's dtype)."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        self.model = model
        self.blocks = decoder_blocks(model)
        self.device = torch.device(device)
        self.store_dtype = model.model.embed_tokens.weight.dtype
        self.config = model.model.config
        self.types = layer_types(self.config, len(self.blocks))
        self._inputs: dict = {}  # (batch, length, device) -> {layer type: (mask, position embeddings, ids)}

    def resident(self, module: nn.Module):
        """``module`` on the compute device in float32 while the context lasts."""
        return on_device(module, self.device)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 embeddings, looked up in the table's own dtype (as the model's forward does; no
        float32 copy of a vocabulary-sized table)."""
        with on_device(self.model.model.embed_tokens, self.device, dtype=None) as embed:
            return embed(input_ids.to(self.device)).to(COMPUTE_DTYPE)

    def _block_inputs(self, hidden: torch.Tensor, layer_type: str):
        """The attention mask and position embeddings the model's forward gives a block of
        ``layer_type`` for unpadded sequences shaped like ``hidden``, built once per shape."""
        key = (hidden.shape[0], hidden.shape[1], hidden.device)
        if key not in self._inputs:
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
            builders, inputs = _mask_builders(), {}
            with self.resident(self.model.model.rotary_emb) as rotary:
                per_type = "layer_type" in inspect.signature(rotary.forward).parameters  # Gemma3: local/global
                for t in set(self.types):
                    if t not in builders:
                        raise ValueError(f"{type(self.model).__name__}: layer type {t!r} has no mask gamma can build")
                    mask = builders[t](config=self.config, inputs_embeds=hidden, attention_mask=None,
                                       past_key_values=None, position_ids=pos)
                    inputs[t] = mask, (rotary(hidden, pos, t) if per_type else rotary(hidden, pos)), pos
            self._inputs = {key: inputs}  # one shape at a time: the walk's batches share it
        return self._inputs[key][layer_type]

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``hidden`` (on the device, float32); the block moves there if it is not."""
        mask, positions, ids = self._block_inputs(hidden, self.types[index])
        with self.resident(self.blocks[index]) as block:
            out = block(hidden, attention_mask=mask, position_embeddings=positions, position_ids=ids)
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, the language-model head and the model's logit soft-capping (Gemma2/3)."""
        with self.resident(self.model.model.norm) as norm, self.resident(self.model.lm_head) as lm_head:
            logits = lm_head(norm(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.device, COMPUTE_DTYPE)

    def to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.detach().to("cpu", self.store_dtype)

    @torch.no_grad()
    def embed_all(self, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        with on_device(self.model.model.embed_tokens, self.device, dtype=None):  # moved once for all batches
            return torch.cat([self.to_host(self.embed(b)) for b in input_ids.split(batch_size)])

    @torch.no_grad()
    def run_block_all(self, index: int, hidden: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        with self.resident(self.blocks[index]):
            return torch.cat([self.to_host(self.run_block(index, self.to_device(h))) for h in hidden.split(batch_size)])


class WalkMismatch(ValueError):
    """The block walk does not reproduce the model's own logits: its blocks need a call gamma does not make."""


@torch.no_grad()
def walk_error(model: nn.Module, input_ids: torch.Tensor, device: torch.device | str = "cpu",
               tolerance: float | None = None) -> float:
    """The walk's logits (float32) against ``model()``'s (in the model's own dtype) on ``input_ids``
    (one sequence, say) on ``device``, over the first blocks up to one of every layer type, and the
    head: the largest difference relative to the largest logit. ``WalkMismatch`` naming the
    architecture above ``tolerance`` (default: 1e-3 for a float32 model, 5e-2 for 16-bit ones,
    whose own forward rounds; a lost mask or soft-cap is off by 25% and more). Only those blocks
    need the device, and nothing is copied to float32 at once."""
    runner = BlockRunner(model, device)
    if tolerance is None:
        tolerance = 1e-3 if runner.store_dtype == torch.float32 else 5e-2
    k = max(runner.types.index(t) for t in set(runner.types)) + 1
    layers, depth = model.model.layers, model.model.config.num_hidden_layers
    model.model.layers, model.model.config.num_hidden_layers = layers[:k], k
    try:
        ids = input_ids.to(device)
        with on_device(model, device, dtype=None):  # the model's own forward, in its own dtypes
            expected = model(input_ids=ids).logits.float()
        hidden = runner.embed(ids)
        for index in range(k):
            hidden = runner.run_block(index, hidden)
        error = float((runner.head(hidden) - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    finally:
        model.model.layers, model.model.config.num_hidden_layers = layers, depth
    if not error <= tolerance:
        raise WalkMismatch(
            f"{type(model).__name__}: gamma's block-by-block walk does not reproduce the model's own logits "
            f"(largest difference {error:.2g} of the largest logit over {k} block(s) and the head, tolerance "
            f"{tolerance:g}): its blocks need inputs gamma does not give them, so teacher forcing, GPTQ and "
            "evaluation would all be wrong for it")
    return error


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


def why_block_walk(model: nn.Module, device: torch.device | str, headroom: float = 0.8) -> str | None:
    """Why ``model()`` cannot run as it is (None: it can): on the CPU it runs a float32 model
    (a 16-bit one goes block by block, each computed in float32); on a CUDA device, a model
    whose float32 copy fits ``headroom`` of the free memory. Otherwise the walk streams it."""
    device = torch.device(device)
    params = list(model.parameters())
    if device.type == "cpu":
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32})
        return f"{'/'.join(dtypes)} weights: each block computes in float32" if dtypes else None
    if device.type != "cuda":
        return f"no whole-model path on a {device.type} device"
    if sum(p.numel() for p in params) * 4 >= headroom * torch.cuda.mem_get_info(device)[0]:
        return "the whole model does not fit the device"
    return None


@torch.no_grad()
def batch_logits(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu"):
    """Float32 logits of every batch of token ids (right-padded; causal, no mask), in order: the
    whole model on ``device`` when it fits there, else the block walk (every batch through one
    resident block before the next block comes)."""
    reason = why_block_walk(model, device)
    if reason is None:
        computed_on(device, "whole model")
        with on_device(model, device):
            for batch in batches:
                yield model(input_ids=batch.to(device)).logits.float()
        return
    computed_on(device, f"block walk: {reason}")
    runner = BlockRunner(model, device)
    hidden = [runner.embed_all(b) for b in batches]
    for index in range(len(runner.blocks)):
        with runner.resident(runner.blocks[index]):
            hidden = [runner.run_block_all(index, h) for h in hidden]
    for h in hidden:
        yield runner.head(runner.to_device(h)).float()
