"""Real model sizes: weights stay on the host in the checkpoint's dtype, every phase streams one
block at a time through the compute device, and the streamed teacher capture equals the whole
model's own forward and backward (tiny random-weight models built from configs)."""

import copy
import dataclasses
import json
from itertools import cycle

import pytest
import torch
import torch.nn.functional as F
from conftest import defaults

from gamma.config import ConfigError, load_config
from gamma.model.assignment import apply_assignment
from gamma.model.candidates import build_candidates
from gamma.model.device import DeviceError, on_device, resolve_device
from gamma.model.loading import load_model, quantizable_modules, resolve_dtype
from gamma.problem import AllocationProblem
from gamma.quant import get_quantizer
from gamma.quant.interface import QuantizationError
from gamma.stage1.proxy import KeepFisher
from gamma.stage1.teacher import capture_teacher


def tiny_llama(path, dtype, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, model_dir):
    return tiny_llama(tmp_path_factory.mktemp("bf16"), torch.bfloat16, model_dir)


def test_models_load_in_their_own_dtype_unless_told_otherwise(bf16_dir):
    assert resolve_dtype("auto", bf16_dir) == torch.bfloat16
    model, _ = load_model(bf16_dir, resolve_dtype("auto", bf16_dir))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(bf16_dir, resolve_dtype("float32", bf16_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_device_that_is_not_there_is_refused_by_name():
    with pytest.raises(ConfigError, match="gpu"):
        load_config(overrides={"model": {"device": "gpu"}})
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda:1"):
            resolve_device("cuda:1")


def test_a_piece_on_the_device_comes_back_exactly_as_it_was(bf16_dir):
    model, _ = load_model(bf16_dir)
    block = model.model.layers[0]
    before = {n: t.clone() for n, t in block.state_dict().items()}
    inv_freq = model.model.rotary_emb.inv_freq
    with on_device(block, "cpu") as moved:
        assert {p.dtype for p in moved.parameters()} == {torch.float32}
    after = block.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    with on_device(model.model.rotary_emb, "cpu"):
        pass
    assert model.model.rotary_emb.inv_freq.dtype == inv_freq.dtype == torch.float32


def _reference(model, sequences):
    """Hidden states, block-output gradients and Fisher diagonals from the whole model's own
    forward and backward, one sequence at a time."""
    blocks, modules = model.model.layers, quantizable_modules(model)
    fisher = {n: torch.zeros_like(m.weight) for n, m in modules.items()}
    hidden, grads = [[] for _ in range(len(blocks) + 1)], [[] for _ in blocks]
    for m in modules.values():
        m.weight.requires_grad_(True)
    outs = []
    handles = [b.register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
               for b in blocks]
    for seq in sequences.split(1):
        outs.clear()
        res = model(input_ids=seq, output_hidden_states=True)
        for y in outs:
            y.retain_grad()
        F.cross_entropy(res.logits[0, :-1].float(), seq[0, 1:]).backward()
        hidden[0].append(res.hidden_states[0].detach())
        for i, y in enumerate(outs):
            hidden[i + 1].append(y.detach())
            grads[i].append(y.grad)
        for n, m in modules.items():
            fisher[n] += m.weight.grad.pow(2) / len(sequences)
            m.weight.grad = None
    for h in handles:
        h.remove()
    for m in modules.values():
        m.weight.requires_grad_(False)
    return [torch.cat(h) for h in hidden], [torch.cat(g) for g in grads], fisher


def test_the_streamed_teacher_equals_the_whole_model_forward_and_backward(tmp_path, model_dir):
    model, _ = load_model(tiny_llama(tmp_path, torch.float32, model_dir))
    sequences = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    hidden, grads, fisher = _reference(model, sequences)
    kept = KeepFisher()
    teacher = capture_teacher(model, sequences, on_fisher=kept)
    for ours, theirs in zip(teacher.hidden[:-1], hidden[:-1]):  # the last: the model's output is normed
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(teacher.grads, grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-9)
    assert set(kept.fisher) == set(fisher)
    for name, f in fisher.items():
        torch.testing.assert_close(kept.fisher[name], f, rtol=1e-3, atol=1e-12)


def test_a_bfloat16_model_keeps_its_activations_in_bfloat16_and_learns(bf16_dir):
    from gamma.config import Stage1Config
    from gamma.stage1.learn import learn_score_table

    model, _ = load_model(bf16_dir)
    sequences = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    candidates = build_candidates(model, get_quantizer("rtn"), [2, 3, 4], group_size=32)
    problem = AllocationProblem(model, sequences, candidates, [2, 3, 4], group_size=32)
    teacher = problem.capture(proxy=True)
    assert {h.dtype for h in teacher.hidden} == {torch.bfloat16}
    assert {g.dtype for g in teacher.grads} == {torch.bfloat16}
    assert teacher.proxy_costs.shape == (len(candidates), 3)
    assert (teacher.proxy_costs[:, 0] > teacher.proxy_costs[:, 2]).all()  # 2 bits cost more than 4
    table = learn_score_table(problem, Stage1Config(budget=3.0, steps=3, sequences_per_step=2,
                                                    tokens_per_sequence=32), teacher=teacher)
    assert abs(sum(table.history["expected_bits"][-1:]) - 3.0) < 0.3
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_a_run_that_would_not_fit_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import gamma.run.tables
    import gamma.run.workspace
    from gamma import cli

    loads = []
    monkeypatch.setattr(gamma.run.workspace, "load_model", lambda *a, **k: loads.append(1))
    monkeypatch.setattr(gamma.run.tables, "available_memory", lambda device: (2 * 1024**3, None))
    code = cli.main(["learn", "--params", str(defaults(tmp_path)), "--set", f"output_dir={tmp_path}",
                     "--set", "text.calibration_sequences=64", "--set", "text.sequence_length=2048",
                     "--set", "stage1.max_host_activations_gb=100"])
    out = "".join(capsys.readouterr())
    assert code == 2 and not loads
    assert "2.0 GB are free" in out and "teacher hidden states" in out and "text.calibration_sequences" in out
    record = json.loads((tmp_path / "memory_estimate.json").read_text())
    assert record["host_gb"] > 2.0 and record["parts_gb"]["teacher hidden states"] > 2.0


def test_the_estimate_grows_with_what_a_user_can_lower(model_dir):
    from gamma.model.memory import estimate_memory

    base = load_config(overrides={"model": {"dtype": "float32"}})
    small = estimate_memory(base, model_dir).totals()[0]
    for change in ({"model": {"dtype": "float32"}, "text": {"calibration_sequences": 128}},
                   {"model": {"dtype": "float32"}, "quantizer": {"method": "gptq"}},
                   {"model": {"dtype": "float32"}, "candidates": [2, 3, 4, 8]}):
        assert estimate_memory(load_config(overrides=change), model_dir).totals()[0] > small, change
    half = estimate_memory(load_config(overrides={"model": {"dtype": "bfloat16"}}), model_dir)
    assert half.host["weights"] == estimate_memory(base, model_dir).host["weights"] / 2


def test_evaluation_streams_a_model_that_cannot_run_whole_and_scores_the_same(bf16_dir, monkeypatch):
    import gamma.model.blocks as blocks
    from gamma.evaluation.metrics import perplexity, score_with_model

    streamed, _ = load_model(bf16_dir)  # bfloat16 on the host: evaluated through the block walk
    whole, _ = load_model(bf16_dir, torch.float32)  # the same weights, float32: model() as it is
    assert blocks.why_block_walk(streamed, "cpu") == "bfloat16 weights: each block computes in float32"
    assert blocks.why_block_walk(whole, "cpu") is None
    windows = torch.randint(0, 300, (5, 40), generator=torch.Generator().manual_seed(3))
    want, got = perplexity(whole, windows, batch_size=2), perplexity(streamed, windows, batch_size=2)
    assert got.perplexity == pytest.approx(want.perplexity, rel=2e-3)  # hidden states rounded to bfloat16
    requests = [(list(range(1, n)), 3) for n in (9, 14, 6, 20)]
    monkeypatch.setattr(blocks, "why_block_walk", lambda *a: "forced")  # the walk on float32: no rounding
    walked = score_with_model(whole, requests, batch_size=3)
    monkeypatch.undo()
    for (a, hit_a), (b, hit_b) in zip(walked, score_with_model(whole, requests, batch_size=3)):
        assert a == pytest.approx(b, abs=1e-4) and hit_a == hit_b


def test_gptq_candidates_built_block_by_block_equal_those_from_all_hessians_at_once(bf16_dir, model_dir):
    """No Hessian of a whole model is held: each block's are consumed into its candidates, which are
    then the very records of a variant quantized with the full-precision Hessians."""
    from pathlib import Path

    from gamma.run.workspace import Workspace

    cfg = load_config(overrides={"model": {"path": str(bf16_dir), "data_dir": str(Path(model_dir).parents[1])},
                                 "quantizer": {"method": "gptq", "group_size": 32},
                                 "text": {"calibration_sequences": 2, "sequence_length": 32},
                                 "evaluation": {"context_length": 32, "max_tokens": 128}})
    ws = Workspace(cfg)
    model, _ = ws.load()
    streamed = ws.candidates(model)
    at_once = build_candidates(model, ws.quantizer(), cfg.candidates, 32, False, ws.hessians(model))
    assert list(streamed) == list(at_once)
    for name, cands in at_once.items():
        for a, b in zip(cands, streamed[name]):
            assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name

    # so a variant quantized from the same full-precision Hessians is made of those very candidates
    problem = AllocationProblem(model, ws.calibration, streamed, cfg.candidates, 32, False)
    assignment = dict(zip(streamed, cycle(cfg.candidates)))
    gptq = dataclasses.replace(ws.quantizer(), sequential=False)
    again, acct = apply_assignment(copy.deepcopy(model), assignment, gptq, 32, False, ws.hessians(model))
    taken, held_acct = apply_assignment(copy.deepcopy(model), assignment, gptq, 32, False, held=problem.candidate)
    assert acct == held_acct and set(again) == set(taken) == set(assignment)
    for name, record in again.items():
        assert torch.equal(record.codes, taken[name].codes) and torch.equal(record.scales, taken[name].scales)
    with pytest.raises(QuantizationError, match="sequential"):
        apply_assignment(copy.deepcopy(model), assignment, ws.quantizer(), 32, False, held=problem.candidate)


def test_activations_beyond_the_host_limit_are_memory_mapped_and_change_nothing(bf16_dir, tmp_path):
    model, _ = load_model(bf16_dir)
    sequences = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(4))
    in_memory = capture_teacher(model, sequences)
    mapped = capture_teacher(model, sequences, spill_dir=tmp_path / "teacher")
    for a, b in zip(in_memory.hidden + in_memory.grads, mapped.hidden + mapped.grads):
        assert torch.equal(a, b) and a.untyped_storage().filename is None
        assert b.untyped_storage().filename.startswith(str(tmp_path / "teacher"))
    assert not (tmp_path / "teacher").exists() or not any((tmp_path / "teacher").rglob("*"))  # nothing left


def test_the_estimate_moves_activations_to_disk_beyond_the_limit(model_dir):
    from gamma.model.memory import estimate_memory

    cfg = load_config(overrides={"stage1": {"max_host_activations_gb": 0.1}})
    spilled, kept = estimate_memory(cfg, model_dir), estimate_memory(load_config(), model_dir)
    assert spilled.spills and not kept.spills
    assert spilled.totals()[0] < kept.totals()[0] and "teacher hidden states" in spilled.record()["parts_gb"]


def test_a_table_learned_on_other_weights_dtype_is_another_table():
    from gamma.config import Stage1Config
    from gamma.problem import Provenance
    from gamma.stage1.learn import stage1_key, stage1_settings

    keys = {stage1_key(p, stage1_settings(Stage1Config(), [2, 3, 4], p))
            for p in (Provenance("m", "t", dtype="float32"), Provenance("m", "t", dtype="bfloat16"))}
    assert len(keys) == 2


def test_an_unreadable_config_json_is_one_clear_error(tmp_path):
    from gamma.model.loading import ModelInputError

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelInputError, match="config.json"):
        resolve_dtype("auto", tmp_path)


