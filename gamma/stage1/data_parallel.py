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

import os
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

import torch

from gamma.config import command_line
from gamma.progress import console, set_quiet
from gamma.stage1.shard import Shard


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


def process_group_shard():
    """Inside a process that ``accelerate launch`` started: this process's shard (rank, world and
    the sum over processes) and its ``Accelerator`` (device, main process, barrier). Refuses
    accelerate's quiet fallback to unconnected processes, each training alone on its share."""
    from accelerate import Accelerator

    acc = Accelerator()
    rank, world = acc.process_index, acc.num_processes
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if world != expected:
        raise Stage1LaunchError(f"launched as {expected} processes but accelerate set up {world} "
                                f"({acc.distributed_type}); on CPU set ACCELERATE_USE_CPU=1")
    set_quiet(rank != 0 or os.environ.get("GAMMA_QUIET") == "1")  # one progress stream, the main process's

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        return acc.reduce(t.to(acc.device), reduction="sum").to(t.device)

    return Shard(rank, world, all_reduce if world > 1 else None), acc


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
            *command_line("learn", None, "--params", str(params), "--out", str(out))[1:]]


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
