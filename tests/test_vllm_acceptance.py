"""vLLM's own verdict on gamma's exports (``vllm_accepts``: its config parsing, weight loading and one
forward, in the vLLM environment named by ``$GAMMA_VLLM_PYTHON``), set against gamma's pre-check
(``serving_problems``) for this machine's device. Skipped, with the reason, where no vLLM
environment exists or where its CPU build cannot run int4 (no AVX-512); ``.ci/run`` builds the
environment whenever the CPU allows."""

import os

import pytest

from gamma.config import VllmConfig
from gamma.evaluation.backends import (
    VLLM_PROFILES,
    BackendUnavailable,
    VllmBackend,
    checkpoint_group_sizes,
    checkpoint_schemes,
    checkpoint_unquantized,
    cpu_runs_vllm_int4,
    evaluate_with_vllm,
    serving_problems,
    vllm_accepts,
    vllm_environment_problem,
)
from gamma.evaluation.metrics import perplexity
from gamma.model.export import export_checkpoint, load_checkpoint
from gamma.model.loading import load_model, quantizable_modules
from gamma.model.units import allocation_units
from gamma.quant.interface import QuantSpec
from gamma.quant.rtn import RTN


@pytest.fixture(scope="module")
def vllm_here():
    """(python, device) of a vLLM environment that can run 4-bit weights here, or a skip saying why."""
    python = os.environ.get("GAMMA_VLLM_PYTHON", "")
    if not python:
        pytest.skip("no vLLM environment: set GAMMA_VLLM_PYTHON (scripts/install_vllm.sh builds one)")
    problem = vllm_environment_problem(python)
    if problem:
        pytest.skip(problem)
    device = VllmBackend(VllmConfig(python=python)).device()
    if device == "cpu" and not cpu_runs_vllm_int4():
        pytest.skip("vLLM's CPU build runs int4 weights only on AVX-512 CPUs and this CPU has none")
    return python, device


@pytest.fixture(scope="module")
def export(vllm_here, model_dir, tmp_path_factory):
    """``export(name, widths, symmetric=True)``: an RTN group-64 checkpoint of the embedded model,
    where ``widths(module_names)`` is the assignment; one model and each module's codes shared by all."""
    model, tok = load_model(model_dir)
    modules, codes = quantizable_modules(model), {}
    where = tmp_path_factory.mktemp("vllm-acceptance")

    def record(name: str, bits: int, symmetric: bool):
        if (name, bits, symmetric) not in codes:
            codes[name, bits, symmetric] = RTN().quantize(modules[name].weight.detach(), QuantSpec(bits, 64, symmetric))
        return codes[name, bits, symmetric]

    def build(name: str, widths, symmetric: bool = True) -> str:
        # the model's own weights stay full precision: a 16-bit module is exported from them
        records = {m: record(m, b, symmetric) for m, b in widths(list(modules)).items() if b != 16}
        return str(export_checkpoint(model, tok, records, where / name).path)

    return build


def _fused_tied(modules: list[str], widths=(4, 8, 16)) -> dict[str, int]:
    """``widths`` dealt over vLLM's fused units (q/k/v one width, gate/up one width)."""
    units = allocation_units(modules, "fused", "per_layer")
    return {modules[i]: widths[u % len(widths)] for u, unit in enumerate(units) for i in unit}


def _predicted(ckpt, device) -> list[str]:
    return serving_problems(checkpoint_schemes(ckpt), VLLM_PROFILES[device], checkpoint_group_sizes(ckpt),
                            checkpoint_unquantized(ckpt))


def test_vllm_accepts_symmetric_4bit(vllm_here, export):
    python, device = vllm_here
    ckpt = export("w4", lambda ms: dict.fromkeys(ms, 4))
    verdict = vllm_accepts(python, ckpt, device)
    assert verdict["accepted"], verdict
    assert verdict["stage"] == "forward" and verdict["error"] is None and verdict["next_token"]
    assert _predicted(ckpt, device) == []


