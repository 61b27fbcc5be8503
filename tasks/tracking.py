"""MLflow: runs, the score-table registry entry, variant registry entries and promotion.

Everything goes through one ``MlflowClient`` with explicit run ids, from the flow's process
(mapped tasks run in threads of that process), so no fluent-API global state is shared between
tasks. The database and the experiment are created once, before any fan-out (SQLite migrations
race otherwise).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gamma.config import GammaConfig
from gamma.operations.promotion import Decision, decide_promotion
from gamma.stage2.budgets import budget_label, label_budget

SCORES_ARTIFACT = "scores"
VARIANT_ARTIFACT = "variant"
VARIANT_METRICS = ("perplexity", "perplexity_se", "kl_divergence", "kl_divergence_se", "zero_shot", "zero_shot_se",
                   "total_bytes", "nominal_bits", "effective_bits", "quantize_seconds", "eval_seconds",
                   "solve_seconds", "checkpoint_bytes", "checkpoint_over_predicted")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass(frozen=True)
class Names:
    """Registered model names of one base model; variants are named by their budget's label
    (``gamma.stage2.budgets.budget_label``: ``2.5bit``, ``95MB``) in ``unit``."""

    prefix: str
    unit: str = "nominal"

    @property
    def scores(self) -> str:
        return f"{self.prefix}-gamma-scores"

    def variant(self, budget: float) -> str:
        return f"{self.prefix}-{budget_label(budget, self.unit)}"

    def uniform(self, bits: int) -> str:
        return f"{self.prefix}-uniform-{bits}bit"

    def allocated(self, allocator: str, budget: float) -> str:
        """A variant of another allocator than GAMMA (GAMMA's keep ``variant``'s name)."""
        return self.variant(budget) if allocator == "gamma" else \
            f"{self.prefix}-{allocator}-{budget_label(budget, self.unit)}"

    def in_unit(self, unit: str) -> Names:
        return Names(self.prefix, unit)


def names_for(cfg: GammaConfig, model_dir: str | Path) -> Names:
    return Names(cfg.tracking.model_name or Path(model_dir).name, cfg.stage2.unit)


class TrackingError(ValueError):
    """The tracking URI cannot be used; the message names it."""


STORE_SCHEMES = {"file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc"}
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Refuse, in seconds and before any work, a tracking URI that MLflow cannot use or a server
    that does not answer (MLflow's own client retries for minutes)."""
    import socket
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit

    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else "file"
    if scheme not in STORE_SCHEMES:
        raise TrackingError(f"tracking.uri={uri!r}: {scheme!r} is not a store MLflow knows; use sqlite:///mlflow.db, "
                            "a directory, postgresql://user@host/db or http://host:5000")
    try:
        if scheme in ("http", "https"):
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)  # noqa: S310 (http(s) only)
        elif scheme in DATABASE_PORTS:
            parts = urlsplit(uri)
            socket.create_connection((parts.hostname or "localhost", parts.port or DATABASE_PORTS[scheme]),
                                     timeout=timeout).close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise TrackingError(f"tracking.uri={uri!r}: nothing answers there ({getattr(err, 'reason', err)}); start "
                            "the server or use sqlite:///mlflow.db") from None


def client_for(cfg: GammaConfig) -> tuple[MlflowClient, str]:
    """The client and the experiment id (created here, once, with its artifact root)."""
    check_tracking(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return client, exp.experiment_id
    root = cfg.tracking.artifacts
    location = root if "://" in root else Path(root).resolve().as_uri()
    return client, client.create_experiment(cfg.tracking.experiment, artifact_location=location)


@contextmanager
def child_run(client: MlflowClient, experiment: str, parent_run: str | None, run_name: str, kind: str):
    """A run (under the pipeline's parent run, if any): yields its id, ends FINISHED, or FAILED on any error."""
    tags = {"gamma.kind": kind} | ({"mlflow.parentRunId": parent_run} if parent_run else {})
    run_id = client.create_run(experiment, run_name=run_name, tags=tags).info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)


