"""The README's benchmark figures are the figures in ``benchmarks/results``, as rounded there.

Each claim names the README text around a figure (``{}`` where the figure stands), the results
file, the row it comes from and how it is printed. A rerun of a benchmark that moves a figure
fails this test until the README says the new one."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _row(name: str, **where):
    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
    hits = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    assert len(hits) == 1, f"{name}.json: {len(hits)} rows match {where}"
    return hits[0]


def _ppl(name: str, **where) -> str:
    return f"{_row(name, **where)['perplexity']:.1f}"


def _field(name: str, field: str, fmt: str = "{:.2f}", **where) -> str:
    return fmt.format(_row(name, **where)[field])


CLAIMS = {  # README text with {} for the figure -> the figure as the results file gives it
    "the profile's own recipe is ahead of the proxy at 4.5 bits ({} ± 0.0015)": lambda: _more_text(
        "hawq", "nll_diff", "{:+.4f}"),
    "at 4.5 bits (-0.0050 ± {}) and at 5": lambda: _more_text("hawq", "nll_diff_se", "{:.4f}"),
    "and at 5 ({} ± 0.0012), and keeps": lambda: _more_text("hawq", "nll_diff", "{:+.4f}", 5.0),
    "cuts the shortfall to {} ± 0.0013, within": lambda: _field(
        "paired_comparison", "nll_diff", "{:+.4f}", profile="vllm-marlin", quantizer="gptq", budget=4.5,
        method="hawq", stage1_recipe="hard, next_token"),
    "at 3.0 bits GAMMA {} perplexity": lambda: _ppl("compare_allocators", quantizer="rtn", method="gamma", budget=3.0),
    "against uniform {}, HAWQ": lambda: _ppl("compare_allocators", quantizer="rtn", method="uniform", budget=3.0),
    "HAWQ {}, HIGGS": lambda: _ppl("compare_allocators", quantizer="rtn", method="hawq", budget=3.0),
    "HIGGS {}, EvoPress": lambda: _ppl("compare_allocators", quantizer="rtn", method="higgs", budget=3.0),
    "EvoPress {}; with GPTQ": lambda: _ppl("compare_allocators", quantizer="rtn", method="evopress", budget=3.0),
    "({} at 3.0 bits, uniform": lambda: _ppl("compare_allocators", quantizer="gptq", method="gamma", budget=3.0),
    "bits, uniform {}).": lambda: _ppl("compare_allocators", quantizer="gptq", method="uniform", budget=3.0),
    "peak host memory **{} GB** (the estimate": lambda: _field("model_sizes", "peak_host_gb", model="llama-3.2-1b",
                                                                 code="current"),
    "(the estimate said {} GB)": lambda: _field("model_sizes", "estimate_host_gb", model="llama-3.2-1b",
                                                code="current"),
    "peaked at **{} GB**": lambda: _field("model_sizes", "peak_host_gb", code="before"),
    "a peak of **{} GB** of host memory": lambda: _field("model_sizes", "peak_host_gb", "{:.1f}", code="pipeline"),
    "took **{} minutes**": lambda: f"{_row('model_sizes', code='pipeline')['wall_seconds'] / 60:.1f}",
    "tokens: {} vs": lambda: _vllm("vllm-marlin-w4-symmetric", "vllm"),
    "vs {} symmetric,": lambda: _vllm("vllm-marlin-w4-symmetric", "transformers"),
    "symmetric, {} vs": lambda: _vllm("vllm-marlin-w4-asymmetric", "vllm"),
    "vs {} asymmetric,": lambda: _vllm("vllm-marlin-w4-asymmetric", "transformers"),
    "asymmetric, {} vs": lambda: _vllm("vllm-marlin-4-16", "vllm"),
    "vs {} for the 4/16 mix": lambda: _vllm("vllm-marlin-4-16", "transformers"),
    "int4 kernel as through transformers ({} vs": lambda: _through_vllm("rtn", "vllm_perplexity"),
    "int4 kernel as through transformers (37.025 vs {} RTN": lambda: _through_vllm("rtn", "perplexity"),
    "RTN, {} vs 29.641 GPTQ": lambda: _through_vllm("gptq", "vllm_perplexity"),
    "RTN, 29.649 vs {} GPTQ": lambda: _through_vllm("gptq", "perplexity"),
    "Marlin's 4/8/16 mix {} vs": lambda: _vllm("vllm-marlin-mixed-reference", "vllm"),
    "Marlin's 4/8/16 mix 29.06 vs {}": lambda: _vllm("vllm-marlin-mixed-reference", "transformers"),
    "Humming's 2/3/4/8/16 mix with zero-points {} vs": lambda: _vllm("vllm-humming-mixed-reference", "vllm"),
    "with zero-points 144.46 vs {}": lambda: _vllm("vllm-humming-mixed-reference", "transformers"),
    "| 4.5 | {}, KL": lambda: _marlin("gamma", 4.5),
    "Uniform 4-bit: {} (KL": lambda: _marlin("uniform-4", 4.0),
    "uniform 8-bit: {} (KL": lambda: _marlin("uniform-8", 8.0),
    "GAMMA at 4.5 bits closes {}% of the perplexity gap": lambda: _closed(),
    "(a 70B model) solve in at most {} s": lambda: _slowest("llama-70b", "nominal"),
    "in bytes in at most {} s;": lambda: _slowest("llama-8b", "bytes"),
    "proven bound in at most {} s": lambda: _slowest("block-wise", "nominal"),
    "Stage I of an 8B model needs {} GB of device memory": lambda: _projected_8b("estimate_device_gb_rtn"),
    "device memory with RTN ({} GB with GPTQ)": lambda: _projected_8b("estimate_device_gb_gptq"),
    "GPTQ) and {} GB of host memory with RTN's": lambda: _projected_8b("estimate_host_gb_rtn_rebuilt"),
    "the peak grows by {} GB per block": lambda: f"{_summary('scale')['fit_8b']['peak_host_gb']['per_block']:.2f}",
    "| 4.25 | {} |": lambda: _marlin_row(4.25),
    "| 4.5 | {} |": lambda: _marlin_row(4.5),
    "| 5 | {} |": lambda: _marlin_row(5.0),
    "| 6 | {} |": lambda: _marlin_row(6.0),
    "| inside a run (each budget's task: Stage II, quantize, export, evaluate, register) | {} s |":
        lambda: f"{_summary('budget_fanout')['in_run_budget_seconds_mean']:.1f}",
    "| alone, in a fresh `gamma run` process | {} s |":
        lambda: f"{_summary('budget_fanout')['fresh_process_seconds']:.1f}",
    "| Stage II + quantization alone | {} s |":
        lambda: f"{_summary('budget_fanout')['solve_quantize_seconds_mean']:.1f}",
    "A fresh process adds {} s of fixed start-up": lambda: f"{_summary('budget_fanout')['fixed_start_up_seconds']:.1f}",
    "1 process {} s and": lambda: _field("stage1_scaling", "stage1_seconds", "{:.0f}", processes=1),
    "s and {} GiB; 2 processes": lambda: f"{_row('stage1_scaling', processes=1)['peak_memory_mb'] / 1024:.1f}",
    "2 processes {} s and": lambda: _field("stage1_scaling", "stage1_seconds", "{:.0f}", processes=2, rank=0),
    "(3 bits: {} against": lambda: _field("uniform", "perplexity", "{:.1f}", quantizer="gptq", budget=3.0),
    "(3 bits: 46.1 against {})": lambda: _field("uniform", "perplexity", "{:.1f}", quantizer="rtn", budget=3.0),
    "the table's 4,096 tokens ({} against": lambda: _humming("gamma", 3.0),
    "against {}, KL 1.429": lambda: _humming("uniform-3", 3.0),
    "KL {} against 1.457)": lambda: _humming("gamma", 3.0, "kl"),
    "KL 1.429 against {})": lambda: _humming("uniform-3", 3.0, "kl"),
    "level with it on 32,704 tokens: {} against": lambda: _paired("gamma", "perplexity", "{:.2f}"),
    "against {}, a paired difference": lambda: _paired("uniform", "perplexity", "{:.2f}"),
    "a paired difference of {} ±": lambda: _paired("uniform", "nll_diff", "{:.4f}"),
    "± {} nats per token in GAMMA's favour": lambda: _paired("uniform", "nll_diff_se", "{:.4f}"),
    "0.59% behind it at 6 ({} ±": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin", 6.0, (5.0,)),
    "0.59% behind it at 6 (+0.0059 ± {})": lambda: _paired("hawq", "nll_diff_se", "{:.4f}", "vllm-marlin", 6.0,
                                                          (5.0,)),
    "it is ahead at 4.5 bits ({} ± 0.0027 nats": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin", 4.5,
                                                                 MARLIN_TABLES),
    "and at 6 ({} ± 0.0014), and level": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin", 6.0, (6.0,)),
    "behind the proxy on 32,704 tokens ({} ± 0.0013": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin",
                                                                       4.5, MARLIN_TABLES, "gptq"),
    "32,704 ({} against 26.80": lambda: _paired("gamma", "perplexity", "{:.2f}", "vllm-humming", 4.0, (4.0,)),
    "32,704 (26.51 against {}, -0.0108": lambda: _paired("uniform", "perplexity", "{:.2f}", "vllm-humming", 4.0,
                                                         (4.0,)),
    "against 26.80, {} ± 0.0051 nats per token, window": lambda: _paired("uniform", "nll_diff", "{:+.4f}",
                                                                          "vllm-humming", 4.0, (4.0,)),
    "-0.0108 ± {} nats per token, window": lambda: _paired("uniform", "nll_diff_se", "{:.4f}", "vllm-humming", 4.0,
                                                           (4.0,)),
    "(at 2.5 bits {} and": lambda: _served("transformers", "gamma", 2.5, quantizer="gptq"),
    "and {} against the proxy's": lambda: _humming("gamma", 2.5, quantizer="gptq"),
    "against the proxy's {} and 88.8": lambda: _served("transformers", "hawq", 2.5, quantizer="gptq"),
    "107.4 ± 3.9 and {}), and under": lambda: _humming("hawq", 2.5, quantizer="gptq"),
    "closes {}% of the 4-to-8-bit gap at 4.5 bits (goal: half)": lambda: _closed("gptq"),
    "`benchmarks/allocation_ceiling.py`) closes {}%": lambda: _closed("gptq", "ceiling", "allocation_ceiling"),
    "best at every budget ({} against the proxy's 7,822": lambda: _served("transformers", "gamma", 2.5, "alone"),
    "against the proxy's {} at 2.5, 108.6": lambda: _served("transformers", "hawq", 2.5, "alone"),
    "at 2.5, {} against 177.1 at 3": lambda: _served("transformers", "gamma", 3.0, "alone"),
    "against {} at 3, 47.2": lambda: _served("transformers", "hawq", 3.0, "alone"),
    "at 3, {} against 56.3 ± 3.1 at 3.5)": lambda: _served("transformers", "gamma", 3.5),
    "against {} at 3.5). Every checkpoint": lambda: _served("transformers", "hawq", 3.5),
}


SIZE_CLAIMS = {  # docs/model_sizes.md's figures outside its table
    "in {} s against": lambda: _field("model_sizes", "wall_seconds", "{:.0f}", model="llama-3.2-1b", code="current"),
    "against {} s.": lambda: _field("model_sizes", "wall_seconds", "{:.0f}", code="before"),
    "gamma's estimate is {} GB of host memory with RTN's": lambda: _projected_8b("estimate_host_gb_rtn_rebuilt"),
    "against a goal of {} GB; 27.6 GB": lambda: _projected_8b("host_goal_gb"),
    "GB; {} GB with candidates held": lambda: _projected_8b("estimate_host_gb_rtn"),
    "Stage I's own phases peak at {} GB": lambda: _stage1_peak("rebuilt"),
    "GB ({} GB held), under": lambda: _stage1_peak("held"),
}
SIZE_CLAIMS.update({k: CLAIMS[k] for k in ("peak host memory **{} GB** (the estimate", "(the estimate said {} GB)",
                                           "peaked at **{} GB**", "took **{} minutes**",
                                           "a peak of **{} GB** of host memory")})


def _projected_8b(field: str) -> str:
    return f"{_summary('scale')['projected']['llama-3.1-8b'][field]:.1f}"


def _stage1_peak(store: str) -> str:
    rows = json.loads((RESULTS / "scale.json").read_text())["rows"]
    stage1 = [r["peak_host_gb"] for r in rows if (r["model"], r["store"]) == ("llama-3.2-1b", store)
              and r["phase"].startswith(("one Stage I", "Stage I,"))]
    return f"{max(stage1):.1f}"


def _summary(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["settings"]["summary"]


def _marlin_row(budget: float) -> str:
    rows = {m: _row("serving_profiles", profile="vllm-marlin", quantizer="rtn", method=m, budget=budget)
            for m in ("gamma", "hawq", "uniform")}
    cells = [f"{_marlin(m, budget)}, KL {r['kl_divergence']:.3f}" for m, r in rows.items()]
    return " | ".join(cells) + f" | {rows['gamma']['total_bytes'] / 2**20:.1f}"  # GAMMA's MiB


def _served(profile: str, method: str, budget: float, what: str = "perplexity", quantizer: str = "rtn") -> str:
    """A serving-profile row's perplexity ± SE, its perplexity alone (thousands without decimals) or its KL."""
    r = _row("serving_profiles", profile=profile, quantizer=quantizer, method=method, budget=budget)
    if what == "kl":
        return f"{r['kl_divergence']:.3f}"
    text = [f"{v:,.0f}" if r["perplexity"] >= 1000 else f"{v:.1f}" for v in (r["perplexity"], r["perplexity_se"])]
    return text[0] if what == "alone" else " ± ".join(text)


