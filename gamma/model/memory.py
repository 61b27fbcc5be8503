"""What a run will need, estimated from the model's config.json and the settings before anything
heavy is loaded, printed, recorded, and checked against what the host and device have.

Host: the weights in ``model.dtype``, the packed candidates (none when they are rebuilt on the
device), the teacher's hidden states and gradients. Device: one block in float32 with its Fisher,
its dense candidates (all of them while they fit the cache), one step's activations, the head, and
one block's GPTQ Hessians. When the device is the CPU both live in the same memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gamma.config import END_TO_END_LOSSES, GammaConfig
from gamma.model.device import resolve_device
from gamma.model.loading import ModelInputError, resolve_dtype
from gamma.quant.interface import UNQUANTIZED

GB = 1024**3
DENSE_CACHE_BYTES = 4e9  # stage1.rows.LogitRows keeps every dense candidate on the device while all fit this
RUNTIME_BYTES = 0.3 * GB  # Python with torch, transformers and gamma imported (0.26 GB measured on CPU)

# the setting that lowers each part most directly, for the refusal message
LOWERED_BY = {
    "runtime": "nothing (Python, torch and transformers themselves)",
    "weights": "model.dtype=bfloat16",
    "candidates (packed)": "fewer candidates or, with RTN, quantizer.candidate_store=rebuilt",
    "teacher hidden states": "text.calibration_sequences, text.sequence_length or stage1.max_host_activations_gb",
    "teacher gradients": "text.calibration_sequences, text.sequence_length or stage1.max_host_activations_gb",
    "one block's GPTQ Hessians": "quantizer.method=rtn",
    "one block (float32) and its Fisher": "a device with more memory",
    "dense candidates": "fewer candidates",
    "one step's activations": "stage1.sequences_per_step or stage1.tokens_per_sequence",
    "end-to-end block inputs": "stage1.sequences_per_step or stage1.tokens_per_sequence",
    "the head (float32) and its logits": "a device with more memory",
}


class MemoryRefusal(ValueError):
    """The run would not fit; the message names the figure and the setting that lowers it."""


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None = None
    experts: int = 0  # mixture of experts: experts per block (0: a dense MLP)
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # a shared expert beside the routed ones (Qwen2-MoE)

    @classmethod
    def of(cls, model_dir: str | Path) -> Shapes:
        path = Path(model_dir) / "config.json"
        try:
            return cls.from_config(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelInputError(f"{path} does not give a decoder's shapes ({type(err).__name__}: {err})") from None

    @classmethod
    def from_config(cls, c: dict) -> Shapes:
        """From a config.json's fields (a multimodal one's ``text_config``)."""
        c = c.get("text_config", c)
        heads = c["num_attention_heads"]
        experts = c.get("num_local_experts") or c.get("num_experts") or 0
        return cls(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                   c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)), c.get("max_position_embeddings"),
                   experts, (c.get("moe_intermediate_size") or c["intermediate_size"]) if experts else 0,
                   c.get("shared_expert_intermediate_size") or 0)

    @property
    def block_linear(self) -> int:
        """Weights of one block's projections (q, k, v, o, and gate, up, down of the MLP or of every
        expert)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = self.experts * self.expert_intermediate + self.shared_intermediate if self.experts else self.intermediate
        return attn + 3 * self.hidden * mlp

    @property
    def input_widths(self) -> dict[str, int]:
        """The input width of each kind of projection, by the modules that have it."""
        widths = {"q/k/v, gate and up projections (hidden size)": self.hidden,
                  "o_proj (heads x head_dim)": self.heads * self.head_dim}
        if not self.experts:
            return {**widths, "down_proj (intermediate size)": self.intermediate}
        widths["experts' down projections (moe intermediate size)"] = self.expert_intermediate
        if self.shared_intermediate:
            widths["the shared expert's down_proj"] = self.shared_intermediate
        return widths

    def check_group_size(self, group_size: int) -> None:
        """Refuse a group size that does not divide every projection's input width, naming them."""
        bad = {kind: w for kind, w in self.input_widths.items() if group_size > 0 and w % group_size}
        if bad:
            widths = ", ".join(f"{kind}: {w}" for kind, w in bad.items())
            fits = [str(g) for g in (32, 64, 128, 256) if all(w % g == 0 for w in self.input_widths.values())]
            raise ModelInputError(f"quantizer.group_size={group_size} does not divide the input width of {widths}; "
                                  f"pick one that divides them all ({', '.join(fits) or 'none of 32/64/128/256 does'})"
                                  " or -1 for one group per row")

    def check_lengths(self, lengths: dict[str, int]) -> None:
        """Refuse a setting (``{name: tokens}``) longer than the model's positions."""
        long = {k: v for k, v in lengths.items() if self.max_positions and v > self.max_positions}
        if long:
            said = ", ".join(f"{k}={v}" for k, v in long.items())
            raise ModelInputError(f"{said} is beyond the model's {self.max_positions} positions "
                                  "(max_position_embeddings in its config.json): lower it")

    @property
    def block_hessians(self) -> int:
        """Entries of one block's distinct Hessians (q/k/v and gate/up share their input; each
        expert sees its own tokens)."""
        attn = self.hidden**2 + (self.heads * self.head_dim) ** 2
        if not self.experts:
            return attn + self.hidden**2 + self.intermediate**2
        shared = self.hidden**2 + self.shared_intermediate**2 if self.shared_intermediate else 0
        return attn + self.experts * (self.hidden**2 + self.expert_intermediate**2) + shared

    @property
    def parameters(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * (self.block_linear + 2 * self.hidden) + embed * (1 if self.tied else 2) + self.hidden


def packed_candidate_bytes(weights: float, bits: list[int], group_size: int, in_features: int) -> float:
    """Host bytes of ``weights`` weights held at every candidate width: b/8 bytes per weight for
    width b, and per group a float16 scale and a one-byte zero-point (``PackedWeight``)."""
    groups = weights / (group_size if group_size > 0 else in_features)
    quantized = [b for b in bits if b != UNQUANTIZED]  # the 16-bit one: its own float16 copy
    return weights * sum(quantized) / 8 + groups * 3 * len(quantized) + weights * 2 * (UNQUANTIZED in bits)


SPILLED = ("teacher hidden states", "teacher gradients")


@dataclass
class MemoryEstimate:
    host: dict[str, float]  # bytes by part
    device: dict[str, float]
    device_name: str
    disk: dict[str, float] = field(default_factory=dict)  # memory-mapped (stage1.max_host_activations_gb)

    @property
    def spills(self) -> bool:
        return bool(self.disk)

    @property
    def shared(self) -> bool:
        return self.device_name == "cpu"

    def totals(self) -> tuple[float, float]:
        host, device = sum(self.host.values()), sum(self.device.values())
        return (host + device, 0.0) if self.shared else (host, device)

    def lines(self) -> list[str]:
        host, device = self.totals()
        where = "host (the CPU computes: device parts included)" if self.shared else "host"
        out = [f"memory estimate: {where} {host / GB:.2f} GB" +
               ("" if self.shared else f", device {self.device_name} {device / GB:.2f} GB")]
        for side, parts in (("host", self.host), ("device", self.device), ("disk (memory-mapped)", self.disk)):
            out += [f"  {side}: {name} {b / GB:.2f} GB" for name, b in parts.items() if b > 0]
        return out

    def record(self) -> dict:
        host, device = self.totals()
        return {"host_gb": round(host / GB, 3), "device_gb": round(device / GB, 3), "device": self.device_name,
                "disk_gb": round(sum(self.disk.values()) / GB, 3),
                "parts_gb": {k: round(v / GB, 3) for k, v in {**self.host, **self.device, **self.disk}.items()}}

    def check(self, host_available: float, device_available: float | None) -> None:
        """Refuse, naming the figure and the setting that lowers it, when either side cannot hold it."""
        host, device = self.totals()
        for side, need, have, parts in (("host", host, host_available, {**self.host, **self.device}),
                                        (self.device_name, device, device_available, self.device)):
            if have is not None and need > have:
                largest = max(parts, key=parts.get)
                raise MemoryRefusal(
                    f"this run needs about {need / GB:.1f} GB on the {side} but {have / GB:.1f} GB are free; the "
                    f"largest part is {largest} ({parts[largest] / GB:.1f} GB): lower it with {LOWERED_BY[largest]}")


def estimate_memory(cfg: GammaConfig, model_dir: str | Path, sequences: int | None = None) -> MemoryEstimate:
    """Stage I's memory (the largest phase) for ``cfg`` on the model at ``model_dir``; ``sequences``:
    the calibration sequences this process holds (all of them by default)."""
    s = Shapes.of(model_dir)
    itemsize = resolve_dtype(cfg.model.dtype, model_dir).itemsize
    n, t = sequences or cfg.text.calibration_sequences, cfg.text.sequence_length
    quantized, k = s.layers * s.block_linear, len(cfg.candidates)
    with_grads = cfg.stage1.loss == "fisher" or cfg.stage1.init == "proxy"
    activations = (s.layers + 1) * n * t * s.hidden
    dense = k * quantized * 4
    device_name = str(resolve_device(cfg.model.device))
    held = cfg.quantizer.store_on(torch.device(device_name).type) == "held"  # rebuilt: only one block's, dense
    host = {
        "runtime": RUNTIME_BYTES,
        "weights": s.parameters * itemsize,
        "candidates (packed)": packed_candidate_bytes(quantized, cfg.candidates, cfg.quantizer.group_size, s.hidden)
        if held else 0.0,
        "teacher hidden states": activations * itemsize,
        "teacher gradients": s.layers * n * t * s.hidden * max(itemsize, 2) if with_grads else 0.0,
    }
    b, tokens = cfg.stage1.sequences_per_step, min(cfg.stage1.tokens_per_sequence, t)
    if cfg.stage1.loss in END_TO_END_LOSSES:  # every block's mixed input of one draw, float32, for the backward
        host["end-to-end block inputs"] = s.layers * b * tokens * s.hidden * 4
    device = {
        "one block (float32) and its Fisher": (s.block_linear + 2 * s.hidden) * 4 + s.block_linear * 4,
        "dense candidates": dense if dense <= DENSE_CACHE_BYTES else k * s.block_linear * 4,  # else one block's
        "one step's activations": b * tokens * (12 * s.hidden + 4 * s.intermediate) * 4 + b * s.heads * tokens**2 * 4,
        # one at a time: the embedding is looked up in its own dtype, the head runs in float32
        "the head (float32) and its logits": s.vocab * s.hidden * 4 + t * s.vocab * 4 * 3,
        # GPTQ's candidates are built block by block: one block's Hessians (float64 sums) at a time
        "one block's GPTQ Hessians": s.block_hessians * 8 if cfg.quantizer.method == "gptq" else 0.0,
    }
    estimate = MemoryEstimate(host, device, device_name)
    if sum(host[p] for p in SPILLED) > cfg.stage1.max_host_activations_gb * GB:
        estimate.disk = {p: host.pop(p) for p in SPILLED}
    return estimate


def available_memory(device: str) -> tuple[float, float | None]:
    """Free host memory, and free device memory (None for the CPU, which shares the host's)."""
    import psutil

    host = float(psutil.virtual_memory().available)
    dev = torch.device(device)
    if dev.type == "cuda":
        return host, float(torch.cuda.mem_get_info(dev)[0])
    return host, None