def _newest(client: MlflowClient, query: str) -> ModelVersion | None:
    try:
        found = client.search_model_versions(query)
    except MlflowException:
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def _ensure_registered(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise


def find_scores(client: MlflowClient, names: Names, cache_key: str) -> ModelVersion | None:
    """The newest registered score table with this cache key, if any."""
    return _newest(client, f"name = '{names.scores}' and tags.cache_key = '{cache_key}'")


def download_scores(client: MlflowClient, version: ModelVersion, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(version.run_id, f"{SCORES_ARTIFACT}/scores.json", str(dest))
    return Path(local)


def register_scores(client: MlflowClient, run_id: str, names: Names, files: list[Path], tags: dict) -> ModelVersion:
    for f in files:
        client.log_artifact(run_id, str(f), SCORES_ARTIFACT)
    _ensure_registered(client, names.scores, "GAMMA Stage I preference scores (modules x candidate bits)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{SCORES_ARTIFACT}"
    return client.create_model_version(names.scores, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})


def register_variant(client: MlflowClient, run_id: str, name: str, row: dict, files: list[Path],
                     tags: dict, checkpoint: Path | None = None) -> ModelVersion:
    """Metrics and lineage on the run, the files as artifacts, and a new version of ``name``."""
    for key in VARIANT_METRICS:
        value = row.get(key)
        if isinstance(value, int | float) and value == value:
            client.log_metric(run_id, key, float(value))
    for f in files:
        client.log_artifact(run_id, str(f), VARIANT_ARTIFACT)
    if checkpoint is not None:
        client.log_artifacts(run_id, str(checkpoint), f"{VARIANT_ARTIFACT}/checkpoint")
    where = {k: row[k] for k in ("quantize_devices", "eval_devices") if k in row}  # the devices each phase ran on
    serving = {k: ",".join(v) if isinstance(v, list) else v for k, v in row.items()
               if k in ("serving_profile", "loads_in")}  # the engine it is made for, the loaders checked
    serving.update({f"{why}.{k}": v[:500] for why in ("refused_by", "unchecked")  # and why not
                    for k, v in row.get(why, {}).items()})
    tags = {**tags, **serving}
    for k, v in {**where, **tags}.items():
        client.set_tag(run_id, k, str(v))
    _ensure_registered(client, name, "GAMMA mixed-precision variant")
    source = f"{client.get_run(run_id).info.artifact_uri}/{VARIANT_ARTIFACT}"
    tagged = ("perplexity", "kl_divergence", "zero_shot", "zero_shot_se", "total_bytes", "checkpoint_bytes")
    metrics = {f"metric.{k}": row[k] for k in tagged if k in row}
    return client.create_model_version(name, source, run_id=run_id,
                                       tags={**{k: str(v) for k, v in tags.items()},
                                             **{k: repr(float(v)) for k, v in metrics.items()}})


def version_metrics(version: ModelVersion) -> dict:
    out = {"name": f"{version.name} v{version.version}", "version": version.version}
    for k, v in version.tags.items():
        if k.startswith("metric."):
            out[k.removeprefix("metric.")] = float(v)
    return out


def latest_version(client: MlflowClient, name: str) -> ModelVersion | None:
    return _newest(client, f"name = '{name}'")


def alias_holder(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str, alias: str) -> list[str]:
    """Versions that held ``alias``, oldest first (a registered-model tag, so rollback can walk back)."""
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(f"alias_history.{alias}", "[]"))


def _record(client: MlflowClient, experiment: str, run_name: str, record: dict) -> None:
    """One MLflow run per decision, holding every figure it used."""
    run = client.create_run(experiment, run_name=run_name,
                            tags={"gamma.kind": record["action"], "decision": str(record.get("promote", True))})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decision.json"
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)


def promote(cfg: GammaConfig, names: Names, budget: float, alias: str, version: str | None = None) -> Decision:
    """Move ``alias`` of ``<model>-<budget>bit`` to ``version`` (default: newest) only through the gate."""
    client, experiment = client_for(cfg)
    name = names.variant(budget)
    challenger = client.get_model_version(name, version) if version else latest_version(client, name)
    if challenger is None:
        raise ValueError(f"no registered variant {name!r}; run the pipeline with budget {budget} first")
    uniform = []
    for bits in cfg.uniform_bits:
        v = latest_version(client, names.uniform(bits))
        if v is not None:
            uniform.append(version_metrics(v))
    holder = alias_holder(client, name, alias)
    holder_figures = version_metrics(holder) if holder is not None and holder.version != challenger.version else None
    decision = decide_promotion(version_metrics(challenger), uniform, holder_figures)
    if decision.promote and (holder is None or holder.version != challenger.version):
        client.set_registered_model_alias(name, alias, challenger.version)
        history = _history(client, name, alias) + [challenger.version]
        client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history))
    client.set_model_version_tag(name, challenger.version, f"promotion.{alias}",
                                 "promoted" if decision.promote else "refused: " + "; ".join(decision.reasons))
    _record(client, experiment, f"promote {name} -> {alias}",
            {"action": "promotion", "alias": alias, "budget": budget, "model": name, "version": challenger.version,
             "previous_holder": holder.version if holder else None, **decision.as_dict()})
    return decision


def rollback(cfg: GammaConfig, names: Names, budget: float, alias: str) -> str | None:
    """Give ``alias`` back to the version that held it before the current holder (or remove it when
    there was none); returns the new holder's version."""
    client, experiment = client_for(cfg)
    name = names.variant(budget)
    holder = alias_holder(client, name, alias)
    if holder is None:
        raise ValueError(f"{name!r} has no alias {alias!r} to roll back")
    history = _history(client, name, alias)
    while history and history[-1] == holder.version:
        history.pop()
    previous = history[-1] if history else None
    if previous is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(name, f"alias_history.{alias}", json.dumps(history))
    client.set_model_version_tag(name, holder.version, f"promotion.{alias}", f"rolled back to {previous}")
    _record(client, experiment, f"rollback {name} {alias}",
            {"action": "rollback", "alias": alias, "budget": budget, "model": name, "from_version": holder.version,
             "to_version": previous})
    return previous


def registered_budgets(client: MlflowClient, names: Names) -> list[float]:
    """Budgets in ``names.unit`` with a registered GAMMA variant (``<prefix>-<label>``)."""
    out = []
    for m in client.search_registered_models(f"name LIKE '{names.prefix}-%'"):
        budget = label_budget(m.name[len(names.prefix) + 1:], names.unit)
        if budget is not None:  # not uniform-<b>bit, <allocator>-<label>, the scores or another unit's
            out.append(budget)
    return sorted(out)
