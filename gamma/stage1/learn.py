"""Stage I end to end, the one entry every caller uses (the command line, the pipeline, the
data-parallel launcher, the learned allocators): teacher capture, proxy warm start, the training
loop, and the score table with everything that reproduces it."""

from __future__ import annotations

from pathlib import Path

import torch

from gamma.config import Stage1Config
from gamma.hashing import settings_hash
from gamma.problem import AllocationProblem, Provenance
from gamma.stage1.checkpoint import Checkpoint
from gamma.stage1.loop import learn_preferences
from gamma.stage1.proxy import costs_to_logits
from gamma.stage1.rows import LogitRows
from gamma.stage1.shard import Shard
from gamma.stage1.teacher import TeacherData
from gamma.stage2.scores import ScoreTable

CHECKPOINT_FILE = "stage1.ckpt"


def learn_score_table(problem: AllocationProblem, stage1: Stage1Config, *, teacher: TeacherData | None = None,
                      blocks=None, shard: Shard | None = None, checkpoint: str | Path | None = None,
                      device: str | None = None) -> ScoreTable:
    """Learn one score table at ``stage1.budget`` on ``problem``'s candidates.

    ``teacher``: a capture of the problem's calibration sequences to share (a band of tables
    learns on one); ``blocks``: column blocks (``allocators.column_blocks.ColumnBlocks``), one row
    of logits per block, named ``module#j``; ``shard``: this process's part of data-parallel
    Stage I; ``checkpoint``: a file to resume from and save to (a ``Checkpoint`` or a path)."""
    n = problem.calibration.shape[0]
    shard = (shard or Shard()).over(n)
    if teacher is None:
        held = len(shard.held())
        teacher = problem.capture(stage1.loss == "fisher", proxy=stage1.init == "proxy" and blocks is None,
                                  sequences=problem.calibration[shard.held()], device=device)
        if shard.world > 1 and teacher.proxy_costs is not None:  # per-process means -> the mean over all
            teacher.proxy_costs = shard.sum(torch.from_numpy(teacher.proxy_costs * held)).numpy() / n
    if blocks is None:
        rows = LogitRows(problem.model, problem.candidates, problem.bits, units=problem.units)
        names, sizes = problem.modules, problem.sizes
    else:
        rows = LogitRows(problem.model, blocks.candidates, problem.bits, blocks.layouts())
        names, sizes = blocks.row_names, blocks.row_sizes
    init = None
    if stage1.init == "proxy":
        costs = rows.per_unit(teacher.proxy_costs) if blocks is None else blocks.errors
        init = costs_to_logits(costs, rows.sizes, problem.bits, stage1.budget, stage1.proxy_scale, stage1.proxy_clip)
    settings = stage1_settings(stage1, problem.bits, problem.provenance)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(Path(checkpoint), stage1_key(problem.provenance, settings))
    result = learn_preferences(problem.model, teacher, rows, stage1, init, shard=shard, checkpoint=checkpoint,
                               device=device or problem.device)
    p = problem.provenance
    scores = rows.per_module(result.scores) if blocks is None else result.scores
    return ScoreTable(
        modules=names, sizes=sizes, bits=problem.bits, scores=scores.tolist(), model_hash=p.model_hash,
        text_hash=p.text_hash, quantizer=p.quantizer, training_budget=stage1.budget, settings=settings,
        seed=stage1.seed, multiplier=result.multiplier, penalty=result.penalty, violation=result.violation,
        history=result.history, wall_seconds=result.wall_seconds, peak_memory_mb=result.peak_memory_mb,
        fixed_bytes=problem.fixed_bytes,
    )


def stage1_settings(stage1: Stage1Config, bits: list[int], provenance: Provenance) -> dict:
    """Everything that determines a score table besides model and text content."""
    # the process count changes only float summation order, not the result; every table has its
    # own training budget, whatever other tables a run learns beside it; where the teacher's
    # activations are held changes nothing: none of them is part of the key
    kept = stage1.model_dump(exclude={"processes", "extra_budgets", "max_host_activations_gb", "checkpoint_every",
                                      "checkpoint_seconds"})
    settings = {"stage1": kept, "candidates": list(bits), "quantizer": provenance.quantizer, "text": provenance.text,
                "dtype": provenance.dtype}
    if provenance.units:  # modules sharing rows (allocation.ties / experts), when any do
        settings["units"] = provenance.units
    return settings


def stage1_key(provenance: Provenance, settings: dict) -> str:
    """Identifies one Stage I result: resumable checkpoints and the registry's cache both use it."""
    return settings_hash({"model": provenance.model_hash, "text": provenance.text_hash, "settings": settings})
