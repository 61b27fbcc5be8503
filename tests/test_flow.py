"""A real Prefect flow run (ephemeral API) on the embedded model with tiny settings."""

import json

import pytest


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():  # one API for several flow runs in one process
        yield


def test_pipeline_flow_end_to_end_with_stage1_cache(tmp_path, prefect_api):
    from flows.pipeline import gamma_pipeline

    overrides = {
        "output_dir": str(tmp_path), "text.calibration_sequences": 2, "text.sequence_length": 64,
        "stage1.steps": 2, "stage1.tokens_per_sequence": 32, "evaluation.max_tokens": 512,
        "evaluation.context_length": 256, "evaluation.zero_shot_items": 0, "uniform_bits": [4],
        "stage2.budgets": [3.0, 1.5],
    }
    rows = gamma_pipeline(params=str(tmp_path / "none.yaml"), overrides=overrides)
    by_budget = {(r["method"], r["budget"]): r for r in rows}
    ok = by_budget[("gamma", 3.0)]
    assert ok["solve_status"] == "OPTIMAL" and 2.98 <= ok["avg_bits"] <= 3.0
    assert ok["perplexity"] > by_budget[("uniform", 4.0)]["perplexity"] > 1
    assert "outside the reachable range" in by_budget[("gamma", 1.5)]["error"]  # fails alone
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["inputs"]["text_md5"]) == 32 and (tmp_path / "pareto.png").exists()

    scores = tmp_path / "scores.json"
    stamp = scores.stat().st_mtime_ns
    gamma_pipeline(params=str(tmp_path / "none.yaml"), overrides={**overrides, "stage2.budgets": [3.5]})
    assert scores.stat().st_mtime_ns == stamp  # same inputs: Stage I reused, only Stage II re-solved
    gamma_pipeline(params=str(tmp_path / "none.yaml"), overrides={**overrides, "stage1.steps": 3,
                                                                  "stage2.budgets": [3.5]})
    assert scores.stat().st_mtime_ns != stamp  # a Stage I setting changed: retrained
