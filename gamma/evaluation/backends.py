"""Evaluation backends behind one interface: ``transformers`` in this process, ``vllm`` as a
subprocess in its own environment (vLLM pins torch and fastapi differently, so it cannot share
ours). Both answer the same requests (``gamma.evaluation.metrics.Request``): perplexity windows and
zero-shot continuations, reduced to figures by the same code.

vLLM loads only what its kernels serve. A variant is checked against the engine's serving
profile before a subprocess starts, so an unservable variant gets a reason, not a stack trace:
- on a GPU, integer weight-only compressed-tensors go through Marlin: 4 and 8 bits, symmetric;
- vLLM's CPU build takes 4-bit weights only, and its int4 kernel (``cpu_gemm_wna16``) exists only
  in the AVX-512 build: on an AVX2-only CPU the checkpoint loads and the first forward fails;
- vLLM fuses q/k/v and gate/up into one layer, whose shards must share one scheme.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from gamma.config import VllmConfig
from gamma.evaluation.metrics import (
    Request,
    Score,
    figures,
    perplexity_from_scores,
    perplexity_requests,
    summarize_tasks,
    task_requests,
)
from gamma.progress import console

WORKER = Path(__file__).with_name("vllm_worker.py")
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class BackendUnavailable(RuntimeError):
    """The backend cannot evaluate this variant here; the message says why."""


class BackendFailed(RuntimeError):
    """The backend ran and failed; the message carries the worker's own error."""


@dataclass(frozen=True)
class ServingProfile:
    engine: str
    bits: frozenset[int]
    symmetric_only: bool


VLLM_PROFILES = {
    "cuda": ServingProfile("vLLM on GPU (Marlin kernels)", frozenset({4, 8}), True),
    "cpu": ServingProfile("vLLM CPU build", frozenset({4}), True),
}


def checkpoint_schemes(checkpoint: str | Path) -> dict[str, tuple[int, bool]]:
    """(bits, symmetric) of every quantized module, from the checkpoint's config."""
    qc = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    out = {}
    for group in qc.get("config_groups", {}).values():
        w = group["weights"]
        for target in group["targets"]:
            out[target] = (int(w["num_bits"]), bool(w.get("symmetric", True)))
    return out


def serving_problems(schemes: dict[str, tuple[int, bool]], profile: ServingProfile) -> list[str]:
    """Why ``profile`` cannot load modules quantized as ``schemes`` (empty: it can)."""
    problems = []
    bad_bits = sorted({b for b, _ in schemes.values()} - profile.bits)
    if bad_bits:
        problems.append(f"{profile.engine} serves {sorted(profile.bits)}-bit weights; the variant has "
                        f"{bad_bits}-bit modules")
    if profile.symmetric_only and any(not s for _, s in schemes.values()):
        problems.append(f"{profile.engine} serves symmetric weights only; the variant is asymmetric "
                        "(quantizer.symmetric: true)")
    for shards in FUSED_SHARDS:
        fused: dict[str, set] = {}
        for name, scheme in schemes.items():
            prefix, _, leaf = name.rpartition(".")
            if leaf in shards:
                fused.setdefault(prefix, set()).add(scheme)
        mixed = sorted(p for p, s in fused.items() if len(s) > 1)
        if mixed:
            problems.append(f"vLLM fuses {'/'.join(shards)} into one layer, which needs one scheme; "
                            f"{len(mixed)} blocks mix them (first: {mixed[0]})")
    return problems


