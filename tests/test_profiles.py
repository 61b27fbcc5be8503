"""Serving profiles: a profile alone sets a run's widths, units, Stage I recipe and budgets; a
configuration outside the profile is refused naming each value; a variant records the profile it
was made for and the loaders that read it back."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DATA, defaults

from gamma import cli
from gamma.config import load_config
from gamma.operations.profiles import PROFILE_SETTINGS, PROFILES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile, sets, named", [
    ("vllm-marlin", ["candidates=[2,3,4]", "allocation.ties=none", "allocation.experts=per_expert"],
     ["candidates=[2, 3, 4]", "allocation.ties=none", "allocation.experts=per_expert"]),
    ("vllm-marlin", ["quantizer.group_size=48"], ["quantizer.group_size=48"]),
    ("vllm-marlin", ["quantizer.symmetric=false"], ["with zero-points it serves [4, 16]"]),
    ("vllm-humming", ["quantizer.group_size=48", "allocation.ties=none"], ["allocation.ties=none",
                                                                        "quantizer.group_size=48"]),
])
def test_a_configuration_outside_its_profile_is_refused_naming_every_value(profile, sets, named, tmp_path, capsys):
    argv = ["allocate", "--params", str(defaults(tmp_path)), "--set", f"serving.profile={profile}",
            *(a for s in sets for a in ("--set", s))]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert f"serving.profile={profile} does not take" in out and all(n in out for n in named), out


@pytest.mark.parametrize("profile", list(PROFILES))
def test_a_profile_alone_sets_its_widths_units_recipe_and_budgets(profile, tmp_path):
    """``--set serving.profile=X`` is enough: what params.yaml leaves to the profile comes from it,
    and is recorded as coming from it."""
    cfg = load_config(ROOT / "params.yaml", {"serving.profile": profile})
    given = PROFILES[profile].settings
    assert sorted(given) == sorted(PROFILE_SETTINGS)
    assert cfg.serving.from_profile == list(PROFILE_SETTINGS)
    for dotted, value in given.items():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, dotted
    assert set(cfg.candidates) <= set(PROFILES[profile].bits)


def test_what_the_file_or_set_gives_beats_the_profile(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("serving:\n  profile: transformers\nstage1:\n  relaxation: soft\n")
    cfg = load_config(params, {"stage2.budgets": [3.0]})
    assert (cfg.stage1.relaxation, cfg.stage1.loss, cfg.stage2.budgets) == ("soft", "end_to_end", [3.0])
    assert "stage1.relaxation" not in cfg.serving.from_profile and "stage2.budgets" not in cfg.serving.from_profile
    assert "stage1.loss" in cfg.serving.from_profile


def test_the_shipped_params_are_the_research_profile():
    """params.yaml leaves every profile setting to the profile (a key written there would stop
    ``--set serving.profile=...`` from setting it); research's are the main command's."""
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.serving.profile == "research" and cfg.serving.from_profile == list(PROFILE_SETTINGS)
    assert cfg.stage1.training_budgets == [2.75, 3.0, 3.5] and cfg.stage2.budgets == [2.5, 3.0, 3.5]


def test_gamma_profiles_lists_each_profile_and_what_this_run_gives_itself(tmp_path, capsys):
    code = cli.main(["profiles", "--params", str(defaults(tmp_path)), "--set", "serving.profile=vllm-marlin"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 0 and all(name in out for name in PROFILES) and "4.25,4.5,5.0,6.0" in out, out
    assert "serving.profile=vllm-marlin; it gives its own stage1.extra_budgets" in " ".join(out.split())


@pytest.mark.parametrize("symmetric", ["true", "false"])
def test_a_transformers_profile_variant_is_read_back_by_transformers_and_says_so(tmp_path, model_dir, symmetric):
    """Symmetric and asymmetric (zero-points in the layout transformers reads): transformers' own
    loader computes the in-memory variant's logits, and the account is the stored bytes exactly."""
    from safetensors import safe_open
    from test_architectures import SETTINGS, build

    from gamma.config import load_config, parse_overrides

    folder = build("Qwen2", tmp_path / "qwen2", model_dir)
    sets = [f"model.path={folder}", f"model.data_dir={DATA}", f"output_dir={tmp_path / 'out'}", *SETTINGS,
            "serving.profile=transformers", f"quantizer.symmetric={symmetric}"]
    base = ["--params", str(defaults(tmp_path)), *(a for s in sets for a in ("--set", s))]
    assert cli.main(["learn", *base]) == 0 and cli.main(["allocate", *base, "--budgets", "3"]) == 0
    cfg = load_config(defaults(tmp_path), parse_overrides(sets))
    row = cli.cmd_quantize(cfg, SimpleNamespace(assignment=None, budget=3.0))
    assert row["serving_profile"] == "transformers" and row["loads_in"] == ["gamma", "transformers"]
    stored = 0
    for f in (tmp_path / "out" / "models" / "3").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            stored += sum(st.get_tensor(k).numel() * st.get_tensor(k).element_size() for k in st.keys())
    assert row["total_bytes"] == stored


