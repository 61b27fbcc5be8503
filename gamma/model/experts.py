"""Mixture-of-experts weights as one ``nn.Linear`` per expert projection.

transformers 5 stores a layer's experts as two 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]), while every part of gamma (calibration hooks, GPTQ's Hessians, Stage I's
mixed weights, the Fisher proxy, the export) works on ``nn.Linear``. ``split_experts`` replaces each
such module by ``ExpertLinears``: per expert, three ``nn.Linear`` whose weights are views of the
3-D parameters (nothing is copied), named as that architecture's per-expert checkpoints name them
(Mixtral: ``w1`` gate, ``w3`` up, ``w2`` down; the Qwen-MoE family: ``gate_proj``, ``up_proj``,
``down_proj``), routing tokens exactly as transformers' eager experts forward does. The export
writes those per-expert names (the layout vLLM's MoE loaders and transformers' own conversion
read); ``checkpoint_name`` and ``model_name`` translate between the module tree and the checkpoint.

Layouts this does not know (transposed, interleaved, with biases or a custom gate) stay as they are
and are listed as not quantized by the coverage account.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# the per-expert projection names of an architecture's checkpoints: (gate, up, down)
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"), "minimax": ("w1", "w3", "w2")}
DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
# module-tree name -> checkpoint name, where transformers renamed the checkpoint's layout
CHECKPOINT_RENAMES = {"mixtral": (".mlp.", ".block_sparse_moe."), "minimax": (".mlp.", ".block_sparse_moe.")}


class ExpertSplitError(ValueError):
    """Split experts do not compute what the model's own experts compute."""


def _frozen_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class ExpertLinears(nn.Module):
    """One layer's experts: child ``"e"`` holds expert e's gate, up and down ``nn.Linear``."""

    def __init__(self, experts: nn.Module, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        inter = experts.down_proj.shape[-1]
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        for e in range(self.num_experts):
            expert = nn.Module()
            for name, weight in zip(names, (gate_up[e, :inter], gate_up[e, inter:], down[e]), strict=True):
                setattr(expert, name, _frozen_linear(weight))
            self.add_module(str(e), expert)

    def expert(self, e: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        block = getattr(self, str(e))
        return tuple(getattr(block, n) for n in self.names)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == self.num_experts:  # the slot of tokens dropped by the router
                continue
            position, token = torch.where(mask[e])
            x = hidden_states[token]
            gate, up, down = self.expert(e)
            y = down(self.act_fn(gate(x)) * up(x)) * top_k_weights[token, position, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def splittable(module: nn.Module) -> bool:
    """A transformers 5 experts module in the plain layout: concatenated [gate; up] rows, not
    transposed, no biases, the default gate ``act(gate) * up``."""
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and all(p.dim() == 3 for p in params.values())
            and getattr(module, "has_gate", False) and getattr(module, "is_concatenated", False)
            and not getattr(module, "is_transposed", True) and not getattr(module, "has_bias", True)
            and not getattr(module, "has_post_expert_norm", True) and hasattr(module, "act_fn")
            and _default_gate(type(module)))


def _default_gate(cls: type) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without the experts interface: no 3-D experts either
        return False
    return getattr(cls, "_apply_gate", None) is _default_apply_gate


def split_experts(model: nn.Module) -> int:
    """Replace every splittable experts module of ``model`` by ``ExpertLinears`` (in place); the
    first of each class is checked against the original on random routed tokens. Returns how many
    modules were split."""
    model_type = getattr(model.config, "model_type", "")
    names = EXPERT_NAMES.get(model_type, DEFAULT_EXPERT_NAMES)
    checked: set[type] = set()
    targets = [(n, m) for n, m in model.named_modules() if splittable(m)]
    for name, module in targets:
        split = ExpertLinears(module, names)
        if type(module) not in checked:
            _check_split(module, split, model_type)
            checked.add(type(module))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, split)
    return len(targets)


def _check_split(original: nn.Module, split: ExpertLinears, model_type: str) -> None:
    weight = original.down_proj
    generator = torch.Generator().manual_seed(0)
    tokens, k = 16, min(2, split.num_experts)
    x = torch.randn(tokens, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(split.num_experts, generator=generator)[:k] for _ in range(tokens)])
    probs = torch.rand(tokens, k, generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        want, got = original(x, index.to(weight.device), probs), split(x, index.to(weight.device), probs)
    error = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
    tolerance = 1e-5 if weight.dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise ExpertSplitError(f"{model_type}: {type(original).__name__} split into one nn.Linear per expert "
                               f"differs from the original by {error:.2e} (relative; tolerance {tolerance:g}): "
                               "this experts layout is not supported")


def checkpoint_name(model_type: str, name: str) -> str:
    """A module-tree tensor or module name as the architecture's checkpoints spell it."""
    old, new = CHECKPOINT_RENAMES.get(model_type, ("", ""))
    return name.replace(old, new) if old else name


def model_name(model_type: str, name: str) -> str:
    """The inverse of ``checkpoint_name``."""
    old, new = CHECKPOINT_RENAMES.get(model_type, ("", ""))
    return name.replace(new, old) if old else name
