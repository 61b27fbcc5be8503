"""The product end to end: a real Prefect flow run, a real MLflow SQLite registry and a real DVC repo
(git + dvc init, a local remote) in a temporary directory, on the embedded model with tiny settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import defaults

from gamma.model.export import verify_checkpoint
from gamma.operations.promotion import decide_promotion

DVC = str(Path(sys.executable).parent / "dvc")


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():  # one API for several flow runs in one process
        yield


@pytest.fixture()
def project(tmp_path, monkeypatch, model_dir, text):
    """A DVC project whose `prepare` stage splits a user corpus; the model is the embedded one."""
    root = tmp_path / "project"
    (root / "corpus").mkdir(parents=True)
    docs = Path(text.calibration).read_text().split("\n\n")[:40]
    for i, doc in enumerate(docs):
        (root / "corpus" / f"doc{i:02d}.txt").write_text(doc)
    params = {
        "model": {"path": str(model_dir), "data_dir": "data"},
        "text": {"source": "corpus", "calibration_sequences": 2, "sequence_length": 64, "eval_fraction": 0.25,
                 "split_seed": 0},
        "stage1": {"steps": 2, "tokens_per_sequence": 32, "extra_budgets": []},  # one table (research's: three)
        "evaluation": {"max_tokens": 512, "context_length": 256, "zero_shot_items": 0},
        "uniform_bits": [4], "stage2": {"budgets": [3.0, 1.5]},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "artifacts": str(root / "mlartifacts")},
        "output_dir": "runs",
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {
        "cmd": "gamma prepare", "deps": ["corpus"], "params": ["text.source", "text.eval_fraction"],
        "outs": ["data/text"]}}}))
    remote = [DVC, "remote", "add", "-d", "local", str(tmp_path / "remote")]
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], remote):
        subprocess.run(cmd, cwd=root, check=True)
    monkeypatch.chdir(root)
    return root


def _registry(root: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(client, name):
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def test_pipeline_registers_lineage_caches_stage1_and_isolates_failures(project, prefect_api, monkeypatch):
    from flows.pipeline import gamma_pipeline
    from gamma.config import load_config
    from tasks.tracking import names_for, promote

    rows = gamma_pipeline(params="params.yaml")
    by = {(r["method"], r["budget"]): r for r in rows}
    ok = by[("gamma", 3.0)]
    assert ok["solve_status"] == "OPTIMAL" and 2.98 <= ok["avg_bits"] <= 3.0
    assert "outside the reachable range" in by[("gamma", 1.5)]["error"]  # fails alone

    lock = yaml.safe_load((project / "dvc.lock").read_text())
    text_md5 = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert any((project.parent / "remote").rglob("*"))  # pushed to the local remote
    client = _registry(project)
    prefix = Path(load_config("params.yaml").model.path).name
    [scores] = _versions(client, f"{prefix}-gamma-scores")
    summary = json.loads((project / "runs" / "summary.json").read_text())
    assert summary["inputs"]["text_dir_md5"] == text_md5  # the md5 DVC recorded
    assert scores.tags["text_md5"] == summary["inputs"]["text_md5"]
    assert scores.tags["model_md5"] == summary["inputs"]["model_md5"] and len(scores.tags["git_commit"]) >= 7
    [variant] = _versions(client, f"{prefix}-3bit")
    assert variant.tags["score_version"] == str(scores.version) and variant.tags["text_md5"] == scores.tags["text_md5"]
    pipeline_run = client.get_run(client.get_run(variant.run_id).data.tags.get("mlflow.parentRunId")
                                  or variant.run_id)
    assert pipeline_run.data.tags.get("serving_profile") == "research"  # what it took from the profile, recorded
    assert "stage1.relaxation=soft" in pipeline_run.data.tags.get("from_profile", ""), pipeline_run.data.tags
    assert "stage1.extra_budgets" not in pipeline_run.data.tags["from_profile"]  # params.yaml gave it
    assert float(variant.tags["metric.perplexity"]) == pytest.approx(ok["perplexity"])
    run = client.get_run(variant.run_id)
    assert run.data.metrics["total_bytes"] == pytest.approx(ok["total_bytes"])
    [baseline] = _versions(client, f"{prefix}-uniform-4bit")
    assert "not exported" in baseline.tags["unchecked.loaders"] and "loads_in" not in baseline.tags
    assert not client.search_registered_models(f"name = '{prefix}-1.5bit'")  # nothing registered for it

    ckpt = Path(variant.tags["checkpoint"])
    assert verify_checkpoint(ckpt) == variant.tags["checkpoint_sha256"]  # the registered checkpoint, intact
    assert abs(ok["checkpoint_bytes"] / ok["total_bytes"] - 1) < 0.02

    # Same inputs: Stage I comes from the registry, only Stage II runs. The export of 2.5 bits
    # crashes: that budget registers nothing and leaves no checkpoint; 3.5 is unaffected.
    import gamma.model.export

    real_checksum = gamma.model.export.checksum

    def crash_at_2_5(path):  # the export dies after the tensors are written, before the rename
        if "2.5bit" in str(path):
            raise OSError("simulated crash during export")
        return real_checksum(path)

    monkeypatch.setattr(gamma.model.export, "checksum", crash_at_2_5)
    rows = gamma_pipeline(params="params.yaml", overrides={"stage2.budgets": [3.5, 2.5], "uniform_bits": [2]})
    assert "simulated crash" in next(r for r in rows if r["budget"] == 2.5)["error"]
    assert not client.search_registered_models(f"name = '{prefix}-2.5bit'")
    assert not (project / "runs" / "variants" / "2.5bit" / "checkpoint").exists()
    assert json.loads((project / "runs" / "summary.json").read_text())["scores"]["cached"] is True
    assert len(_versions(client, f"{prefix}-gamma-scores")) == 1
    assert len(_versions(client, f"{prefix}-3.5bit")) == 1

    # Promotion: the 3-bit variant does not beat uniform 4-bit (a larger model): refused, recorded.
    cfg = load_config("params.yaml", {"uniform_bits": [2, 4]})
    decision = promote(cfg, names_for(cfg, cfg.model.path), 3.0, "production")
    assert not decision.promote and "uniform" in decision.reasons[0]
    tagged = client.get_model_version(f"{prefix}-3bit", variant.version)
    assert tagged.tags["promotion.production"].startswith("refused")
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(f"{prefix}-3bit", "production")

    # New calibration text: a new DVC hash, and Stage I trains again.
    (project / "corpus" / "doc00.txt").unlink(missing_ok=True)
    gamma_pipeline(params="params.yaml", overrides={"stage2.budgets": [3.0], "uniform_bits": [4]})
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["outs"][0]["md5"] != text_md5
    versions = _versions(client, f"{prefix}-gamma-scores")
    assert len(versions) == 2 and versions[1].tags["text_md5"] != versions[0].tags["text_md5"]

    # Fleet rollout: each class's budget is its memory in bytes, solved directly in bytes from the
    # registered scores (no Stage I) and registered as <model>-<MB>; a class whose engine no variant
    # was checked for gets none, and says why.
    from flows.rollout import fleet_rollout
    from gamma.operations.fleet import MB
    from gamma.stage2.budgets import budget_label

    large = float(_versions(client, f"{prefix}-3bit")[-1].tags["metric.total_bytes"]) + 4096
    classes = [{"name": "large", "memory_mb": large / MB + 0.5, "kv_cache_reserve_mb": 0.5, "count": 2},
               {"name": "small", "memory_mb": 0.95 * large / MB, "count": 8},
               {"name": "gpu", "memory_mb": large / MB + 0.5, "kv_cache_reserve_mb": 0.5, "engine": "vllm"}]
    (project / "fleet.yaml").write_text(yaml.safe_dump({"classes": classes}))
    manifest = fleet_rollout("fleet.yaml", params="params.yaml")
    by_class = {e["class"]: e for e in manifest["classes"]}
    needed = sorted({by_class[n]["needed_bytes"] for n in ("large", "small")})
    assert [d["budget"] for d in manifest["on_demand"]] == needed
    assert all(d["registered"] for d in manifest["on_demand"])
    for budget in needed:
        [solved] = _versions(client, f"{prefix}-{budget_label(budget, 'bytes')}")
        assert float(solved.tags["metric.total_bytes"]) <= budget  # never over, to the byte
    for name in ("large", "small"):
        e = by_class[name]
        assert e["variant"]["bytes"] <= e["model_budget_mb"] * MB and e["variant"]["checkpoint_sha256"]
        assert "gamma" in e["variant"]["loads_in"]
    assert by_class["small"]["variant"]["bytes"] > 0.9 * large  # the largest that fits, not a grid step below
    assert by_class["gpu"]["variant"] is None and "loads in vllm" in by_class["gpu"]["note"]
    small = by_class["small"]["variant"]
    assert verify_checkpoint(Path(small["checkpoint_uri"].removeprefix("file://"))) == small["checkpoint_sha256"]
    assert (project / "runs" / "rollout" / "manifest.md").exists()

    # A rollout that fails half way ends its MLflow run FAILED: no run is left RUNNING.
    import flows.rollout

    def planner_down(*a, **k):
        raise RuntimeError("planner down")

    monkeypatch.setattr(flows.rollout, "plan_rollout", planner_down)
    with pytest.raises(RuntimeError, match="planner down"):
        fleet_rollout("fleet.yaml", params="params.yaml")
    experiments = [e.experiment_id for e in client.search_experiments()]
    rollouts = client.search_runs(experiments, "tags.`gamma.kind` = 'rollout'")
    assert sorted(r.info.status for r in rollouts) == ["FAILED", "FINISHED"]
    assert not client.search_runs(experiments, "attributes.status = 'RUNNING'")


def test_dvc_repro_runs_prepare_then_the_flow(project):
    """`dvc repro` on the project's dvc.yaml (prepare, then the flow as a stage) registers what
    `gamma run` would, and a second `dvc repro` has nothing to do."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    stages["stages"]["pipeline"] = {
        "cmd": "gamma run --no-dvc", "deps": ["data/text"], "params": ["stage1", "stage2", "evaluation"],
        "outs": [{"runs/summary.json": {"cache": False}}]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(stages))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stage2"]["budgets"], params["uniform_bits"] = [3.0, 3.5], []
    params["stage1"]["extra_budgets"] = [3.5]  # a second score table; 3.5 bits is projected from it
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run([DVC, "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage 'prepare'" in first.stdout and "Running stage 'pipeline'" in first.stdout
    summary = json.loads((project / "runs" / "summary.json").read_text())
    assert [(r["budget"], r["training_budget"]) for r in summary["rows"]] == [(3.0, 3.0), (3.5, 3.5)]
    prefix = Path(params["model"]["path"]).name
    client = _registry(project)
    tables = _versions(client, f"{prefix}-gamma-scores")
    assert sorted(float(v.tags["training_budget"]) for v in tables) == [3.0, 3.5]
    [variant] = _versions(client, f"{prefix}-3.5bit")
    by_budget = {float(v.tags["training_budget"]): v.version for v in tables}
    assert variant.tags["score_version"] == str(by_budget[3.5]) and float(variant.tags["training_budget"]) == 3.5
    assert variant.tags["text_md5"] == summary["inputs"]["text_md5"]
    again = subprocess.run([DVC, "repro"], cwd=project, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


def test_promotion_gate_decisions():
    uniform = [{"name": "u3", "perplexity": 90.0, "zero_shot": 0.36, "total_bytes": 100.0},
               {"name": "u4", "perplexity": 35.0, "zero_shot": 0.40, "total_bytes": 130.0}]
    good = {"perplexity": 60.0, "zero_shot": 0.37, "zero_shot_se": 0.02, "total_bytes": 90.0}
    assert decide_promotion(good, uniform, None).promote  # beats u3, the smallest uniform at least as large
    worse = {**good, "perplexity": 95.0}
    d = decide_promotion(worse, uniform, None)
    assert not d.promote and "95.000" in d.reasons[0]
    low_zero_shot = {**good, "zero_shot": 0.30}
    assert not decide_promotion(low_zero_shot, uniform, None).promote
    holder = {"perplexity": 55.0}
    d = decide_promotion(good, uniform, holder)
    assert not d.promote and "holder" in d.reasons[-1]
    assert not decide_promotion({**good, "total_bytes": 500.0}, uniform, None).promote  # nothing as large


def test_stage1_task_fails_with_the_dead_workers_error_and_registers_nothing(tmp_path, prefect_api):
    """stage1.processes=2 launches real processes; a worker that dies (here: an unreadable model)
    fails the Prefect task with that worker's own error, and nothing reaches the registry."""
    from gamma.config import load_config
    from gamma.stage1.data_parallel import Stage1LaunchError
    from tasks import tracking
    from tasks.stage1 import learn

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')  # read, then unloadable
    cfg = load_config(tmp_path / "none.yaml", {
        "model.path": str(broken), "stage1.processes": 2, "output_dir": str(tmp_path / "runs"),
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.artifacts": str(tmp_path / "art")})
    client, experiment = tracking.client_for(cfg)
    parent = client.create_run(experiment, run_name="pipeline").info.run_id
    inputs = {"model_dir": str(broken), "model_md5": "0" * 32, "text_md5": "1" * 32, "git_commit": "abc1234"}
    with pytest.raises(Stage1LaunchError, match="cannot load a causal LM"):
        learn(cfg, inputs, parent)
    assert not client.search_registered_models()
    [stage1] = client.search_runs([experiment], "tags.`gamma.kind` = 'stage1'")
    assert stage1.info.status == "FAILED"
    assert not (tmp_path / "runs" / "scores.json").exists()


def test_dask_runner_registers_the_same_variants_as_threads(tmp_path, monkeypatch, model_dir, prefect_api):
    """The fan-out on a local Dask cluster (worker processes) gives the very same variant."""
    from flows.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    params = {"model": {"path": str(model_dir), "data_dir": str(Path(model_dir).parents[1])},
              "text": {"calibration_sequences": 2, "sequence_length": 64},
              "stage1": {"steps": 2, "tokens_per_sequence": 32, "extra_budgets": []},  # one small table
              "evaluation": {"max_tokens": 256, "context_length": 128, "zero_shot_items": 0},
              "uniform_bits": [], "stage2": {"budgets": [3.0]},
              "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "art")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    threads = run_pipeline("params.yaml", {"output_dir": "threads"}, use_dvc=False)
    dask = run_pipeline("params.yaml", {"output_dir": "dask", "pipeline.task_runner": "dask"}, use_dvc=False)
    assert threads[0]["perplexity"] == dask[0]["perplexity"]
    client = _registry(tmp_path)
    prefix = Path(model_dir).name
    v1, v2 = _versions(client, f"{prefix}-3bit")
    assert v1.tags["metric.perplexity"] == v2.tags["metric.perplexity"]
    weights = [json.loads((Path(v.tags["checkpoint"]) / "gamma_checksums.json").read_text())["files"]
               ["model.safetensors"] for v in (v1, v2)]
    assert weights[0] == weights[1]  # bit-identical checkpoints
    assert "dask" in v2.tags["checkpoint"]

    # The scheduled re-evaluation reloads the newest registered checkpoint: the same figures again.
    from flows.deploy import reevaluate

    [row] = reevaluate("params.yaml", {"output_dir": "dask"})
    assert row["version"] == v2.version and row["perplexity_drift"] == pytest.approx(0.0, abs=1e-9)
    assert client.get_model_version(v2.name, v2.version).tags["last_reevaluation"].startswith("perplexity")


def test_competing_allocators_fan_out_and_register_under_their_names(project, prefect_api):
    from flows.pipeline import gamma_pipeline
    from gamma.config import load_config

    methods = ["hawq", "scalebits", "gamma-blocks"]
    overrides = {"allocation.methods": methods, "uniform_bits": []}
    rows = gamma_pipeline(params="params.yaml", overrides=overrides)
    by = {(r["method"], r["budget"]): r for r in rows}
    assert set(by) == {(m, b) for m in methods for b in (3.0, 1.5)}  # no module-level GAMMA asked
    for method in methods:
        assert "1.5 bits is outside" in by[(method, 1.5)]["error"]  # fails alone
        assert 2.95 <= by[(method, 3.0)]["avg_bits"] <= 3.0
    assert by[("scalebits", 3.0)]["metadata_bits"] > 0 and by[("hawq", 3.0)]["metadata_bits"] == 0
    assert by[("scalebits", 3.0)]["effective_bits"] > by[("hawq", 3.0)]["effective_bits"] - 0.05

    client = _registry(project)
    prefix = Path(load_config("params.yaml").model.path).name
    assert not client.search_model_versions(f"name = '{prefix}-gamma-scores'")  # Stage I never ran
    for method, fmt in (("hawq", "compressed-tensors"), ("scalebits", "fake-quantized float16"),
                        ("gamma-blocks", "fake-quantized float16")):
        [version] = _versions(client, f"{prefix}-{method}-3bit")
        assert version.tags["allocator"] == method and version.tags["checkpoint_format"] == fmt
        assert float(version.tags["metric.perplexity"]) == pytest.approx(by[(method, 3.0)]["perplexity"])
        assert verify_checkpoint(version.tags["checkpoint"]) == version.tags["checkpoint_sha256"]
    # the block score table gamma-blocks learned travels with its variant
    [version] = _versions(client, f"{prefix}-gamma-blocks-3bit")
    import mlflow

    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="variant/scores.json",
                                               tracking_uri=client.tracking_uri)
    table = json.loads(Path(path).read_text())
    assert table["training_budget"] == 3.0 and table["modules"][0].endswith("#0")
    assert len(table["modules"]) > 10 * 210 and len(table["history"]["loss"]) == 2


def test_promote_with_nothing_registered_says_so_and_exits_non_zero(tmp_path, prefect_api, capsys):
    from gamma import cli

    code = cli.main(["promote", "--params", str(defaults(tmp_path)), "--alias", "production",
                     "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                     "--set", f"tracking.artifacts={tmp_path / 'art'}"])
    assert code == 1 and "nothing is registered to promote to alias 'production'" in "".join(capsys.readouterr())


def test_a_users_model_and_text_are_versioned_by_dvc_and_the_embedded_stage_does_not_run(
        tmp_path, monkeypatch, model_dir, text, prefect_api):
    """This repository's own dvc.yaml (whose `prepare` stage converts the embedded model), a user's
    model directory and text outside the project: DVC hashes both, the lineage records DVC's md5,
    and the embedded stage neither runs nor converts anything."""
    import transformers

    from flows.pipeline import gamma_pipeline
    from gamma.hashing import content_md5

    user = tmp_path / "user"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer))
    transformers.LlamaForCausalLM(config).save_pretrained(user / "model")
    tokenizer.save_pretrained(user / "model")
    (user / "notes.txt").write_text(Path(text.calibration).read_text()[:200_000])
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text((Path(__file__).parents[1] / "dvc.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(user / "model"), "data_dir": "data"}, "text": {"source": str(user / "notes.txt"),
        "calibration_sequences": 2, "sequence_length": 64}, "stage1": {"steps": 2, "tokens_per_sequence": 32,
        "extra_budgets": []}, "evaluation": {"max_tokens": 256, "context_length": 64, "zero_shot_items": 0},
        "quantizer": {"group_size": 32}, "uniform_bits": [], "stage2": {"budgets": [3.0]},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}, "output_dir": "runs"}))
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True)
    monkeypatch.chdir(root)

    [row] = gamma_pipeline(params="params.yaml")
    assert "error" not in row
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "prepare" not in lock and not (root / "data" / "models").exists()  # the embedded stage: not run
    hashed = {d["path"]: d["md5"] for d in lock["inputs"]["deps"]}
    assert hashed == {str(user / "model"): content_md5(user / "model"), "data/text": content_md5(root / "data/text"),
                      str(user / "notes.txt"): content_md5(user / "notes.txt")}
    summary = json.loads((root / "runs" / "summary.json").read_text())
    assert summary["inputs"]["dvc_inputs"] == hashed and summary["inputs"]["model_md5"] == hashed[str(user / "model")]
    [variant] = _versions(_registry(root), "model-3bit")
    assert json.loads(variant.tags["dvc_inputs"]) == hashed
