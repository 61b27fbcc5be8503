"""Evaluation backends: the vLLM backend's profile checks, command, fallback and worker protocol.

vLLM itself is not installed here (it needs its own environment and, for 2/3/8-bit, a GPU). The
worker script is exercised for real, in a subprocess, against a stand-in ``vllm`` package that
answers prompt log-probabilities with transformers on the same checkpoint: the protocol, the
request building and the reduction to figures are the code a real vLLM run uses."""

import stat
import sys
import textwrap

import pytest
import torch
from conftest import DATA, ROOT

from gamma.config import ConfigError, VllmConfig, load_config
from gamma.evaluation.backends import (
    VLLM_PROFILES,
    WORKER,
    BackendFailed,
    BackendUnavailable,
    VllmBackend,
    checkpoint_schemes,
    cpu_runs_vllm_int4,
    evaluate_with_vllm,
    serving_problems,
)
from gamma.evaluation.metrics import perplexity, zero_shot_suite
from gamma.model.export import export_checkpoint, round_to_storage
from gamma.model.loading import load_model, quantizable_modules
from gamma.quant.interface import QuantSpec
from gamma.quant.rtn import RTN
from gamma.run.variant import evaluate_model
from gamma.run.workspace import Workspace

FAKE_VLLM = '''
import atexit
import os
import types
import torch
from gamma.model.export import load_checkpoint

__version__ = "stand-in"

class SamplingParams:
    def __init__(self, **kw):
        assert kw["prompt_logprobs"] >= 1 and kw["max_tokens"] == 1

class LLM:
    def __init__(self, model, **engine):
        self.model, _ = load_checkpoint(model)
        if os.environ.get("STAND_IN_ABORTS") == "at_exit":  # as vLLM 0.32's CPU teardown once did
            atexit.register(os.abort)


    def generate(self, prompts, params):
        if os.environ.get("STAND_IN_ABORTS") == "while_scoring":
            os.abort()
        outs = []
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(self.model(ids).logits[0].float(), -1)
            entries = [None]
            for pos in range(1, ids.shape[1]):
                row, tok = logp[pos - 1], int(ids[0, pos])
                rank = int((row > row[tok]).sum()) + 1
                entries.append({tok: types.SimpleNamespace(logprob=float(row[tok]), rank=rank)})
            outs.append(types.SimpleNamespace(prompt_logprobs=entries))
        return outs
'''


def _schemes(bits, symmetric=True, blocks=2):
    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return {f"model.layers.{i}.{leaf}": (bits, symmetric) for i in range(blocks) for leaf in leaves}


def test_serving_profiles_name_what_vllm_cannot_load():
    gpu, cpu = VLLM_PROFILES["cuda"], VLLM_PROFILES["cpu"]
    assert serving_problems(_schemes(4), gpu) == [] and serving_problems(_schemes(8), gpu) == []
    assert serving_problems(_schemes(4), cpu) == []
    [why] = serving_problems(_schemes(8), cpu)
    assert "[8]-bit" in why
    assert any("[3]-bit" in p for p in serving_problems(_schemes(3), gpu))
    # Marlin takes zero-points at 4 bits (uint4) but not at 8 (uint8: Machete on Hopper only)
    assert serving_problems(_schemes(4, symmetric=False), gpu) == []
    [why] = serving_problems(_schemes(8, symmetric=False), gpu)
    assert "[8]-bit weights symmetric only" in why
    assert serving_problems(_schemes(4, symmetric=False), cpu) == []  # CPUWNA16 takes uint4 and uint4b8
    [why] = serving_problems(_schemes(4), gpu, {256})
    assert "group sizes" in why and "[256]" in why
    mixed = {**_schemes(4), "model.layers.1.self_attn.k_proj": (8, True)}
    [why] = serving_problems(mixed, gpu)
    assert "q_proj/k_proj/v_proj" in why and "model.layers.1.self_attn" in why
    # a shard left unquantized (in ``ignore``) mixes schemes too: vLLM refuses it while parsing
    del mixed["model.layers.1.self_attn.k_proj"]
    [why] = serving_problems(mixed, cpu, unquantized=["model.layers.1.self_attn.k_proj", "lm_head"])
    assert "q_proj/k_proj/v_proj" in why and "model.layers.1.self_attn" in why
    # quantized MoE experts: the GPU build's MoE kernels take them, the CPU build has none
    moe = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}": (4, True) for e in range(4) for w in ("w1", "w2", "w3")}
    assert serving_problems(moe, gpu) == []
    [why] = serving_problems(moe, cpu)
    assert "MoE experts" in why and "12 expert modules" in why


