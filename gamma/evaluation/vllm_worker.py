"""Answer scoring requests with vLLM: runs *inside the vLLM environment*, so it imports nothing
from gamma (and nothing but the standard library, torch and vLLM).

    python vllm_worker.py --model CHECKPOINT --requests in.json --out out.json [--device cuda]

``in.json`` holds ``{"requests": [[token_ids, n_scored], ...]}``; ``out.json`` receives
``{"scores": [[sum_logprob, all_greedy], ...], "engine": {...}}``: for each request the summed
prompt log-probability of its last ``n_scored`` tokens and whether each was the top-ranked token.

    python vllm_worker.py --check-load --model CHECKPOINT --out out.json [--device cpu]

asks vLLM whether it serves the checkpoint, in three stages, and writes
``{"accepted": bool, "stage": ..., "error": ..., "vllm": version, ...}``:

- ``config``: vLLM's engine configuration (its compressed-tensors config parsing), then its
  per-layer scheme resolution for every linear layer under vLLM's own (fused) layer names;
- ``load``: ``LLM(...)``: the model built with its kernels and the weights loaded;
- ``forward``: one greedy token for a short prompt.

``stage`` is the stage that failed, or ``forward`` when all passed; ``error`` is vLLM's own
exception (the root of its chain) as ``Class: message``. The record is rewritten at the start of
every stage, so a process that dies without Python's help (a signal, an illegal instruction)
still leaves the stage it reached.

``--reference-kernel`` adds a stand-in weight-only kernel after the device's own
(``ReferenceWNA16Kernel``): a layer whose weight type this device has no kernel for (8-bit and
2/3-bit on the CPU build) is dequantized once, after vLLM's own loader has placed the
checkpoint's tensors in its (fused) parameters, and multiplied in torch. So vLLM's config parsing,
schemes and weight loading are exercised for every width, and its forward is exactly what those
loaded tensors mean; the serving kernels' repacking and arithmetic (Marlin, Humming on a GPU) are
not. Layers a device kernel takes keep it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

PROMPT = "The capital of France is"


def write_json(path: str, obj: dict) -> None:
    # whole or not at all: vLLM's teardown can abort the process (SIGABRT) right after this
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def unpack_dense(packed, bits: int, count: int):
    """Unsigned ``bits``-bit codes packed densely along the last dimension of int32 words (element
    i at bit i*bits, little-endian, crossing words where it must: compressed-tensors'
    ``pack-quantized`` format, whose sizes vLLM allocates as ``ceil(count*bits/32)`` words)."""
    import torch

    words = packed.to(torch.int64) & 0xFFFFFFFF  # the int32 words as unsigned
    start = torch.arange(count, device=packed.device) * bits
    word, offset = start // 32, start % 32
    low = words[..., word] >> offset
    spill = words[..., (word + 1).clamp(max=words.shape[-1] - 1)] << (32 - offset)  # bits in the next word
    high = torch.where(offset + bits > 32, spill, torch.zeros_like(spill))
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32)


def register_reference_kernel() -> None:
    """Put ``ReferenceWNA16Kernel`` last among this platform's weight-only kernels."""
    import torch
    from vllm.model_executor.kernels import linear
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearKernel
    from vllm.platforms import current_platform

    class ReferenceWNA16Kernel(MPLinearKernel):
        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c) -> tuple[bool, str | None]:
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            c = self.config
            bits, (rows, cols) = c.weight_type.size_bits, (layer.output_size_per_partition,
                                                           layer.input_size_per_partition)
            w_q, w_s, w_zp = self._get_weight_params(layer)
            codes = unpack_dense(w_q.data, bits, cols)  # [out, in]: packed along the input
            if c.zero_points:  # [ceil(out*bits/32), groups]: packed along the output
                zeros = unpack_dense(w_zp.data.T.contiguous(), bits, rows).T
            else:  # symmetric: the type's own bias (uint4b8: 8)
                zeros = torch.full_like(w_s.data, c.weight_type.bias, dtype=torch.int32)
            group = cols if c.group_size == -1 else c.group_size
            weight = (codes - zeros.repeat_interleave(group, dim=1)).float()
            weight = weight * w_s.data.float().repeat_interleave(group, dim=1)
            layer.reference_weight = torch.nn.Parameter(weight.to(c.act_type), requires_grad=False)

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
            return torch.nn.functional.linear(x, layer.reference_weight, bias)

    kernels = linear._POSSIBLE_KERNELS.setdefault(current_platform._enum, [])
    kernels.append(ReferenceWNA16Kernel)


def engine_settings(args) -> dict:
    # on vLLM's CPU build the "gpu" memory utilization is the fraction of RAM it reserves
    return {"model": args.model, "max_model_len": args.max_model_len, "enforce_eager": True,
            "gpu_memory_utilization": args.gpu_memory_utilization}


