"""Scale: wall time and peak host memory of every phase on random-weight models with real shapes.

Builds Llama-style models from configs (no download; bf16 on disk, the embedded tokenizer):
Llama-3.2-1B at full depth, Llama-3.1-8B block shapes with 1, 2 and 4 blocks, one Llama-3.1-70B
block. Each model runs in a fresh process, phase by phase through the library as the pipeline
calls it (load with the walk check, candidates RTN and GPTQ, teacher capture with gradients,
Stage I: one step and three, Stage II, quantize and export, perplexity on 2k tokens); a sampler
thread reads the process's resident memory every 20 ms, so each phase gets its own peak, and after
each phase the freed memory is handed back (malloc_trim) and what the process still holds is read:
what stays on the host between phases (on a GPU machine the device's part is not among it). With
``--store rebuilt`` RTN's candidates are rebuilt per block (``quantizer.candidate_store``). Over the
8B block sweep it fits peak host memory and the steady Stage I step (after the first) against
the number of blocks, checks them against the goals of issue 23, and projects host and device
memory (gamma's own estimate) and time per step to full 8B, 32B and 70B models at the default
calibration size. Writes benchmarks/results/scale.json (rows keyed by model, store and phase, the
summary in its settings) and benchmarks/results/scale.png (peak memory against blocks).

    python benchmarks/scale.py [--models llama-3.2-1b,llama-3.1-8b:1,llama-3.1-8b:2] [--gptq llama-3.2-1b]
    python benchmarks/scale.py --models llama-3.2-1b --gptq "" --store rebuilt
    python benchmarks/scale.py --models ""     # the summary and the plot again, from the rows there
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, SHAPES, build_model, memory_estimates, write_results

from gamma.model.memory import Shapes, packed_candidate_bytes
from gamma.progress import console

STEP = "one Stage I step"
STEADY = 2
STEPS = f"Stage I, {1 + STEADY} steps"
DEFAULT_MODELS = "llama-3.2-1b,llama-3.1-8b:1,llama-3.1-8b:2,llama-3.1-8b:4,llama-3.1-70b:1"
GB = 1024**3


class PeakMemory:
    """Resident memory of this process, sampled every ``interval`` seconds: the peak of each phase."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    @contextmanager
    def phase(self, rows: list, name: str):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = self.process.memory_info().rss
        t0 = time.perf_counter()
        yield
        seconds, peak = time.perf_counter() - t0, max(self.peak, self.process.memory_info().rss)
        gc.collect()
        _LIBC.malloc_trim(0)  # glibc keeps freed memory resident; what is still held after this is in use
        rows.append({"phase": name, "seconds": round(seconds, 2), "peak_host_gb": round(peak / GB, 3),
                     "held_host_gb": round(self.process.memory_info().rss / GB, 3)})
        if cuda:  # on a GPU machine the device's own peak, apart from the host's
            rows[-1]["peak_device_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        console.print(rows[-1])


_LIBC = ctypes.CDLL("libc.so.6")


def run_phases(model_dir: str, gptq: bool, sequences: int, length: int, spec: str, store: str) -> list[dict]:
    """Every phase on the model at ``model_dir`` (``spec``'s blocks), in this process. Stage I caches
    the dense candidates only when the whole model's fit ``DENSE_CACHE_BYTES``: a few blocks of a
    large model run as the whole model does (uncached), so that time per step scales to it."""
    from gamma.config import load_config
    from gamma.model import memory as model_memory

    full, candidates = config_shapes(spec.partition(":")[0]), load_config(ROOT / "params.yaml").candidates
    if full.layers * full.block_linear * len(candidates) * 4 > model_memory.DENSE_CACHE_BYTES:
        model_memory.DENSE_CACHE_BYTES = 0
    from gamma.evaluation.metrics import perplexity
    from gamma.model.assignment import apply_assignment
    from gamma.model.export import export_checkpoint, round_to_storage
    from gamma.problem import AllocationProblem
    from gamma.run.workspace import Workspace
    from gamma.stage1.learn import learn_score_table
    from gamma.stage2.projection import project

    memory, rows = PeakMemory(), []
    sets = {"model.path": model_dir, "model.data_dir": str(ROOT / "data"), "text.calibration_sequences": sequences,
            "text.sequence_length": length, "stage1.steps": 1, "stage1.extra_budgets": [],
            "quantizer.candidate_store": store,
            "evaluation.max_tokens": 2048, "evaluation.context_length": 512}
    cfg = load_config(ROOT / "params.yaml", sets)
    ws = Workspace(cfg)
    _ = ws.calibration, ws.evaluation  # tokenized before the clock starts
    with memory.phase(rows, "load"):
        model, tokenizer = ws.load()
    with memory.phase(rows, "candidates rtn"):
        candidates = ws.candidates(model)
    if gptq:
        with memory.phase(rows, "candidates gptq"):
            Workspace(load_config(ROOT / "params.yaml", {**sets, "quantizer.method": "gptq",
                                                          "quantizer.candidate_store": "held"})).candidates(model)
    problem = AllocationProblem(model, ws.calibration, candidates, cfg.candidates, cfg.quantizer.group_size,
                                cfg.quantizer.symmetric, provenance=ws.provenance(), device=str(ws.device))
    with memory.phase(rows, "teacher capture with gradients"):
        teacher = problem.capture(True, proxy=True)
    with memory.phase(rows, STEP):
        table = learn_score_table(problem, cfg.stage1, teacher=teacher)
    with memory.phase(rows, STEPS):  # the first step also pays one-off costs: the steady step is the rest's mean
        learn_score_table(problem, cfg.stage1.model_copy(update={"steps": 1 + STEADY}), teacher=teacher)
    del teacher
    with memory.phase(rows, "Stage II"):
        assignment = project(table, 3.0, cfg.stage2, group_size=cfg.quantizer.group_size).assignment
    with tempfile.TemporaryDirectory() as tmp, memory.phase(rows, "quantize and export"):
        records, _ = apply_assignment(model, assignment, ws.quantizer(), cfg.quantizer.group_size,
                                      cfg.quantizer.symmetric)
        round_to_storage(model, set(records))
        export_checkpoint(model, tokenizer, records, Path(tmp) / "variant")
    with memory.phase(rows, "perplexity (2k tokens)"):
        perplexity(model, ws.evaluation, device=str(ws.device))
    return rows


def measure(spec: str, gptq: bool, sequences: int, length: int, store: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        console.rule(f"{spec}: building")
        model_dir = build_model(spec, Path(tmp) / "model")
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / GB
        out = Path(tmp) / "phases.json"
        cmd = [sys.executable, __file__, "--child", str(model_dir), "--out", str(out), "--sequences", str(sequences),
               "--length", str(length), "--spec", spec, "--store", store] + (["--with-gptq"] if gptq else [])
        subprocess.run(cmd, cwd=ROOT, check=True)
        name, _, blocks = spec.partition(":")
        n_blocks = int(blocks) if blocks else SHAPES[name]["num_hidden_layers"]
        return [{"model": spec, "store": store, "blocks": n_blocks, "checkpoint_gb": round(size, 3), **r}
                for r in json.loads(out.read_text())]


def config_shapes(name: str) -> Shapes:
    return Shapes.from_config(SHAPES[name])


def per_block_expected_gb(s: Shapes, sequences: int, length: int, bits: list[int], group_size: int) -> float:
    """One block's bf16 weights + its packed candidates + its teacher activations (hidden states
    and gradients in bf16): what each added block should cost the host."""
    weights = s.block_linear * 2
    candidates = packed_candidate_bytes(s.block_linear, bits, group_size, s.hidden)
    activations = 2 * sequences * length * s.hidden * 2
    return (weights + candidates + activations) / GB


def host_goal_gb(s: Shapes, sequences: int, length: int) -> float:
    """1.3 x the model's bf16 size + the teacher activations + 2 GB."""
    activations = ((s.layers + 1) + s.layers) * sequences * length * s.hidden * 2
    return (1.3 * s.parameters * 2 + activations) / GB + 2


def linear_fit(xs: list[int], ys: list[float]) -> dict:
    slope, intercept = np.polyfit(xs, ys, 1)
    worst = max(abs(y - (slope * x + intercept)) / y for x, y in zip(xs, ys))
    return {"per_block": round(float(slope), 3), "fixed": round(float(intercept), 3),
            "largest_fit_error": round(float(worst), 3)}


def steady_step(rows: list[dict], model: str, store: str = "held") -> float:
    """Seconds per Stage I step after the first: (time of 1 + STEADY steps - time of one) / STEADY."""
    seconds = {r["phase"]: r["seconds"] for r in rows if (r["model"], r["store"]) == (model, store)}
    return (seconds[STEPS] - seconds[STEP]) / STEADY


def summarize(rows: list[dict], sequences: int, length: int) -> dict:
    """The goals of issue 23 against the measured rows, and the projections to full 8B/32B/70B models."""
    from gamma.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    bits, group = cfg.candidates, cfg.quantizer.group_size
    out: dict = {"host_goal": {}}
    for model, store in sorted({(r["model"], r["store"]) for r in rows}):
        name, _, blocks = model.partition(":")
        s = config_shapes(name)
        s = Shapes(**{**vars(s), "layers": int(blocks) if blocks else s.layers})
        mine = [r for r in rows if (r["model"], r["store"]) == (model, store)]
        peak = max(r["peak_host_gb"] for r in mine)
        held = max((r["held_host_gb"] for r in mine if "held_host_gb" in r), default=None)
        goal = host_goal_gb(s, sequences, length)
        out["host_goal"][f"{model} ({store})"] = {
            "peak_host_gb": peak, "goal_gb": round(goal, 2), "met": peak <= goal,
            "held_host_gb": held, "held_met": None if held is None else held <= goal}
    held = [r for r in rows if r["store"] == "held"]  # the 8B sweep: candidates held, as on the CPU by default
    sweep = sorted({r["blocks"] for r in held if r["model"].startswith("llama-3.1-8b:")})
    if len(sweep) >= 2:
        peaks = [max(r["peak_host_gb"] for r in held if r["model"] == f"llama-3.1-8b:{b}") for b in sweep]
        steps = [steady_step(held, f"llama-3.1-8b:{b}") for b in sweep]
        host, step = linear_fit(sweep, peaks), linear_fit(sweep, steps)
        expected = per_block_expected_gb(config_shapes("llama-3.1-8b"), sequences, length, bits, group)
        host["expected_per_block"] = round(expected, 3)
        host["slope_over_expected"] = round(host["per_block"] / expected, 3)
        out["fit_8b"] = {"peak_host_gb": host, "stage1_step_seconds": step}
        out["projected"] = project(step, cfg)
    return out


def project(step_fit: dict, cfg) -> dict:
    """Full models at the default calibration size (params.yaml): host and device memory from
    gamma's own estimate, Stage I step time on this CPU from the 8B block sweep's per-block slope
    scaled by each block's weights (a step's work is the block's weights times the step's tokens)."""
    per_weight = step_fit["per_block"] / config_shapes("llama-3.1-8b").block_linear
    out = {}
    for name in ("llama-3.1-8b", "qwen2.5-32b", "llama-3.1-70b"):
        s = config_shapes(name)
        goal = host_goal_gb(s, cfg.text.calibration_sequences, cfg.text.sequence_length)
        out[name] = {"blocks": s.layers, "bf16_gb": round(s.parameters * 2 / GB, 2), **memory_estimates(name),
                     "host_goal_gb": round(goal, 2),
                     "stage1_step_seconds_cpu": round(per_weight * s.block_linear * s.layers + step_fit["fixed"], 1),
                     "calibration": f"{cfg.text.calibration_sequences} x {cfg.text.sequence_length}"}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r["model"].split(":")[0] for r in rows if r["store"] == "held"}):
        mine = [r for r in rows if r["model"].split(":")[0] == name and r["store"] == "held"]
        blocks = sorted({r["blocks"] for r in mine})
        ax.plot(blocks, [max(r["peak_host_gb"] for r in mine if r["blocks"] == b) for b in blocks], "o-", label=name)
    ax.set_xlabel("decoder blocks")
    ax.set_ylabel("peak host memory, GB (all phases)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--gptq", default="llama-3.2-1b", help="models that also time GPTQ's candidates (slow on "
                                                           "CPU: a 14336-column GPTQ per module and width)")
    ap.add_argument("--sequences", type=int, default=4, help="calibration sequences")
    ap.add_argument("--length", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--with-gptq", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", default="held", choices=("held", "rebuilt"),
                    help="quantizer.candidate_store for the Stage I phases (rebuilt: RTN's, per block)")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows = run_phases(args.child, args.with_gptq, args.sequences, args.length, args.spec, args.store)
        Path(args.out).write_text(json.dumps(rows))
        return
    gptq = set(filter(None, args.gptq.split(",")))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # model.device: auto, as params.yaml has it
    settings = {"sequences": args.sequences, "length": args.length, "gptq": sorted(gptq), "device": device}
    for spec in filter(None, args.models.split(",")):  # written after each model: a later failure loses nothing
        path = write_results("scale", settings, measure(spec, spec in gptq, args.sequences, args.length, args.store),
                             key=("model", "store", "phase"))
        console.print(f"wrote {path}")
    data = json.loads((RESULTS / "scale.json").read_text())
    data["settings"]["summary"] = summarize(data["rows"], args.sequences, args.length)
    (RESULTS / "scale.json").write_text(json.dumps(data, indent=1) + "\n")
    console.print(data["settings"]["summary"])
    plot(json.loads((RESULTS / "scale.json").read_text())["rows"], RESULTS / "scale.png")


if __name__ == "__main__":
    main()