def test_vllm_command_and_configuration(tmp_path, monkeypatch):
    monkeypatch.delenv("GAMMA_VLLM_PYTHON", raising=False)  # CI sets it where a vLLM environment exists
    backend = VllmBackend(VllmConfig(python="/opt/vllm/bin/python", device="cuda", gpu_memory_utilization=0.3))
    cmd = backend.command(tmp_path / "ckpt", tmp_path / "in.json", tmp_path / "out.json")
    assert cmd[:2] == ["/opt/vllm/bin/python", str(WORKER)]
    flags = dict(zip(cmd[2::2], cmd[3::2]))
    assert flags["--model"] == str(tmp_path / "ckpt") and flags["--device"] == "cuda"
    assert flags["--gpu-memory-utilization"] == "0.3"
    with pytest.raises(ConfigError, match="fallback"):
        load_config(tmp_path / "none.yaml", {"evaluation.vllm.fallback": "maybe"})
    with pytest.raises(BackendUnavailable, match="GAMMA_VLLM_PYTHON"):
        VllmBackend(VllmConfig(python="")).check(tmp_path)
    with pytest.raises(BackendUnavailable, match="does not import"):
        VllmBackend(VllmConfig(python=sys.executable)).check(tmp_path)  # this env has no vLLM


@pytest.fixture(scope="module")
def symmetric_4bit(model_dir, tmp_path_factory):
    model, tok = load_model(model_dir)
    records = {}
    with torch.no_grad():
        for name, m in quantizable_modules(model).items():
            records[name] = RTN().quantize(m.weight, QuantSpec(4, 64, True))
            m.weight.copy_(records[name].dequantize())
    round_to_storage(model, set(records))
    ckpt = export_checkpoint(model, tok, records, tmp_path_factory.mktemp("vllm") / "w4")
    return model, tok, ckpt.path


def _stand_in_python(tmp_path):
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    script = tmp_path / "python"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        PYTHONPATH={tmp_path / 'fake'}:{ROOT} exec {sys.executable} "$@"
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_vllm_cpu_needs_avx512(tmp_path, monkeypatch):
    assert cpu_runs_vllm_int4("flags : fpu sse2 avx2 avx512f avx512bw") and not cpu_runs_vllm_int4("flags : avx2")
    monkeypatch.setattr("gamma.evaluation.backends.cpu_runs_vllm_int4", lambda: False)
    with pytest.raises(BackendUnavailable, match="AVX-512"):
        VllmBackend(VllmConfig(python=_stand_in_python(tmp_path), device="cpu")).check(tmp_path)


def test_vllm_worker_protocol_matches_transformers(symmetric_4bit, tmp_path, calibration, monkeypatch):
    monkeypatch.setattr("gamma.evaluation.backends.cpu_runs_vllm_int4", lambda: True)  # the stand-in needs no kernel
    model, tok, ckpt = symmetric_4bit
    assert set(checkpoint_schemes(ckpt).values()) == {(4, True)}
    backend = VllmBackend(VllmConfig(python=_stand_in_python(tmp_path), device="cpu"))
    windows = calibration[:2, :96]
    got = evaluate_with_vllm(backend, ckpt, windows, tok, ["piqa", "arc_easy"], 2, 128)
    want_ppl = perplexity(model, windows)
    want_zs = zero_shot_suite(model, tok, ["piqa", "arc_easy"], 2, 128)
    assert got["perplexity"] == pytest.approx(want_ppl.perplexity, rel=1e-3)  # batch 1 vs 2
    assert got["zero_shot"] == pytest.approx(want_zs["average"])
    assert got["eval_backend"] == "vllm stand-in on cpu"
    # an abort in vLLM's teardown, after the scores were written whole, keeps them and says so
    monkeypatch.setenv("STAND_IN_ABORTS", "at_exit")
    aborted = evaluate_with_vllm(backend, ckpt, windows, tok, [], 0, 128)
    assert aborted["perplexity"] == got["perplexity"]
    assert aborted["eval_backend"] == "vllm stand-in on cpu (worker exited -6 after scoring)"
    monkeypatch.setenv("STAND_IN_ABORTS", "while_scoring")
    with pytest.raises(BackendFailed, match="exited with -6"):
        evaluate_with_vllm(backend, ckpt, windows, tok, [], 0, 128)