def score(args) -> int:
    import vllm
    from vllm import LLM, SamplingParams

    if args.reference_kernel:
        register_reference_kernel()
    requests = json.load(open(args.requests))["requests"]
    t0 = time.perf_counter()
    llm = LLM(**engine_settings(args))
    load_seconds = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outputs = llm.generate(prompts, params)
    scores = []
    for (ids, n_scored), out in zip(requests, outputs):
        total, greedy = 0.0, True
        for pos in range(len(ids) - n_scored, len(ids)):
            entry = out.prompt_logprobs[pos][ids[pos]]
            total += entry.logprob
            greedy = greedy and entry.rank == 1
        scores.append([total, greedy])
    result = {"scores": scores, "engine": {"vllm": vllm.__version__, "device": args.device,
                                           "load_seconds": load_seconds,
                                           "score_seconds": time.perf_counter() - t0 - load_seconds}}
    write_json(args.out, result)
    print(f"scored {len(scores)} requests in {result['engine']['score_seconds']:.1f} s", file=sys.stderr)
    return 0


def describe(err: BaseException) -> dict:
    """The root of the exception chain (vLLM often re-raises a wrapper), its message on one line,
    and the innermost frame that raised it."""
    root = err
    while (root.__cause__ or root.__context__) is not None and root not in (root.__cause__, root.__context__):
        root = root.__cause__ or root.__context__
    message = " ".join(str(root).split()) or "(no message)"
    frames = traceback.extract_tb(root.__traceback__)
    where = ""
    if frames:  # a bare assert says nothing: its file, line and source do
        f = frames[-1]
        where = f"{f.filename.split('site-packages/')[-1]}:{f.lineno} ({f.name}): {f.line}"
    return {"error": f"{type(root).__name__}: {message[:2000]}", "raised_at": where}


def layer_schemes(vllm_config, checkpoint: str) -> dict[str, int]:
    """vLLM's scheme for every linear layer of the checkpoint, by vLLM's layer names (q/k/v as one
    ``qkv_proj``...), counted by scheme. Resolved the way model construction resolves them (the
    model class's fused-module mapping handed to the quantization config), but for every layer at
    once: construction stops at the first layer a device's kernels refuse."""
    import torch
    from vllm.model_executor.model_loader.utils import get_model_architecture

    qc = vllm_config.quant_config
    if qc is None:
        return {"unquantized": 0}
    model_cls, _ = get_model_architecture(vllm_config.model_config)
    mapping = dict(getattr(model_cls, "packed_modules_mapping", None) or {})
    qc.packed_modules_mapping.update(mapping)
    fused_of = {shard: fused for fused, shards in mapping.items() for shard in shards}
    quant = json.load(open(os.path.join(checkpoint, "config.json"))).get("quantization_config") or {}
    names = [t for g in quant.get("config_groups", {}).values() for t in g.get("targets", [])]
    names += quant.get("ignore", [])
    counts: dict[str, int] = {}
    for name in sorted({f"{p}.{fused_of.get(leaf, leaf)}" if p else leaf
                        for p, _, leaf in (n.rpartition(".") for n in names)}):
        scheme = qc.get_scheme(torch.nn.Module(), name)
        kind = "unquantized" if scheme is None else type(scheme).__name__
        if scheme is not None and hasattr(scheme, "quant_type"):
            kind += f" {scheme.quant_type} group {scheme.group_size}"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def check_load(args) -> int:
    record: dict = {"accepted": False, "stage": "config", "error": None, "vllm": None, "device": args.device}

    def stage(name: str) -> None:
        record["stage"] = name
        record["error"] = f"the worker died during stage {name!r}"  # replaced by the outcome below
        write_json(args.out, record)

    t0 = time.perf_counter()
    try:
        stage("config")
        import vllm

        record["vllm"] = vllm.__version__
        if args.reference_kernel:
            register_reference_kernel()
        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import EngineArgs

        engine = engine_settings(args)
        record["schemes"] = layer_schemes(EngineArgs(**engine).create_engine_config(), args.model)
        stage("load")
        llm = LLM(**engine)
        record["kernels"] = loaded_kernels()
        stage("forward")
        out = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0))
        record.update(accepted=True, error=None, next_token=out[0].outputs[0].text)
    except BaseException as err:  # noqa: BLE001 -- every failure is the answer, recorded as vLLM said it
        record.update(describe(err))
        traceback.print_exc()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, record)
    print(f"vLLM {'accepts' if record['accepted'] else 'refuses'} {args.model} (stage {record['stage']})"
          + ("" if record["accepted"] else f": {record['error']}"), file=sys.stderr)
    return 0


def loaded_kernels() -> list[str]:
    """The weight-only kernels vLLM chose while building the model (it keeps them on the scheme class)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_wNa16 as w

    return sorted(getattr(w.CompressedTensorsWNA16, "_kernel_backends_being_used", ()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--requests")
    p.add_argument("--out", required=True)
    p.add_argument("--check-load", action="store_true", help="only ask whether vLLM loads and runs the model")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--reference-kernel", action="store_true",
                   help="dequantize in torch the layers no kernel of this device takes (ReferenceWNA16Kernel)")
    args = p.parse_args(argv)
    if args.reference_kernel:  # the engine core in this process, where the kernel is registered
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if args.check_load:
        return check_load(args)
    if not args.requests:
        p.error("--requests is required unless --check-load")
    return score(args)


if __name__ == "__main__":
    sys.exit(main())