def _humming(method: str, budget: float, what: str = "perplexity", quantizer: str = "rtn") -> str:
    return _served("vllm-humming", method, budget, what, quantizer)


def _paired(method: str, field: str, fmt: str, profile: str = "vllm-humming", budget: float = 3.0,
            training_budgets: tuple = (3.0,), quantizer: str = "rtn") -> str:
    return fmt.format(_row("paired_comparison", profile=profile, quantizer=quantizer, budget=budget,
                           method=method, training_budgets=list(training_budgets))[field])


MARLIN_TABLES = (4.5, 5.0, 6.0)  # the training budgets of vllm-marlin's recipe


def _more_text(method: str, field: str, fmt: str, budget: float = 4.5, loss: str = "end_to_end") -> str:
    """vllm-marlin GPTQ with four times the calibration text and twice Stage I's steps."""
    return _field("paired_comparison", field, fmt, profile="vllm-marlin", quantizer="gptq", budget=budget,
                  method=method, stage1_recipe=f"hard, {loss}, 64 sequences, 200 steps")


def _recipe(quantizer: str, budget: float, recipe: str = "soft, tables at 4.5, 5 and 6 bits") -> str:
    r = _row("serving_profiles_recipes", recipe=recipe, profile="vllm-marlin", quantizer=quantizer, method="gamma",
             budget=budget)
    return f"{r['perplexity']:.2f}"


