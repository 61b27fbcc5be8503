"""MLflow as users run it beyond one machine: a tracking server with a PostgreSQL backend (Debian's
PostgreSQL, on loopback), holding a real pipeline run's registry."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gamma.stage1.data_parallel import free_port

BIN = Path(sys.executable).parent
PG_USER = "postgres"



def _as_postgres(*cmd: str) -> list[str]:
    return list(cmd) if os.geteuid() != 0 else ["runuser", "-u", PG_USER, "--", *cmd]


def _postgres_available() -> str | None:
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    if os.geteuid() == 0 and subprocess.run(["id", PG_USER], capture_output=True).returncode:
        return "running as root without a 'postgres' user to run the server as"
    return None


@pytest.fixture()
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with a database 'mlflow'; yields its URI."""
    root = Path(tempfile.mkdtemp(prefix="gamma-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
    subprocess.run(_as_postgres("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust"), check=True,
                   capture_output=True)
    subprocess.run(_as_postgres("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                                f"-h 127.0.0.1 -p {port} -k {root}", "start"), check=True, capture_output=True)
    try:
        subprocess.run(_as_postgres("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "mlflow"),
                       check=True, capture_output=True)
        yield f"postgresql://{PG_USER}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "stop"), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# CI (.ci/run) installs PostgreSQL and sets GAMMA_REQUIRE_POSTGRES: there the test fails rather than skips
@pytest.mark.skipif(_postgres_available() is not None and not os.environ.get("GAMMA_REQUIRE_POSTGRES"),
                    reason=str(_postgres_available()))
def test_pipeline_registry_on_an_mlflow_server_with_postgres(postgres, tmp_path, model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import run_pipeline

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", postgres,
                               "--default-artifact-root", (tmp_path / "art").as_uri(), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=5).read().strip() == b"OK":
                    break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow server did not come up"
                time.sleep(2)
        monkeypatch.chdir(tmp_path)
        params = {"model": {"path": str(model_dir), "data_dir": str(Path(model_dir).parents[1])},
                  "text": {"calibration_sequences": 2, "sequence_length": 64},
                  "stage1": {"steps": 2, "extra_budgets": []},  # one table (the research profile's: three)
                  "evaluation": {"max_tokens": 256, "context_length": 128, "zero_shot_items": 0},
                  "uniform_bits": [], "stage2": {"budgets": [3.0]},
                  "tracking": {"uri": uri, "artifacts": str(tmp_path / "art")}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        with prefect_test_harness():
            [row] = run_pipeline("params.yaml", use_dvc=False)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        prefix = Path(model_dir).name
        [variant] = client.search_model_versions(f"name = '{prefix}-3bit'")
        [scores] = client.search_model_versions(f"name = '{prefix}-gamma-scores'")
        assert variant.tags["score_version"] == scores.version
        assert float(variant.tags["metric.perplexity"]) == pytest.approx(row["perplexity"])
        # the rows really live in PostgreSQL
        count = subprocess.run(["psql", postgres, "-tAc", "select count(*) from model_versions"],
                               capture_output=True, text=True, check=True).stdout.strip()
        assert int(count) == 2
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
