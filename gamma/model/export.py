"""A quantized variant as a packed compressed-tensors checkpoint (the format vLLM loads), and back.

The checkpoint is an ordinary Hugging Face directory whose ``config.json`` carries a
``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``) with one
config group per (bits, symmetric) pair and the explicit module names as its ``targets``. Each
quantized linear stores ``weight_packed`` (int32, codes packed densely by compressed-tensors' own
``pack_to_int32``), ``weight_scale`` (float16), ``weight_shape`` and, when asymmetric,
``weight_zero_point`` (packed along the output dimension, in one of ``ZERO_POINT_LAYOUTS``). Every
export is read back before it is made visible (``read_back``): a checkpoint whose modules do not
dequantize to exactly what was exported is never written where a finished one is expected.
Everything else (embeddings, norms, head) is stored at float16, unchanged otherwise.

Codes here are unsigned (``[0, 2**bits - 1]``, symmetric zero-point ``2**(bits-1)``);
compressed-tensors stores signed values, so both codes and zero-points move by ``2**(bits-1)``,
and ``(q - z) * s`` is the same number on either side. Reloading dequantizes in float32 exactly
as ``QuantizedWeight.dequantize`` does, so a reloaded model computes bit-identical logits to the
in-memory one once that model's unquantized tensors are rounded to storage precision
(``round_to_storage``), which is what the pipeline evaluates.

Asymmetric zero-points have two layouts, because the loaders disagree (one tensor name, two
shapes; no single tensor satisfies both):

- ``packed`` (the default): ``[ceil(rows*bits/32), groups]`` int32, exactly what compressed-tensors'
  own compressor writes (``PackedQuantizationCompressor.compress``) and what vLLM allocates
  (``CompressedTensorsWNA16.create_weights``: ``packed_output_dim``, ``packed_dim=0``). transformers
  (5.23, with compressed-tensors 0.20) refuses it: it builds the compressed model on the meta device,
  where compressed-tensors' compressor leaves ``weight_zero_point`` at its unpacked ``[rows, groups]``
  shape (``pack_quantized/base.py``, the ``meta`` branch of ``compress``), so the load stops at a size
  mismatch; this holds for compressed-tensors' own asymmetric output too.
- ``padded``: ``[rows, groups]`` int32, the packed rows first and zeros after them. transformers loads
  it (its decompression unpacks only the first ``ceil(rows*bits/32)`` rows) and computes bit-identical
  logits; vLLM's row-parallel layers (``o_proj``, ``down_proj``) refuse it (``parameter.py``,
  ``load_row_parallel_weight``: the loaded shape must equal the allocated packed one).

gamma's reader takes both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gamma.model.assignment import unquantized_tensors
from gamma.model.experts import checkpoint_name, model_name, split_experts
from gamma.quant.interface import QuantizedWeight, QuantSpec

STORAGE_DTYPE = torch.float16
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
FORMAT = "pack-quantized"
MANIFEST = "gamma_checksums.json"
ZERO_POINT_LAYOUTS = {
    "packed": "[ceil(rows*bits/32), groups] int32: compressed-tensors' own and vLLM's (not transformers')",
    "padded": "[rows, groups] int32, the packed rows then zeros: transformers' (not vLLM's row-parallel layers)",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read; the message names the file or module."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    weights_bytes: int  # the safetensors file(s): what the budget predicts
    total_bytes: int  # everything in the directory (tokenizer and config included)
    sha256: str  # over the manifest of every file's digest

    def as_dict(self) -> dict:
        return {"path": str(self.path), "weights_bytes": self.weights_bytes, "total_bytes": self.total_bytes,
                "sha256": self.sha256}


def _signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    return (values.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def _unsigned(values: torch.Tensor, bits: int) -> torch.Tensor:
    return values.to(torch.int32) + 2 ** (bits - 1)


def quantization_config(records: dict[str, QuantizedWeight], ignore: list[str]) -> dict:
    """compressed-tensors' ``QuantizationConfig``, one group per (bits, symmetric), explicit targets."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_kind: dict[tuple[int, bool, int], list[str]] = {}
    for name, rec in records.items():
        by_kind.setdefault((rec.spec.bits, rec.spec.symmetric, rec.spec.group_size), []).append(name)
    groups = {}
    for i, ((bits, symmetric, group_size), targets) in enumerate(sorted(by_kind.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if group_size > 0 else "channel",
                                group_size=group_size if group_size > 0 else None)
        groups[f"group_{i}"] = QuantizationScheme(targets=sorted(targets), weights=args, format=FORMAT)
    config = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                ignore=ignore)
    return config.model_dump(exclude_none=True)