def _marlin(method: str, budget: float) -> str:
    r = _row("serving_profiles", profile="vllm-marlin", quantizer="rtn", method=method, budget=budget)
    return f"{r['perplexity']:.2f} ± {r['perplexity_se']:.2f}"


def _closed(quantizer: str = "rtn", method: str = "gamma", name: str = "serving_profiles", **where) -> str:
    """The share of the gap from uniform 4-bit to 8-bit that ``method`` closes at 4.5 bits (vllm-marlin)."""
    ppl = {m: _row("serving_profiles", profile="vllm-marlin", quantizer=quantizer, method=m, budget=b)["perplexity"]
           for m, b in (("uniform-4", 4.0), ("uniform-8", 8.0))}
    ppl[method] = _row(name, profile="vllm-marlin", quantizer=quantizer, method=method, budget=4.5,
                       **where)["perplexity"]
    return f"{100 * (ppl['uniform-4'] - ppl[method]) / (ppl['uniform-4'] - ppl['uniform-8']):.0f}"


def _ceiling_row() -> str:
    rows = [_row("allocation_ceiling", profile="vllm-marlin", quantizer="gptq", method="ceiling", budget=b)
            for b in (4.25, 4.5, 5.0, 6.0)]
    return " | ".join(f"{r['perplexity']:.2f} ± {r['perplexity_se']:.2f}" for r in rows)


