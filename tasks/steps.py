"""One-screen Prefect tasks over the library's steps."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task

from gamma import steps
from gamma.config import GammaConfig
from gamma.scores import ScoreTable
from gamma.workspace import Workspace


@task(name="prepare inputs", retries=1)
def prepare(cfg: GammaConfig) -> dict:
    ws = Workspace(cfg)
    return {"model_dir": str(ws.model_dir), "model_md5": ws.model_hash, "text_md5": ws.text_hash}


@task(name="learn preferences (Stage I)")
def learn(cfg: GammaConfig, hashes: dict) -> str:
    """Stage I, skipped when a table for the same model, text and settings already exists."""
    log = get_run_logger()
    out = Path(cfg.output_dir)
    path = out / "scores.json"
    ws = Workspace(cfg)
    if path.exists():
        table = ScoreTable.load(path)
        if (table.model_hash, table.text_hash, table.settings) == (
            hashes["model_md5"], hashes["text_md5"], json.loads(json.dumps(steps.stage1_settings(ws)))
        ):
            log.info("Stage I cache hit: reusing %s (same model, text and settings)", path)
            return str(path)
    log.info("Stage I: learning preferences at %.2f bits", cfg.stage1.budget)
    table = steps.learn_score_table(ws, checkpoint=out / "stage1.ckpt")
    table.save(path)
    return str(path)


@task(name="solve, quantize and evaluate one budget")
def variant(cfg: GammaConfig, scores_path: str, budget: float) -> dict:
    table = ScoreTable.load(scores_path)
    result = steps.allocate(table, [budget], cfg)[budget]
    if isinstance(result, Exception):
        return {"budget": budget, "method": "gamma", "error": str(result)}
    out = Path(cfg.output_dir) / "assignments"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{budget:g}.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    row = steps.quantize_and_evaluate(Workspace(cfg), result.assignment)
    return {"budget": budget, "method": "gamma", "solve_status": result.status,
            "solve_seconds": result.solve_seconds, **row}


@task(name="uniform baseline")
def uniform(cfg: GammaConfig, bits: int) -> dict:
    return {"budget": float(bits), "method": "uniform", **steps.quantize_and_evaluate(Workspace(cfg), bits)}
