"""Stage II, projection: score tables and their reuse (``scores``), the one Stage II call
(``projection.project``) and the knapsack solvers under it (``knapsack``)."""
