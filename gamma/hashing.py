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
    """The md5 DVC records for ``path`` (in ``.dvc`` files and ``dvc.lock``): a file's md5, or for
    a directory the md5 of its sorted ``[{"md5", "relpath"}]`` listing with ``.dir`` appended."""
    p = Path(path)
    if p.is_file():
        return file_md5(p)
    if not p.is_dir():
        raise FileNotFoundError(f"cannot hash {p}: no such file or directory")
    files = sorted((f.relative_to(p).as_posix(), f) for f in p.rglob("*") if f.is_file())
    listing = [{"md5": file_md5(f), "relpath": rel} for rel, f in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def settings_hash(settings: dict) -> str:
    return hashlib.md5(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
