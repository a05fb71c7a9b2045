"""Helpers for testing and benchmarking code that uses TokenGate.

The pytest plugin (:mod:`tokengate.testing.plugin`, registered as ``tokengate`` when the
package is installed) builds its fixtures on these:

- :func:`compare_concurrency` runs one workload under ThreadPoolExecutor,
  ``asyncio.to_thread`` and TokenGate, timed the same way, and returns a
  :class:`Comparison` (the ``concurrency_compare`` fixture calls it with pytest-benchmark);
- :func:`unresolved_tokens` lists the tokens of this process that are not final yet (the
  ``tokengate_coordinator`` fixture reports them at teardown).
"""

from __future__ import annotations

from ._compare import PEERS, Comparison, compare_concurrency
from ._leaks import describe_tokens, unresolved_tokens

__all__ = ["PEERS", "Comparison", "compare_concurrency", "describe_tokens", "unresolved_tokens"]
