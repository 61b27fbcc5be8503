"""The inputs of a run, resolved once from the configuration: model directory, prepared text,
token sequences and their content hashes. Pure library code (no orchestrator imports)."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from gamma.config import GammaConfig, shares_widths
from gamma.evaluation.metrics import reference_logprobs
from gamma.hashing import content_md5
from gamma.model.blocks import walk_error
from gamma.model.candidates import RebuiltCandidates, build_candidates
from gamma.model.coverage import coverage
from gamma.model.device import resolve_device
from gamma.model.loading import ModelInputError, load_model, quantizable_modules, resolve_dtype, resolve_model_path
from gamma.model.memory import Shapes
from gamma.model.text import (
    PreparedText,
    evaluation_windows,
    overlap_note,
    prepare_text,
    sample_sequences,
    tokenize_file,
)
from gamma.model.units import allocation_units
from gamma.problem import AllocationProblem, Provenance
from gamma.progress import console
from gamma.quant import get_quantizer
from gamma.quant.hessians import collect_hessians

_SHARED: dict[tuple[str, str, str], Workspace] = {}
_SHARED_MAX = 4
_SHARED_LOCK = threading.Lock()
_REFERENCE_LOCK = threading.Lock()


@dataclass
class Workspace:
    cfg: GammaConfig
    # prepared allocators and their problem, shared by every budget this workspace serves
    allocators: dict = field(default_factory=dict, repr=False, compare=False)
    walk_error: float | None = field(default=None, repr=False, compare=False)  # set by the first load
    notes: list[str] = field(default_factory=list, repr=False, compare=False)  # warnings, recorded with the tables

    @cached_property
    def model_dir(self) -> Path:
        return resolve_model_path(self.cfg.model.path, self.cfg.model.data_dir)

    @cached_property
    def text(self) -> PreparedText:
        return self.prepare_text(reuse=True)

    def prepare_text(self, reuse: bool) -> PreparedText:
        t = self.cfg.text
        return prepare_text(t.source, Path(self.cfg.model.data_dir) / "text", t.eval_fraction, t.split_seed, reuse)

    @cached_property
    def model_hash(self) -> str:
        return content_md5(self.model_dir)

    @cached_property
    def text_hash(self) -> str:
        return content_md5(self.text.calibration)

    @classmethod
    def shared(cls, cfg: GammaConfig, model_hash: str, text_hash: str) -> Workspace:
        """One workspace per configuration and input content in this process, so that the tasks of
        a run (every budget of a fan-out) load the text and tokenize it once. Keyed on the content
        hashes the run recorded: new data never meets a stale workspace in a long-lived process."""
        key = (cfg.model_dump_json(), model_hash, text_hash)
        with _SHARED_LOCK:
            if key not in _SHARED:
                while len(_SHARED) >= _SHARED_MAX:
                    _SHARED.pop(next(iter(_SHARED)))
                ws = cls(cfg)
                ws.__dict__.update(model_hash=model_hash, text_hash=text_hash)
                _SHARED[key] = ws
            return _SHARED[key]

    def load(self):
        """A fresh copy of the full-precision model (on the host, in ``model.dtype``) and its tokenizer.
        The first load of a workspace checks the block walk against the model's own forward."""
        if self.walk_error is None:
            self.check_shapes()
        model, tokenizer = load_model(self.model_dir, self.dtype)
        if self.walk_error is None:
            self.walk_error = walk_error(model, self.calibration[:1], self.device)
            console.print(f"block walk checked against {type(model).__name__}'s own forward on one calibration "
                          f"sequence: largest logit difference {self.walk_error:.1g} of the largest logit")
            console.print(coverage(model).line())
        return model, tokenizer

    def check_shapes(self) -> None:
        """Settings that the model's shapes refuse (a group size that divides no width, sequences
        longer than its positions), from config.json before anything heavy; a config without a
        decoder's shapes is checked module by module when it is quantized."""
        try:
            shapes = Shapes.of(self.model_dir)
        except ModelInputError:
            return
        shapes.check_group_size(self.cfg.quantizer.group_size)
        shapes.check_lengths({"text.sequence_length": self.cfg.text.sequence_length,
                              "evaluation.context_length": self.cfg.evaluation.context_length})

    @cached_property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.model.dtype, self.model_dir)

    @cached_property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.model.device)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    @cached_property
    def calibration(self) -> torch.Tensor:
        t = self.cfg.text
        tokens = tokenize_file(self.text.calibration, self.tokenizer)
        note = overlap_note(tokens.numel(), t.calibration_sequences, t.sequence_length)
        if note:
            console.print(f"[yellow]warning: {note}")
            self.notes.append(note)
        return sample_sequences(tokens, t.calibration_sequences, t.sequence_length, t.seed)

    @cached_property
    def evaluation(self) -> torch.Tensor:
        e = self.cfg.evaluation
        return evaluation_windows(tokenize_file(self.text.evaluation, self.tokenizer), e.context_length, e.max_tokens)

    def reference(self, model=None):
        """The unquantized model's log-probabilities on the KL windows (``evaluation.kl_tokens``),
        memory-mapped from ``<output_dir>/reference``; computed once per model, text and settings,
        from ``model`` when given (the caller's full-precision copy: no second load), else from a
        fresh load. None when the KL divergence is not measured."""
        e = self.cfg.evaluation
        if not e.kl_tokens:
            return None
        windows = self.evaluation[: math.ceil(e.kl_tokens / e.context_length)]
        key = hashlib.md5(json.dumps([self.model_hash, content_md5(self.text.evaluation), list(windows.shape),
                                      str(self.dtype)]).encode()).hexdigest()[:16]
        path = Path(self.cfg.output_dir) / "reference" / f"{key}.npy"
        with _REFERENCE_LOCK:  # the budgets of a fan-out: one computes, the others wait and read
            if not path.exists():
                model = model if model is not None else self.load()[0]
                console.log(f"reference log-probabilities of the unquantized model for the KL divergence: {path}")
                reference_logprobs(model, windows, path, max(1, e.batch_size // 2), str(self.device))
            return reference_logprobs(None, windows, path)

    def quantizer(self):
        q = self.cfg.quantizer
        return get_quantizer("gptq", **q.gptq.model_dump()) if q.method == "gptq" else get_quantizer("rtn")

    def quantizer_record(self) -> dict:
        q = self.cfg.quantizer
        rec = {"name": q.method, "group_size": q.group_size, "symmetric": q.symmetric}
        if q.method == "gptq":
            rec.update(q.gptq.model_dump())
        return rec

    def provenance(self) -> Provenance:
        a = self.cfg.allocation
        units = {"ties": a.ties, "experts": a.experts} if shares_widths(a.ties, a.experts) else {}
        return Provenance(self.model_hash, self.text_hash, self.quantizer_record(),
                          self.cfg.text.model_dump(exclude={"source"}), str(self.dtype).removeprefix("torch."), units)

    def hessians(self, model) -> dict[str, torch.Tensor] | None:
        """Full-precision Hessians of every module when the quantizer reads them, else None."""
        quantizer, g = self.quantizer(), self.cfg.quantizer.gptq
        if not quantizer.needs_hessians:
            return None
        return collect_hessians(model, self.calibration, token_clip=g.token_clip, sink_weight=g.sink_weight,
                               device=self.device)

    def reusable_hessians(self, model) -> dict[str, torch.Tensor] | None:
        """Full-precision Hessians to share across several assignments, or None when there is nothing
        to share (RTN, or sequential GPTQ, whose Hessians depend on each assignment's quantized prefix)."""
        return None if self.quantizer().sequential else self.hessians(model)

    def problem(self) -> AllocationProblem:
        """The shared input of every allocator and of Stage I: a fresh full-precision model, the
        calibration sequences and each module quantized at every candidate width (GPTQ with
        full-precision Hessians), with the run's knapsack settings and provenance."""
        cfg, q = self.cfg, self.cfg.quantizer
        model, _ = self.load()
        candidates = self.candidates(model)
        units = allocation_units(list(candidates), cfg.allocation.ties, cfg.allocation.experts)
        return AllocationProblem(model, self.calibration, candidates, cfg.candidates, q.group_size,
                                 q.symmetric, cfg.stage1.seed, self.quantizer(), None, cfg.stage2, self.provenance(),
                                 str(self.device), units, zero_points=cfg.serving.zero_points)

    def candidates(self, model) -> Mapping:
        """Every module at every candidate width: held packed on the host, or rebuilt on the device
        whenever asked (``candidate_store``). GPTQ's are built block by block during the walk that
        takes the block's full-precision Hessians, which are then dropped: never all of them at once."""
        cfg, q, quantizer = self.cfg, self.cfg.quantizer, self.quantizer()
        if q.store_on(self.device.type) == "rebuilt":
            console.print(f"candidates: {quantizer.name} at bits {cfg.candidates}, rebuilt on {self.device} "
                          "whenever a block needs them (quantizer.candidate_store), none held on the host")
            return RebuiltCandidates(model, quantizer, cfg.candidates, q.group_size, q.symmetric, self.device)
        if not quantizer.needs_hessians:
            return build_candidates(model, quantizer, cfg.candidates, q.group_size, q.symmetric, device=self.device)
        built: dict = {}

        def build_block(_index: int, hessians: dict) -> None:
            unseen = [name for name, h in hessians.items() if not h.any()]
            if unseen:
                note = (f"{len(unseen)} modules saw no calibration token ({', '.join(unseen[:3])}"
                        f"{', ...' if len(unseen) > 3 else ''}): GPTQ rounds them to nearest (no Hessian)")
                console.print(f"[yellow]warning: {note}")
                self.notes.append(note)
            built.update(build_candidates(model, quantizer, cfg.candidates, q.group_size, q.symmetric, hessians,
                                          sorted(hessians), progress=False, device=self.device))

        g = q.gptq
        collect_hessians(model, self.calibration, token_clip=g.token_clip, sink_weight=g.sink_weight,
                         device=self.device, on_block=build_block)  # its progress shows the candidates too
        return {name: built[name] for name in quantizable_modules(model)}

    @staticmethod
    def module_sizes(model) -> tuple[list[str], list[tuple[int, int]]]:
        mods = quantizable_modules(model)
        return list(mods), [tuple(m.weight.shape) for m in mods.values()]