def _through_vllm(quantizer: str, field: str) -> str:
    """Uniform 4-bit vllm-marlin's perplexity through vLLM or through transformers (the row's own)."""
    return f"{_row('serving_profiles', profile='vllm-marlin', quantizer=quantizer, method='uniform-4')[field]:.3f}"


def _vllm(variant: str, engine: str) -> str:
    return f"{_row('vllm_acceptance', variant=variant)[f'{engine}_perplexity']:.2f}"


def _slowest(case: str, unit: str) -> str:
    rows = json.loads((RESULTS / "solver_scale.json").read_text())["rows"]
    return f"{max(r['solve_seconds'] for r in rows if case in r['case'] and r['unit'] == unit):.1f}"


SCALE_PHASES = ("load", "candidates rtn", "teacher capture with gradients", "steady", "quantize and export",
                "perplexity (2k tokens)")


def scale_row(model: str, store: str) -> str:
    """The README's row of the scale table for ``model`` with candidates ``store``: each phase's
    seconds, the steady Stage I step, the peak and (where measured) what the host held after a phase."""
    rows = [r for r in json.loads((RESULTS / "scale.json").read_text())["rows"]
            if (r["model"], r["store"]) == (model, store)]
    seconds = {r["phase"]: r["seconds"] for r in rows}
    seconds["steady"] = (seconds["Stage I, 3 steps"] - seconds["one Stage I step"]) / 2
    held = [r["held_host_gb"] for r in rows if "held_host_gb" in r]
    cells = [f"{seconds[p]:.1f} s" if seconds[p] < 10 else f"{seconds[p]:.0f} s" for p in SCALE_PHASES]
    cells += [f"{max(r['peak_host_gb'] for r in rows):.1f} GB", f"{max(held):.1f} GB" if held else "not measured"]
    name = {"llama-3.1-8b": "Llama-3.1-8B", "llama-3.2-1b": "Llama-3.2-1B", "llama-3.1-70b": "Llama-3.1-70B"}
    blocks = rows[0]["blocks"]
    label = f"{name[model.partition(':')[0]]}, {blocks} block{'s' if blocks > 1 else ''}"
    return f"| {label} | {store} | " + " | ".join(cells) + " |"