@pytest.mark.parametrize("environment", ["none", "vllm", "refused"])
def test_a_vllm_profile_variant_says_whether_vllms_loader_was_checked(environment, tmp_path, model_dir, monkeypatch):
    """Without a vLLM environment a vllm-marlin variant's ``loads_in`` is gamma's alone and
    ``unchecked`` says why; with one, vLLM's own loader (config, weights, one forward; the worker's
    reference kernel for the 8-bit layers the CPU build has no kernel for) is run on the variant
    and ``loads_in`` names it; vLLM's refusal (its verdict stood in for) fails the variant with
    vLLM's error."""
    import torch
    import transformers
    from test_architectures import SETTINGS

    from gamma.config import VllmConfig, parse_overrides
    from gamma.evaluation.backends import BackendUnavailable, VllmBackend
    from gamma.model.export import CheckpointError

    if environment == "none":
        monkeypatch.delenv("GAMMA_VLLM_PYTHON", raising=False)
    elif environment == "refused":
        monkeypatch.setattr("gamma.run.variant.vllm_loads", lambda cfg, ckpt: {
            "accepted": False, "stage": "load", "error": "ValueError: a shard's shape differs"})
    else:
        try:
            VllmBackend(VllmConfig()).ready()
        except BackendUnavailable as err:
            pytest.skip(f"no vLLM that runs here: {err}")
    folder, tokenizer = tmp_path / "qwen2", transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.save_pretrained(folder)  # head_dim 64: vLLM's CPU attention takes no smaller
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, vocab_size=len(tokenizer))).save_pretrained(folder)
    sets = [f"model.path={folder}", f"model.data_dir={DATA}", f"output_dir={tmp_path / 'out'}", *SETTINGS,
            "serving.profile=vllm-marlin", "quantizer.group_size=32"]
    base = ["--params", str(defaults(tmp_path)), *(a for s in sets for a in ("--set", s))]
    assert cli.main(["learn", *base]) == 0 and cli.main(["allocate", *base, "--budgets", "6"]) == 0
    cfg = load_config(defaults(tmp_path), parse_overrides(sets))
    if environment == "refused":
        with pytest.raises(CheckpointError, match="vLLM refuses .* at stage 'load': ValueError: a shard's shape"):
            cli.cmd_quantize(cfg, SimpleNamespace(assignment=None, budget=6.0))
        return
    row = cli.cmd_quantize(cfg, SimpleNamespace(assignment=None, budget=6.0))
    assignment = json.loads((tmp_path / "out" / "models" / "6" / "gamma_assignment.json").read_text())
    assert row["serving_profile"] == "vllm-marlin" and set(assignment.values()) > {4}  # 8 or 16 bits too
    if environment == "none":
        assert row["loads_in"] == ["gamma"] and "no vLLM environment" in row["unchecked"]["vllm"]
    else:
        assert row["loads_in"] == ["gamma", "vllm"] and "unchecked" not in row, row  # the forward ran too
