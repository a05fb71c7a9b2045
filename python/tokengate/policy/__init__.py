"""Policy: the Python side of the rules the Rust core enforces (decisions that change rarely)."""

from .convergence import ConvergenceOptions, CoreFigures, Decision, Trial, decide

__all__ = ["ConvergenceOptions", "CoreFigures", "Decision", "Trial", "decide"]
