"""Serving profiles on the embedded model: what each engine can load, and what GAMMA buys there.

For each profile (``serving.profile``: its candidates, symmetry and tie groups) and quantizer, the
same budgets are allocated by GAMMA (Stage I once, then Stage II per budget), by the Fisher proxy
GAMMA starts from (``hawq``: the knapsack over the proxy's costs) and by the best two-level
uniform split (``uniform``: the lower width everywhere, the upper one unit at a time by the order
that loses least on calibration text), all under the profile's tie groups; uniform rows at each
candidate width are the reference points. Every variant goes the pipeline's way: quantized from
a fresh model, exported, read back, evaluated (perplexity with its standard error, and the KL
divergence from the unquantized model on the first ``--kl-tokens``); its real bytes are the
checkpoint's tensors (``total_bytes``, exact) and its files (``checkpoint_bytes``), and
transformers' own ``from_pretrained`` is tried on every checkpoint (accepted = identical logits);
where a vLLM environment runs here (``$GAMMA_VLLM_PYTHON``), so is vLLM's own loader (``vllm``:
config parsing, weight loading and one forward, with the worker's reference kernel where the CPU
build has no kernel for a width), and uniform 4-bit ``vllm-marlin`` variants are also evaluated
through vLLM (its real int4 kernel; ``vllm_perplexity``). ``--loaders-only`` rebuilds each variant
of the results file (refusing one whose bytes differ from the recorded row), runs only those loader
checks and adds them to its row, which keeps its figures and their commit. GPTQ uses Hessians
taken once from the full-precision model (``quantizer.gptq.sequential=false``), so a variant's
weights are exactly the candidates the allocators chose among: they are taken from the problem
instead of quantized again (the pipeline's sequential GPTQ pass per variant costs minutes each
here).

GAMMA's score tables are kept under ``runs/serving_profiles/tables``, named by everything that
determines them: a rerun with the same settings reads them instead of learning them again.

Writes ``benchmarks/results/serving_profiles.json`` (rows merged by profile, quantizer, method and
budget: a rerun replaces only what it recomputed) and ``serving_profiles.png`` (perplexity
against bytes, one panel per profile).

    python benchmarks/serving_profiles.py [--profiles vllm-marlin,vllm-humming,transformers]
        [--quantizers rtn,gptq] [--allocators gamma,hawq,uniform] [--tokens 4096] [--kl-tokens 4096]
        [--no-references] [--set key=value] [--recipe LABEL] [--name serving_profiles] [--tables]
        [--loaders-only]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, commit, prepared_allocator, vllm_perplexity, write_results

from gamma.config import load_config, parse_overrides
from gamma.evaluation.backends import BackendUnavailable, vllm_loads
from gamma.model.export import CheckpointError, check_transformers_reads, load_checkpoint
from gamma.operations.profiles import PROFILES as SERVING
from gamma.progress import console
from gamma.run.variant import quantize_and_evaluate, quantize_variant
from gamma.run.workspace import Workspace

# the profiles benchmarked: each brings its widths, tie groups, Stage I recipe and budgets
# (gamma/operations/profiles.py, ``Profile.settings``; the recipes were chosen by this script's runs)
PROFILES = {name: SERVING[name].settings for name in ("vllm-marlin", "vllm-humming", "transformers")}
KEY = ("profile", "quantizer", "method", "budget")
RECIPES = "serving_profiles_recipes"  # other Stage I recipes than a profile's own (``--recipe``)
RECIPE_KEY = ("recipe", "profile", "quantizer", "method", "budget")
WORK = ROOT / "runs" / "serving_profiles"


def config(profile: str, quantizer: str, args):
    """The profile's own settings (params.yaml leaves them to it), GPTQ's Hessians from the
    full-precision model, and the evaluation this script measures with."""
    return load_config(ROOT / "params.yaml", {
        "serving.profile": profile, "quantizer.method": quantizer,
        "quantizer.gptq.sequential": False, "evaluation.max_tokens": args.tokens,
        "evaluation.kl_tokens": args.kl_tokens, "evaluation.zero_shot_items": 0,
        "output_dir": str(WORK / profile / quantizer), **parse_overrides(args.set)})


def transformers_reads(path: Path) -> str:
    """"accepted" (identical logits to gamma's reading) or transformers' own error."""
    model, _ = load_checkpoint(path)
    try:
        check_transformers_reads(path, model)
        return "accepted"
    except CheckpointError as err:
        return str(err).replace(str(path), "<checkpoint>")


def vllm_reads(ws: Workspace, row: dict, where: Path, assignment: dict | int) -> dict:
    """vLLM's own loader on the variant where a vLLM environment runs here (none: {}): ``vllm`` is
    "accepted" (config, weights, one forward) or its refusal; a ``vllm-marlin`` variant whose
    modules are all 4-bit is also evaluated through vLLM on the same windows."""
    if "vllm" in row.get("unchecked", {}):  # the pipeline's own check (a vLLM profile) found no vLLM here
        return {}
    if "vllm" in row.get("loads_in", []):
        forward = row.get("unchecked", {}).get("vllm_forward")
        out = {"vllm": "accepted" if forward is None else f"loaded; its forward failed here: {forward}"}
    else:
        try:
            verdict = vllm_loads(ws.cfg.evaluation.vllm, where)
        except BackendUnavailable:
            return {}
        out = {"vllm": "accepted" if verdict["accepted"] else
               f"refused at stage {verdict['stage']!r}: {verdict['error']}".replace(str(where), "<checkpoint>")}
    widths = set(assignment.values()) if isinstance(assignment, dict) else {assignment}
    if ws.cfg.serving.profile == "vllm-marlin" and widths == {4} and out["vllm"] == "accepted":
        out.update(vllm_perplexity(ws, where, ws.cfg.evaluation.vllm))
    return out


def measure(ws: Workspace, assignment: dict | int, where: Path, problem) -> dict:
    """The pipeline's path for one variant: quantize a fresh model (from the problem's candidates),
    export, read back, evaluate."""
    t0 = time.perf_counter()
    row = quantize_and_evaluate(ws, assignment, save_to=where, problem=problem)
    row["transformers"] = transformers_reads(where)
    row.update(vllm_reads(ws, row, where, assignment))
    row["seconds"] = time.perf_counter() - t0
    shutil.rmtree(where, ignore_errors=True)
    if isinstance(assignment, dict):  # what the allocator chose: the share of the weights at each width
        weights = dict(zip(problem.modules, problem.params.tolist()))
        row["width_share"] = {b: round(sum(weights[m] for m, w in assignment.items() if w == b) / sum(weights.values()),
                                       4) for b in problem.bits}
    keep = ("avg_bits", "effective_bits", "total_bytes", "checkpoint_bytes", "perplexity", "perplexity_se",
            "kl_divergence", "kl_divergence_se", "kl_tokens", "eval_tokens", "transformers", "seconds", "width_share",
            *LOADERS)
    return {k: row[k] for k in keep if k in row}


LOADERS = ("loads_in", "unchecked", "vllm", "vllm_perplexity", "vllm_perplexity_se", "vllm_eval_seconds",
           "vllm_backend")


def recheck(ws: Workspace, assignment: dict | int, where: Path, problem, recorded: dict) -> dict:
    """``--loaders-only``: the recorded variant rebuilt (the same bytes, or refused), exported and
    read back, and its loader checks besides transformers' (recorded already) run; the recorded row
    with them added."""
    row, _, _ = quantize_variant(ws, assignment, save_to=where, problem=problem)
    if row["total_bytes"] != recorded["total_bytes"]:
        raise SystemExit(f"{where.name}: rebuilt with {row['total_bytes']:,} bytes, recorded with "
                         f"{recorded['total_bytes']:,}: not the variant of the results file; rerun it whole")
    row.update(vllm_reads(ws, row, where, assignment))
    shutil.rmtree(where, ignore_errors=True)
    checked = {k: row[k] for k in LOADERS if k in row}
    return {**recorded, **checked, "loaders_commit": commit()}


def run(profile: str, quantizer: str, allocators: list[str], args) -> list[dict]:
    cfg = config(profile, quantizer, args)
    ws = Workspace(cfg)
    problem = ws.problem()
    out = WORK / profile / quantizer / "checkpoints"
    rows = []
    base = {"profile": profile, "quantizer": quantizer}
    recorded = {tuple(r[k] for k in KEY): r for r in json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
                } if args.loaders_only else {}

    def variant(method: str, budget: float, assignment: dict | int) -> dict:
        where = out / f"{method}-{budget:g}"
        if args.loaders_only:
            return recheck(ws, assignment, where, problem, recorded[profile, quantizer, method, budget])
        return {**base, "method": method, "budget": budget, **measure(ws, assignment, where, problem)}

    for bits in cfg.uniform_bits if args.references else []:
        rows.append(variant(f"uniform-{bits}", float(bits), bits))
        console.print(f"{profile} {quantizer} uniform-{bits}: {rows[-1]}")
        save(rows, args)
    for name in allocators:
        allocator, _ = prepared_allocator(ws, name, problem, WORK / "tables")
        for budget in cfg.stage2.budgets:
            try:
                result = allocator.allocate(problem, budget)
            except ValueError as err:
                rows.append({**base, "method": name, "budget": budget, "error": str(err)})
                continue
            timing = {"allocate_seconds": result.seconds, "prepare_seconds": result.prepare_seconds}
            rows.append({**(timing if not args.loaders_only else {}), **variant(name, budget, result.assignment)})
            row = rows[-1]
            console.print(f"{profile} {quantizer} {name} {budget:g}: ppl {row['perplexity']:.2f} "
                          f"kl {row['kl_divergence']:.4f} bytes {row['total_bytes']:,.0f} {row['transformers']} "
                          f"vllm: {row.get('vllm', 'not checked')}")
            save(rows, args)
    return rows


def save(rows: list[dict], args) -> None:
    if args.recipe:
        write_results(RECIPES, settings(args), [{**r, "recipe": args.recipe} for r in rows], RECIPE_KEY)
    else:
        write_results(args.name, settings(args), rows, KEY)


def settings(args) -> dict:
    return {"profiles": PROFILES,
            "eval_tokens": args.tokens, "kl_tokens": args.kl_tokens,
            "gptq": "Hessians from the full-precision model; variants made of the problem's candidates",
            "params": "params.yaml defaults otherwise (Stage I: 100 steps, 16 calibration sequences)",
            "overrides": args.set}


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in json.loads(path.read_text())["rows"] if "error" not in r]
    profiles = [p for p in PROFILES if any(r["profile"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, profile in zip(axes[0], profiles):
        for (q, m) in sorted({(r["quantizer"], r["method"].split("-")[0]) for r in rows if r["profile"] == profile}):
            pts = sorted((r["total_bytes"] / 2**20, r["perplexity"]) for r in rows
                         if r["profile"] == profile and r["quantizer"] == q and r["method"].split("-")[0] == m)
            ax.plot(*zip(*pts), marker="o" if q == "rtn" else "s", linestyle="-" if q == "rtn" else "--",
                    label=f"{m} ({q})")
        ax.set(title=profile, xlabel="checkpoint tensors (MiB)", ylabel="perplexity", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


METHODS = {"gamma": "GAMMA", "hawq": "Fisher proxy", "uniform": "best two-level split"}


def _ppl(r: dict) -> str:
    return " ± ".join(f"{v:,.0f}" if r["perplexity"] >= 1000 else f"{v:.1f}"
                      for v in (r["perplexity"], r["perplexity_se"]))


def _cell(r: dict) -> str:
    """A row's perplexity ± SE, then its KL divergence in brackets."""
    return f"{_ppl(r)} ({r['kl_divergence']:.3f})"


