"""Stage I data-parallel over processes (CPU, gloo) or GPUs (NCCL) through ``accelerate``.

Each process holds the teacher data of its share of the calibration sequences and streams the
blocks through its own device; logit gradients (and the Fisher proxy) are summed over processes
with ``accelerator.reduce``, so every process takes the same optimizer steps and the main process
writes the one score table. ``launch_stage1`` starts the processes with ``accelerate launch``
(``--multi_gpu`` plus ``ACCELERATE_USE_CPU=1`` on CPU: ``--cpu --num_processes N`` silently runs
one process, and ``--multi_gpu`` alone on a CPU machine runs N unconnected ones), streams
their output and, when a worker dies, raises with that worker's own error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import torch

from gamma.progress import console, set_quiet


class Stage1LaunchError(RuntimeError):
    """A Stage I worker failed; the message carries its own error output."""


def in_process_group() -> bool:
    """True inside a process that ``accelerate launch`` (or torchrun) started with others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def write_params(cfg, path: str | Path) -> Path:
    """The resolved configuration (file plus overrides) for the launched processes to read."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    return path


def learn_in_process_group(ws, checkpoint: str | Path | None, out: str | Path, stop_after: int | None = None):
    """Run inside each launched process: Stage I on this process's share, the table written once.

    Returns the score table on the main process, None elsewhere. Every process also writes
    ``<out>.rank<r>.json`` with its wall time and peak memory."""
    from accelerate import Accelerator

    from gamma.steps import learn_score_table

    acc = Accelerator()
    rank, world = acc.process_index, acc.num_processes
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if world != expected:  # accelerate's quiet fallback: each process would train alone on a share
        raise Stage1LaunchError(f"launched as {expected} processes but accelerate set up {world} "
                                f"({acc.distributed_type}); on CPU set ACCELERATE_USE_CPU=1")
    set_quiet(rank != 0 or os.environ.get("GAMMA_QUIET") == "1")  # one progress stream, the main process's

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return acc.reduce(t.to(acc.device), reduction="sum").to(t.device)

    t0 = time.perf_counter()
    table = learn_score_table(ws, checkpoint=checkpoint, stop_after=stop_after, rank=rank, world=world,
                              all_reduce=all_reduce if world > 1 else None, device=str(acc.device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "device": str(acc.device), "distributed_type": str(acc.distributed_type),
        "wall_seconds": time.perf_counter() - t0, "stage1_seconds": table.wall_seconds,
        "peak_memory_mb": table.peak_memory_mb}) + "\n")
    acc.wait_for_everyone()
    if acc.is_main_process:
        table.save(out)
        return table
    return None


def free_port() -> int:
    """A TCP port free on loopback now (for a launcher or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(params: str | Path, out: str | Path, processes: int) -> list[str]:
    """``accelerate launch`` of ``gamma learn`` over ``processes`` processes (GPUs when present)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "gamma.cli", "learn", "--params", str(params), "--out", str(out)]


def launch_stage1(params: str | Path, out: str | Path, processes: int, on_line=None) -> Path:
    """Launch Stage I over ``processes`` processes; return the score table path once written.

    Output lines go to ``on_line`` (default: the console) as they come. A failed worker raises
    ``Stage1LaunchError`` with its traceback; nothing is left at ``out`` then."""
    out = Path(out)
    out.unlink(missing_ok=True)
    cmd = launch_command(params, out, processes)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                       str(max(1, (os.cpu_count() or 1) // processes)))}
    if not torch.cuda.is_available():
        # Without it accelerate sets up no process group on CPU: N processes each training alone.
        env["ACCELERATE_USE_CPU"] = "1"
    on_line = on_line or (lambda line: console.log(line))
    tail: deque[str] = deque(maxlen=40)
    errors: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if "error" in line.lower() or "Traceback" in line or errors:
            errors.append(line)
        on_line(line)
    if proc.wait() != 0 or not out.exists():
        out.unlink(missing_ok=True)
        detail = "\n".join(errors[:60] or list(tail))
        raise Stage1LaunchError(f"Stage I over {processes} processes failed (exit {proc.returncode}):\n{detail}")
    return out


def learn_with_processes(ws, out_dir: str | Path, on_line=None):
    """Stage I as configured: in this process, or over ``stage1.processes`` launched processes.
    The score table is saved at ``<out_dir>/scores.json`` and returned."""
    from gamma.scores import ScoreTable
    from gamma.steps import learn_score_table

    out_dir = Path(out_dir)
    path = out_dir / "scores.json"
    n = ws.cfg.stage1.processes
    if n > 1:
        launch_stage1(write_params(ws.cfg, out_dir / "stage1_params.yaml"), path, n, on_line)
        return ScoreTable.load(path)
    table = learn_score_table(ws, checkpoint=out_dir / "stage1.ckpt")
    table.save(path)
    return table
