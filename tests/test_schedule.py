"""A real Prefect server on loopback: `gamma serve` registers the cron deployments and a scheduled
run of the re-evaluation flow evaluates the registered variant again and records its drift."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import DATA

from gamma.stage1.data_parallel import free_port

BIN = Path(sys.executable).parent



def register_uniform_variant(params: Path, where: Path):
    """A uniform 4-bit variant of the embedded model, exported and registered as the pipeline does."""
    from gamma.config import load_config
    from gamma.run.variant import quantize_and_evaluate
    from gamma.run.workspace import Workspace
    from tasks.tracking import client_for, names_for, register_variant

    cfg = load_config(params)
    ws = Workspace(cfg)
    row = quantize_and_evaluate(ws, 4, save_to=where)
    client, experiment = client_for(cfg)
    run_id = client.create_run(experiment, run_name="registered for the schedule test").info.run_id
    version = register_variant(client, run_id, names_for(cfg, ws.model_dir).variant(4.0), row, [],
                               {"checkpoint": str(where), "checkpoint_sha256": row["checkpoint_sha256"]})
    client.set_terminated(run_id)
    return client, version


def _api(url: str, path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait(predicate, seconds: float, what: str, procs=()):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} while waiting for {what}"
        try:
            if result := predicate():
                return result
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_scheduled_deployment_runs_on_a_real_server(tmp_path, model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "GAMMA_QUIET": "1"}
    params = {"model": {"path": str(model_dir), "data_dir": str(DATA)},
              "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifacts": str(tmp_path / "art")},
              "schedule": {"pipeline_cron": "0 0 1 1 *", "reevaluate_cron": "* * * * *"},
              "evaluation": {"max_tokens": 256, "context_length": 64, "zero_shot_items": 0, "kl_tokens": 0},
              "output_dir": str(tmp_path / "runs")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    client, variant = register_uniform_variant(tmp_path / "params.yaml", tmp_path / "ckpt")
    logs = open(tmp_path / "server.log", "w"), open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)
    procs = [server]
    try:
        _wait(lambda: _api(url, "/health") is True, 120, "the Prefect server", procs)
        runner = subprocess.Popen([str(BIN / "gamma"), "serve", "--params", "params.yaml"], cwd=tmp_path, env=env,
                                  stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(runner)
        deployments = _wait(lambda: _api(url, "/deployments/filter", {}) if len(_api(url, "/deployments/filter", {}))
                            == 2 else None, 120, "both deployments", procs)
        assert {d["name"] for d in deployments} == {"scheduled-pipeline", "scheduled-reevaluation"}
        reeval = next(d for d in deployments if d["name"] == "scheduled-reevaluation")
        assert reeval["schedules"][0]["schedule"]["cron"] == "* * * * *"

        def completed():
            runs = _api(url, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [reeval["id"]]},
                                                                 "state": {"type": {"any_": ["COMPLETED"]}}}})
            return runs or None

        [run, *_] = _wait(completed, 240, "a scheduled re-evaluation run to complete", procs)
        assert run["auto_scheduled"] is True  # started by the schedule, not by hand
        record = client.get_model_version(variant.name, variant.version).tags["last_reevaluation"]
        figure, drift = re.fullmatch(r"perplexity (\S+) \(drift (\S+)\)", record).groups()
        assert float(figure) == pytest.approx(float(variant.tags["metric.perplexity"]), rel=1e-4)
        assert abs(float(drift)) < 1e-4  # the checkpoint evaluates as it did when it was registered
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)
        for f in logs:
            f.close()


def test_the_scheduled_pipeline_runs_on_the_configured_task_runner(tmp_path):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.deploy import scheduled_pipeline
    from gamma.config import load_config

    threads = scheduled_pipeline(load_config(tmp_path / "none.yaml", {"pipeline.workers": 3})).task_runner
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    dask = load_config(tmp_path / "none.yaml", {"pipeline.task_runner": "dask"})
    assert isinstance(scheduled_pipeline(dask).task_runner, DaskTaskRunner)
