"""Fleet rollout: a fleet file in, a rollout manifest out.

Each device class's budget is its model memory in bytes (``gamma.operations.fleet.needed_bytes``);
the budgets the registry lacks are solved directly in bytes from the registered scores (Stage II,
quantize, evaluate, register: no Stage I) and put through the promotion gate. Then every class
gets the best registered variant that fits and loads in its engine, by alias, with its checkpoint
URI and checksum. The manifest (JSON and a Markdown table) is written under
``<output_dir>/rollout`` and logged to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger

from gamma.config import GammaConfig, load_config
from gamma.operations.fleet import MB, bytes_range, load_fleet, needed_bytes, plan_rollout
from gamma.stage2.budgets import UNITS
from gamma.stage2.scores import ScoreTable
from tasks import tracking
from tasks.prepare import prepare
from tasks.stage1 import registered_tables
from tasks.variants import variant

MANIFEST_FILE = "manifest.json"


def in_bytes(cfg: GammaConfig) -> GammaConfig:
    """``cfg`` solving budgets in bytes (the fleet's unit)."""
    data = cfg.model_dump()
    data["stage2"].update(unit="bytes", budgets=[1])  # the budgets come from the fleet
    return GammaConfig.model_validate(data)


def reachable_bytes(cfg: GammaConfig, tables: list[dict]) -> tuple[int, int]:
    """The bytes range of this model's variants, from a registered score table's shapes."""
    table = ScoreTable.load(tables[0]["path"])
    if table.fixed_bytes is None:
        raise ValueError(f"score table {tables[0]['path']} predates bytes budgets (no fixed_bytes): run `gamma run` "
                         "once to learn it again before a rollout")
    q = cfg.quantizer
    return bytes_range(table.sizes, table.bits, q.group_size, q.symmetric, table.fixed_bytes, cfg.serving.zero_points)


def _registered_variants(client, names, alias: str) -> list[dict]:
    """The newest version and the alias holder of every registered GAMMA budget, in every unit,
    with what a manifest needs."""
    out = []
    for unit in UNITS:
        named = names.in_unit(unit)
        for budget in tracking.registered_budgets(client, named):
            name = named.variant(budget)
            holder = tracking.alias_holder(client, name, alias)
            newest = tracking.latest_version(client, name)
            for v in {x.version: x for x in (holder, newest) if x is not None}.values():
                m = tracking.version_metrics(v)
                out.append({"name": name, "version": v.version, "budget": budget, "unit": unit,
                            "bytes": m.get("total_bytes", float("inf")), "checkpoint_bytes": m.get("checkpoint_bytes"),
                            "perplexity": m.get("perplexity", float("inf")), "zero_shot": m.get("zero_shot"),
                            "loads_in": [x for x in v.tags.get("loads_in", "").split(",") if x],
                            "serving_profile": v.tags.get("serving_profile"),
                            "alias_holder": holder is not None and v.version == holder.version,
                            "checkpoint_uri": Path(v.tags["checkpoint"]).as_uri() if v.tags.get("checkpoint")
                            else v.source, "checkpoint_sha256": v.tags.get("checkpoint_sha256")})
    return out


def _write_manifest(out: Path, manifest: dict) -> Path:
    """``manifest.json`` and a readable ``manifest.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    lines = ["| class | count | engine | model MB | needed MB | variant | tensors MB | perplexity | loads in | alias "
             "| checksum |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in manifest["classes"]:
        v = e["variant"] or {}
        checksum = (v.get("checkpoint_sha256") or "")[:12]
        needed = "-" if e["needed_bytes"] is None else f"{e['needed_bytes'] / MB:.2f}"
        lines.append(f"| {e['class']} | {e['count']} | {e['engine'] or 'any'} | {e['model_budget_mb']} | {needed} | "
                     f"{v.get('name', '-')} v{v.get('version', '-')} | {v.get('bytes', 0) / MB:.2f} | "
                     f"{v.get('perplexity', float('nan')):.2f} | {','.join(v.get('loads_in', [])) or '-'} | "
                     f"{e['note']} | {checksum} |")
    (out / "manifest.md").write_text("\n".join(lines) + "\n")
    return out


@flow(name="gamma-fleet-rollout")
def fleet_rollout(fleet_file: str, params: str = "params.yaml", overrides: dict | None = None) -> dict:
    log = get_run_logger()
    cfg = load_config(params, overrides)
    fleet = load_fleet(fleet_file)
    inputs = prepare(cfg, use_dvc=False)
    client, experiment = tracking.client_for(cfg)
    names = tracking.names_for(cfg, inputs["model_dir"])
    tables = registered_tables(cfg, inputs)
    if not tables:
        raise ValueError(f"no registered score table {names.scores!r} for this model, text and Stage I settings: "
                         "run `gamma run` once before a rollout")

    reachable = reachable_bytes(cfg, tables)
    needed = {c.name: needed_bytes(c, reachable) for c in fleet.classes}
    solving = in_bytes(cfg)
    in_bytes_names = names.in_unit("bytes")
    missing = sorted({b for b in needed.values() if b is not None}
                     - set(tracking.registered_budgets(client, in_bytes_names)))
    with tracking.child_run(client, experiment, None, "fleet rollout", "rollout") as parent:  # FAILED on error
        on_demand = []
        for budget in missing:
            log.info("%s is needed by the fleet and not registered: solving it in bytes from the registered %s",
                     in_bytes_names.variant(budget), names.scores)
            t0 = time.perf_counter()
            row = variant(solving, tables, budget, inputs, parent)
            seconds = time.perf_counter() - t0
            gate = tracking.promote(solving, in_bytes_names, budget, fleet.alias) if "error" not in row else None
            on_demand.append({"budget": budget, "unit": "bytes", "seconds": seconds,
                              "registered": row.get("registered"), "error": row.get("error"),
                              "promoted": gate.promote if gate else False, "gate": gate.reasons if gate else None})

        entries = plan_rollout(fleet, _registered_variants(client, names, fleet.alias))
        for e in entries:
            e["needed_bytes"] = needed[e["class"]]
        manifest = {"fleet": fleet.model_dump(), "scores": tables, "on_demand": on_demand, "classes": entries}
        out = _write_manifest(Path(cfg.output_dir) / "rollout", manifest)
        for f in (MANIFEST_FILE, "manifest.md"):
            client.log_artifact(parent, str(out / f), "rollout")
    log.info("rollout manifest: %s", out / MANIFEST_FILE)
    return manifest
