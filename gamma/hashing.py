"""Content hashes (md5, as DVC uses) of files and directories, for lineage and cache keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_md5(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_md5(path: str | Path) -> str:
    """md5 of a file, or of a directory's sorted (relative path, md5) listing."""
    p = Path(path)
    if p.is_file():
        return file_md5(p)
    listing = [(str(f.relative_to(p)), file_md5(f)) for f in sorted(p.rglob("*")) if f.is_file()]
    return hashlib.md5(json.dumps(listing).encode()).hexdigest()


def settings_hash(settings: dict) -> str:
    return hashlib.md5(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