def test_unservable_variant_falls_back_or_fails_as_configured(symmetric_4bit, model_dir, tmp_path):
    model, tok, ckpt = symmetric_4bit
    overrides = {"model.path": str(model_dir), "model.data_dir": str(DATA), "evaluation.backend": "vllm",
                 "evaluation.vllm.python": _stand_in_python(tmp_path), "evaluation.vllm.device": "cuda",
                 "evaluation.max_tokens": 256, "evaluation.context_length": 128, "evaluation.zero_shot_items": 0}
    # 4-bit symmetric is servable on a GPU, but not when one block's k_proj is 8-bit: fused-shard rule.
    import json

    config = json.loads((ckpt / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_0"]["targets"].remove("model.layers.0.self_attn.k_proj")
    groups["group_1"] = {**groups["group_0"], "targets": ["model.layers.0.self_attn.k_proj"],
                         "weights": {**groups["group_0"]["weights"], "num_bits": 8}}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    row = evaluate_model(Workspace(load_config(tmp_path / "none.yaml", overrides)), model, tok, checkpoint=bad)
    assert row["eval_backend"].startswith("transformers (vLLM fallback: vLLM fuses q_proj/k_proj/v_proj")
    with pytest.raises(BackendUnavailable, match="fuses"):
        strict = load_config(tmp_path / "none.yaml", {**overrides, "evaluation.vllm.fallback": "fail"})
        evaluate_model(Workspace(strict), model, tok, checkpoint=bad)


def test_real_vllm_agrees_with_transformers(symmetric_4bit, calibration):
    """The real engine, when a vLLM environment is configured and can serve the variant here;
    otherwise skipped with the backend's own reason (no vLLM, no GPU, no AVX-512 for the CPU build)."""
    model, tok, ckpt = symmetric_4bit
    backend = VllmBackend(VllmConfig(), max_model_len=129)
    try:
        backend.check(ckpt)
    except BackendUnavailable as err:
        pytest.skip(f"vLLM unavailable: {err}")
    windows = calibration[:2, :128]
    got = evaluate_with_vllm(backend, ckpt, windows, tok, [], 0, 128)
    assert got["perplexity"] == pytest.approx(perplexity(model, windows).perplexity, rel=0.02)


def test_vllms_loader_is_not_asked_where_its_build_cannot_build_quantized_experts(tmp_path, model_dir, monkeypatch):
    """A Mixtral variant with quantized experts: vLLM's CPU build has no MoE kernel for them, so its
    loader is not asked (its refusal would be about this machine, not the checkpoint) and the
    reason names the experts; the variant is not refused."""
    from test_architectures import build

    from gamma.evaluation.backends import vllm_loads

    model, tok = load_model(build("Mixtral", tmp_path / "mixtral", model_dir))
    records = {name: RTN().quantize(m.weight.detach(), QuantSpec(4, 32, True))
               for name, m in quantizable_modules(model).items()}
    ckpt = export_checkpoint(model, tok, records, tmp_path / "w4").path
    monkeypatch.setattr(VllmBackend, "ready", lambda self: "cpu")  # a vLLM environment on an AVX-512 CPU
    with pytest.raises(BackendUnavailable, match=r"quantized MoE experts, .*\(24 expert modules, first: model\.layers"):
        vllm_loads(VllmConfig(python="/vllm/bin/python"), ckpt)