@pytest.mark.parametrize("model,store", [("llama-3.1-8b:1", "held"), ("llama-3.1-8b:2", "held"),
                                         ("llama-3.1-8b:4", "held"), ("llama-3.2-1b", "held"),
                                         ("llama-3.2-1b", "rebuilt"), ("llama-3.1-70b:1", "held")])
def test_the_scale_table_is_its_results_file(model, store):
    want = scale_row(model, store)
    assert want in _text("docs/model_sizes.md"), f"docs/model_sizes.md should have the row {want!r}"


def _text(path: str) -> str:
    """A document with its whitespace runs as single spaces and no bold marks."""
    return re.sub(r"\s+", " ", (ROOT / path).read_text()).replace("**", "")


def quality_row(budget: float) -> str:
    """docs/results.md's allocation-quality row at ``budget``: per quantizer GAMMA, the proxy and the
    best split, the lowest perplexity in bold (thousands without decimals)."""
    cells = []
    for quantizer in ("rtn", "gptq"):
        ppl = [_row("allocation_quality", quantizer=quantizer, method=m, budget=budget)["perplexity"]
               for m in ("gamma", "proxy", "split")]
        for p in ppl:
            text = f"{p:,.0f}" if p >= 1000 else f"{p:.1f}"
            cells.append(f"**{text}**" if p == min(ppl) else text)
    return f"| {budget:g} | " + " | ".join(cells) + " |"


