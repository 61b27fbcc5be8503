"""Prefect tasks, thin wrappers (retries, caching, logging, registration) around ``gamma.run``:
``prepare`` (inputs and their lineage), ``stage1`` (score tables, cached on the registry),
``variants`` (one budget each), and the stores they write: ``tracking`` (MLflow runs and the model
registry) and ``versioning`` (DVC)."""
