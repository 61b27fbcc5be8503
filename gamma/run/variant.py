"""One variant of a run: quantize an assignment (or allocate one with any allocator first),
export it, evaluate it with the configured backend. Each returns a plain row that can be saved
and registered; a budget that cannot be served raises a ``ValueError`` naming it, and a loop over
budgets records it with ``failed``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gamma.allocators import AllocationProblem, Allocator, BlockAssignment, allocator_from_config
from gamma.allocators.column_blocks import block_account
from gamma.evaluation.backends import BackendUnavailable, VllmBackend, evaluate_with_vllm, vllm_loads
from gamma.evaluation.metrics import figures, kl_divergence, perplexity, zero_shot_suite
from gamma.model.assignment import apply_assignment, stored_bytes, uniform_assignment, unquantized_tensors
from gamma.model.coverage import coverage
from gamma.model.device import ComputeRecord
from gamma.model.export import (
    CheckpointError,
    check_transformers_reads,
    export_checkpoint,
    export_fake_quantized,
    round_to_storage,
)
from gamma.operations.profiles import PROFILES
from gamma.progress import console
from gamma.run.workspace import Workspace

ASSIGNMENT_FILE = "gamma_assignment.json"
SUMMARY_FILE = "gamma_summary.json"


def failed(budget: float, method: str, err: BaseException | str) -> dict:
    """The one record of a budget that could not be served: the others stand."""
    return {"budget": budget, "method": method, "error": str(err)}


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
            backend = VllmBackend(e.vllm, e.context_length + 1)
            return {**evaluate_with_vllm(backend, checkpoint, ws.evaluation, tokenizer, e.zero_shot_tasks, items,
                                         e.context_length), "eval_devices": "cuda (vLLM)"}
        except BackendUnavailable as err:
            if e.vllm.fallback == "fail":
                raise
            fallback_reason = str(err)
            console.log(f"[yellow]vLLM backend unavailable, evaluating with transformers: {err}")
    t0 = time.perf_counter()
    device, compute = str(ws.device), ComputeRecord()
    with compute.phase("evaluation"):
        ppl = perplexity(model, ws.evaluation, batch_size=max(1, e.batch_size // 2), device=device)
        reference = ws.reference()
        kl = None if reference is None else kl_divergence(model, ws.evaluation, reference,
                                                          max(1, e.batch_size // 2), device)
        zs = zero_shot_suite(model, tokenizer, e.zero_shot_tasks, items, e.context_length, e.batch_size,
                             device=device) if items else None
    where = compute.as_dict()["evaluation"]
    console.log(f"evaluated on {where}")
    return {**figures(ppl, zs, time.perf_counter() - t0,
                      "transformers" + (f" (vLLM fallback: {fallback_reason})" if fallback_reason else ""), kl),
            "eval_devices": where}


def quantize_and_evaluate(ws: Workspace, assignment: dict[str, int] | int, hessians=None,
                          save_to: str | Path | None = None, loaded=None,
                          problem: AllocationProblem | None = None) -> dict:
    """Apply an assignment (or one uniform bit width) to a fresh model (``loaded``: a full-precision
    ``(model, tokenizer)`` this call may consume), export it as a compressed-tensors checkpoint when
    ``save_to`` is given, and evaluate it. ``problem``: take each module's quantized weights from
    its candidates instead of quantizing again (not for sequential GPTQ, whose weights differ)."""
    row, model, tokenizer = quantize_variant(ws, assignment, hessians, save_to, loaded, problem)
    row.update(evaluate_model(ws, model, tokenizer, checkpoint=save_to))
    if str(row.get("eval_backend")).startswith("vllm") and "vllm" not in row.get("loads_in", []):
        row["loads_in"] = [*row.get("loads_in", []), "vllm"]  # it evaluated the checkpoint itself
    return row


def quantize_variant(ws: Workspace, assignment: dict[str, int] | int, hessians=None,
                     save_to: str | Path | None = None, loaded=None, problem: AllocationProblem | None = None):
    """``quantize_and_evaluate`` up to its evaluation: the row of the quantized (and, with
    ``save_to``, exported and read-back) variant, and the quantized model with its tokenizer."""
    model, tokenizer = loaded or ws.load()
    if ws.cfg.evaluation.backend == "transformers":
        ws.reference(model)  # from this full-precision copy, before it is quantized, if not there yet
    if isinstance(assignment, int):
        assignment = uniform_assignment(model, assignment)
    q = ws.cfg.quantizer
    t0 = time.perf_counter()
    quantizer, compute = ws.quantizer(), ComputeRecord()
    with compute.phase("quantization"):
        if quantizer.sequential:
            hessians = None  # taken block by block from the quantized prefix instead
        elif quantizer.needs_hessians and hessians is None and problem is None:
            hessians = ws.hessians(model)
        records, acct = apply_assignment(model, assignment, quantizer, q.group_size, q.symmetric, hessians,
                                         calibration=ws.calibration if quantizer.sequential else None,
                                         device=ws.device, zero_points=ws.cfg.serving.zero_points,
                                         held=problem.candidate if problem is not None else None)
    round_to_storage(model, set(records))  # evaluate exactly what the checkpoint stores
    covered = coverage(model, set(records))
    console.log(covered.line())
    row = {"quantizer": q.method, "quantize_seconds": time.perf_counter() - t0, **acct.as_dict(),
           "coverage": covered.as_dict()}
    row["avg_bits"] = acct.nominal_bits
    if save_to:
        ckpt = export_checkpoint(model, tokenizer, records, save_to, {
            ASSIGNMENT_FILE: json.dumps(assignment, indent=1) + "\n",
            # run-dependent figures (timings) stay out of the checksummed files: the same inputs and
            # seed give the same checkpoint hash
            SUMMARY_FILE: json.dumps({k: v for k, v in row.items() if not k.endswith("_seconds")}, indent=1,
                                     default=str) + "\n"}, zero_points=ws.cfg.serving.zero_points)
        row.update({"checkpoint_bytes": ckpt.weights_bytes, "checkpoint_total_bytes": ckpt.total_bytes,
                    "checkpoint_sha256": ckpt.sha256,
                    "checkpoint_over_predicted": ckpt.weights_bytes / acct.total_bytes})
        row["loads_in"], refused, unchecked = loaders_checked(ws, save_to, model)
        row.update({k: v for k, v in (("refused_by", refused), ("unchecked", unchecked)) if v})
    row["quantize_devices"] = compute.as_dict()["quantization"]  # after the export: not part of its checksum
    row["serving_profile"] = ws.cfg.serving.profile
    return row, model, tokenizer


def loaders_checked(ws: Workspace, checkpoint: str | Path, model) -> tuple[list[str], dict, dict]:
    """The loaders that read ``checkpoint`` back, why the others tried did not, and which could not
    be tried here: gamma's always (the export reads itself back); transformers' own (identical
    logits) and vLLM's (``vllm_loads``: its config parsing, weight loading and one forward, when a
    vLLM environment is configured) when the serving profile is made for them, where a refusal fails
    the variant (it is never registered), or tries them, where a refusal is said and recorded."""
    profile, checked, refused, unchecked = PROFILES[ws.cfg.serving.profile], ["gamma"], {}, {}
    if "transformers" in profile.loads_in + profile.tries:
        try:
            check_transformers_reads(checkpoint, model)
            checked.append("transformers")
        except CheckpointError as err:
            if "transformers" in profile.loads_in:
                raise
            refused["transformers"] = str(err)
            console.log(f"[yellow]not loadable by transformers (recorded): {err}")
    if "vllm" in profile.loads_in + profile.tries:
        try:
            verdict = vllm_loads(ws.cfg.evaluation.vllm, checkpoint)
        except BackendUnavailable as err:
            unchecked["vllm"] = str(err)
            console.log(f"[yellow]vLLM's loader not checked on this variant: {err}")
            return checked, refused, unchecked
        if verdict["accepted"] or verdict["stage"] == "forward":  # its loader read every tensor
            checked.append("vllm")
            console.log(f"vLLM loads it (kernels: {', '.join(verdict.get('kernels') or [])})")
            if not verdict["accepted"]:  # this device's limit (the CPU build's attention shapes, say)
                unchecked["vllm_forward"] = verdict["error"]
                console.log(f"[yellow]vLLM loaded it but could not run its forward here: {verdict['error']}")
        elif "vllm" in profile.loads_in:
            raise CheckpointError(f"vLLM refuses {checkpoint} at stage {verdict['stage']!r}: {verdict['error']}")
        else:
            refused["vllm"] = f"stage {verdict['stage']!r}: {verdict['error']}"
    return checked, refused, unchecked


def prepared_allocator(ws: Workspace, name: str, tables=None) -> tuple[Allocator, AllocationProblem]:
    """The allocator ``name`` and the problem, built once per workspace and shared by its budgets."""
    if "problem" not in ws.allocators:
        ws.allocators["problem"] = ws.problem()
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
        row["score_table"] = next(t for t in learned if t.training_budget == result.notes["training_budget"])
    if not isinstance(result.assignment, BlockAssignment):
        row.update(quantize_and_evaluate(ws, result.assignment, save_to=save_to))
        return {**row, "allocation": record}
    try:
        ws.reference(problem.model)  # the allocator's model is still full precision here
        allocator.apply(problem, result.assignment)
        acct = block_account(problem, result.assignment)
        other = stored_bytes(unquantized_tensors(problem.model, problem.modules).values())
        row.update({"quantizer": ws.cfg.quantizer.method, "avg_bits": acct["nominal_bits"], **acct,
                     "total_bytes": acct["quantized_bytes"] + other})
        if save_to:
            ckpt = export_fake_quantized(problem.model, ws.tokenizer, save_to, {"gamma_blocks.json": record})
            row.update({"checkpoint_bytes": ckpt.weights_bytes, "checkpoint_sha256": ckpt.sha256,
                        "checkpoint_format": "fake-quantized float16"})
        row.update(evaluate_model(ws, problem.model, ws.tokenizer))
    finally:
        problem.restore()
    return {**row, "allocation": record}