@pytest.mark.parametrize("budget", [2.25, 2.5, 2.75, 3.0, 3.5])
def test_the_allocation_quality_table_is_its_results_file(budget):
    docs = re.sub(r"[ \t]+", " ", (ROOT / "docs" / "results.md").read_text())
    assert quality_row(budget) in docs, f"docs/results.md should have the row {quality_row(budget)!r}"


NEXT_TOKEN = "hard, next_token, tables at 4.5, 5 and 6 bits"
KL_RECIPE = "hard, end_to_end KL, tables at 4.5, 5 and 6 bits"  # the profile's own

DOC_CLAIMS = {  # docs/serving_profiles.md's figures outside its tables
    "nats per token; {} ± 0.0013 with a soft table learned at 6": lambda: _paired(
        "hawq", "nll_diff", "{:+.4f}", "vllm-marlin", 6.0, (5.0, 6.0)),
    "worse at 4.5 with RTN ({}, KL 0.281": lambda: _recipe("rtn", 4.5),
    "with a soft table learned at 6, {} against 27.32": lambda: _recipe("rtn", 6.0),
    "with RTN: at 4.5 bits {} (KL 0.267": lambda: _recipe("rtn", 4.5,
                                                          KL_RECIPE),
    "(KL 0.267; {}% of the gap)": lambda: _closed("rtn"),
    "at 4.5 bits it is 0.74% behind the proxy ({} ±": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin",
                                                                       4.5, MARLIN_TABLES, "gptq"),
    "level at 4.25 ({} ± 0.0019)": lambda: _paired("hawq", "nll_diff", "{:+.4f}", "vllm-marlin", 4.25, MARLIN_TABLES),
    "GAMMA closes only {}% of it at 4.5": lambda: _closed("gptq"),
    "The proxy closes {}%, and an allocation": lambda: _closed("gptq", "hawq"),
    "the ceiling closes {}% of the gap at 4.5 bits": lambda: _closed("gptq", "ceiling", "allocation_ceiling"),
    "| ceiling (chosen on the evaluation text) | {} |": _ceiling_row,
    "22.77 against the proxy's 22.72, {} ± 0.0013 nats per token": lambda: _field(
        "paired_comparison", "nll_diff", "{:+.4f}", profile="vllm-marlin", quantizer="gptq", budget=4.5,
        method="hawq", stage1_recipe="hard, next_token"),
    "with GPTQ {} / 27.72 / 27.13 / 25.76": lambda: _recipe("gptq", 4.25, NEXT_TOKEN),
    "with GPTQ 28.27 / {} / 27.13 / 25.76": lambda: _recipe("gptq", 4.5, NEXT_TOKEN),
    "with RTN {} / 29.94 / 29.05 / 27.04": lambda: _recipe("rtn", 4.25, NEXT_TOKEN),
    "with RTN 32.65 / {} / 29.05 / 27.04": lambda: _recipe("rtn", 4.5, NEXT_TOKEN),
    "with RTN 32.65 / 29.94 / 29.05 / {} against": lambda: _recipe("rtn", 6.0, NEXT_TOKEN),
    "27.04 against 32.68 / {} /": lambda: _recipe("rtn", 4.5, KL_RECIPE),
    "bits**, {} against 22.71, -0.0050": lambda: _more_text("gamma", "perplexity", "{:.2f}"),
    "bits**, 22.60 against {}, -0.0050": lambda: _more_text("hawq", "perplexity", "{:.2f}"),
    "against 22.71, {} ± 0.0015 nats per token (3.3 SE": lambda: _more_text("hawq", "nll_diff", "{:+.4f}"),
    "KL {} against 0.1250), and the next-token": lambda: _more_text("gamma", "kl_divergence", "{:.4f}"),
    "the next-token loss by {} ± 0.0016": lambda: _more_text("hawq", "nll_diff", "{:+.4f}", loss="next_token"),
    "GAMMA keeps the proxy's widths ({}, a difference": lambda: _more_text("hawq", "perplexity", "{:.2f}", 4.25),
    "23.19, a difference of {}). At 5 bits": lambda: _more_text("hawq", "nll_diff", "{:+.4f}", 4.25),
    "ahead of the proxy there ({} ± 0.0015,": lambda: _more_text("hawq", "nll_diff", "{:+.4f}"),
    "it is ahead by {} ± 0.0012 (22.17": lambda: _more_text("hawq", "nll_diff", "{:+.4f}", 5.0),
    "(22.17 against 22.23; KL {} against 0.0926)": lambda: _more_text("gamma", "kl_divergence", "{:.4f}", 5.0),
    "every budget: 4.25 {} ± 0.00033, 4.5": lambda: _agreement(4.25, "kl_diff"),
    "4.5 {} ± 0.00062, 5 -0.00138": lambda: _agreement(4.5, "kl_diff"),
    "Its NLL is not: 4.25 -0.00241 ± 0.00085, 4.5 {} ± 0.00186": lambda: _agreement(4.5, "nll_diff"),
    "4.5 +0.00244 ± {}, 5": lambda: _agreement(4.5, "nll_diff_se"),
}