def test_vllm_parses_mixed_fused_tied_export(vllm_here, export):
    """4/8/16 bits tied the way vLLM fuses: its parser gives every layer a scheme; a GPU (Marlin)
    runs it, the CPU build has no 8-bit kernel and says so while building the model, as gamma's
    pre-check predicts."""
    python, device = vllm_here
    ckpt = export("mixed", _fused_tied)
    verdict = vllm_accepts(python, ckpt, device)
    kinds = " ".join(verdict.get("schemes") or {})
    assert "uint4b8" in kinds and "uint8b128" in kinds and "unquantized" in kinds, verdict
    units = allocation_units(list(checkpoint_schemes(ckpt)) + checkpoint_unquantized(ckpt), "fused", "per_layer")
    assert sum(verdict["schemes"].values()) == len(units)  # every vLLM layer resolved, none refused
    predicted = _predicted(ckpt, device)
    if not predicted:
        assert verdict["accepted"], verdict
    else:
        assert "[8]-bit" in predicted[0] and not verdict["accepted"]
        assert verdict["stage"] == "load" and "uint8b128" in verdict["error"], verdict


def test_vllm_refusal_is_recorded(vllm_here, export):
    """One k_proj left at 16 bits while its q/v are 4-bit: vLLM cannot fuse them and refuses while
    parsing; the refusal comes back as its own error, not as a crash, and gamma predicted it."""
    python, device = vllm_here
    untied = "model.layers.0.self_attn.k_proj"
    ckpt = export("untied", lambda ms: {m: 16 if m == untied else 4 for m in ms})
    verdict = vllm_accepts(python, ckpt, device)
    assert not verdict["accepted"] and verdict["stage"] == "config", verdict
    assert verdict["error"].startswith("ValueError: ") and "model.layers.0.self_attn.qkv_proj" in verdict["error"]
    assert "vllm/" in verdict["raised_at"]  # raised inside vLLM, not by the worker
    assert any("q_proj/k_proj/v_proj" in p for p in _predicted(ckpt, device))


@pytest.mark.parametrize("widths, symmetric", [((4, 8, 16), True), ((2, 3, 4, 8, 16), False)],
                         ids=["marlin-4-8-16", "humming-2-to-16-zero-points"])
def test_reference_kernel_computes_what_the_checkpoint_means(vllm_here, export, calibration, widths, symmetric):
    """Widths the CPU build has no kernel for (8, 3, 2 bits), symmetric or with packed zero-points,
    tied as vLLM fuses: vLLM's own loader places every tensor in its fused layers and, with the
    worker's reference kernel for those widths (its own kernel for the 4-bit ones), computes the
    perplexity that gamma's reading of the same checkpoint gives."""
    python, device = vllm_here
    if device != "cpu":
        pytest.skip("the reference kernel stands in for the CPU build's missing kernels")
    ckpt = export(f"reference-{'-'.join(map(str, widths))}", lambda ms: _fused_tied(ms, widths), symmetric)
    verdict = vllm_accepts(python, ckpt, device, reference_kernel=True)
    assert verdict["accepted"], verdict
    assert verdict["kernels"] == ["CPUWNA16LinearKernel", "ReferenceWNA16Kernel"], verdict
    backend = VllmBackend(VllmConfig(python=python, device="cpu", gpu_memory_utilization=0.1), 129,
                          reference_kernel=True)
    windows = calibration[:2, :128]
    got = evaluate_with_vllm(backend, ckpt, windows, None, [], 0, 128)
    model, _ = load_checkpoint(ckpt)
    assert got["perplexity"] == pytest.approx(perplexity(model, windows).perplexity, rel=0.02)
    with pytest.raises(BackendUnavailable, match="bit"):  # without it the CPU build has no kernel for them
        VllmBackend(VllmConfig(python=python, device="cpu")).check(ckpt)
