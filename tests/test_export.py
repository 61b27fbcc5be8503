"""compressed-tensors export: bit-exact reload, predicted size, atomic writes, other loaders."""

import json

import pytest
import torch

from gamma.model.assignment import account, apply_assignment, module_stored_bytes
from gamma.model.export import (
    WEIGHTS_FILE,
    CheckpointError,
    check_transformers_reads,
    export_checkpoint,
    load_checkpoint,
    packed_zero_points,
    round_to_storage,
    verify_checkpoint,
)
from gamma.model.loading import load_model, quantizable_modules
from gamma.quant.interface import QuantSpec
from gamma.quant.rtn import RTN

MIXED_BITS = (2, 3, 4, 8)


def _mixed_quantize(model, symmetric_of, group_size_of=lambda i: 64):
    """Every module quantized with RTN, bits cycling through 2/3/4/8, symmetry per ``symmetric_of``,
    group size per ``group_size_of``."""
    records = {}
    with torch.no_grad():
        for i, (name, module) in enumerate(quantizable_modules(model).items()):
            spec = QuantSpec(MIXED_BITS[i % len(MIXED_BITS)], group_size_of(i), symmetric_of(i))
            rec = RTN().quantize(module.weight, spec)
            module.weight.copy_(rec.dequantize())
            records[name] = rec
    round_to_storage(model, set(records))
    return records


