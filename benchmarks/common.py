"""Shared by the benchmark scripts: results file in the format of method.md."""

from __future__ import annotations

import argparse
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


def write_results(name: str, settings: dict, rows: list[dict], key: tuple[str, ...] | None = None) -> Path:
    """Write ``benchmarks/results/<name>.json``. With ``key``, every row is stamped with the commit
    and date it was measured at and merged by its key into the rows already there: a rerun
    replaces only the rows it recomputed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    stamp = {"commit": commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    settings = {**settings, **stamp}
    if key is not None:
        old = json.loads(path.read_text())["rows"] if path.exists() else []
        new = {tuple(r[k] for k in key): {**r, **stamp} for r in rows}
        rows = [r for r in old if tuple(r.get(k) for k in key) not in new] + list(new.values())
    path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1, default=str) + "\n")
    return path


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
