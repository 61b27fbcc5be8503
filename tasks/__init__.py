"""Prefect tasks: thin wrappers (retries, caching, logging) around gamma.steps."""
