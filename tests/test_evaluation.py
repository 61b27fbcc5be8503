"""The KL divergence from the unquantized model: exact against a direct computation, zero for the
model itself, ordered by bits, and computed once per run from the caller's own full-precision copy.
Paired perplexity differences: per-window NLLs exact, the difference of two variants on the same
windows, and its refusal of windows that do not pair."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gamma.config import load_config
from gamma.evaluation.metrics import EvaluationError, kl_divergence, paired_difference, perplexity, reference_logprobs
from gamma.model.assignment import apply_assignment, uniform_assignment
from gamma.model.loading import load_model
from gamma.quant.rtn import RTN


@pytest.fixture(scope="module")
def windows(calibration):
    return calibration[:4, :64]


def test_kl_divergence_matches_a_direct_computation_and_orders_the_widths(model_dir, windows, tmp_path):
    model, _ = load_model(model_dir)
    reference = reference_logprobs(model, windows, tmp_path / "ref.npy", batch_size=2)
    assert reference.dtype == np.float16 and reference.shape[:2] == tuple(windows.shape)
    assert kl_divergence(model, windows, reference).kl < 1e-4  # the model from itself: float16 storage only
    with torch.no_grad():
        log_p = F.log_softmax(model(windows).logits.float(), -1)
    kls = {}
    for bits in (2, 4):
        quantized, _ = load_model(model_dir)
        apply_assignment(quantized, uniform_assignment(quantized, bits), RTN(), 64, False)
        got = kl_divergence(quantized, windows, reference, batch_size=3)
        with torch.no_grad():
            log_q = F.log_softmax(quantized(windows).logits.float(), -1)
        per_window = (log_p.exp() * (log_p - log_q)).sum(-1).mean(1)
        direct = per_window.mean().item()
        assert got.kl == pytest.approx(direct, rel=2e-3) and got.tokens == windows.numel() and got.windows == 4
        assert got.window_kl == pytest.approx(per_window.tolist(), rel=2e-3)  # what paired differences take
        kls[bits] = got.kl
    assert kls[2] > 5 * kls[4] > 0


def test_a_paired_difference_separates_two_widths_on_the_same_windows(model_dir, windows):
    model, _ = load_model(model_dir)
    full = perplexity(model, windows, batch_size=3)
    with torch.no_grad():
        logits = model(windows).logits
    direct = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    assert full.window_nll == pytest.approx(direct.tolist(), rel=1e-5) and len(full.window_nll) == 4
    quantized, _ = load_model(model_dir)
    apply_assignment(quantized, uniform_assignment(quantized, 3), RTN(), 64, False)
    three = perplexity(quantized, windows, batch_size=3)
    d = paired_difference(three, full)
    assert d.nll == pytest.approx(three.nll - full.nll, abs=1e-9) and d.windows == 4
    assert d.ratio == pytest.approx(three.perplexity / full.perplexity, rel=1e-9)
    assert d.nll > 3 * d.standard_error > 0  # 3-bit RTN is worse on every window by far more than its spread
    with pytest.raises(EvaluationError, match="got 4 and 2"):
        paired_difference(three, perplexity(model, windows[:2]))


def test_the_run_computes_its_reference_once_from_the_callers_copy(tmp_path, monkeypatch):
    import gamma.run.workspace
    from gamma.run.variant import quantize_and_evaluate
    from gamma.run.workspace import Workspace

    cfg = load_config(tmp_path / "none.yaml", {"output_dir": str(tmp_path), "evaluation.max_tokens": 256,
                                               "evaluation.context_length": 64, "evaluation.zero_shot_items": 0,
                                               "evaluation.kl_tokens": 128})
    ws = Workspace(cfg)
    model, tok = ws.load()
    loads = []
    monkeypatch.setattr(Workspace, "load", lambda self: loads.append(1) or (_ for _ in ()).throw(AssertionError))
    calls = []
    real = gamma.run.workspace.reference_logprobs
    monkeypatch.setattr(gamma.run.workspace, "reference_logprobs",
                        lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    rows = [quantize_and_evaluate(ws, 3, loaded=(model, tok))]
    monkeypatch.undo()
    rows.append(quantize_and_evaluate(ws, 4))
    assert not loads and sum(m is not None for m in calls) == 1  # computed once, from the caller's copy
    assert len(list((tmp_path / "reference").glob("*.npy"))) == 1
    assert rows[0]["kl_divergence"] > rows[1]["kl_divergence"] > 0 and rows[0]["kl_tokens"] == 128
