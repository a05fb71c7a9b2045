"""Execution policy, the Python side of the rules the core enforces (decisions that change
rarely): per-token options and their validation (``policy.options``), and the convergence of
per-core worker counts (``policy.convergence``, imported on first use)."""
