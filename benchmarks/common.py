"""Shared by the benchmark scripts: results file in the format of method.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]
SHAPES = {  # the published configs' shapes
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


def vllm_perplexity(ws, checkpoint: Path, vllm, reference_kernel: bool = False) -> dict:
    """Perplexity of ``checkpoint`` through vLLM (its ``VllmConfig``) on the workspace's evaluation
    windows, as fields of a results row."""
    from gamma.evaluation.backends import VllmBackend, evaluate_with_vllm

    e = ws.cfg.evaluation
    backend = VllmBackend(vllm, e.context_length + 1, reference_kernel)
    got = evaluate_with_vllm(backend, checkpoint, ws.evaluation, ws.tokenizer, [], 0, e.context_length)
    return {"vllm_perplexity": got["perplexity"], "vllm_perplexity_se": got["perplexity_se"],
            "vllm_eval_seconds": got["eval_seconds"], "vllm_backend": got["eval_backend"]}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, settings: dict, rows: list[dict], key: tuple[str, ...]) -> Path:
    """Write ``benchmarks/results/<name>.json``: every row new to this run is stamped with the commit
    and date it was measured at (a row that already has them, read back from the file, keeps its
    own) and merged by ``key`` into the rows already there: a rerun replaces only the rows it
    recomputed and erases no figure it did not."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamp = {"commit": commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    settings = {**settings, **stamp}
    old = json.loads(path.read_text())["rows"] if path.exists() else []

    def row_key(r: dict) -> tuple:  # a list in a key (training budgets, say) compares as a tuple
        return tuple(tuple(v) if isinstance(v, list) else v for v in (r.get(k) for k in key))

    new = {row_key(r): {**stamp, **r} if "commit" in r else {**r, **stamp} for r in rows}
    rows = [r for r in old if row_key(r) not in new] + list(new.values())
    path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1, default=str) + "\n")
    return path


def build_model(spec: str, where: Path) -> Path:
    """``name`` or ``name:blocks`` of ``SHAPES``: a random-weight Llama-style model with those shapes
    (``blocks`` of its blocks), initialised and saved in bfloat16 like the real checkpoints (no
    float32 copy of a 70B block's model), with the embedded tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gamma.model.loading import resolve_model_path

    name, _, blocks = spec.partition(":")
    shapes = {**SHAPES[name], **({"num_hidden_layers": int(blocks)} if blocks else {})}
    torch.manual_seed(0)
    config = LlamaConfig(**shapes, max_position_embeddings=4096, torch_dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(resolve_model_path("embedded", ROOT / "data")).save_pretrained(where)
    return where


def memory_estimates(name: str) -> dict:
    """gamma's own memory estimate (the one every run prints) for ``name``'s shapes in bfloat16
    under params.yaml, RTN (candidates held, and rebuilt per block: what ``auto`` picks on CUDA) and
    GPTQ, computing on a CUDA device: from config.json alone, nothing is built or run."""
    import tempfile

    from gamma.config import load_config
    from gamma.model.memory import estimate_memory

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**SHAPES[name], "torch_dtype": "bfloat16"}))
        for method, store in (("rtn", "held"), ("rtn_rebuilt", "rebuilt"), ("gptq", "held")):
            sets = {"quantizer.method": method.removesuffix("_rebuilt"), "quantizer.candidate_store": store}
            estimate = estimate_memory(load_config(ROOT / "params.yaml", sets), tmp)
            estimate.device_name = "cuda"  # where the product runs these models; nothing is allocated
            host, device = estimate.totals()
            out.update({f"estimate_host_gb_{method}": round(host / 1024**3, 2),
                        f"estimate_device_gb_{method}": round(device / 1024**3, 2),
                        f"estimate_disk_gb_{method}": round(sum(estimate.disk.values()) / 1024**3, 2)})
    return out


LEARNED = ("gamma", "gamma-blocks")  # allocators with score tables to learn


def table_files(ws, name: str, where: Path) -> list[Path]:
    """Where the score tables of a learned allocator with the workspace's settings are kept under
    ``where``, one per training budget, named by everything that determines them."""
    from gamma.run.tables import run_settings
    from gamma.stage1.learn import stage1_key

    settings = {**run_settings(ws), "allocator": name, "blocks": ws.cfg.allocation.gamma_blocks.model_dump()}
    files = []
    for b in ws.cfg.stage1.training_budgets:  # each table's key holds its own training budget only
        key = stage1_key(ws.provenance(), {**settings, "stage1": {**settings["stage1"], "budget": b}})
        files.append(where / f"{name}-{b:g}-{key[:16]}.json")
    return files


def prepared_allocator(ws, name: str, problem, where: Path):
    """The allocator ``name`` of the workspace's settings, prepared on ``problem``, and whether
    score tables were read back: a learned one reads the tables an earlier run saved under
    ``where`` for the very same settings, model and text, learns only those of its training
    budgets that are missing and saves them there (a rerun of the evaluation costs no Stage I)."""
    from gamma.allocators import allocator_from_config
    from gamma.progress import console
    from gamma.stage2.scores import ScoreTable

    files = dict(zip(ws.cfg.stage1.training_budgets, table_files(ws, name, where))) if name in LEARNED else {}
    tables = {b: ScoreTable.load(f) for b, f in files.items() if f.exists()}
    if not tables:  # nothing saved (or nothing to learn): the allocator prepares itself, as in a run
        allocator = allocator_from_config(ws.cfg, name)
        allocator.prepare(problem)
        for table in allocator.tables if files else []:
            table.save(files[table.training_budget])
        return allocator, False
    console.print(f"{name}: score tables read from {', '.join(str(files[b]) for b in tables)}, not learned again")
    missing = [b for b in files if b not in tables]
    learned_seconds = 0.0
    if missing:
        part = ws.cfg.stage1.model_copy(update={"budget": missing[0], "extra_budgets": missing[1:]})
        learner = allocator_from_config(ws.cfg.model_copy(update={"stage1": part}), name)
        learner.prepare(problem)
        learned_seconds = learner.prepare_seconds
        for table in learner.tables:
            tables[table.training_budget] = table
            table.save(files[table.training_budget])
    allocator = allocator_from_config(ws.cfg, name, [tables[b] for b in sorted(tables)])
    allocator.prepare(problem)
    allocator.prepare_seconds += learned_seconds  # the one-off work this run did pay: the missing tables
    return allocator, True


def quantizer_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every per-quantizer comparison takes; callers add their own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--budgets", default="2.25,2.5,2.75,3,3.5")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out evaluation tokens")
    ap.add_argument("--items", type=int, default=20, help="zero-shot items per task")
    ap.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
    return ap


def previous_rows(name: str) -> tuple[list[dict], dict]:
    """Rows and per-quantizer settings of an earlier run: each quantizer's rerun replaces only its
    own rows, so RTN and GPTQ can be measured in separate sittings and land in one table."""
    previous = RESULTS / f"{name}.json"
    old = json.loads(previous.read_text()) if previous.exists() else {"settings": {}, "rows": []}
    return old["rows"], old["settings"].get("per_quantizer", {})
