"""The fan-out tasks: one budget each (GAMMA's Stage II from the registered tables, a uniform
baseline, or a competing allocator), quantized, exported, evaluated and registered. A budget that
cannot be served is returned as a failed record (``gamma.run.variant.failed``), never retried."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from gamma.config import GammaConfig
from gamma.run.plots import plot_allocation
from gamma.run.tables import SCORES_FILE, check_tables, project_budget
from gamma.run.variant import allocate_and_evaluate, failed, quantize_and_evaluate
from gamma.stage2.budgets import budget_label, budget_text
from gamma.stage2.scores import ScoreTable
from tasks import tracking
from tasks.prepare import lineage, workspace


def _register(cfg: GammaConfig, inputs: dict, parent_run: str, name: str, run_name: str, row: dict,
              files: list[Path], tags: dict, checkpoint: Path | None = None) -> str:
    client, experiment = tracking.client_for(cfg)
    with tracking.child_run(client, experiment, parent_run, run_name, "variant") as run_id:
        version = tracking.register_variant(client, run_id, name, row, files, {**lineage(inputs), **tags},
                                            checkpoint if cfg.tracking.log_checkpoints else None)
    return f"{name} v{version.version}"


@task(name="solve, quantize and evaluate one budget")
def variant(cfg: GammaConfig, scores: dict | list[dict], budget: float, inputs: dict, parent_run: str) -> dict:
    """Stage II from the registered scores (of several tables, the one learned nearest ``budget``),
    then quantize, evaluate and register ``<model>-<budget>bit``."""
    log = get_run_logger()
    t0 = time.perf_counter()
    label = budget_label(budget, cfg.stage2.unit)
    scores = scores if isinstance(scores, list) else [scores]
    tables = [ScoreTable.load(s["path"]) for s in scores]
    ws = workspace(cfg, inputs)
    loaded = ws.load()
    check_tables(tables, ws, loaded[0])
    try:
        result = project_budget(tables, budget, cfg)
    except ValueError as err:  # an infeasible budget is an answer, not a crash: no retry
        log.error("budget %s: %s", label, err)
        return failed(budget, "gamma", err)
    out = Path(cfg.output_dir) / "variants" / label
    out.mkdir(parents=True, exist_ok=True)
    assignment = out / "allocation.json"
    assignment.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    picture = plot_allocation(result.assignment, out / "allocation.png", budget_text(budget, cfg.stage2.unit))
    used = next(s for s, t in zip(scores, tables) if t.training_budget == result.training_budget)
    checkpoint = out / "checkpoint"
    row = quantize_and_evaluate(ws, result.assignment, save_to=checkpoint, loaded=loaded)
    row = {"budget": budget, "budget_unit": cfg.stage2.unit, "method": "gamma", "solve_status": result.status,
           "solve_gap": result.gap,
           "solve_seconds": result.solve_seconds, "training_budget": result.training_budget, **row}
    names = tracking.names_for(cfg, inputs["model_dir"])
    row["registered"] = _register(
        cfg, inputs, parent_run, names.variant(budget), label, row, [assignment, picture],
        {"score_model": used["name"], "score_version": used["version"], "budget": budget, "method": "gamma",
         "allocator": "gamma",
         "training_budget": result.training_budget,
         "solve_status": result.status, "checkpoint": checkpoint.resolve(),
         "checkpoint_sha256": row["checkpoint_sha256"], "checkpoint_format": "compressed-tensors"}, checkpoint)
    row["task_seconds"] = time.perf_counter() - t0  # what this budget cost, from the scores to its registration
    log.info("budget %g: perplexity %.2f, registered %s", budget, row["perplexity"], row["registered"])
    return row


@task(name="uniform baseline")
def uniform(cfg: GammaConfig, bits: int, inputs: dict, parent_run: str) -> dict:
    row = {"budget": float(bits), "method": "uniform", **quantize_and_evaluate(workspace(cfg, inputs), bits)}
    # a reference point, not a deployable variant: said on its version rather than left without loads_in
    row["unchecked"] = {"loaders": "a uniform baseline, evaluated in memory for comparison and not exported: "
                                   "no checkpoint for a loader to read"}
    names = tracking.names_for(cfg, inputs["model_dir"])
    row["registered"] = _register(cfg, inputs, parent_run, names.uniform(bits), f"uniform-{bits}bit", row, [],
                                  {"budget": bits, "method": "uniform"})
    return row


@task(name="allocate with another allocator, quantize and evaluate one budget")
def compared_variant(cfg: GammaConfig, allocator: str, budget: float, inputs: dict, parent_run: str) -> dict:
    """One budget from a competing allocator (``allocation.methods``), registered as
    ``<model>-<allocator>-<budget>bit`` with the allocator's name and costs; the allocator's
    one-off work (a Fisher pass, coefficients, a policy) is shared by the budgets of this process."""
    log = get_run_logger()
    t0 = time.perf_counter()
    ws = workspace(cfg, inputs)
    label = budget_label(budget, cfg.stage2.unit)
    out = Path(cfg.output_dir) / "variants" / allocator / label
    out.mkdir(parents=True, exist_ok=True)
    try:
        row = allocate_and_evaluate(ws, allocator, budget, save_to=out / "checkpoint")
    except ValueError as err:  # an infeasible budget or bad settings: an answer, not a crash
        log.error("%s at %s: %s", allocator, label, err)
        return failed(budget, allocator, err)
    row["budget_unit"] = cfg.stage2.unit
    allocation = out / "allocation.json"
    allocation.write_text(row.pop("allocation"))
    artifacts = [allocation]
    if "score_table" in row:  # gamma-blocks: its block table travels with every variant it produced
        artifacts.append(row.pop("score_table").save(out / SCORES_FILE))
    names = tracking.names_for(cfg, inputs["model_dir"])
    row["registered"] = _register(
        cfg, inputs, parent_run, names.allocated(allocator, budget), f"{allocator}-{label}", row, artifacts,
        {"budget": budget, "method": allocator, "allocator": allocator, "checkpoint": (out / "checkpoint").resolve(),
         "checkpoint_sha256": row.get("checkpoint_sha256"),
         "checkpoint_format": row.get("checkpoint_format", "compressed-tensors"),
         "prepare_seconds": row["prepare_seconds"], "metadata_bits": row["metadata_bits"]}, out / "checkpoint")
    row["task_seconds"] = time.perf_counter() - t0
    log.info("%s at %g bits: perplexity %.2f, registered %s", allocator, budget, row["perplexity"], row["registered"])
    return row
