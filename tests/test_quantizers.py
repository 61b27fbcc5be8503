import pytest
import torch

from gamma.model.assignment import account, apply_assignment, uniform_assignment
from gamma.model.loading import quantizable_modules
from gamma.quant import get_quantizer
from gamma.quant.hessians import collect_hessians
from gamma.quant.interface import (
    QuantizationError,
    QuantSpec,
    group_params,
    quantize_with,
    search_group_params,
)

NAME = "model.layers.5.mlp.up_proj"


@pytest.fixture(scope="module")
def weight(model_and_tokenizer):
    return quantizable_modules(model_and_tokenizer[0])[NAME].weight.detach().clone()


@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_falls_with_bits_and_codes_in_range(weight, symmetric):
    rtn = get_quantizer("rtn")
    errors = []
    for bits in (2, 3, 4, 8):
        q = rtn.quantize(weight, QuantSpec(bits, 64, symmetric))
        assert int(q.codes.max()) <= 2**bits - 1 and int(q.codes.min()) >= 0
        assert q.scales.shape == (weight.shape[0], weight.shape[1] // 64)
        errors.append(float((q.dequantize() - weight).pow(2).sum() / weight.pow(2).sum()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4  # 8-bit is near lossless


def test_dequantize_is_deterministic(weight):
    rtn = get_quantizer("rtn")
    a = rtn.quantize(weight, QuantSpec(3)).dequantize()
    b = rtn.quantize(weight, QuantSpec(3)).dequantize()
    assert torch.equal(a, b)


def test_group_size_must_divide_input(weight):
    with pytest.raises(QuantizationError, match="does not divide"):
        get_quantizer("rtn").quantize(weight, QuantSpec(4, 100))
    q = get_quantizer("rtn").quantize(weight, QuantSpec(4, -1))  # one group per row is explicit
    assert q.scales.shape == (weight.shape[0], 1)


def test_gptq_layer_output_error_below_rtn_on_real_activations(model_and_tokenizer, calibration):
    model = model_and_tokenizer[0]
    hessians = collect_hessians(model, calibration, modules={NAME, "model.layers.5.self_attn.o_proj"})
    mods = quantizable_modules(model)
    for name, h in hessians.items():
        w = mods[name].weight.detach()
        for bits in (2, 3, 4):
            spec = QuantSpec(bits, 64, False)

            def out_err(q, w=w, h=h):
                d = q.dequantize() - w
                return float(torch.einsum("ij,jk,ik->", d, h, d))

            gptq = get_quantizer("gptq").quantize(w, spec, h)
            assert int(gptq.codes.max()) <= 2**bits - 1
            assert out_err(gptq) < out_err(get_quantizer("rtn").quantize(w, spec)), (name, bits)
    with pytest.raises(QuantizationError, match="Hessian"):
        get_quantizer("gptq").quantize(w, QuantSpec(3))


def test_gptq_act_order_keeps_groups_in_place(model_and_tokenizer, calibration):
    model = model_and_tokenizer[0]
    h = collect_hessians(model, calibration, modules={NAME})[NAME]
    q = get_quantizer("gptq", act_order=True).quantize(quantizable_modules(model)[NAME].weight, QuantSpec(3), h)
    w = quantizable_modules(model)[NAME].weight
    assert float((q.dequantize() - w).pow(2).mean()) < float(w.pow(2).mean())


def test_apply_assignment_in_one_call_with_account(model_and_tokenizer):
    import copy

    model = copy.deepcopy(model_and_tokenizer[0])
    assignment = uniform_assignment(model, 4)
    assignment["model.layers.0.mlp.down_proj"] = 2
    before = quantizable_modules(model)["model.layers.0.mlp.down_proj"].weight.clone()
    records, acct = apply_assignment(model, assignment, get_quantizer("rtn"), 64, False)
    after = quantizable_modules(model)["model.layers.0.mlp.down_proj"].weight
    assert torch.equal(after, records["model.layers.0.mlp.down_proj"].dequantize())
    assert not torch.equal(before, after)
    assert acct.nominal_bits < 4.0 and acct.effective_bits == pytest.approx(acct.nominal_bits + 20 / 64, abs=0.01)
    sym = account(model, uniform_assignment(model, 4), 64, True)
    shape_bits = 128 * len(assignment) / sym.quantized_params  # each module's int64 [rows, cols]
    assert sym.effective_bits == pytest.approx(4 + 16 / 64 + shape_bits, rel=1e-12)
    assert acct.total_bytes == pytest.approx(acct.quantized_bytes + acct.other_bytes)
    with pytest.raises(QuantizationError, match="does not have"):
        apply_assignment(model, {"model.layers.99.mlp.up_proj": 4}, get_quantizer("rtn"))


def test_clip_search_lowers_the_weighted_group_error(weight):
    grouped = weight.reshape(-1, 64)
    importance = torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.1
    for bits in (2, 3):
        spec = QuantSpec(bits, 64, False)

        def row_error(scale, zero, spec=spec):
            q = quantize_with(grouped, scale, zero, spec.max_code)
            return (((q - zero[:, None]) * scale[:, None] - grouped).abs().pow(2.4) * importance).sum(dim=1)

        plain = row_error(*group_params(grouped, spec))
        searched = row_error(*search_group_params(grouped, spec, weights=importance))
        assert bool((searched <= plain + 1e-6).all())
        assert float(searched.sum()) < 0.9 * float(plain.sum()), bits  # clipping pays at 2-3 bits


def test_sequential_gptq_uses_the_quantized_prefix(model_and_tokenizer, calibration):
    import copy

    model = copy.deepcopy(model_and_tokenizer[0])
    first, second = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"
    assignment = {first: 2, second: 2}
    gptq = get_quantizer("gptq", sequential=True)
    with pytest.raises(QuantizationError, match="calibration"):
        apply_assignment(model, assignment, gptq)
    records, _ = apply_assignment(model, assignment, gptq, calibration=calibration)

    # The same by hand: block 0 from full-precision Hessians, block 1 from the quantized block 0.
    reference = copy.deepcopy(model_and_tokenizer[0])
    mods = quantizable_modules(reference)
    h0 = collect_hessians(reference, calibration, modules={first})[first]
    q0 = gptq.quantize(mods[first].weight, QuantSpec(2), h0)
    with torch.no_grad():
        mods[first].weight.copy_(q0.dequantize())
    h1 = collect_hessians(reference, calibration, modules={second})[second]
    fp_h1 = collect_hessians(model_and_tokenizer[0], calibration, modules={second})[second]
    assert not torch.allclose(h1, fp_h1)  # block 1 really sees different inputs
    q1 = gptq.quantize(mods[second].weight, QuantSpec(2), h1)
    assert torch.equal(records[first].codes, q0.codes)
    assert torch.equal(records[second].codes, q1.codes)


def test_gptq_per_group_widths_in_one_pass(model_and_tokenizer, calibration):
    """Groups at their own widths: codes stay in each group's range, equal widths reproduce the plain
    pass exactly, and one pass has a lower output error than splicing separately quantized groups."""
    model = model_and_tokenizer[0]
    h = collect_hessians(model, calibration, modules={NAME})[NAME]
    w = quantizable_modules(model)[NAME].weight.detach()
    gptq = get_quantizer("gptq")
    plain = {b: gptq.quantize(w, QuantSpec(b), h) for b in (2, 4)}
    groups = w.shape[1] // 64
    assert torch.equal(gptq.quantize(w, QuantSpec(4), h, group_bits=[4] * groups).codes, plain[4].codes)
    widths = [2 if g % 2 else 4 for g in range(groups)]
    mixed = gptq.quantize(w, QuantSpec(4), h, group_bits=widths)
    for g, b in enumerate(widths):
        assert int(mixed.codes[:, g * 64:(g + 1) * 64].max()) <= 2**b - 1
    spliced = torch.cat([plain[b].dequantize()[:, g * 64:(g + 1) * 64] for g, b in enumerate(widths)], dim=1)

    def out_err(q):
        d = q - w
        return float(torch.einsum("ij,jk,ik->", d, h, d))

    assert out_err(mixed.dequantize()) < out_err(spliced)
    with pytest.raises(QuantizationError, match=f"group_bits has 3 widths for {groups} groups"):
        gptq.quantize(w, QuantSpec(4), h, group_bits=[2, 3, 4])


def test_packed_candidates_keep_their_groups_in_three_bytes_and_lose_nothing(weight):
    rtn = get_quantizer("rtn")
    for symmetric in (False, True):
        q = rtn.quantize(weight, QuantSpec(3, 64, symmetric))
        packed = q.pack()
        assert packed.scales.dtype == torch.float16 and packed.zeros.dtype == torch.uint8
        assert torch.equal(packed.dequantize(), q.dequantize())
        assert torch.equal(packed.unpack().scales, q.scales) and torch.equal(packed.unpack().zeros, q.zeros)
