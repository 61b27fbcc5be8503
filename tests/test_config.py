from pathlib import Path

import pytest

from gamma.config import ConfigError, GammaConfig, load_config, validate_config


def test_defaults_are_valid_and_serve_embedded_run(tmp_path):
    """No file: the model's defaults, and the research profile's settings (its band of tables)."""
    from gamma.operations.profiles import PROFILE_SETTINGS

    cfg = load_config(tmp_path / "missing.yaml")
    assert cfg.serving.profile == "research" and cfg.serving.from_profile == list(PROFILE_SETTINGS)
    assert cfg.model.path == "embedded" and cfg.candidates == [2, 3, 4]
    assert cfg.stage1.training_budgets == [2.75, 3.0, 3.5]
    bare = cfg.model_copy(update={"stage1": cfg.stage1.model_copy(update={"extra_budgets": []}),
                                  "serving": cfg.serving.model_copy(update={"from_profile": []})})
    assert bare == GammaConfig()


def test_repo_params_yaml_is_valid():
    from pathlib import Path

    load_config(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.mark.parametrize(
    "data, field, value",
    [
        ({"candidates": [2, 5]}, "candidates", "5"),
        ({"candidates": []}, "candidates", "[]"),
        ({"quantizer": {"method": "awq"}}, "quantizer.method", "awq"),
        ({"quantizer": {"group_size": 0}}, "quantizer.group_size", "0"),
        ({"quantizer": {"gptq": {"damping": -1}}}, "quantizer.gptq.damping", "-1"),
        ({"text": {"eval_fraction": 1.5}}, "text.eval_fraction", "1.5"),
        ({"text": {"calibration_sequences": 0}}, "text.calibration_sequences", "0"),
        ({"stage1": {"relaxation": "fuzzy"}}, "stage1.relaxation", "fuzzy"),
        ({"stage1": {"loss": "mse"}}, "stage1.loss", "mse"),
        ({"stage1": {"steps": -1}}, "stage1.steps", "-1"),
        ({"stage1": {"budget": 9.0}}, "stage1.budget", "9.0"),
        ({"stage1": {"lr": "fast"}}, "stage1.lr", "fast"),
        ({"stage1": {"extra_budgets": [3.5, 1.0]}}, "stage1.extra_budgets", "1.0"),
        ({"stage1": {"samples": 2}}, "stage1.samples", "2"),
        ({"stage1": {"fisher_weight": "row"}}, "stage1.fisher_weight", "row"),
        ({"stage2": {"window": -0.1}}, "stage2.window", "-0.1"),
        ({"stage2": {"min_bits": {"down_proj": 5}}}, "min_bits", "5"),
        ({"evaluation": {"context_length": 4}}, "evaluation.context_length", "4"),
        ({"unknown_section": 1}, "unknown_section", "1"),
    ],
)
def test_bad_value_is_rejected_with_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    msg = str(info.value)
    assert field in msg and value in msg


def test_overrides_and_bad_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("stage1:\n  steps: 7\n")
    assert load_config(p, {"stage1.lr": 0.1}).stage1.lr == 0.1
    assert load_config(p).stage1.steps == 7
    p.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_evaluation_needs_one_window(tmp_path):
    with pytest.raises(ConfigError, match="max_tokens=256 is below one window"):
        load_config(tmp_path / "none.yaml", {"evaluation.max_tokens": 256})
    assert load_config(tmp_path / "none.yaml", {"evaluation.max_tokens": 256,
                                                "evaluation.context_length": 128}).evaluation.max_tokens == 256


def test_each_training_budget_has_its_own_table_settings(tmp_path):
    from gamma.run.tables import run_settings, table_dir
    from gamma.run.workspace import Workspace

    cfg = load_config(tmp_path / "none.yaml", {"stage1.extra_budgets": [3.5, 2.5], "stage1.processes": 2})
    assert cfg.stage1.training_budgets == [2.5, 3.0, 3.5]
    alone = load_config(tmp_path / "none.yaml", {"stage1.budget": 3.5})
    # the table learned at 3.5 beside others is the table learned at 3.5 alone (same cache key)
    assert run_settings(Workspace(cfg.for_training_budget(3.5))) == run_settings(Workspace(alone))
    assert run_settings(Workspace(cfg)) != run_settings(Workspace(alone))
    assert table_dir(cfg, 3.0) == Path(cfg.output_dir) and table_dir(cfg, 3.5) == Path(cfg.output_dir) / "stage1-3.5"


def test_allocators_are_chosen_by_name_with_their_settings():
    from gamma.allocators import allocator_from_config

    with pytest.raises(ConfigError, match="allocation.methods"):
        validate_config({"allocation": {"methods": ["gamma", "hawk"]}})
    with pytest.raises(ConfigError, match="each allocator once"):
        validate_config({"allocation": {"methods": ["hawq", "hawq"]}})
    cfg = validate_config({"allocation": {"methods": ["evopress"], "evopress": {"generations": 7}},
                           "stage2": {"window": 0.01}})
    assert allocator_from_config(cfg, "evopress").generations == 7
    assert allocator_from_config(cfg, "hawq").name == "hawq"  # the knapsack's settings travel with the problem
    assert allocator_from_config(cfg, "gamma").stage1 == cfg.stage1
