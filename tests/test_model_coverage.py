"""Any decoder a user brings: the block walk calls every block exactly as the model's own forward
does (its attention masks: causal, sliding window, alternating layer types; its rotary embeddings;
its logit soft-capping), checked against ``model()`` (tiny random-weight models built from
configs, the embedded tokenizer)."""

import pytest
import torch

from gamma.model.blocks import BlockRunner, WalkMismatch, walk_error

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny(arch: str, **extra):
    import transformers

    config_class = getattr(transformers, "Gemma3TextConfig" if arch == "Gemma3" else f"{arch}Config")
    config = config_class(**{**SMALL, "vocab_size": 512, **extra})
    torch.manual_seed(0)
    return getattr(transformers, f"{arch}ForCausalLM")(config).eval()


ARCHITECTURES = {  # what each one's forward does beyond plain causal attention
    "Llama": {},
    "Qwen2": {},
    "Mistral": {"sliding_window": 16},  # a window shorter than the sequences
    "Gemma2": {"sliding_window": 16, "attn_implementation": "eager", "head_dim": 16},  # alternating, soft-capped
    "Gemma3": {"sliding_window": 16, "head_dim": 16, "sliding_window_pattern": 2},  # local/global rotary
    "Phi3": {"sliding_window": 16, "pad_token_id": 0},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_walk_reproduces_the_models_own_hidden_states_and_logits(arch):
    model = tiny(arch, **ARCHITECTURES[arch])
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        runner = BlockRunner(model)
        hidden = runner.embed(ids)
        for index in range(len(runner.blocks)):
            torch.testing.assert_close(hidden, out.hidden_states[index], rtol=1e-4, atol=1e-5)
            hidden = runner.run_block(index, hidden)
        torch.testing.assert_close(runner.head(hidden), out.logits, rtol=1e-4, atol=1e-5)
    assert walk_error(model, ids[:1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_walk_that_does_not_reproduce_the_model_is_refused_naming_the_architecture(dtype, monkeypatch):
    model = tiny("Mistral", sliding_window=16).to(dtype)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    assert walk_error(model, ids) < (1e-5 if dtype == torch.float32 else 2e-2)  # bf16: model() rounds
    monkeypatch.setattr("gamma.model.blocks.layer_types", lambda config, n: ["full_attention"] * n)  # window lost
    with pytest.raises(WalkMismatch, match="MistralForCausalLM.*does not reproduce"):
        walk_error(model, ids)


MOE = {"Mixtral": {"num_local_experts": 4},
       "Qwen2Moe": {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
       "Qwen3Moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}}


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Phi3", *MOE])
def test_every_weight_is_accounted_for_and_nothing_is_skipped_silently(arch):
    from gamma.model.coverage import coverage
    from gamma.model.experts import split_experts
    from gamma.model.loading import quantizable_modules

    model = tiny(arch, **{**ARCHITECTURES.get(arch, {}), **MOE.get(arch, {})})
    if arch in MOE:  # experts stored as 3-D tensors: a layout gamma does not split is listed by name
        cov = coverage(model)
        assert cov.unknown and all("experts" in n for n in cov.unknown)
        assert cov.block_fraction < 0.6 and "NOT quantized" in cov.line() and "experts" in cov.line()
        assert split_experts(model) == SMALL["num_hidden_layers"]
    cov = coverage(model)
    assert cov.quantized + sum(cov.kept.values()) == cov.total == sum(p.numel() for p in model.parameters())
    assert not any(".gate" in n and not n.endswith("_proj") for n in quantizable_modules(model))  # routers: 16 bits
    assert not cov.unknown and cov.block_fraction > 0.98 and "NOT quantized" not in cov.line()
    assert (cov.kept["routers"] > 0) == (arch in MOE)


@pytest.mark.parametrize("arch", MOE)
def test_experts_split_into_one_linear_per_expert_compute_what_the_models_experts_compute(arch):
    from gamma.model.experts import ExpertSplitError, _check_split, split_experts

    model = tiny(arch, **MOE[arch])
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        want = model(ids).logits
        split_experts(model)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-6)
    split = model.model.layers[0].mlp.experts
    gate, _, down = split.expert(1)
    assert gate.weight.data_ptr() == experts.gate_up_proj[1].data_ptr()  # views: nothing copied
    assert down.weight.shape == experts.down_proj.shape[1:]
    split.names = (split.names[1], split.names[0], split.names[2])  # gate and up swapped: act(up) * gate
    with pytest.raises(ExpertSplitError, match=f"{model.config.model_type}: .*not supported"):
        _check_split(experts, split, model.config.model_type)


@pytest.mark.parametrize("arch", MOE)
def test_the_memory_estimates_shapes_count_every_experts_weights(arch):
    from gamma.model.experts import split_experts
    from gamma.model.loading import quantizable_modules
    from gamma.model.memory import Shapes

    model = tiny(arch, **MOE[arch])
    split_experts(model)
    shapes = Shapes.from_config(model.config.to_dict())
    quantizable = sum(m.weight.numel() for m in quantizable_modules(model).values())
    assert shapes.block_linear * shapes.layers == quantizable
    assert shapes.input_widths["experts' down projections (moe intermediate size)"] == \
        MOE[arch].get("moe_intermediate_size", SMALL["intermediate_size"])
