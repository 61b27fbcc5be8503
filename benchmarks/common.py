"""Shared by the benchmark scripts: results file in the format of method.md."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(name: str, settings: dict, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    settings = {**settings, "commit": commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1, default=str) + "\n")
    return path