def cpu_runs_vllm_int4(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AVX-512, which vLLM's CPU int4 weight kernel needs."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return " avx512f" in cpuinfo


class VllmBackend:
    name = "vllm"

    def __init__(self, cfg: VllmConfig, max_model_len: int = 2048):
        self.cfg = cfg
        self.max_model_len = max_model_len

    @property
    def python(self) -> str:
        return self.cfg.python or os.environ.get("GAMMA_VLLM_PYTHON", "")

    def device(self) -> str:
        if self.cfg.device != "auto":
            return self.cfg.device
        smi = shutil.which("nvidia-smi")
        found = smi and subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip()
        return "cuda" if found else "cpu"

    def command(self, checkpoint: str | Path, requests_file: str | Path, out_file: str | Path) -> list[str]:
        return [self.python, str(WORKER), "--model", str(checkpoint), "--requests", str(requests_file),
                "--out", str(out_file), "--device", self.device(), "--max-model-len", str(self.max_model_len),
                "--gpu-memory-utilization", str(self.cfg.gpu_memory_utilization)]

    def check(self, checkpoint: str | Path) -> None:
        """Raise ``BackendUnavailable`` with the reason when this variant cannot be served here."""
        if not self.python:
            raise BackendUnavailable("evaluation.backend=vllm but no vLLM environment is configured: set "
                                     "evaluation.vllm.python (or $GAMMA_VLLM_PYTHON) to its python")
        if not Path(self.python).exists() and not shutil.which(self.python):
            raise BackendUnavailable(f"evaluation.vllm.python={self.python!r} does not exist")
        probe = subprocess.run([self.python, "-c", "import vllm"], capture_output=True, text=True)
        if probe.returncode:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendUnavailable(f"vLLM does not import in {self.python}: {last}")
        device = self.device()
        if device == "cpu" and not cpu_runs_vllm_int4():
            raise BackendUnavailable("vLLM's CPU build runs int4 weights (cpu_gemm_wna16) only on AVX-512 CPUs "
                                     "and this CPU has none; use a GPU or evaluation.backend=transformers")
        problems = serving_problems(checkpoint_schemes(checkpoint), VLLM_PROFILES[device])
        if problems:
            raise BackendUnavailable("; ".join(problems))

    def score(self, checkpoint: str | Path, requests: list[Request]) -> tuple[list[Score], dict]:
        """Run the worker on ``requests``; its output streams to the console as it runs."""
        with tempfile.TemporaryDirectory(prefix="gamma-vllm-") as tmp:
            req, out = Path(tmp) / "requests.json", Path(tmp) / "responses.json"
            req.write_text(json.dumps({"requests": requests}))
            cmd = self.command(checkpoint, req, out)
            tail: deque[str] = deque(maxlen=20)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + self.cfg.timeout_s
            for line in proc.stdout:
                tail.append(line.rstrip())
                console.log(f"[vllm] {line.rstrip()}")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise BackendFailed(f"vLLM worker exceeded evaluation.vllm.timeout_s={self.cfg.timeout_s}")
            if proc.wait():
                raise BackendFailed(f"vLLM worker exited with {proc.returncode}: " + " | ".join(tail))
            result = json.loads(out.read_text())
        if len(result["scores"]) != len(requests):
            raise BackendFailed(f"vLLM worker answered {len(result['scores'])} of {len(requests)} requests")
        return [(float(s), bool(g)) for s, g in result["scores"]], result.get("engine", {})


def evaluate_with_vllm(backend: VllmBackend, checkpoint: str | Path, windows: torch.Tensor, tokenizer,
                       tasks: list[str], n_items: int, max_length: int) -> dict:
    """Perplexity and zero-shot figures of a checkpoint from one vLLM run over all requests."""
    backend.check(checkpoint)
    t0 = time.perf_counter()
    requests = perplexity_requests(windows)
    per_task = [task_requests(tokenizer, t, n_items, max_length) for t in tasks] if n_items else []
    for tr in per_task:
        requests += tr.requests
    scores, engine = backend.score(checkpoint, requests)
    ppl = perplexity_from_scores(scores[: len(windows)], windows)
    results, start = [], len(windows)
    for tr in per_task:
        results.append(tr.result(scores[start : start + len(tr.requests)]))
        start += len(tr.requests)
    zs = summarize_tasks(results) if per_task else None
    return figures(ppl, zs, time.perf_counter() - t0,
                   f"vllm {engine.get('vllm', '?')} on {engine.get('device', backend.device())}")
