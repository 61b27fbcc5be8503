"""Serving profiles: a configuration outside the profile is refused naming each value; a variant
records the profile it was made for and the loaders that read it back."""

from types import SimpleNamespace

import pytest
from conftest import DATA, defaults

from gamma import cli


@pytest.mark.parametrize("profile, sets, named", [
    ("vllm-marlin", [], ["candidates=[2, 3, 4]", "allocation.ties=none", "allocation.experts=per_expert"]),
    ("vllm-marlin", ["candidates=[4,8,16]", "stage1.budget=6", "stage1.extra_budgets=[]", "stage2.budgets=[5]",
                     "allocation.ties=fused", "allocation.experts=per_layer", "quantizer.group_size=48"],
     ["quantizer.group_size=48"]),
    ("vllm-marlin", ["candidates=[4,8,16]", "stage1.budget=6", "stage1.extra_budgets=[]", "stage2.budgets=[5]",
                     "allocation.ties=fused", "allocation.experts=per_layer"], ["with zero-points it serves [4, 16]"]),
    ("vllm-humming", ["quantizer.group_size=48"], ["allocation.ties=none", "allocation.experts=per_expert",
                                                   "quantizer.group_size=48"]),
])
def test_a_configuration_outside_its_profile_is_refused_naming_every_value(profile, sets, named, tmp_path, capsys):
    argv = ["allocate", "--params", str(defaults(tmp_path)), "--set", f"serving.profile={profile}",
            *(a for s in sets for a in ("--set", s))]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert f"serving.profile={profile} does not take" in out and all(n in out for n in named), out


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
