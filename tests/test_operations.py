"""Operations on a real MLflow registry (SQLite): promotion gates, rollback; fleet planning."""

import pytest
import yaml
from pydantic import ValidationError

from gamma.config import load_config
from gamma.operations.fleet import (
    MB,
    DeviceClass,
    Fleet,
    FleetError,
    bytes_range,
    load_fleet,
    needed_bytes,
    plan_rollout,
)
from tasks import tracking


@pytest.fixture()
def registry_cfg(tmp_path):
    cfg = load_config(tmp_path / "none.yaml", {
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.artifacts": str(tmp_path / "art"),
        "uniform_bits": [4]})
    client, _ = tracking.client_for(cfg)
    names = tracking.Names("m")

    def register(name, perplexity, total_bytes):
        tracking._ensure_registered(client, name, "test")
        tags = {"metric.perplexity": repr(perplexity), "metric.total_bytes": repr(total_bytes)}
        return client.create_model_version(name, (tmp_path / name).as_uri(), tags=tags).version

    register(names.uniform(4), 50.0, 200.0)
    return cfg, client, names, register


def test_promotion_gates_history_and_rollback(registry_cfg):
    cfg, client, names, register = registry_cfg
    v1 = register(names.variant(3.0), 40.0, 150.0)
    assert tracking.promote(cfg, names, 3.0, "production").promote
    v2 = register(names.variant(3.0), 38.0, 150.0)
    assert tracking.promote(cfg, names, 3.0, "production").promote  # not worse than holder v1
    v3 = register(names.variant(3.0), 45.0, 150.0)
    refused = tracking.promote(cfg, names, 3.0, "production")
    assert not refused.promote and "holder" in refused.reasons[-1]
    name = names.variant(3.0)
    assert client.get_model_version_by_alias(name, "production").version == v2
    assert client.get_model_version(name, v3).tags["promotion.production"].startswith("refused")

    assert tracking.rollback(cfg, names, 3.0, "production") == v1
    assert client.get_model_version_by_alias(name, "production").version == v1
    assert tracking.rollback(cfg, names, 3.0, "production") is None
    assert tracking.alias_holder(client, name, "production") is None
    with pytest.raises(ValueError, match="no alias"):
        tracking.rollback(cfg, names, 3.0, "production")
    runs = client.search_runs([client.get_experiment_by_name("gamma").experiment_id])
    kinds = sorted(r.data.tags["gamma.kind"] for r in runs)
    assert kinds == ["promotion"] * 3 + ["rollback"] * 2  # every decision recorded
    assert tracking.registered_budgets(client, names) == [3.0]


def test_promotion_flow_gates_every_registered_budget(registry_cfg, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.promotion import promotion_flow

    cfg, client, names, register = registry_cfg
    register(names.variant(2.5), 45.0, 120.0)
    register(names.variant(3.5), 60.0, 190.0)  # worse than uniform 4-bit at 200 bytes: refused
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {**cfg.tracking.model_dump(), "model_name": "m"},
                                      "uniform_bits": [4], "model": {"path": str(tmp_path)}}))
    (tmp_path / "config.json").write_text("{}")  # a model directory is all the flow resolves
    with prefect_test_harness():
        decisions = promotion_flow(params=str(params), alias="production")
    assert [(d["budget"], d["promote"]) for d in decisions] == [(2.5, True), (3.5, False)]


def test_fleet_file_errors_name_the_value(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("classes:\n  - {name: a, memory_mb: 100, kv_cache_reserve_mb: 120}\n")
    with pytest.raises(FleetError, match="kv_cache_reserve_mb=120"):
        load_fleet(bad)
    bad.write_text("classes:\n  - {name: a, memory_mb: -1}\n")
    with pytest.raises(FleetError, match="memory_mb"):
        load_fleet(bad)
    with pytest.raises(FleetError, match="does not exist"):
        load_fleet(tmp_path / "nope.yaml")


def test_needed_bytes_and_plan():
    sizes = [(576, 576)] * 4
    lo, hi = bytes_range(sizes, [2, 3, 4], 64, True, 10_000)
    assert lo == 10_000 + 4 * (4 * 576 * 576 * 2 // 32 + 2 * 576 * 9 + 16) and lo < hi
    assert needed_bytes(DeviceClass(name="c", memory_mb=(lo + 1000) / MB), (lo, hi)) == lo + 1000
    assert needed_bytes(DeviceClass(name="tiny", memory_mb=(lo - 1) / MB), (lo, hi)) is None
    assert needed_bytes(DeviceClass(name="huge", memory_mb=1000), (lo, hi)) == hi  # all it can use
    c = DeviceClass(name="c", memory_mb=3.2)
    fleet = Fleet(classes=[c, DeviceClass(name="big", memory_mb=1000, count=8),
                           DeviceClass(name="gpu", memory_mb=1000, engine="vllm")])
    variants = [
        {"name": "m-3bit", "version": "1", "budget": 3.0, "bytes": 3.0 * MB, "perplexity": 40.0,
         "alias_holder": False, "loads_in": ["gamma"]},
        {"name": "m-3.5bit", "version": "2", "budget": 3.5, "bytes": 3.5 * MB, "perplexity": 30.0,
         "alias_holder": True, "loads_in": ["gamma"]},
        {"name": "m-4bit", "version": "1", "budget": 4.0, "bytes": 4.0 * MB, "perplexity": 28.0,
         "alias_holder": False, "loads_in": ["gamma", "vllm"]},
    ]
    small, big, gpu = plan_rollout(fleet, variants)
    assert small["variant"]["name"] == "m-3bit" and "no 'production' holder fits" in small["note"]
    assert big["variant"]["name"] == "m-3.5bit" and big["note"] == "alias 'production'"  # alias beats better ppl
    assert gpu["variant"]["name"] == "m-4bit"  # the only one vLLM's loader was checked for
    alone = plan_rollout(Fleet(classes=[DeviceClass(name="t", memory_mb=10, engine="transformers")]), variants)
    assert alone[0]["variant"] is None and "loads in transformers" in alone[0]["note"]
    with pytest.raises(ValidationError, match="engine"):
        DeviceClass(name="x", memory_mb=1, engine="llama.cpp")


