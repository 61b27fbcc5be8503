"""Promotion and rollback: challenger (newest version) against champion (the alias holder) for
every registered budget; the alias moves only through the gate (gamma.operations.promotion), and every
decision, promotion or rollback is recorded as an MLflow run with its figures."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from gamma.config import load_config
from gamma.run.workspace import Workspace
from tasks import tracking


@task(name="promotion gate for one budget")
def promote_budget(cfg, names: tracking.Names, budget: float, alias: str) -> dict:
    decision = tracking.promote(cfg, names, budget, alias)
    get_run_logger().info("%s -> %s: %s (%s)", names.variant(budget), alias,
                          "promoted" if decision.promote else "refused", "; ".join(decision.reasons))
    return {"budget": budget, **decision.as_dict()}


@flow(name="gamma-promotion")
def promotion_flow(params: str = "params.yaml", alias: str = "production", budgets: list[float] | None = None,
                   overrides: dict | None = None) -> list[dict]:
    """The gate for every registered budget (or the ones given)."""
    cfg = load_config(params, overrides)
    names = tracking.names_for(cfg, Workspace(cfg).model_dir)
    client, _ = tracking.client_for(cfg)
    return [promote_budget(cfg, names, b, alias) for b in budgets or tracking.registered_budgets(client, names)]
