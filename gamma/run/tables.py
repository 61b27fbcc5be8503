"""The score tables of a run: where each training budget's table lives, Stage I over a workspace
(in this process or over launched processes, through the one Stage I entry), and Stage II of a
run's budgets from its tables (through the one Stage II call)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gamma.config import GammaConfig
from gamma.model.device import ComputeRecord
from gamma.model.loading import ModelInputError
from gamma.model.memory import MemoryEstimate, available_memory, estimate_memory
from gamma.model.units import allocation_units
from gamma.progress import console
from gamma.run.workspace import Workspace
from gamma.stage1.checkpoint import Checkpoint
from gamma.stage1.data_parallel import launch_stage1, process_group_shard, write_params
from gamma.stage1.learn import CHECKPOINT_FILE, learn_score_table, stage1_key, stage1_settings
from gamma.stage2.projection import Projection, project_nearest
from gamma.stage2.scores import ScoreTable

SCORES_FILE = "scores.json"
MEMORY_FILE = "memory_estimate.json"
CURVES_FILE = "stage1_curves.png"


def table_dir(cfg: GammaConfig, budget: float) -> Path:
    """Where the score table of one training budget lives: ``output_dir`` for ``stage1.budget``,
    ``output_dir/stage1-<B>`` for each of ``stage1.extra_budgets``."""
    out = Path(cfg.output_dir)
    return out if budget == cfg.stage1.budget else out / f"stage1-{budget:g}"


def run_settings(ws: Workspace) -> dict:
    """What determines the run's score table besides model and text content."""
    return stage1_settings(ws.cfg.stage1, ws.cfg.candidates, ws.provenance())


def run_key(ws: Workspace) -> str:
    """The run's Stage I key (checkpoints and the registry's cache)."""
    return stage1_key(ws.provenance(), run_settings(ws))


def learn_table(ws: Workspace, checkpoint: str | Path | Checkpoint | None = None, shard=None,
                device: str | None = None) -> ScoreTable:
    """Stage I of ``ws.cfg.stage1`` on the workspace's problem; the table records where each phase
    computed."""
    compute = ComputeRecord()
    with compute.phase("candidates"):
        problem = ws.problem()
    with compute.phase("teacher capture and Stage I"):
        table = learn_score_table(problem, ws.cfg.stage1, shard=shard, checkpoint=checkpoint, device=device)
    return recorded(table, compute, ws)


def recorded(table: ScoreTable, compute: ComputeRecord, ws: Workspace) -> ScoreTable:
    """``table`` with what its run checked and noted: the devices each phase computed on, the walk
    check, the warnings."""
    table.devices, table.walk_error, table.notes = compute.as_dict(), ws.walk_error, list(ws.notes)
    return table


def learn_with_processes(ws: Workspace, out_dir: str | Path, on_line=None) -> ScoreTable:
    """Stage I of ``ws.cfg.stage1`` over ``stage1.processes`` launched processes; the score table
    is saved at ``<out_dir>/scores.json`` and returned."""
    path = Path(out_dir) / SCORES_FILE
    launch_stage1(write_params(ws.cfg, Path(out_dir) / "stage1_params.yaml"), path, ws.cfg.stage1.processes, on_line)
    return ScoreTable.load(path)


