"""The steps of a run as plain functions over a ``Workspace``: the CLI calls them directly and
the Prefect tasks wrap them. Each returns plain data that can be saved and registered."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from gamma.allocators import AllocationProblem, Allocator, BlockAssignment, allocator_from_config
from gamma.allocators.column_blocks import block_account
from gamma.assignment import (
    UNQUANTIZED_BITS,
    apply_assignment,
    collect_hessians,
    uniform_assignment,
    unquantized_parameters,
)
from gamma.backends import BackendUnavailable, VllmBackend, evaluate_with_vllm
from gamma.candidates import build_candidates
from gamma.evaluate import figures, perplexity, zero_shot_suite
from gamma.export import export_checkpoint, export_fake_quantized, round_to_storage
from gamma.hashing import settings_hash
from gamma.progress import console
from gamma.projection import Allocation, allocate_bits
from gamma.proxy import costs_to_logits, fisher_costs
from gamma.scores import ScoreTable, nearest_table
from gamma.stage1 import learn_preferences
from gamma.teacher import capture_teacher
from gamma.workspace import Workspace


def hessians_for(ws: Workspace, model) -> dict[str, torch.Tensor] | None:
    q = ws.cfg.quantizer
    if q.method != "gptq":
        return None
    return collect_hessians(model, ws.calibration, token_clip=q.gptq.token_clip, sink_weight=q.gptq.sink_weight)


def reusable_hessians(ws: Workspace, model) -> dict[str, torch.Tensor] | None:
    """Full-precision Hessians to share across several assignments, or None when there is nothing
    to share (RTN, or sequential GPTQ, whose Hessians depend on each assignment's quantized prefix)."""
    return None if ws.cfg.quantizer.gptq.sequential else hessians_for(ws, model)


def evaluate_model(ws: Workspace, model, tokenizer, zero_shot_items: int | None = None,
                   checkpoint: str | Path | None = None) -> dict:
    """Perplexity and zero-shot figures from the configured backend. vLLM evaluates the exported
    ``checkpoint``; when it cannot (not installed, no checkpoint, a variant its kernels do not
    serve) the run falls back to transformers or fails, as ``evaluation.vllm.fallback`` says."""
    e = ws.cfg.evaluation
    items = e.zero_shot_items if zero_shot_items is None else zero_shot_items
    fallback_reason = None
    if e.backend == "vllm":
        try:
            if checkpoint is None:
                raise BackendUnavailable("vLLM evaluates an exported checkpoint and this step saved none")
            return evaluate_with_vllm(VllmBackend(e.vllm, e.context_length + 1), checkpoint, ws.evaluation,
                                      tokenizer, e.zero_shot_tasks, items, e.context_length)
        except BackendUnavailable as err:
            if e.vllm.fallback == "fail":
                raise
            fallback_reason = str(err)
            console.log(f"[yellow]vLLM backend unavailable, evaluating with transformers: {err}")
    t0 = time.perf_counter()
    ppl = perplexity(model, ws.evaluation, batch_size=max(1, e.batch_size // 2))
    zs = zero_shot_suite(model, tokenizer, e.zero_shot_tasks, items, e.context_length, e.batch_size) if items else None
    return figures(ppl, zs, time.perf_counter() - t0,
                   "transformers" + (f" (vLLM fallback: {fallback_reason})" if fallback_reason else ""))


def quantize_and_evaluate(ws: Workspace, assignment: dict[str, int] | int, hessians=None,
                          save_to: str | Path | None = None, loaded=None) -> dict:
    """Apply an assignment (or one uniform bit width) to a fresh model (``loaded``: a full-precision
    ``(model, tokenizer)`` this call may consume), export it as a compressed-tensors checkpoint when
    ``save_to`` is given, and evaluate it."""
    model, tokenizer = loaded or ws.load()
    if isinstance(assignment, int):
        assignment = uniform_assignment(model, assignment)
    q = ws.cfg.quantizer
    t0 = time.perf_counter()
    sequential = q.method == "gptq" and q.gptq.sequential
    if sequential:
        hessians = None  # taken block by block from the quantized prefix instead
    elif q.method == "gptq" and hessians is None:
        hessians = hessians_for(ws, model)
    records, acct = apply_assignment(model, assignment, ws.quantizer(), q.group_size, q.symmetric, hessians,
                                     calibration=ws.calibration if sequential else None)
    round_to_storage(model, set(records))  # evaluate exactly what the checkpoint stores
    row = {"quantizer": q.method, "quantize_seconds": time.perf_counter() - t0, **acct.as_dict()}
    row["avg_bits"] = acct.nominal_bits
    if save_to:
        ckpt = export_checkpoint(model, tokenizer, records, save_to, {
            "gamma_assignment.json": json.dumps(assignment, indent=1) + "\n",
            "gamma_summary.json": json.dumps(row, indent=1, default=str) + "\n"})
        row.update({"checkpoint_bytes": ckpt.weights_bytes, "checkpoint_total_bytes": ckpt.total_bytes,
                    "checkpoint_sha256": ckpt.sha256,
                    "checkpoint_over_predicted": ckpt.weights_bytes / acct.total_bytes})
    row.update(evaluate_model(ws, model, tokenizer, checkpoint=save_to))
    return row


def learn_score_table(ws: Workspace, checkpoint: str | Path | None = None, stop_after: int | None = None,
                      candidates: dict | None = None, rank: int = 0, world: int = 1, all_reduce=None,
                      device: str = "cpu") -> ScoreTable:
    """Stage I end to end: teacher capture, candidates (unless given), proxy warm start, preference
    learning. With ``world > 1`` (see ``gamma.distributed``) this process captures and trains on
    its share of the calibration sequences (``rank::world``); ``all_reduce`` sums tensors over the
    processes, so the Fisher proxy and every step see all sequences."""
    cfg = ws.cfg
    model, _ = ws.load()
    modules, sizes = ws.module_sizes(model)
    need_grads = cfg.stage1.loss == "fisher" or cfg.stage1.init == "proxy"
    n_seq = ws.calibration.shape[0]
    held = torch.arange(n_seq)[rank::world]
    if len(held) == 0:
        raise ValueError(f"{world} processes but only {n_seq} calibration sequences: "
                         "raise text.calibration_sequences or lower stage1.processes")
    teacher = capture_teacher(model, ws.calibration[held], with_grads=need_grads)
    if world > 1 and teacher.fisher is not None:  # per-process means -> the mean over all sequences
        for name, f in teacher.fisher.items():
            teacher.fisher[name] = all_reduce(f * len(held)) / n_seq
    q = cfg.quantizer
    if candidates is None:
        candidates = build_candidates(model, ws.quantizer(), cfg.candidates, q.group_size, q.symmetric,
                                      hessians_for(ws, model))
    init = None
    if cfg.stage1.init == "proxy":
        costs = fisher_costs(model, candidates, teacher.fisher)
        init = costs_to_logits(costs, [r * c for r, c in sizes], cfg.candidates, cfg.stage1.budget,
                               cfg.stage1.proxy_scale, cfg.stage1.proxy_clip)
    key = stage1_key(ws.model_hash, ws.text_hash, stage1_settings(ws))
    result = learn_preferences(model, teacher, candidates, cfg.candidates, cfg.stage1, init, checkpoint,
                               device=device, stop_after=stop_after, checkpoint_key=key, rank=rank,
                               shard=(held, n_seq) if world > 1 else None, all_reduce=all_reduce)
    return ScoreTable(
        modules=modules, sizes=sizes, bits=cfg.candidates, scores=result.scores.tolist(),
        model_hash=ws.model_hash, text_hash=ws.text_hash, quantizer=ws.quantizer_record(),
        training_budget=cfg.stage1.budget, settings=stage1_settings(ws), seed=cfg.stage1.seed,
        multiplier=result.multiplier, penalty=result.penalty, violation=result.violation,
        history=result.history, wall_seconds=result.wall_seconds, peak_memory_mb=result.peak_memory_mb,
    )


def stage1_settings(ws: Workspace) -> dict:
    """Everything that determines a score table besides model and text content."""
    cfg = ws.cfg
    # the process count changes only float summation order, not the result; every table has its
    # own training budget, whatever other tables a run learns beside it: neither is part of the key
    return {"stage1": cfg.stage1.model_dump(exclude={"processes", "extra_budgets"}), "candidates": cfg.candidates,
            "quantizer": ws.quantizer_record(), "text": cfg.text.model_dump(exclude={"source"})}


def table_dir(cfg, budget: float) -> Path:
    """Where the score table of one training budget lives: ``output_dir`` for ``stage1.budget``,
    ``output_dir/stage1-<B>`` for each of ``stage1.extra_budgets``."""
    out = Path(cfg.output_dir)
    return out if budget == cfg.stage1.budget else out / f"stage1-{budget:g}"


def stage1_key(model_md5: str, text_md5: str, settings: dict) -> str:
    """Identifies one Stage I result: resumable checkpoints and the registry's cache both use it."""
    return settings_hash({"model": model_md5, "text": text_md5, "settings": settings})


def allocate(tables: ScoreTable | list[ScoreTable], budgets: list[float], ws_cfg, modules=None, sizes=None,
             model_hash: str | None = None) -> dict[float, Allocation | Exception]:
    """Stage II for each budget from saved score tables (never runs Stage I); with several tables,
    each budget is projected from the one learned nearest to it."""
    tables = tables if isinstance(tables, list) else [tables]
    if modules is not None:
        for table in tables:
            table.check_matches(modules, sizes, model_hash)
    s2, q = ws_cfg.stage2, ws_cfg.quantizer
    out: dict[float, Allocation | Exception] = {}
    for b in budgets:
        table = nearest_table(tables, b)
        try:
            alloc = allocate_bits(table.modules, table.sizes, np.asarray(table.scores), table.bits, b,
                                  window=s2.window, min_bits=s2.min_bits, group_size=q.group_size,
                                  symmetric=q.symmetric, time_limit=s2.time_limit,
                                  solver=s2.solver)
            alloc.notes.append(f"table learned at {table.training_budget:g} bits "
                               f"(distance {b - table.training_budget:+.2f})")
            alloc.training_budget = table.training_budget
            out[b] = alloc
        except ValueError as err:
            out[b] = err
    return out


def allocation_problem(ws: Workspace) -> AllocationProblem:
    """The shared input of every allocator: the full-precision model, the calibration sequences and
    each module quantized at every candidate width (GPTQ with full-precision Hessians)."""
    cfg, q = ws.cfg, ws.cfg.quantizer
    model, _ = ws.load()
    hessians = hessians_for(ws, model)
    candidates = build_candidates(model, ws.quantizer(), cfg.candidates, q.group_size, q.symmetric, hessians)
    return AllocationProblem(model, ws.calibration, candidates, cfg.candidates, q.group_size, q.symmetric,
                             cfg.stage1.seed, ws.quantizer(), hessians)


def prepared_allocator(ws: Workspace, name: str, tables=None) -> tuple[Allocator, AllocationProblem]:
    """The allocator ``name`` and the problem, built once per workspace and shared by its budgets."""
    if "problem" not in ws.allocators:
        ws.allocators["problem"] = allocation_problem(ws)
    if name not in ws.allocators:
        ws.allocators[name] = allocator_from_config(ws.cfg, name, tables)
    return ws.allocators[name], ws.allocators["problem"]


def allocate_and_evaluate(ws: Workspace, name: str, budget: float, save_to: str | Path | None = None,
                          tables=None) -> dict:
    """One budget with one allocator: allocate, quantize (a compressed-tensors checkpoint for a
    module assignment, a fake-quantized one for a block assignment), evaluate. A learned
    allocator's row carries the ``score_table`` it projected from."""
    allocator, problem = prepared_allocator(ws, name, tables)
    result = allocator.allocate(problem, budget)
    notes = {k: v for k, v in result.notes.items() if isinstance(v, (int, float, str))}
    row = {"budget": budget, "method": name, "allocate_seconds": result.seconds,
           "prepare_seconds": result.prepare_seconds, "metadata_bits": result.metadata_bits, **notes}
    record = json.dumps(result.as_dict(), indent=1, default=str) + "\n"
    learned = getattr(allocator, "tables", None)  # GAMMA's: the table this budget was projected from
    if learned:
        row["score_table"] = nearest_table(learned, budget)
    if not isinstance(result.assignment, BlockAssignment):
        row.update(quantize_and_evaluate(ws, result.assignment, save_to=save_to))
        return {**row, "allocation": record}
    try:
        allocator.apply(problem, result.assignment)
        acct = block_account(problem, result.assignment)
        other = sum(p.numel() for p in unquantized_parameters(problem.model, problem.modules))
        row.update({"quantizer": ws.cfg.quantizer.method, "avg_bits": acct["nominal_bits"], **acct,
                     "total_bytes": acct["quantized_bytes"] + other * UNQUANTIZED_BITS / 8})
        if save_to:
            ckpt = export_fake_quantized(problem.model, ws.tokenizer, save_to, {"gamma_blocks.json": record})
            row.update({"checkpoint_bytes": ckpt.weights_bytes, "checkpoint_sha256": ckpt.sha256,
                        "checkpoint_format": "fake-quantized float16"})
        row.update(evaluate_model(ws, problem.model, ws.tokenizer))
    finally:
        problem.restore()
    return {**row, "allocation": record}
