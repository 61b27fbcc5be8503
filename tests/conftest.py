import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GAMMA_QUIET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def model_dir():
    from gamma.model.loading import resolve_model_path

    return resolve_model_path("embedded", DATA)


@pytest.fixture(scope="session")
def text(model_dir):
    from gamma.model.text import prepare_text

    return prepare_text("embedded", DATA / "text")


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    from gamma.model.loading import load_model

    return load_model(model_dir)


@pytest.fixture(scope="session")
def calibration(model_and_tokenizer, text):
    from gamma.model.text import sample_sequences, tokenize_file

    tokens = tokenize_file(text.calibration, model_and_tokenizer[1])
    return sample_sequences(tokens, 4, 128, seed=0)


def defaults(tmp_path: Path) -> Path:
    """A params file with every setting at its default (the research profile's) but one score table
    (``stage1.extra_budgets: []``), which is what the tests time."""
    path = tmp_path / "defaults.yaml"
    path.write_text("stage1:\n  extra_budgets: []\n")
    return path
