"""gamma: global bit allocation for mixed-precision LLMs under arbitrary budgets."""

__version__ = "0.1.0"
