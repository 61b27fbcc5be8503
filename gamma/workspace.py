"""The inputs of a run, resolved once from the configuration: model directory, prepared text,
token sequences and their content hashes. Pure library code (no orchestrator imports)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from gamma.config import GammaConfig
from gamma.hashing import content_md5
from gamma.model import load_model, quantizable_modules, resolve_model_path
from gamma.quantizer import get_quantizer
from gamma.text import PreparedText, evaluation_windows, prepare_text, sample_sequences, tokenize_file


@dataclass
class Workspace:
    cfg: GammaConfig

    @cached_property
    def model_dir(self) -> Path:
        return resolve_model_path(self.cfg.model.path, self.cfg.model.data_dir)

    @cached_property
    def text(self) -> PreparedText:
        t = self.cfg.text
        return prepare_text(t.source, Path(self.cfg.model.data_dir) / "text", t.eval_fraction, t.split_seed)

    @cached_property
    def model_hash(self) -> str:
        return content_md5(self.model_dir)

    @cached_property
    def text_hash(self) -> str:
        return content_md5(self.text.calibration)

    def load(self):
        """A fresh copy of the full-precision model and its tokenizer."""
        return load_model(self.model_dir)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    @cached_property
    def calibration(self) -> torch.Tensor:
        t = self.cfg.text
        tokens = tokenize_file(self.text.calibration, self.tokenizer)
        return sample_sequences(tokens, t.calibration_sequences, t.sequence_length, t.seed)

    @cached_property
    def evaluation(self) -> torch.Tensor:
        e = self.cfg.evaluation
        return evaluation_windows(tokenize_file(self.text.evaluation, self.tokenizer), e.context_length, e.max_tokens)

    def quantizer(self):
        q = self.cfg.quantizer
        return get_quantizer("gptq", **q.gptq.model_dump()) if q.method == "gptq" else get_quantizer("rtn")

    def quantizer_record(self) -> dict:
        q = self.cfg.quantizer
        rec = {"name": q.method, "group_size": q.group_size, "symmetric": q.symmetric}
        if q.method == "gptq":
            rec.update(q.gptq.model_dump())
        return rec

    @staticmethod
    def module_sizes(model) -> tuple[list[str], list[tuple[int, int]]]:
        mods = quantizable_modules(model)
        return list(mods), [tuple(m.weight.shape) for m in mods.values()]