def test_every_phase_records_the_device_it_computed_on(tmp_path, bf16_dir):
    """Noted by the code that moves the work (not copied from the settings): on this CPU-only
    machine, every phase of learning, quantizing and evaluating says cpu, and a phase that moved
    nothing anywhere would say "none noted"."""
    from conftest import DATA

    from gamma.run.tables import Band
    from gamma.run.variant import quantize_and_evaluate
    from gamma.run.workspace import Workspace

    for method in ("rtn", "gptq"):
        cfg = load_config(defaults(tmp_path), {
            "model.path": str(bf16_dir), "model.data_dir": str(DATA), "model.device": "cpu",
            "quantizer.method": method, "quantizer.group_size": 32, "text.calibration_sequences": 2,
            "text.sequence_length": 32, "stage1.steps": 2, "stage1.extra_budgets": [],
            "evaluation.max_tokens": 128, "evaluation.context_length": 32, "evaluation.zero_shot_items": 2,
            "output_dir": str(tmp_path / method)})
        ws = Workspace(cfg)
        table = Band(ws).learn(3.0)
        assert table.devices == {"candidates": "cpu", "teacher capture": "cpu", "Stage I": "cpu"}
        assert table.walk_error is not None and table.walk_error < 2e-2  # against model() in bf16, on load
        row = quantize_and_evaluate(ws, 3)
        assert row["quantize_devices"] == "cpu"
        assert row["coverage"]["quantized_fraction_of_blocks"] > 0.99 and not row["coverage"]["not_quantizable"]
        assert row["eval_devices"] == "cpu (block walk: bfloat16 weights: each block computes in float32)"
    float32 = Workspace(load_config(defaults(tmp_path), {**cfg.model_dump(), "model": {
        **cfg.model.model_dump(), "dtype": "float32"}, "quantizer": {"method": "rtn", "group_size": 32}}))
    assert quantize_and_evaluate(float32, 4)["eval_devices"] == "cpu (whole model)"