@pytest.fixture(scope="module")
def mixed_checkpoint(model_dir, tmp_path_factory):
    """One checkpoint mixing 2/3/4/8 bits with symmetric and asymmetric modules."""
    model, tokenizer = load_model(model_dir)
    records = _mixed_quantize(model, symmetric_of=lambda i: (i // len(MIXED_BITS)) % 2 == 0)
    path = tmp_path_factory.mktemp("export") / "mixed"
    return model, records, export_checkpoint(model, tokenizer, records, path)


def test_reload_is_bit_exact_for_every_width_and_symmetry(mixed_checkpoint, calibration):
    model, records, ckpt = mixed_checkpoint
    kinds = {(r.spec.bits, r.spec.symmetric) for r in records.values()}
    assert kinds == {(b, s) for b in MIXED_BITS for s in (True, False)}
    groups = json.loads((ckpt.path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 8 and sum(len(g["targets"]) for g in groups.values()) == len(records)

    reloaded, _ = load_checkpoint(ckpt.path)
    mods = quantizable_modules(reloaded)
    for name, rec in records.items():
        assert torch.equal(mods[name].weight, rec.dequantize()), name
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    x = calibration[:2, :64]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_default_zero_points_are_packed_as_compressed_tensors_and_vllm_expect(mixed_checkpoint):
    """compressed-tensors' compressor (``pack_to_int32(zp, bits, packed_dim=0)``) and vLLM's WNA16
    (``weight_zero_point``: ``[ceil(rows*bits/32), groups]`` int32, ``packed_dim=0``) agree."""
    from safetensors import safe_open

    _, records, ckpt = mixed_checkpoint
    asymmetric = {n: r for n, r in records.items() if not r.spec.symmetric}
    with safe_open(str(ckpt.path / WEIGHTS_FILE), "pt") as f:
        for name, rec in asymmetric.items():
            rows, groups = rec.scales.shape
            zeros = f.get_tensor(f"{name}.weight_zero_point")
            assert zeros.dtype == torch.int32 and zeros.shape == (-(-rows * rec.spec.bits // 32), groups), name
    assert sorted(packed_zero_points(ckpt.path)) == sorted(asymmetric)


def test_transformers_refuses_packed_zero_points_and_the_check_says_why(mixed_checkpoint):
    """transformers 5.23 with compressed-tensors 0.20 allocates ``weight_zero_point`` unpacked,
    ``[rows, groups]`` (compressed-tensors' compressor does not pack it on the meta device), so an
    asymmetric checkpoint in the packed layout, compressed-tensors' own included, stops at a size
    mismatch. When this test fails, transformers reads the packed layout: ``padded`` is moot."""
    model, _, ckpt = mixed_checkpoint
    with pytest.raises(CheckpointError, match="zero-points in the packed layout, which transformers refuses"):
        check_transformers_reads(ckpt.path, model)


def test_transformers_loads_an_asymmetric_checkpoint_bit_exactly(model_dir, tmp_path, calibration):
    """Zero-points in the ``padded`` layout: transformers' own ``from_pretrained`` (its default,
    compressed path) computes the in-memory model's logits exactly in float32 for an asymmetric
    2/3/4/8-bit checkpoint (grouped and, for down_proj, channel-wise), and so does gamma's loader."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(model_dir)
    records = _mixed_quantize(model, symmetric_of=lambda i: False, group_size_of=lambda i: -1 if i % 7 == 6 else 64)
    assert {r.spec.bits for r in records.values()} == set(MIXED_BITS)
    assert {r.spec.group_size for r in records.values()} == {-1, 64}
    ckpt = export_checkpoint(model, tokenizer, records, tmp_path / "asym", zero_points="padded")
    with safe_open(str(ckpt.path / WEIGHTS_FILE), "pt") as f:
        name, rec = next(iter(records.items()))
        zeros = f.get_tensor(f"{name}.weight_zero_point")
        used = -(-rec.scales.shape[0] * rec.spec.bits // 32)
        assert zeros.shape == rec.scales.shape and not zeros[used:].any()
    assert packed_zero_points(ckpt.path) == []
    theirs = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    ours, _ = load_checkpoint(ckpt.path)
    x = calibration[:2, :64]
    with torch.no_grad():
        want = model(x).logits
        assert torch.equal(theirs(x).logits, want)
        assert torch.equal(ours(x).logits, want)
    check_transformers_reads(ckpt.path, model)
    with pytest.raises(CheckpointError, match="zero_points='sideways'"):
        export_checkpoint(model, tokenizer, records, tmp_path / "bad", zero_points="sideways")


def test_the_account_is_exactly_the_bytes_of_the_stored_tensors(mixed_checkpoint):
    """What a bytes budget counts is what the checkpoint stores, to the byte, module by module."""
    from safetensors import safe_open

    model, records, ckpt = mixed_checkpoint
    with safe_open(str(ckpt.path / WEIGHTS_FILE), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    nbytes = {k: t.numel() * t.element_size() for k, t in stored.items()}
    for name, rec in list(records.items())[:16]:
        rows, cols = rec.codes.shape
        mine = sum(v for k, v in nbytes.items() if k.startswith(f"{name}.weight_"))
        assert mine == module_stored_bytes(rows, cols, rec.spec), name
    predicted = 0.0
    for sym in (True, False):
        part = {n: r.spec.bits for n, r in records.items() if r.spec.symmetric == sym}
        predicted += account(model, part, 64, sym).quantized_bytes
    predicted += account(model, {n: r.spec.bits for n, r in records.items()}, 64, False).other_bytes
    assert predicted == sum(nbytes.values())
    assert verify_checkpoint(ckpt.path) == ckpt.sha256


def test_transformers_loads_a_symmetric_checkpoint_itself(model_dir, tmp_path, calibration):
    """Another tool: transformers' own compressed-tensors integration reads the checkpoint."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(model_dir)
    records = _mixed_quantize(model, symmetric_of=lambda i: True)
    ckpt = export_checkpoint(model, tokenizer, records, tmp_path / "sym")
    theirs = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    x = calibration[:1, :64]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, theirs(x).logits, atol=1e-3, rtol=1e-3)


def test_interrupted_export_leaves_no_checkpoint(model_and_tokenizer, tmp_path, monkeypatch):
    import gamma.model.export as export

    model, tokenizer = model_and_tokenizer
    name = next(iter(quantizable_modules(model)))
    rec = RTN().quantize(quantizable_modules(model)[name].weight, QuantSpec(4))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "checksum", crash)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(model, tokenizer, {name: rec}, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_tampered_checkpoint_fails_verification(mixed_checkpoint, tmp_path):
    import shutil

    _, _, ckpt = mixed_checkpoint
    copy = shutil.copytree(ckpt.path, tmp_path / "copy")
    with open(copy / WEIGHTS_FILE, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        verify_checkpoint(copy)


def test_pipeline_assignment_exports_as_evaluated(model_dir, tmp_path, calibration):
    """apply_assignment's records export to a model equal to the evaluated one (storage rounding)."""
    model, tokenizer = load_model(model_dir)
    names = list(quantizable_modules(model))
    assignment = {n: (2, 3, 4)[i % 3] for i, n in enumerate(names)}
    records, _ = apply_assignment(model, assignment, RTN(), 64, False)
    round_to_storage(model, set(records))
    ckpt = export_checkpoint(model, tokenizer, records, tmp_path / "variant")
    reloaded, _ = load_checkpoint(ckpt.path)
    x = calibration[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_large_checkpoints_are_sharded_and_read_back_by_both_loaders(model_dir, tmp_path, calibration):
    """A model beyond one shard: Hugging Face shards with their index, out and in."""
    from transformers import AutoModelForCausalLM

    from gamma.model.export import INDEX_FILE

    model, tokenizer = load_model(model_dir)
    records = _mixed_quantize(model, symmetric_of=lambda i: True)
    ckpt = export_checkpoint(model, tokenizer, records, tmp_path / "sharded", max_shard_bytes=20 * 1024**2)
    shards = sorted(p.name for p in ckpt.path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((ckpt.path / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards) and verify_checkpoint(ckpt.path) == ckpt.sha256
    reloaded, _ = load_checkpoint(ckpt.path)
    mods = quantizable_modules(reloaded)
    assert all(torch.equal(mods[n].weight, r.dequantize()) for n, r in records.items())
    theirs = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    x = calibration[:1, :64]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, theirs(x).logits, atol=1e-3, rtol=1e-3)
    model.save_pretrained(tmp_path / "sharded-input", max_shard_size="50MB")  # a user's sharded model
    tokenizer.save_pretrained(tmp_path / "sharded-input")
    assert len(list((tmp_path / "sharded-input").glob("model-*.safetensors"))) > 1
    again, _ = load_model(tmp_path / "sharded-input")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_same_inputs_give_the_same_checkpoint_hash(tmp_path, model_dir):
    """Nothing run-dependent (a timing) is inside the checksummed files."""
    from gamma.config import load_config
    from gamma.run.variant import quantize_and_evaluate
    from gamma.run.workspace import Workspace

    cfg = load_config(tmp_path / "none.yaml", {"evaluation.max_tokens": 256, "evaluation.context_length": 128,
                                               "evaluation.zero_shot_items": 0})
    ws = Workspace(cfg)
    first, second = (quantize_and_evaluate(ws, 3, save_to=tmp_path / name) for name in ("a", "b"))
    assert first["checkpoint_sha256"] == second["checkpoint_sha256"]


EXPORT_SCRIPT = """
import sys
from gamma.model.export import export_checkpoint
from gamma.model.loading import load_model, quantizable_modules
from gamma.quant.interface import QuantSpec
from gamma.quant.rtn import RTN
model, tokenizer = load_model(sys.argv[1])
records = {n: RTN().quantize(m.weight, QuantSpec(4)) for n, m in quantizable_modules(model).items()}
print("writing", flush=True)
export_checkpoint(model, tokenizer, records, sys.argv[2], max_shard_bytes=256 * 1024)
"""


def test_an_export_killed_while_writing_tensors_leaves_nothing_that_looks_complete(model_dir, tmp_path):
    """SIGKILL a real process between shards: no checkpoint at the path (only the stale .partial),
    and the next export of the same path succeeds and leaves no partial."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "ckpt"
    partial = tmp_path / "ckpt.partial"
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_SCRIPT, str(model_dir), str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("model-*.safetensors"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the export finished before it could be killed"
    assert not target.exists() and partial.exists()  # killed mid-write: nothing looks complete
    with pytest.raises(CheckpointError):
        load_checkpoint(target)
    model, tokenizer = load_model(model_dir)
    name, module = next(iter(quantizable_modules(model).items()))
    ckpt = export_checkpoint(model, tokenizer, {name: RTN().quantize(module.weight, QuantSpec(4))}, target)
    assert verify_checkpoint(ckpt.path) == ckpt.sha256 and not partial.exists()


def test_every_export_is_read_back_and_one_that_misreads_is_never_made_visible(tmp_path, monkeypatch):
    """A module with fewer than 9 output rows (one packed row of 4-bit zero-points, which
    compressed-tensors' own unpacking refuses) reads back exactly; an export whose stored codes
    differ from what was quantized is refused by name and leaves nothing at its path."""
    import transformers
    from compressed_tensors.compressors.pack_quantized import helpers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    model = transformers.LlamaForCausalLM(config).eval()
    narrow = torch.nn.Linear(64, 4, bias=False)  # 4 output rows
    records = {"model.layers.0.self_attn.k_proj": RTN().quantize(narrow.weight, QuantSpec(4, 32, False))}
    model.model.layers[0].self_attn.k_proj = narrow
    export_checkpoint(model, None, records, tmp_path / "narrow")  # read back inside: no error
    export_checkpoint(model, None, records, tmp_path / "narrow-padded", zero_points="padded")  # 1 packed row of 4

    real = helpers.pack_to_int32

    def flipped(value, bits, packed_dim=1):  # the writer corrupts the codes (not the zero-points)
        out = real(value, bits, packed_dim)
        if packed_dim == 1:
            out = out.clone()
            out.view(-1)[0] ^= 1
        return out

    monkeypatch.setattr(helpers, "pack_to_int32", flipped)
    with pytest.raises(CheckpointError, match="k_proj reads back differently"):
        export_checkpoint(model, None, records, tmp_path / "broken")
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_the_unquantized_candidate_round_trips_as_an_ignored_float16_module(tmp_path, model_dir):
    """Candidates 4/8/16: a module given 16 bits is left as the checkpoint stores it, listed in
    ``ignore``, counted at 16 bits, and read back identically by gamma and by transformers."""
    from conftest import DATA, defaults
    from safetensors import safe_open
    from test_architectures import SETTINGS, build
    from transformers import AutoModelForCausalLM

    from gamma import cli

    folder = build("Llama", tmp_path / "llama", model_dir)
    sets = [f"model.path={folder}", f"model.data_dir={DATA}", f"output_dir={tmp_path / 'out'}", *SETTINGS,
            "candidates=[4,8,16]", "stage1.budget=8"]
    base = ["--params", str(defaults(tmp_path)), *(a for s in sets for a in ("--set", s))]
    assert cli.main(["learn", *base]) == 0 and cli.main(["allocate", *base, "--budgets", "11"]) == 0
    assignment = json.loads((tmp_path / "out" / "assignments" / "11.json").read_text())["assignment"]
    kept = sorted(m for m, b in assignment.items() if b == 16)
    assert kept and len(set(assignment.values())) > 1
    assert cli.main(["quantize", *base, "--budget", "11"]) == 0
    checkpoint = tmp_path / "out" / "models" / "11"
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert set(kept) <= set(config["ignore"])
    assert not set(kept) & {t for g in config["config_groups"].values() for t in g["targets"]}
    with safe_open(checkpoint / WEIGHTS_FILE, "pt") as f:
        assert f.get_tensor(f"{kept[0]}.weight").dtype == torch.float16
    summary = json.loads((checkpoint / "gamma_summary.json").read_text())
    n = {m: w.numel() for m, w in ((k, v.weight) for k, v in quantizable_modules(load_model(folder)[0]).items())}
    assert summary["avg_bits"] == pytest.approx(sum(n[m] * b for m, b in assignment.items()) / sum(n.values()))
    ours, _ = load_checkpoint(checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=0)
