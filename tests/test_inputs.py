import pytest
import torch
from torch import nn

from gamma.model.loading import ModelInputError, quantizable_modules, resolve_model_path
from gamma.model.text import TextInputError, prepare_text, sample_sequences, split_documents


def test_embedded_model_converted_to_safetensors(model_dir, model_and_tokenizer):
    assert (model_dir / "model.safetensors").exists() and (model_dir / "config.json").exists()
    model, _ = model_and_tokenizer
    mods = quantizable_modules(model)
    assert len(mods) == 30 * 7
    assert {m.weight.shape[1] for m in mods.values()} == {576, 1536}


def test_model_path_errors(tmp_path):
    with pytest.raises(ModelInputError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ModelInputError, match="hub id"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M", tmp_path)
    with pytest.raises(ModelInputError, match="config.json"):
        resolve_model_path(str(tmp_path), tmp_path)


def test_model_without_quantizable_linears_is_refused():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.LayerNorm(4)])

    with pytest.raises(ModelInputError, match="no nn.Linear"):
        quantizable_modules(Tiny())


def test_embedded_text_split_is_deterministic_and_disjoint(text, tmp_path):
    again = prepare_text("embedded", tmp_path)
    assert again.calibration.read_text() == text.calibration.read_text()
    import json

    m = json.loads(text.manifest.read_text())
    assert not set(m["calibration_documents"]) & set(m["evaluation_documents"])
    assert len(m["calibration_documents"]) > 3 * len(m["evaluation_documents"]) - 3


def test_user_text_folder_and_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(8):
        (folder / f"d{i}.txt").write_text(f"document {i} " * 50)
    out = prepare_text(str(folder), tmp_path / "out", eval_fraction=0.25)
    assert out.evaluation.read_text().count("document") == 2 * 50
    single = tmp_path / "one.txt"
    single.write_text("only one block")
    with pytest.raises(TextInputError, match="at least 2"):
        prepare_text(str(single), tmp_path / "out2")
    with pytest.raises(TextInputError, match="does not exist"):
        prepare_text(str(tmp_path / "missing"), tmp_path / "out3")


def test_prepared_text_is_reused_until_its_source_or_split_changes(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(8):
        (folder / f"d{i}.txt").write_text(f"document {i} " * 50)
    out = prepare_text(str(folder), tmp_path / "out")
    out.evaluation.write_text("marker")  # a rewrite would replace it
    assert prepare_text(str(folder), tmp_path / "out").evaluation.read_text() == "marker"
    (folder / "d0.txt").write_text("changed " * 50)
    assert "marker" not in prepare_text(str(folder), tmp_path / "out").evaluation.read_text()
    out.evaluation.write_text("marker")
    assert "marker" not in prepare_text(str(folder), tmp_path / "out", seed=1).evaluation.read_text()
    out.evaluation.write_text("marker")
    assert "marker" not in prepare_text(str(folder), tmp_path / "out", seed=1, reuse=False).evaluation.read_text()


def test_split_and_sampling_are_seeded():
    docs = [(f"t{i}", "x") for i in range(20)]
    ev1 = {t for t, _ in split_documents(docs, 0.25, 1)[1]}
    ev2 = {t for t, _ in split_documents(list(reversed(docs)), 0.25, 1)[1]}
    assert ev1 == ev2  # the split depends on the documents, not on the order they were listed
    a, b = split_documents(docs, 0.25, 1)
    assert len(b) == 5 and len(a) == 15
    tokens = torch.arange(1000)
    s1, s2 = sample_sequences(tokens, 4, 32, 7), sample_sequences(tokens, 4, 32, 7)
    assert torch.equal(s1, s2) and s1.shape == (4, 32)
    assert not torch.equal(s1, sample_sequences(tokens, 4, 32, 8))
    with pytest.raises(TextInputError):
        sample_sequences(tokens[:10], 1, 32, 0)