def table(rows: list[dict], profile: str) -> str:
    """docs/serving_profiles.md's table of ``profile``: per quantizer and method the perplexity ± SE
    and the KL divergence at each budget (the lowest perplexity of a quantizer and budget in bold),
    then a line of the uniform references."""
    budgets = PROFILES[profile]["stage2.budgets"]
    mine = {(r["quantizer"], r["method"], r["budget"]): r for r in rows if r["profile"] == profile and "error" not in r}
    lines = ["| quantizer | method | " + " | ".join(f"{b:g} bits" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    refs = []
    for q in ("rtn", "gptq"):
        best = {b: min((r["perplexity"] for (rq, m, rb), r in mine.items() if rq == q and rb == b and m in METHODS),
                       default=None) for b in budgets}
        for m, label in METHODS.items():
            if not any((q, m, b) in mine for b in budgets):
                continue
            cells = []
            for b in budgets:
                r = mine.get((q, m, b))
                cell = "not run" if r is None else _cell(r)
                cells.append(f"**{cell}**" if r and r["perplexity"] == best[b] else cell)
            lines.append(f"| {q.upper()} | {label} | " + " | ".join(cells) + " |")
        uniform = sorted((r["budget"], r) for (rq, m, _), r in mine.items() if rq == q and m.startswith("uniform-"))
        if uniform:
            refs.append(f"{q.upper()} uniform " + ", ".join(f"{b:g} bits {_cell(r)}" for b, r in uniform))
    return "\n".join(lines) + ("\n\n" + "; ".join(refs) + "." if refs else "")


def loaders_table(rows: list[dict]) -> str:
    """docs/serving_profiles.md's loaders table: per profile and quantizer, how many variants each
    loader read (transformers: identical logits; vLLM: config, weights and one forward), vLLM's
    refusals by their first words, and vLLM's perplexity of uniform 4-bit against transformers'."""
    lines = ["| profile | quantizer | variants | transformers reads | vLLM reads | vLLM refuses "
             "| uniform 4-bit through vLLM (transformers) |", "|---|---|---|---|---|---|---|"]
    for profile in PROFILES:
        for q in ("rtn", "gptq"):
            mine = [r for r in rows if (r["profile"], r["quantizer"]) == (profile, q) and "error" not in r]
            if not mine:
                continue
            checked = [r for r in mine if "vllm" in r]
            refusals = sorted({r["vllm"].split(". ")[0] for r in checked if r["vllm"] != "accepted"})
            w4 = [r for r in mine if "vllm_perplexity" in r]
            lines.append(f"| {profile} | {q.upper()} | {len(mine)} | "
                         f"{sum(r['transformers'] == 'accepted' for r in mine)} | "
                         f"{sum(r['vllm'] == 'accepted' for r in checked)} of {len(checked)} checked | "
                         f"{'; '.join(refusals) or '-'} | "
                         + (", ".join(f"{r['vllm_perplexity']:.3f} ({r['perplexity']:.3f})" for r in w4) or "-") + " |")
    return "\n".join(lines)


def recipes_table(rows: list[dict], profile: str, quantizer: str) -> str:
    """GAMMA under each Stage I recipe of ``RECIPES`` (and the profile's own rows), per budget."""
    budgets = PROFILES[profile]["stage2.budgets"]
    cells = {(r["recipe"], r["budget"]): r for r in rows if (r["profile"], r["quantizer"]) == (profile, quantizer)}
    lines = ["| Stage I recipe | " + " | ".join(f"{b:g} bits" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for recipe in dict.fromkeys(r for r, _ in cells):
        lines.append(f"| {recipe} | " + " | ".join(
            _cell(cells[recipe, b]) if (recipe, b) in cells else "not run" for b in budgets) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--allocators", default="gamma,hawq,uniform")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out evaluation tokens (perplexity)")
    ap.add_argument("--kl-tokens", type=int, default=4096, help="tokens of the KL divergence")
    ap.add_argument("--no-references", dest="references", action="store_false",
                    help="skip the uniform rows at each candidate width (a rerun of one allocator)")
    ap.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    ap.add_argument("--name", default="serving_profiles", help="results file name (a smoke run keeps its own)")
    ap.add_argument("--recipe", default="", help=f"a label for other Stage I settings (--set): rows go to "
                                                  f"{RECIPES}.json under it, not to the profiles' results")
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of the results file and stop")
    ap.add_argument("--loaders-only", action="store_true",
                    help="rebuild the recorded variants and add only their loader checks to their rows")
    args = ap.parse_args()
    if args.tables:
        rows = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
        print("\n\n".join(f"{p}\n\n{table(rows, p)}" for p in PROFILES))
        print(f"\nloaders\n\n{loaders_table(rows)}")
        if (RESULTS / f"{RECIPES}.json").exists():
            recipes = json.loads((RESULTS / f"{RECIPES}.json").read_text())["rows"]
            for profile, quantizer in dict.fromkeys((r["profile"], r["quantizer"]) for r in recipes):
                print(f"\n{RECIPES}: {profile} {quantizer}\n\n" + recipes_table(recipes, profile, quantizer))
        return
    for quantizer in args.quantizers.split(","):
        for profile in args.profiles.split(","):
            run(profile, quantizer, args.allocators.split(","), args)
            plot(RESULTS / f"{args.name}.json")


if __name__ == "__main__":
    main()
