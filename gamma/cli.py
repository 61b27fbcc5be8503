"""The ``gamma`` command line.

  gamma prepare                      convert the model and prepare the text
  gamma uniform --bits 2,3,4         quantize uniformly and evaluate (baselines)
  gamma learn                        Stage I: learn the preference score table (once)
  gamma allocate --budgets 2.5,3     Stage II: solve any budgets from the saved table (seconds)
  gamma quantize --budget 2.5        apply an allocation, save the model, evaluate it
  gamma run                          the main job: all of the above on params.yaml
  gamma promote --budget 2.5 --alias production   move a registry alias through the promotion gate
  gamma promote --alias production   the gate for every registered budget (promotion flow)
  gamma rollback --budget 2.5 --alias production  give the alias back to its previous holder
  gamma rollout --fleet fleet.yaml   rollout manifest for a fleet; each class's bytes solved on demand
  gamma serve                        cron deployments of the pipeline and the re-evaluation (Prefect server)
  gamma profiles                     the serving profiles: the widths, units, Stage I recipe and budgets each sets

Every command reads params.yaml (``--params``) and accepts ``--set key=value`` overrides.
The orchestrated pipeline (Prefect, MLflow, DVC) lives in ``flows/`` and is imported lazily.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from gamma.config import SUPPORTED_BITS, ConfigError, GammaConfig, load_config, parse_overrides
from gamma.progress import console, print_table
from gamma.stage2.budgets import budget_label, budget_stem, budget_text, parse_budget, parse_budgets


def _parse_list(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"cannot read {text!r} as a comma-separated list of finite numbers")
    return values


DEFAULT_PARAMS = "params.yaml"


class AllFailed(Exception):
    """Every item a command was asked for failed (each was reported): the command exits 1."""


def _out(cfg: GammaConfig) -> Path:
    p = Path(cfg.output_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cmd_prepare(cfg: GammaConfig, args) -> None:
    from gamma.run.workspace import Workspace

    ws = Workspace(cfg)
    ws.text = ws.prepare_text(reuse=False)  # the DVC stage: extract afresh, whatever is there
    console.print(f"model: {ws.model_dir} (md5 {ws.model_hash[:12]})")
    console.print(f"text:  {ws.text.calibration} (md5 {ws.text_hash[:12]}), {ws.text.evaluation}")


def cmd_uniform(cfg: GammaConfig, args) -> list[dict]:
    from gamma.run.variant import evaluate_model, quantize_and_evaluate
    from gamma.run.workspace import Workspace

    ws = Workspace(cfg)
    bits = _parse_list(args.bits, int) if getattr(args, "bits", None) else cfg.uniform_bits
    if any(b not in SUPPORTED_BITS for b in bits):  # before the unquantized model is evaluated
        raise ConfigError(f"--bits {args.bits}: bit widths must be among {SUPPORTED_BITS}")
    model, tok = ws.load()
    ws.reference(model)  # from this copy: no second load
    rows = [{"method": "unquantized", "avg_bits": 16.0, **evaluate_model(ws, model, tok)}]
    hessians = ws.reusable_hessians(model)
    del model
    for b in bits:
        rows.append({"method": f"uniform-{b}", **quantize_and_evaluate(ws, b, hessians)})
    print_table(rows, f"uniform baselines ({cfg.quantizer.method})")
    (_out(cfg) / "uniform.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return rows


def cmd_learn(cfg: GammaConfig, args) -> Path:
    from gamma.run.plots import plot_learning_curves
    from gamma.run.tables import CURVES_FILE, SCORES_FILE, Band, learn_in_process_group, table_dir
    from gamma.run.workspace import Workspace
    from gamma.stage1.data_parallel import in_process_group
    from gamma.stage1.learn import CHECKPOINT_FILE

    ws = Workspace(cfg)
    out = _out(cfg)
    if in_process_group():  # one of the processes `accelerate launch` started
        path = Path(args.out) if args.out else out / SCORES_FILE
        learn_in_process_group(ws, path.parent / CHECKPOINT_FILE, path)  # each table its own checkpoint
        return path
    band = Band(ws)
    for budget in cfg.stage1.training_budgets:  # one table per training budget, on one teacher capture
        where = table_dir(cfg, budget)
        table = band.learn(budget)
        path = where / SCORES_FILE
        plot_learning_curves(table.history, where / CURVES_FILE)
        console.print(f"score table: {path} ({len(table.modules)} modules x bits {table.bits}, learned at "
                      f"{budget:g} bits); E - B = {table.violation:+.4f} bits, lambda = {table.multiplier:.4g}, "
                      f"{table.wall_seconds:.0f}s, peak {table.peak_memory_mb:.0f} MB")
    return out / SCORES_FILE


def with_budgets(cfg: GammaConfig, text: str) -> GammaConfig:
    """``cfg`` serving the comma-separated budgets of ``text`` (``2.5,3``, ``95MB,120MB``), in their unit."""
    values = [x.strip() for x in str(text).split(",") if x.strip()]
    if not values:
        raise ConfigError(f"cannot read {text!r} as a comma-separated list of budgets (e.g. 2.5,3 or 95MB)")
    budgets, unit = parse_budgets(values, cfg.stage2.unit)
    data = cfg.model_dump()
    data["stage2"].update(budgets=budgets, unit=unit)
    try:  # validated whole: the allocators must solve budgets in this unit
        return GammaConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"--budgets {text}: {err.errors()[0]['msg']}") from None


def cmd_allocate(cfg: GammaConfig, args) -> dict:
    from gamma.run.plots import plot_allocation
    from gamma.run.tables import SCORES_FILE, check_tables, project_budget, table_dir
    from gamma.run.workspace import Workspace
    from gamma.stage2.scores import ScoreTable

    out = _out(cfg)
    if getattr(args, "budgets", None):
        cfg = with_budgets(cfg, args.budgets)
    budgets, unit = cfg.stage2.budgets, cfg.stage2.unit
    if getattr(args, "allocator", "gamma") != "gamma":
        return allocate_with(cfg, args.allocator, budgets)
    if args.scores:
        tables = [ScoreTable.load(p) for p in args.scores]
    else:  # every training budget's table that exists; the main one at least
        paths = [table_dir(cfg, b) / SCORES_FILE for b in cfg.stage1.training_budgets]
        tables = [ScoreTable.load(p) for p in paths if p.exists()] or [ScoreTable.load(out / SCORES_FILE)]
    ws = Workspace(cfg)
    check_tables(tables, ws, ws.load()[0])  # a foreign table is refused
    (out / "assignments").mkdir(exist_ok=True)
    rows, results = [], {}
    for b in budgets:
        try:
            res = project_budget(tables, b, cfg)
        except ValueError as err:
            rows.append({"budget": budget_stem(b, unit), "status": "FAILED", "note": str(err)})
            continue
        results[b] = res
        stem = budget_stem(b, unit)
        (out / "assignments" / f"{stem}.json").write_text(json.dumps(res.as_dict(), indent=1) + "\n")
        plot_allocation(res.assignment, out / "assignments" / f"{stem}.png",
                        f"GAMMA allocation at {budget_text(b, unit)}")
        rows.append({"budget": budget_stem(b, unit), "status": res.status, "bits used": f"{res.bits_used:.4f}",
                     "used": f"{res.used:,.0f}" if unit == "bytes" else f"{res.used:.4f}",
                     "slack": f"{res.slack:,.0f}" if unit == "bytes" else f"{res.slack:.4f}", "gap": f"{res.gap:.1e}",
                     "seconds": f"{res.solve_seconds:.2f}", "note": "; ".join(res.notes)})
    print_table(rows, "Stage II (from the saved score table; Stage I not rerun)",
                ["budget", "status", "bits used", *(["used"] if unit != "nominal" else []), "slack", "gap",
                 "seconds", "note"])
    if not results:
        raise AllFailed(f"no budget could be allocated ({', '.join(r['budget'] for r in rows)})")
    return results


def allocate_with(cfg: GammaConfig, allocator: str, budgets: list[float]) -> dict:
    """Another allocator than GAMMA: allocate, quantize, export and evaluate each budget."""
    from gamma.allocators import ALLOCATORS, AllocatorError
    from gamma.config import check_budget_unit, check_keeps_units
    from gamma.run.variant import allocate_and_evaluate, failed
    from gamma.run.workspace import Workspace

    if allocator not in ALLOCATORS:
        raise AllocatorError(f"unknown allocator {allocator!r}; choose one of {sorted(ALLOCATORS)}")
    check_keeps_units(allocator, cfg.allocation.ties, cfg.allocation.experts)
    check_budget_unit(allocator, cfg.stage2.unit)
    ws, out, rows = Workspace(cfg), _out(cfg), {}
    ws.check_shapes()  # the same for every budget: refused once, before any
    (out / "assignments").mkdir(exist_ok=True)
    for b in budgets:
        stem = f"{allocator}-{budget_stem(b, cfg.stage2.unit)}"
        try:
            row = allocate_and_evaluate(ws, allocator, b, save_to=out / "models" / stem)
        except ValueError as err:
            console.print(f"[red]{allocator} at {budget_text(b, cfg.stage2.unit)}: {err}")
            rows[b] = failed(b, allocator, err)
            continue
        (out / "assignments" / f"{stem}.json").write_text(row.pop("allocation"))
        if "score_table" in row:  # gamma-blocks: the block table it projected from
            table = row.pop("score_table")
            table.save(out / f"{allocator}-scores-{table.training_budget:g}.json")
        rows[b] = row
    print_table([{**r, "method": f"{allocator}-{budget_label(b, cfg.stage2.unit)}"} for b, r in rows.items()
                 if "error" not in r],
           f"{allocator}: allocations in {out / 'assignments'}, models in {out / 'models'}")
    if all("error" in r for r in rows.values()):
        raise AllFailed(f"{allocator}: no budget could be allocated "
                        f"({', '.join(budget_label(b, cfg.stage2.unit) for b in rows)})")
    return rows


def cmd_quantize(cfg: GammaConfig, args) -> dict:
    from gamma.run.variant import quantize_and_evaluate
    from gamma.run.workspace import Workspace

    out = _out(cfg)
    if args.assignment:
        path = Path(args.assignment)
    else:
        budget, unit = parse_budget(args.budget, cfg.stage2.unit)
        path = out / "assignments" / f"{budget_stem(budget, unit)}.json"
    if not path.exists():
        raise SystemExit(f"error: no assignment at {path}; run `gamma allocate --budgets {args.budget}` first")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path} is not an assignment file (not JSON: {err})") from None
    assignment = data.get("assignment", data) if isinstance(data, dict) else data
    if not isinstance(assignment, dict) or not assignment or \
            not all(isinstance(b, int) and not isinstance(b, bool) for b in assignment.values()):
        raise ConfigError(f"{path} is not an assignment file: expected {{module: bits}}, got {str(data)[:60]!r}")
    name = path.stem
    row = quantize_and_evaluate(Workspace(cfg), assignment, save_to=out / "models" / name)
    row["method"] = f"gamma-{name}"
    print_table([row], f"quantized model saved to {out / 'models' / name}")
    return row


def cmd_profiles(cfg: GammaConfig, args) -> None:
    from gamma.operations.profiles import PROFILE_SETTINGS, PROFILES

    def value(v) -> str:
        return (",".join(map(str, v)) or "none") if isinstance(v, (list, tuple)) else str(v)

    rows = [{"setting": "engine", **{n: p.engine for n, p in PROFILES.items()}},
            {"setting": "loaders checked", **{n: value(p.loads_in) for n, p in PROFILES.items()}}]
    rows += [{"setting": k, **{n: value(p.settings[k]) for n, p in PROFILES.items()}} for k in PROFILE_SETTINGS]
    print_table(rows, "serving profiles: each sets what params.yaml and --set leave out", ["setting", *PROFILES])
    own = [k for k in PROFILE_SETTINGS if k not in cfg.serving.from_profile]
    console.print(f"this configuration: serving.profile={cfg.serving.profile}"
                  + (f"; it gives its own {', '.join(own)}" if own else "; every setting above from the profile"))


def cmd_run(cfg: GammaConfig, args) -> None:
    from flows.pipeline import run_pipeline

    run_pipeline(params=args.params, overrides=parse_overrides(args.set), use_dvc=not args.no_dvc)


def cmd_promote(cfg: GammaConfig, args) -> None:
    from gamma.run.workspace import Workspace
    from tasks.tracking import names_for, promote

    if args.budget is None:  # every registered budget, as the scheduled promotion flow does
        from flows.promotion import promotion_flow

        decisions = promotion_flow(params=args.params, alias=args.alias, overrides=parse_overrides(args.set))
    else:
        budget, unit = parse_budget(args.budget, cfg.stage2.unit)
        names = names_for(cfg, Workspace(cfg).model_dir).in_unit(unit)
        decision = promote(cfg, names, budget, args.alias, args.version)
        decisions = [{"budget": budget, "unit": unit, **decision.as_dict()}]
    if not decisions:
        raise AllFailed(f"nothing is registered to promote to alias {args.alias!r}: run `gamma run` first")
    for d in decisions:
        verdict = "[green]promoted[/green]" if d["promote"] else "[red]refused[/red]"
        console.print(f"{budget_text(d['budget'], d.get('unit', cfg.stage2.unit))} -> alias '{args.alias}': {verdict}")
        for reason in d["reasons"]:
            console.print(f"  - {reason}")
    if not all(d["promote"] for d in decisions):
        raise SystemExit(1)


def cmd_rollback(cfg: GammaConfig, args) -> None:
    from gamma.run.workspace import Workspace
    from tasks.tracking import names_for, rollback

    budget, unit = parse_budget(args.budget, cfg.stage2.unit)
    names = names_for(cfg, Workspace(cfg).model_dir).in_unit(unit)
    previous = rollback(cfg, names, budget, args.alias)
    console.print(f"{names.variant(budget)}: alias '{args.alias}' "
                  + (f"back on version {previous}" if previous else "removed (no earlier holder)"))


def cmd_serve(cfg: GammaConfig, args) -> None:
    from flows.deploy import serve_deployments

    console.print(f"serving the pipeline ({cfg.schedule.pipeline_cron}) and the re-evaluation "
                  f"({cfg.schedule.reevaluate_cron}) against the Prefect server at PREFECT_API_URL")
    serve_deployments(params=args.params, overrides=parse_overrides(args.set))


def cmd_rollout(cfg: GammaConfig, args) -> None:
    from flows.rollout import MANIFEST_FILE, fleet_rollout
    from gamma.operations.fleet import load_fleet
    from tasks.prepare import check_inputs

    load_fleet(args.fleet)  # a bad fleet file or setting is refused before the flow (and its server) starts
    check_inputs(cfg)
    manifest = fleet_rollout(args.fleet, params=args.params, overrides=parse_overrides(args.set))
    for e in manifest["classes"]:
        v = e["variant"]
        console.print(f"{e['class']} (x{e['count']}, {e['model_budget_mb']} MB): "
                      + (f"{v['name']} v{v['version']} [{e['note']}]" if v else e["note"]))
    console.print(f"manifest: {Path(cfg.output_dir) / 'rollout' / MANIFEST_FILE}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gamma",
        description="GAMMA: learn once how many bits each linear module deserves (Stage I), then serve any "
        "average-bit budget by re-solving an exact knapsack (Stage II).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=DEFAULT_PARAMS, help="configuration file (default: params.yaml)")
    common.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a setting, e.g. --set stage1.steps=20 (repeatable)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("prepare", parents=[common], help="convert the model and prepare calibration/evaluation text")
    u = sub.add_parser("uniform", parents=[common], help="quantize uniformly and evaluate (baseline table)")
    u.add_argument("--bits", help="comma-separated bit widths (default: uniform_bits in params.yaml)")
    lr = sub.add_parser("learn", parents=[common], help="Stage I: learn the preference score table")
    lr.add_argument("--out", help="score table file, for launched processes (default: <output_dir>/scores.json)")
    a = sub.add_parser("allocate", parents=[common], help="Stage II: solve budgets from a saved score table")
    a.add_argument("--budgets", help="comma-separated budgets: average bits (2.25,2.5,3) or checkpoint bytes "
                   "(95MB,120MB; B/kB/MB/GB/KiB/MiB/GiB)")
    a.add_argument("--allocator", default="gamma", help="gamma (Stage II from the score tables) or another "
                   "allocator (gamma-blocks, uniform, hawq, higgs, scalebits, windquant, evopress): allocates, "
                   "quantizes and evaluates each budget")
    a.add_argument("--scores", action="append", help="score table, repeatable: each budget is projected from the "
                   "table learned nearest to it (default: the tables of stage1.budget and stage1.extra_budgets)")
    q = sub.add_parser("quantize", parents=[common], help="apply an allocation, save and evaluate the model")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="use the assignment `gamma allocate` saved for this budget (2.5, 95MB)")
    g.add_argument("--assignment", help="an assignment JSON file (module -> bits)")
    r = sub.add_parser("run", parents=[common], help="the whole pipeline on params.yaml (Prefect flow, MLflow, DVC)")
    r.add_argument("--no-dvc", action="store_true",
                   help="do not reproduce/push the DVC prepare stage (dvc repro uses it)")
    pr = sub.add_parser("promote", parents=[common], help="move an MLflow alias to a variant, only through the gate")
    pr.add_argument("--budget", help="the variant's budget, e.g. 2.5 or 95MB (default: every registered one)")
    pr.add_argument("--alias", required=True, help="e.g. production")
    pr.add_argument("--version", help="model version to promote (default: the newest)")
    rb = sub.add_parser("rollback", parents=[common], help="give an alias back to its previous holder")
    rb.add_argument("--budget", required=True, help="the variant's budget, e.g. 2.5 or 95MB")
    rb.add_argument("--alias", required=True)
    ro = sub.add_parser("rollout", parents=[common],
                        help="fleet file -> rollout manifest (each class's bytes solved on demand)")
    ro.add_argument("--fleet", required=True,
                    help="fleet YAML: classes of name, memory_mb, kv_cache_reserve_mb, count, engine")
    sub.add_parser("serve", parents=[common], help="cron deployments (pipeline, re-evaluation) on a Prefect server")
    sub.add_parser("profiles", parents=[common], help="the serving profiles and the settings each one gives a run")
    return p


COMMANDS = {"prepare": cmd_prepare, "uniform": cmd_uniform, "learn": cmd_learn, "allocate": cmd_allocate,
            "quantize": cmd_quantize, "run": cmd_run, "promote": cmd_promote, "rollback": cmd_rollback,
            "rollout": cmd_rollout, "serve": cmd_serve, "profiles": cmd_profiles}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.params != DEFAULT_PARAMS and not Path(args.params).is_file():  # a typo must not run on defaults
            raise ConfigError(f"--params {args.params}: no such file (without --params, ./{DEFAULT_PARAMS} is read "
                              "when it exists, and every default applies when it does not)")
        cfg = load_config(args.params, parse_overrides(args.set))
        COMMANDS[args.command](cfg, args)
    except ConfigError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    except ValueError as err:  # every input error of the library is a ValueError subclass with a clear message
        console.print(f"[red]error:[/red] {err}")
        return 2
    except AllFailed as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
