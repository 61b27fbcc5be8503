"""Thin Prefect tasks over the library's steps; MLflow and DVC bookkeeping lives here, never in gamma/."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from gamma import steps
from gamma.config import GammaConfig
from gamma.distributed import learn_with_processes
from gamma.hashing import content_md5
from gamma.plots import plot_allocation, plot_learning_curves
from gamma.scores import ScoreTable
from gamma.workspace import Workspace
from tasks import registry
from tasks.data import dvc_root, reproduce_and_push


@task(name="prepare inputs", retries=1)
def prepare(cfg: GammaConfig, use_dvc: bool = True) -> dict:
    """Model directory and text, versioned with DVC where the project is a DVC repo; content hashes."""
    log = get_run_logger()
    root = dvc_root() if use_dvc and cfg.pipeline.dvc else None
    dvc = None
    if root is not None:
        dvc = reproduce_and_push(root)
        log.info("DVC: stage 'prepare' of %s reproduced, %s file(s) pushed to the default remote", root, dvc["pushed"])
    ws = Workspace(cfg)
    inputs = {"model_dir": str(ws.model_dir), "model_md5": ws.model_hash, "text_md5": ws.text_hash,
              "text_dir_md5": content_md5(ws.text.calibration.parent), "git_commit": registry.git_commit()}
    if dvc:
        inputs["dvc_outs"] = dvc["outs"]
    log.info("inputs: model md5 %s, calibration text md5 %s", inputs["model_md5"][:12], inputs["text_md5"][:12])
    return inputs


def _workspace(cfg: GammaConfig, inputs: dict) -> Workspace:
    return Workspace.shared(cfg, inputs["model_md5"], inputs["text_md5"])


def _lineage(inputs: dict) -> dict:
    return {"model_md5": inputs["model_md5"], "text_md5": inputs["text_md5"], "git_commit": inputs["git_commit"]}


def _table_key(cfg: GammaConfig, inputs: dict) -> tuple[Workspace, dict, str]:
    ws = _workspace(cfg, inputs)
    settings = json.loads(json.dumps(steps.stage1_settings(ws)))
    return ws, settings, steps.stage1_key(inputs["model_md5"], inputs["text_md5"], settings)


def registered_tables(cfg: GammaConfig, inputs: dict) -> list[dict]:
    """The registered score tables of every training budget of ``cfg`` (model, text and settings
    as now), downloaded; budgets with no registered table are left out."""
    client, _ = registry.client_for(cfg)
    names = registry.names_for(cfg, inputs["model_dir"])
    found = []
    for b in cfg.stage1.training_budgets:
        hit = registry.find_scores(client, names, _table_key(cfg.for_training_budget(b), inputs)[2])
        if hit is not None:
            path = registry.download_scores(client, hit, steps.table_dir(cfg, b) / "registered")
            found.append({"path": str(path), "name": names.scores, "version": hit.version, "cached": True,
                          "training_budget": b})
    return found


@task(name="learn preferences (Stage I)")
def learn(cfg: GammaConfig, inputs: dict, parent_run: str, budget: float | None = None) -> dict:
    """Stage I at ``budget`` (default ``stage1.budget``), or the registered score table when model,
    text and settings are the same."""
    log = get_run_logger()
    budget = cfg.stage1.budget if budget is None else budget
    out = steps.table_dir(cfg, budget)
    cfg = cfg.for_training_budget(budget)
    client, experiment = registry.client_for(cfg)
    names = registry.names_for(cfg, inputs["model_dir"])
    ws, settings, key = _table_key(cfg, inputs)
    hit = registry.find_scores(client, names, key)
    if hit is not None:
        path = registry.download_scores(client, hit, out / "registered")
        log.info("Stage I cache hit: reusing registered %s v%s (same model, text and settings, %g bits)",
                 names.scores, hit.version, budget)
        return {"path": str(path), "name": names.scores, "version": hit.version, "cached": True,
                "training_budget": budget}
    log.info("Stage I: learning preferences at %.2f bits (no registered table for key %s)", budget, key[:12])
    with registry.child_run(client, experiment, parent_run, f"stage1 ({budget:g} bits)", "stage1") as run_id:
        table = learn_with_processes(ws, out, on_line=log.info)  # over stage1.processes processes
        path = out / "scores.json"
        curves = plot_learning_curves(table.history, out / "stage1_curves.png")
        for k in ("training_budget", "multiplier", "penalty", "violation", "wall_seconds", "peak_memory_mb"):
            client.log_metric(run_id, k, float(getattr(table, k)))
        for step, (loss, viol) in enumerate(zip(table.history.get("loss", []), table.history.get("violation", []))):
            client.log_metric(run_id, "loss", float(loss), step=step)
            client.log_metric(run_id, "constraint_violation", float(viol), step=step)
        version = registry.register_scores(
            client, run_id, names, [path, curves],
            {**_lineage(inputs), "cache_key": key, "quantizer": json.dumps(table.quantizer),
             "training_budget": table.training_budget, "settings": json.dumps(settings)[:4000]})
    log.info("registered %s v%s", names.scores, version.version)
    return {"path": str(path), "name": names.scores, "version": version.version, "cached": False,
            "training_budget": budget}


def _register(cfg: GammaConfig, inputs: dict, parent_run: str, name: str, run_name: str, row: dict,
              files: list[Path], tags: dict, checkpoint: Path | None = None) -> str:
    client, experiment = registry.client_for(cfg)
    with registry.child_run(client, experiment, parent_run, run_name, "variant") as run_id:
        version = registry.register_variant(client, run_id, name, row, files, {**_lineage(inputs), **tags},
                                            checkpoint if cfg.tracking.log_checkpoints else None)
    return f"{name} v{version.version}"


@task(name="solve, quantize and evaluate one budget")
def variant(cfg: GammaConfig, scores: dict | list[dict], budget: float, inputs: dict, parent_run: str) -> dict:
    """Stage II from the registered scores (of several tables, the one learned nearest ``budget``),
    then quantize, evaluate and register ``<model>-<budget>bit``."""
    log = get_run_logger()
    t0 = time.perf_counter()
    scores = scores if isinstance(scores, list) else [scores]
    tables = [ScoreTable.load(s["path"]) for s in scores]
    ws = _workspace(cfg, inputs)
    loaded = ws.load()
    modules, sizes = ws.module_sizes(loaded[0])
    result = steps.allocate(tables, [budget], cfg, modules, sizes, inputs["model_md5"])[budget]
    if isinstance(result, Exception):  # an infeasible budget is an answer, not a crash: no retry
        log.error("budget %g: %s", budget, result)
        return {"budget": budget, "method": "gamma", "error": str(result)}
    out = Path(cfg.output_dir) / "variants" / f"{budget:g}bit"
    out.mkdir(parents=True, exist_ok=True)
    assignment = out / "allocation.json"
    assignment.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    picture = plot_allocation(result.assignment, out / "allocation.png", f"{budget:g} bits")
    used = next(s for s, t in zip(scores, tables) if t.training_budget == result.training_budget)
    checkpoint = out / "checkpoint"
    row = steps.quantize_and_evaluate(ws, result.assignment, save_to=checkpoint, loaded=loaded)
    row = {"budget": budget, "method": "gamma", "solve_status": result.status, "solve_gap": result.gap,
           "solve_seconds": result.solve_seconds, "training_budget": result.training_budget, **row}
    names = registry.names_for(cfg, inputs["model_dir"])
    row["registered"] = _register(
        cfg, inputs, parent_run, names.variant(budget), f"{budget:g}bit", row, [assignment, picture],
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
    row = {"budget": float(bits), "method": "uniform", **steps.quantize_and_evaluate(_workspace(cfg, inputs), bits)}
    names = registry.names_for(cfg, inputs["model_dir"])
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
    ws = _workspace(cfg, inputs)
    out = Path(cfg.output_dir) / "variants" / allocator / f"{budget:g}bit"
    out.mkdir(parents=True, exist_ok=True)
    try:
        row = steps.allocate_and_evaluate(ws, allocator, budget, save_to=out / "checkpoint")
    except ValueError as err:  # an infeasible budget or bad settings: an answer, not a crash
        log.error("%s at %g bits: %s", allocator, budget, err)
        return {"budget": budget, "method": allocator, "error": str(err)}
    allocation = out / "allocation.json"
    allocation.write_text(row.pop("allocation"))
    artifacts = [allocation]
    if "score_table" in row:  # gamma-blocks: its block table travels with every variant it produced
        artifacts.append(row.pop("score_table").save(out / "scores.json"))
    names = registry.names_for(cfg, inputs["model_dir"])
    row["registered"] = _register(
        cfg, inputs, parent_run, names.allocated(allocator, budget), f"{allocator}-{budget:g}bit", row, artifacts,
        {"budget": budget, "method": allocator, "allocator": allocator, "checkpoint": (out / "checkpoint").resolve(),
         "checkpoint_sha256": row.get("checkpoint_sha256"),
         "checkpoint_format": row.get("checkpoint_format", "compressed-tensors"),
         "prepare_seconds": row["prepare_seconds"], "metadata_bits": row["metadata_bits"]}, out / "checkpoint")
    row["task_seconds"] = time.perf_counter() - t0
    log.info("%s at %g bits: perplexity %.2f, registered %s", allocator, budget, row["perplexity"], row["registered"])
    return row
