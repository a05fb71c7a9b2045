"""Execution policy, the Python side of the rules the core enforces: per-token options
(timeouts, retries, limits) and their validation."""

from __future__ import annotations