def round_to_storage(model: nn.Module, quantized: set[str]) -> None:
    """Round every tensor the checkpoint stores at ``STORAGE_DTYPE`` to that precision, in place,
    so the model that is evaluated is exactly the model that is exported."""
    skip = {f"{name}.weight" for name in quantized}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip and p.is_floating_point():
                p.copy_(p.to(STORAGE_DTYPE).to(p.dtype))


def _packed_rows(rows: int, bits: int) -> int:
    return -(-rows * bits // 32)


def _state_dict(model: nn.Module, records: dict[str, QuantizedWeight],
                zero_points: str = "packed") -> dict[str, torch.Tensor]:
    """Every tensor under its checkpoint name (``experts.checkpoint_name``); asymmetric zero-points
    in layout ``zero_points`` (``ZERO_POINT_LAYOUTS``)."""
    rename = functools.partial(checkpoint_name, model.config.model_type)
    out = {rename(key): tensor.detach().to(STORAGE_DTYPE if tensor.is_floating_point() else tensor.dtype).contiguous()
           for key, tensor in unquantized_tensors(model, records).items()}
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    for module, rec in records.items():
        bits, name = rec.spec.bits, rename(module)
        out[f"{name}.weight_packed"] = pack_to_int32(_signed(rec.codes, bits), bits)
        out[f"{name}.weight_scale"] = rec.scales.to(STORAGE_DTYPE).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(list(rec.codes.shape), dtype=torch.int64)
        if not rec.spec.symmetric:
            zeros = pack_to_int32(_signed(rec.zeros, bits), bits, packed_dim=0)
            if zero_points == "padded":
                zeros = torch.cat([zeros, zeros.new_zeros(rec.zeros.shape[0] - zeros.shape[0], zeros.shape[1])])
            out[f"{name}.weight_zero_point"] = zeros.contiguous()
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum(path: str | Path) -> tuple[str, dict[str, str]]:
    """sha256 over the sorted (file, sha256) list of a checkpoint directory, manifest excluded."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(path)): _digest(p) for p in files}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(), manifest


def export_checkpoint(model: nn.Module, tokenizer, records: dict[str, QuantizedWeight], path: str | Path,
                      extra_files: dict[str, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                      zero_points: str = "packed") -> Checkpoint:
    """Write ``records`` (plus the model's other tensors) as a compressed-tensors checkpoint at
    ``path``, atomically: everything goes to ``<path>.partial`` and is renamed only when complete,
    so a crash never leaves a half checkpoint where a finished one is expected. Weights beyond
    ``max_shard_bytes`` are split into Hugging Face shards with their index. Asymmetric
    zero-points are written in layout ``zero_points``: ``packed`` for vLLM (and compressed-tensors),
    ``padded`` for transformers' ``from_pretrained`` (``ZERO_POINT_LAYOUTS``)."""
    if not records:
        raise CheckpointError("nothing to export: the assignment quantized no module")
    if zero_points not in ZERO_POINT_LAYOUTS:
        raise CheckpointError(f"zero_points={zero_points!r}: the layouts are {sorted(ZERO_POINT_LAYOUTS)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_shards(_state_dict(model, records, zero_points), tmp, max_shard_bytes)
    rename = functools.partial(checkpoint_name, model.config.model_type)
    ignore = [rename(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in records]
    _write_config(model, tmp, quantization_config({rename(n): r for n, r in records.items()}, ignore))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    try:  # before it becomes visible: never a checkpoint that misreads
        read_back(tmp, records, model.config.model_type)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(tmp, path)


def _write_config(model: nn.Module, folder: Path, quantization: dict | None) -> None:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    config["torch_dtype"] = config["dtype"] = str(STORAGE_DTYPE).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")


def save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards of at most
    ``max_shard_bytes`` (a module's tensors stay in one shard) with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for names in _by_module(tensors).values():
        nbytes = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update({n: tensors[n] for n in names})
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=1) + "\n")


def _by_module(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in tensors:
        out.setdefault(name.rsplit(".", 1)[0], []).append(name)
    return out


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards its index names."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS_FILE).exists():
        return load_file(folder / WEIGHTS_FILE)
    index = json.loads((folder / INDEX_FILE).read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not (folder / shard).exists():
            raise CheckpointError(f"{folder}: shard {shard} named by {INDEX_FILE} is missing")
        out.update(load_file(folder / shard))
    return out


def _finish(tmp: Path, path: Path) -> Checkpoint:
    """Manifest, fsync, then the rename that makes a finished checkpoint visible at ``path``."""
    digest, manifest = checksum(tmp)
    (tmp / MANIFEST).write_text(json.dumps({"sha256": digest, "files": manifest}, indent=1) + "\n")
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return Checkpoint(path=path, weights_bytes=weights, total_bytes=total, sha256=digest)


def export_fake_quantized(model: nn.Module, tokenizer, path: str | Path,
                          extra_files: dict[str, str] | None = None) -> Checkpoint:
    """A sub-module (block-wise) assignment as a plain Hugging Face checkpoint whose linear weights
    are the dequantized blocks at float16 (fake quantization: no serving kernel packs mixed bits
    inside one matrix); the per-block bits and permutations go in ``extra_files``. Atomic, with
    the same checksum manifest as ``export_checkpoint``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_shards(_state_dict(model, {}), tmp)
    _write_config(model, tmp, quantization=None)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    return _finish(tmp, path)


def verify_checkpoint(path: str | Path) -> str:
    """The checkpoint's sha256, after checking every file against its manifest."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{path} has no {MANIFEST}: not a finished gamma checkpoint")
    recorded = json.loads(manifest_file.read_text())
    digest, files = checksum(path)
    bad = sorted(k for k in set(files) | set(recorded["files"]) if files.get(k) != recorded["files"].get(k))
    if bad or digest != recorded["sha256"]:
        raise CheckpointError(f"{path}: files differ from the recorded checksums: {bad[:5]}")
    return digest


class StoredTensors:
    """A checkpoint's tensors by name, each read from its file when asked for (``KeyError`` when
    it is not stored)."""

    def __init__(self, folder: Path):
        if (folder / WEIGHTS_FILE).exists():
            from safetensors import safe_open

            with safe_open(folder / WEIGHTS_FILE, "pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / WEIGHTS_FILE)
        else:
            index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            self.files = {name: folder / shard for name, shard in index.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def read_quantized(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor], dict[str, dict]]:
    """The config, the stored tensors (``tensors=False``: none read) and, per quantized module, its
    weight arguments."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} is not a checkpoint: config.json is missing")
    if not (path / WEIGHTS_FILE).exists() and not (path / INDEX_FILE).exists():
        raise CheckpointError(f"{path} is not a checkpoint: neither {WEIGHTS_FILE} nor {INDEX_FILE} is there")
    config = json.loads(config_file.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected a compressed-tensors {FORMAT} checkpoint, "
                              f"found quant_method={qc.get('quant_method')!r} format={qc.get('format')!r}")
    args = {}
    for group in qc["config_groups"].values():
        for target in group["targets"]:
            args[target] = group["weights"]
    return config, load_shards(path) if tensors else {}, args


def _unpack_rows(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """Values packed along dim 0 (zero-points) in either layout of ``ZERO_POINT_LAYOUTS``, to
    ``shape``: unpacked as their transpose, packed along dim 1. compressed-tensors' own
    ``packed_dim=0`` path fails on a single packed row (8 or fewer output rows at 4 bits:
    "self.stride(-1) must be 1")."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    rows, groups = shape
    used = _packed_rows(rows, bits)
    if packed.dtype != torch.int32 or tuple(packed.shape) not in ((used, groups), (rows, groups)):
        raise CheckpointError(f"zero-points {tuple(packed.shape)} {packed.dtype} are in neither layout for {rows} "
                              f"rows, {groups} groups at {bits} bits: [{used}, {groups}] or [{rows}, {groups}] int32")
    packed = packed[:used]
    rows_last = packed.new_empty(packed.T.shape).copy_(packed.T)  # canonical strides, even for one row
    return unpack_from_int32(rows_last, bits, torch.Size((shape[1], shape[0]))).T


def dequantize_module(name: str, tensors, a: dict) -> torch.Tensor:
    """Module ``name``'s weight from its stored tensors (``tensors[key]``) and weight arguments,
    dequantized with ``QuantizedWeight.dequantize`` (float32, as in memory)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    try:
        packed, scales, shape = (tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
    except KeyError as err:
        raise CheckpointError(f"module {name} is listed in the config but {err} is not stored") from None
    bits, shape = a["num_bits"], tuple(int(s) for s in shape)
    spec = QuantSpec(bits, a.get("group_size") or -1, a.get("symmetric", True))
    codes = _unsigned(unpack_from_int32(packed, bits, torch.Size(shape)), bits)
    if spec.symmetric:
        zeros = torch.full(scales.shape, 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = _unsigned(_unpack_rows(tensors[f"{name}.weight_zero_point"], bits, scales.shape), bits)
    return QuantizedWeight(codes, scales.to(torch.float32), zeros, spec).dequantize()


def dequantized_state_dict(tensors: dict[str, torch.Tensor], args: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every quantized module unpacked (compressed-tensors' ``unpack_from_int32``) and dequantized
    (``dequantize_module``); other tensors pass through."""
    out = {k: v for k, v in tensors.items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    for name, a in args.items():
        out[f"{name}.weight"] = dequantize_module(name, tensors, a)
    return out


def read_back(path: str | Path, records: dict[str, QuantizedWeight], model_type: str) -> None:
    """Read a written checkpoint back through the reader every loader here uses and compare every
    quantized module's dequantized weight with what was exported, exactly; a module missing,
    misshapen or different is a ``CheckpointError`` naming it. Tensors are read one module at a
    time (``StoredTensors``), never the whole checkpoint at once."""
    _, _, args = read_quantized(path, tensors=False)
    tensors = StoredTensors(Path(path))
    for module, rec in records.items():
        name = checkpoint_name(model_type, module)
        if name not in args:
            raise CheckpointError(f"{path}: {name} is not among the config's quantized targets")
        try:
            weight = dequantize_module(name, tensors, args[name])
        except (RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path}: {name} cannot be read back ({type(err).__name__}: {err})") from None
        if weight.shape != rec.codes.shape or not torch.equal(weight, rec.dequantize()):
            raise CheckpointError(f"{path}: {name} reads back differently from what was exported "
                                  f"(shape {tuple(weight.shape)} vs {tuple(rec.codes.shape)})")


def packed_zero_points(path: str | Path) -> list[str]:
    """The asymmetric modules whose zero-points are stored in the ``packed`` layout (the one
    transformers refuses, ``ZERO_POINT_LAYOUTS``); a module of one output row is in both."""
    _, _, args = read_quantized(path, tensors=False)
    tensors = StoredTensors(Path(path))
    return [name for name, a in args.items() if not a.get("symmetric", True)
            and tensors[f"{name}.weight_zero_point"].shape[0] != int(tensors[f"{name}.weight_shape"][0])]


def check_transformers_reads(path: str | Path, model: nn.Module) -> None:
    """transformers' own ``from_pretrained`` (its compressed-tensors loader) reads the checkpoint
    and computes the logits ``model`` (the exported variant, in memory) computes on a probe
    sequence: exactly in float32, within 16-bit rounding otherwise; else a ``CheckpointError``.
    transformers keeps the weights packed (its compressed linear layers unpack them per forward), so
    the check holds a second, compressed copy of the variant for its duration, not a dense one."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    try:
        theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    except Exception as err:  # noqa: BLE001 - whatever transformers raises, the variant does not load there
        try:
            packed = packed_zero_points(path)
        except (CheckpointError, KeyError, OSError):  # no diagnosis: the error itself is what there is to say
            packed = []
        why = (f"; {packed[0]} (and {len(packed) - 1} other modules) store zero-points in the packed layout, which "
               "transformers refuses (export with zero_points='padded')") if packed else ""
        raise CheckpointError(f"transformers cannot load {path}: {type(err).__name__}: {str(err)[:300]}{why}") from None
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if not error <= (0.0 if dtype == torch.float32 else 5e-2):
        raise CheckpointError(f"transformers reads {path} but computes other logits than the exported variant "
                              f"(largest difference {error:.2e} of the largest logit)")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """A compressed-tensors checkpoint (ours or any pack-quantized one) as a plain transformers model
    with dequantized weights, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from gamma.model.loading import _LOAD_LOCK

    path = Path(path)
    _, tensors, args = read_quantized(path)
    state = dequantized_state_dict(tensors, args)
    with _LOAD_LOCK:
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    split_experts(model)
    state = {model_name(config.model_type, k): v.to(torch.float32) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{path}: tensors missing {sorted(set(missing) - tied)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.to(dtype).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)