def _agreement(budget: float, field: str) -> str:
    return _field("objective_agreement", field, "{:+.5f}" if field.endswith("diff") else "{:.5f}",
                  profile="vllm-marlin", quantizer="gptq", budget=budget, method="hawq")


DOCUMENTS = {"README.md": CLAIMS, "docs/model_sizes.md": SIZE_CLAIMS, "docs/serving_profiles.md": DOC_CLAIMS}


@pytest.mark.parametrize("path,claim", [(path, claim) for path, claims in DOCUMENTS.items()
                                        for claim in sorted(claims)])
def test_a_figure_in_the_text_is_the_figure_in_its_results_file(path, claim):
    want = " ".join(claim.split()).replace("**", "").format(DOCUMENTS[path][claim]())
    assert want in _text(path), f"{path} should say {want!r} ({claim!r})"


@pytest.mark.parametrize("profile", ["vllm-marlin", "vllm-humming", "transformers"])
def test_the_serving_profile_tables_are_their_results_file(profile):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serving_profiles import table

    rows = json.loads((RESULTS / "serving_profiles.json").read_text())["rows"]
    docs = (ROOT / "docs" / "serving_profiles.md").read_text()
    assert table(rows, profile) in docs, f"docs/serving_profiles.md should have the table of {profile}:\n" + table(
        rows, profile)
    from serving_profiles import RECIPES, loaders_table, recipes_table

    loaders = loaders_table(rows)
    assert loaders in docs, f"docs/serving_profiles.md should have the loaders table:\n{loaders}"

    recipes = json.loads((RESULTS / f"{RECIPES}.json").read_text())["rows"]
    for quantizer in dict.fromkeys(r["quantizer"] for r in recipes if r["profile"] == profile):
        want = recipes_table(recipes, profile, quantizer)
        assert want in docs, f"docs/serving_profiles.md should have the {profile} {quantizer} recipes table:\n{want}"


def test_the_paired_comparisons_table_is_its_results_file():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from paired_comparison import table

    want = table(json.loads((RESULTS / "paired_comparison.json").read_text())["rows"])
    assert want in (ROOT / "docs" / "serving_profiles.md").read_text(), \
        f"docs/serving_profiles.md should have the paired comparisons table:\n{want}"
