"""Fleet rollout: a fleet file in, a rollout manifest out.

For each device class the budget it needs is the largest grid budget whose checkpoint fits; the
budgets the registry lacks are produced first, on demand, from the registered scores (Stage II,
quantize, evaluate, register: no Stage I) and put through the promotion gate. Then every class
gets the best registered variant that fits, by alias, with its checkpoint URI and checksum. The
manifest (JSON and a Markdown table) is written under ``<output_dir>/rollout`` and logged to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger

from gamma.config import load_config
from gamma.model.assignment import unquantized_parameters
from gamma.model.loading import quantizable_modules
from gamma.operations.fleet import MB, load_fleet, needed_budget, plan_rollout, predicted_bytes
from gamma.run.workspace import Workspace
from tasks import tracking
from tasks.prepare import prepare
from tasks.stage1 import registered_tables
from tasks.variants import variant

MANIFEST_FILE = "manifest.json"


def _size_model(ws: Workspace):
    """``budget -> predicted checkpoint bytes`` for the configured model and quantizer."""
    model, _ = ws.load()
    modules = quantizable_modules(model)
    sizes = [tuple(m.weight.shape) for m in modules.values()]
    others = unquantized_parameters(model, modules)
    other = sum(p.numel() for p in others)
    q = ws.cfg.quantizer
    return lambda b: predicted_bytes(b, sizes, other, q.group_size, q.symmetric, max(ws.cfg.candidates), len(others))


def _registered_variants(client, names, alias: str) -> list[dict]:
    """The newest version and the alias holder of every registered budget, with what a manifest needs."""
    out = []
    for budget in tracking.registered_budgets(client, names):
        name = names.variant(budget)
        holder = tracking.alias_holder(client, name, alias)
        newest = tracking.latest_version(client, name)
        for v in {x.version: x for x in (holder, newest) if x is not None}.values():
            m = tracking.version_metrics(v)
            out.append({"name": name, "version": v.version, "budget": budget,
                        "bytes": m.get("checkpoint_bytes", m.get("total_bytes", float("inf"))),
                        "perplexity": m.get("perplexity", float("inf")), "zero_shot": m.get("zero_shot"),
                        "alias_holder": holder is not None and v.version == holder.version,
                        "checkpoint_uri": Path(v.tags["checkpoint"]).as_uri() if v.tags.get("checkpoint") else v.source,
                        "checkpoint_sha256": v.tags.get("checkpoint_sha256")})
    return out


def _write_manifest(out: Path, manifest: dict) -> Path:
    """``manifest.json`` and a readable ``manifest.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    lines = ["| class | count | model MB | needed budget | variant | bytes MB | perplexity | alias | checksum |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in manifest["classes"]:
        v = e["variant"] or {}
        checksum = (v.get("checkpoint_sha256") or "")[:12]
        lines.append(f"| {e['class']} | {e['count']} | {e['model_budget_mb']} | {e['needed_budget']} | "
                     f"{v.get('name', '-')} v{v.get('version', '-')} | {v.get('bytes', 0) / MB:.2f} | "
                     f"{v.get('perplexity', float('nan')):.2f} | {e['note']} | {checksum} |")
    (out / "manifest.md").write_text("\n".join(lines) + "\n")
    return out


@flow(name="gamma-fleet-rollout")
def fleet_rollout(fleet_file: str, params: str = "params.yaml", overrides: dict | None = None) -> dict:
    log = get_run_logger()
    cfg = load_config(params, overrides)
    fleet = load_fleet(fleet_file)
    ws = Workspace(cfg)
    inputs = prepare(cfg, use_dvc=False)
    client, experiment = tracking.client_for(cfg)
    names = tracking.names_for(cfg, inputs["model_dir"])
    tables = registered_tables(cfg, inputs)
    if not tables:
        raise ValueError(f"no registered score table {names.scores!r} for this model, text and Stage I settings: "
                         "run `gamma run` once before a rollout")

    size_of = _size_model(ws)
    needed = {c.name: needed_budget(c, cfg.candidates, fleet.budget_step, size_of) for c in fleet.classes}
    missing = sorted({b for b in needed.values() if b is not None} - set(tracking.registered_budgets(client, names)))
    with tracking.child_run(client, experiment, None, "fleet rollout", "rollout") as parent:  # FAILED on error
        on_demand = []
        for budget in missing:
            log.info("budget %g is needed by the fleet and not registered: solving it from the registered %s",
                     budget, names.scores)
            t0 = time.perf_counter()
            row = variant(cfg, tables, budget, inputs, parent)
            seconds = time.perf_counter() - t0
            gate = tracking.promote(cfg, names, budget, fleet.alias) if "error" not in row else None
            on_demand.append({"budget": budget, "seconds": seconds, "registered": row.get("registered"),
                              "error": row.get("error"), "promoted": gate.promote if gate else False,
                              "gate": gate.reasons if gate else None})

        entries = plan_rollout(fleet, _registered_variants(client, names, fleet.alias))
        for e in entries:
            e["needed_budget"] = needed[e["class"]]
        manifest = {"fleet": fleet.model_dump(), "scores": tables, "on_demand": on_demand, "classes": entries}
        out = _write_manifest(Path(cfg.output_dir) / "rollout", manifest)
        for f in (MANIFEST_FILE, "manifest.md"):
            client.log_artifact(parent, str(out / f), "rollout")
    log.info("rollout manifest: %s", out / MANIFEST_FILE)
    return manifest
