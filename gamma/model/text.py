"""Text input: calibration and evaluation text, and token sequences drawn from it.

The embedded default is the English Wikipedia sample shipped in gensim's test data, stripped of
markup and split by article into calibration and evaluation text. A user's own text file or
folder goes through the same split (a folder: one document per file; a file: one document per
blank-line-separated paragraph block).
"""

from __future__ import annotations

import bz2
import json
import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gamma.config import EMBEDDED
from gamma.packaged import package_dir
from gamma.progress import status

CALIBRATION_FILE = "calibration.txt"
EVALUATION_FILE = "evaluation.txt"
DOCUMENT_SEPARATOR = "\n\n\n"
TEXT_SUFFIXES = (".txt", ".md", ".text")


class TextInputError(ValueError):
    """The text input cannot be used; the message says why."""


@dataclass(frozen=True)
class PreparedText:
    calibration: Path
    evaluation: Path
    manifest: Path


def _gensim_wiki_dump() -> Path:
    data = package_dir("gensim", "gensim==4.4.0", TextInputError) / "test" / "test_data"
    dumps = sorted(p for p in data.glob("enwiki*.bz2"))
    if not dumps:
        raise TextInputError(f"no enwiki*.bz2 file in {data}")
    return dumps[0]


def _wiki_articles(dump: Path) -> Iterator[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect article of a MediaWiki dump."""
    import mwparserfromhell

    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            title = fields["title"].text or ""
            ns = fields.get("ns")
            text_el = next((e for e in elem.iter() if e.tag.rsplit("}", 1)[-1] == "text"), None)
            raw = text_el.text if text_el is not None and text_el.text else ""
            elem.clear()
            if (ns is not None and ns.text != "0") or raw.lower().startswith("#redirect"):
                continue
            plain = mwparserfromhell.parse(raw).strip_code().strip()
            plain = "\n".join(line.strip() for line in plain.splitlines())
            while "\n\n\n" in plain:
                plain = plain.replace("\n\n\n", "\n\n")
            if len(plain) > 200:
                yield title, plain


def _read_text(path: Path) -> str:
    """A text file's content; binary data (a NUL byte, or more than 1% of it not UTF-8) is refused."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad, nul = text.count("\ufffd"), b"\x00" in raw
    if nul or bad > 0.01 * max(1, len(text)):
        raise TextInputError(f"text.source file {str(path)!r} is not UTF-8 text ({bad} undecodable characters"
                             f"{', NUL bytes' if nul else ''}): a binary file?")
    return text


def _user_documents(source: Path) -> list[tuple[str, str]]:
    if not source.exists():
        raise TextInputError(f"text.source={str(source)!r} does not exist")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise TextInputError(f"text.source={str(source)!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        docs = [(str(p.relative_to(source)), _read_text(p).strip()) for p in files]
    else:
        blocks = [b.strip() for b in _read_text(source).split("\n\n")]
        docs = [(f"block-{i}", b) for i, b in enumerate(blocks) if b]
    docs = [d for d in docs if d[1]]
    if len(docs) < 2:
        raise TextInputError(
            f"text.source={str(source)!r} yields {len(docs)} document(s); at least 2 are needed "
            "to split calibration from evaluation text"
        )
    return docs


def split_documents(
    docs: list[tuple[str, str]], eval_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic split by document: same documents and seed -> same split, on any machine."""
    order = sorted(range(len(docs)), key=lambda i: docs[i][0])
    random.Random(seed).shuffle(order)
    n_eval = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
    eval_ids = set(order[:n_eval])
    calib = [d for i, d in enumerate(docs) if i not in eval_ids]
    evaluation = [d for i, d in enumerate(docs) if i in eval_ids]
    return calib, evaluation


def _source_record(source: str, eval_fraction: float, seed: int) -> dict:
    """What determines the prepared text: the source's content, the split and this module's code."""
    from gamma.hashing import content_md5

    path = _gensim_wiki_dump() if source == EMBEDDED else Path(source).expanduser()
    if not path.exists():
        raise TextInputError(f"text.source={str(source)!r} does not exist")
    return {"origin": f"gensim:{path.name}" if source == EMBEDDED else str(source),
            "source_md5": content_md5(path), "code_md5": content_md5(Path(__file__)),
            "eval_fraction": eval_fraction, "seed": seed}


def prepare_text(source: str, out_dir: str | Path, eval_fraction: float = 0.25, seed: int = 0,
                 reuse: bool = True) -> PreparedText:
    """Write ``calibration.txt``, ``evaluation.txt`` and a manifest of which document went where.

    With ``reuse``, text already prepared from the same source content, split and code (as the
    manifest records) is returned untouched: a run reads what DVC versioned instead of rewriting it
    (and extraction costs seconds per step). ``gamma prepare`` (the DVC stage) prepares afresh."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = _source_record(source, eval_fraction, seed)
    paths = PreparedText(out / CALIBRATION_FILE, out / EVALUATION_FILE, out / "manifest.json")
    if reuse and paths.calibration.exists() and paths.evaluation.exists() and paths.manifest.exists():
        try:
            manifest = json.loads(paths.manifest.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if all(manifest.get(k) == v for k, v in record.items()):
            return paths
    with status("extracting text"):
        if source == EMBEDDED:
            docs = list(_wiki_articles(_gensim_wiki_dump()))
        else:
            docs = _user_documents(Path(source).expanduser())
    calib, evaluation = split_documents(docs, eval_fraction, seed)
    for path, part in ((paths.calibration, calib), (paths.evaluation, evaluation)):
        tmp = path.with_suffix(".partial")
        tmp.write_text(DOCUMENT_SEPARATOR.join(text for _, text in part) + "\n")
        tmp.replace(path)
    manifest = {**record, "calibration_documents": [t for t, _ in calib],
                "evaluation_documents": [t for t, _ in evaluation]}
    paths.manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def tokenize_file(path: str | Path, tokenizer) -> torch.Tensor:
    """All tokens of a text file as one 1-D LongTensor (no special tokens added)."""
    text = Path(path).read_text()
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_starts(tokens: int, n: int, length: int, seed: int) -> list[int]:
    """Where ``sample_sequences`` cuts its ``n`` windows from a text of ``tokens`` tokens."""
    if tokens < length + 1:
        raise TextInputError(f"the text has {tokens} tokens, fewer than one sequence of {length}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens - length, (n,), generator=g).tolist()


def sample_sequences(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` fixed-length windows at seeded random offsets: a [n, length] LongTensor."""
    return torch.stack([tokens[s : s + length] for s in sample_starts(tokens.numel(), n, length, seed)])


def overlap_note(tokens: int, n: int, length: int) -> str | None:
    """What to say when ``n`` sequences of ``length`` cannot all be distinct in ``tokens`` tokens."""
    if n * length <= tokens:
        return None
    return (f"the calibration text has {tokens} tokens, fewer than {n} sequences x {length}: the sequences overlap "
            "(a larger text gives more distinct ones)")


def evaluation_windows(tokens: torch.Tensor, context_length: int, max_tokens: int) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start: [n_windows, context_length]."""
    n = min(tokens.numel(), max_tokens) // context_length
    if n == 0:
        raise TextInputError(
            f"{min(tokens.numel(), max_tokens)} evaluation tokens (text {tokens.numel()}, max_tokens {max_tokens}) "
            f"are fewer than one window of {context_length}"
        )
    return tokens[: n * context_length].view(n, context_length)