def test_rebuilt_candidates_are_the_held_ones_and_learn_the_same_table(bf16_dir, tmp_path):
    """``quantizer.candidate_store: rebuilt`` holds no candidate on the host: each block's are
    quantized again when asked, the very weights ``held`` keeps packed, so Stage I learns the very
    same table, and an allocator that has changed the model's weights still gets the originals'."""
    from conftest import DATA

    from gamma.model.candidates import RebuiltCandidates, apply_candidates
    from gamma.model.memory import estimate_memory
    from gamma.run.workspace import Workspace
    from gamma.stage1.learn import learn_score_table

    problems, tables = {}, {}
    for store in ("held", "rebuilt"):
        cfg = load_config(defaults(tmp_path), {
            "model.path": str(bf16_dir), "model.data_dir": str(DATA), "quantizer.group_size": 32,
            "quantizer.candidate_store": store, "text.calibration_sequences": 3, "text.sequence_length": 32,
            "stage1.steps": 3, "stage1.sequences_per_step": 2, "evaluation.max_tokens": 128,
            "evaluation.context_length": 32})
        problems[store] = Workspace(cfg).problem()
        tables[store] = learn_score_table(problems[store], cfg.stage1)
        host = estimate_memory(cfg, bf16_dir).host["candidates (packed)"]
        assert (host > 0) == (store == "held")
    held, rebuilt = problems["held"], problems["rebuilt"]
    assert isinstance(rebuilt.candidates, RebuiltCandidates) and isinstance(held.candidates, dict)
    assert list(rebuilt.candidates) == list(held.candidates) and rebuilt.sizes == held.sizes
    assert tables["rebuilt"].scores == tables["held"].scores
    rebuilt.keep_originals()
    apply_candidates(rebuilt.model, rebuilt.candidates, rebuilt.bits, dict.fromkeys(rebuilt.modules, 2))
    for name, cands in held.candidates.items():
        for a, b in zip(cands, rebuilt.candidates[name]):
            assert torch.equal(a.dequantize(), b.dequantize()), name
    assert load_config().quantizer.store_on("cuda") == "rebuilt" and load_config().quantizer.store_on("cpu") == "held"
    with pytest.raises(ConfigError, match="candidate_store='rebuilt'.*gptq"):
        load_config(overrides={"quantizer": {"method": "gptq", "candidate_store": "rebuilt"}})