class Band:
    """The score tables of a run's training budgets (``stage1.budget`` and ``extra_budgets``). In
    one process they all learn on one problem (model and candidates) and one teacher capture,
    made when the first table is learned; over ``stage1.processes`` processes each table is one
    launch, each process capturing its share."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self._capture = None

    def learn(self, budget: float, on_line=None) -> ScoreTable:
        """The table at ``budget``, saved in its ``table_dir`` (resumed from its own checkpoint there)."""
        cfg = self.ws.cfg.for_training_budget(budget)
        out = table_dir(self.ws.cfg, budget)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.stage1.processes > 1:
            return learn_with_processes(Workspace.shared(cfg, self.ws.model_hash, self.ws.text_hash), out, on_line)
        if self._capture is None:
            estimate = check_memory(self.ws, out, on_line)
            compute, s1 = ComputeRecord(), cfg.stage1
            with compute.phase("candidates"):
                problem = self.ws.problem()
            spill = out / "teacher" if estimate is not None and estimate.spills else None
            with compute.phase("teacher capture"):
                teacher = problem.capture(s1.loss == "fisher", proxy=s1.init == "proxy", spill_dir=spill)
            self._capture = problem, teacher, compute
        problem, teacher, compute = self._capture
        with compute.phase("Stage I"):
            compute.devices["Stage I"] = set()  # this table's, not the band's previous one's
            table = learn_score_table(problem, cfg.stage1, teacher=teacher, checkpoint=out / CHECKPOINT_FILE)
        recorded(table, compute, self.ws)
        (on_line or console.print)(f"computed on: {compute.line()}")
        table.save(out / SCORES_FILE)
        return table


def check_memory(ws: Workspace, out_dir: Path, on_line=None, sequences: int | None = None) -> MemoryEstimate | None:
    """Stage I's memory estimate, printed and written to ``<out_dir>/memory_estimate.json`` before
    the model is loaded; ``MemoryRefusal`` when the host or the device cannot hold it. A config.json
    without a decoder's shapes gets no estimate: said, recorded, and the run goes on."""
    say = on_line or console.print
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    try:
        estimate = estimate_memory(ws.cfg, ws.model_dir, sequences)
    except ModelInputError as err:
        say(f"no memory estimate: {err}")
        (Path(out_dir) / MEMORY_FILE).write_text(json.dumps({"unavailable": str(err)}) + "\n")
        return None
    for line in estimate.lines():
        say(line)
    (Path(out_dir) / MEMORY_FILE).write_text(json.dumps(estimate.record(), indent=1) + "\n")
    estimate.check(*available_memory(estimate.device_name))
    return estimate


def learn_in_process_group(ws: Workspace, checkpoint: str | Path | Checkpoint | None, out: str | Path):
    """Run inside each launched process: Stage I on this process's share, the table written once.

    Returns the score table on the main process, None elsewhere. Every process also writes
    ``<out>.rank<r>.json`` with its wall time and peak memory."""
    shard, acc = process_group_shard()
    if acc.is_main_process:
        check_memory(ws, Path(out).parent, sequences=len(shard.over(ws.cfg.text.calibration_sequences).held()))
    t0 = time.perf_counter()
    table = learn_table(ws, checkpoint=checkpoint, shard=shard, device=str(acc.device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.rank{shard.rank}.json").write_text(json.dumps({
        "rank": shard.rank, "world": shard.world, "device": str(acc.device),
        "distributed_type": str(acc.distributed_type), "wall_seconds": time.perf_counter() - t0,
        "stage1_seconds": table.wall_seconds, "peak_memory_mb": table.peak_memory_mb}) + "\n")
    acc.wait_for_everyone()
    if acc.is_main_process:
        table.save(out)
        return table
    return None


def check_tables(tables: list[ScoreTable], ws: Workspace, model) -> None:
    """Refuse a table learned on another model, module set, candidate set or quantizer than the
    workspace's."""
    modules, sizes = ws.module_sizes(model)
    for table in tables:
        table.check_matches(modules, sizes, ws.model_hash, ws.cfg.candidates, ws.quantizer_record())


def project_budget(tables: list[ScoreTable], budget: float, cfg: GammaConfig) -> Projection:
    """Stage II for one budget (in ``stage2.unit``) from saved score tables (never runs Stage I),
    from the table learned nearest to it; raises ``BudgetError`` naming the budget when it cannot
    be met."""
    q = cfg.quantizer
    units = allocation_units(tables[0].modules, cfg.allocation.ties, cfg.allocation.experts) if tables else None
    return project_nearest(tables, budget, cfg.stage2, group_size=q.group_size, symmetric=q.symmetric, units=units,
                           zero_points=cfg.serving.zero_points)
