"""One workload under TokenGate and under its peers, timed the same way in the same process."""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PEERS", "Comparison", "compare_concurrency"]

#: The systems TokenGate is compared with by default (ThreadPoolExecutor is the baseline).
PEERS: tuple[str, ...] = ("threadpool", "asyncio.to_thread")
TOKENGATE = "tokengate"
#: system name -> the prefix of its keys in ``extra_info``
_KEYS = {"threadpool": "threadpool", "asyncio.to_thread": "asyncio_to_thread", TOKENGATE: TOKENGATE}
_DEFAULT_CALLS = 100

perf = time.perf_counter


@dataclass(frozen=True)
class Comparison:
    """Round times of one workload on each system (TokenGate and its peers).

    A round submits every call of the workload at once and waits for all of them; its time
    is the wall clock from the first submission to the last result (``time.perf_counter``).
    """

    #: the TokenGate operation type the workload ran as (the function's qualname, looking
    #: through functools.partial, unless it came decorated)
    workload: str
    #: calls per round
    calls: int
    #: timed rounds per system (after the warm-up rounds)
    rounds: int
    cores: int
    workers_per_core: int
    #: the TokenGate weight the calls ran with
    weight: str
    #: system name ("threadpool", "asyncio.to_thread", "tokengate") -> its round times, seconds
    seconds: Mapping[str, tuple[float, ...]]

    @property
    def threads(self) -> int:
        """Worker threads of every system: ``cores * workers_per_core``."""
        return self.cores * self.workers_per_core

    @property
    def systems(self) -> tuple[str, ...]:
        """The systems that ran, in the order they ran (TokenGate last)."""
        return tuple(self.seconds)

    def median(self, system: str) -> float:
        """Median round time of ``system`` in seconds."""
        return statistics.median(self.seconds[system])

    @property
    def ratios(self) -> dict[str, float]:
        """peer -> TokenGate's median round time / the peer's (below 1: TokenGate was
        faster)."""
        tg = self.median(TOKENGATE)
        out = {}
        for name in self.seconds:
            if name != TOKENGATE:
                peer = self.median(name)
                out[name] = tg / peer if peer > 0 else float("nan")
        return out

    def extra_info(self) -> dict[str, Any]:
        """The figures as flat JSON-friendly ``benchmark.extra_info`` entries: for each
        system ``<key>_median_s``, ``<key>_min_s`` and ``<key>_us_per_call``, and
        ``ratio_vs_<key>`` for each peer (keys: ``threadpool``, ``asyncio_to_thread``,
        ``tokengate``), plus the workload, calls per round, rounds, layout and weight."""
        info: dict[str, Any] = {
            "workload": self.workload,
            "calls_per_round": self.calls,
            "rounds": self.rounds,
            "cores": self.cores,
            "workers_per_core": self.workers_per_core,
            "threads": self.threads,
            "weight": self.weight,
        }
        for name, times in self.seconds.items():
            key = _KEYS[name]
            med = statistics.median(times)
            info[f"{key}_median_s"] = med
            info[f"{key}_min_s"] = min(times)
            info[f"{key}_us_per_call"] = med / self.calls * 1e6
        for name, ratio in self.ratios.items():
            info[f"ratio_vs_{_KEYS[name]}"] = ratio
        return info

    def __str__(self) -> str:
        cells = [f"{name} {self.median(name) * 1e3:.3f} ms" for name in self.seconds]
        ratios = ", ".join(f"{r:.3f}x {name}" for name, r in self.ratios.items())
        return (
            f"{self.workload}: {self.calls} calls on {self.threads} threads, median of "
            f"{self.rounds}: " + ", ".join(cells) + (f" (tokengate = {ratios})" if ratios else "")
        )


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _workload_name(fn: Callable[..., Any]) -> str:
    """The function's qualname, looking through :func:`functools.partial`."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    for attr in ("__qualname__", "__name__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str) and name.strip():
            return name
    return type(fn).__name__


def _timed_rounds(run: Callable[[], object], rounds: int, warmup_rounds: int) -> tuple[float, ...]:
    for _ in range(warmup_rounds):
        run()
    times = []
    for _ in range(rounds):
        t0 = perf()
        run()
        times.append(perf() - t0)
    return tuple(times)


def compare_concurrency(
    fn: Callable[..., Any],
    *args: Any,
    arglist: Iterable[Sequence[Any]] | None = None,
    calls: int | None = None,
    cores: int | None = None,
    workers_per_core: int = 4,
    weight: str | None = None,
    rounds: int = 5,
    warmup_rounds: int = 1,
    peers: Sequence[str] = PEERS,
    benchmark: Any = None,
) -> Comparison:
    """Run ``fn`` under each peer and under TokenGate, the same calls the same way, and
    return the round times.

    Each round submits ``calls`` calls of ``fn(*args)`` (100 by default), or one call per
    argument tuple of ``arglist``, then waits for every result; ``warmup_rounds`` untimed
    rounds come first (they start the threads). Every system gets ``cores *
    workers_per_core`` worker threads (``cores`` defaults to the CPUs this process may use):
    ``ThreadPoolExecutor(max_workers=threads)``, ``asyncio.to_thread`` on a loop whose
    default executor is such a pool, and ``OperationsCoordinator(cores=cores,
    workers_per_core=workers_per_core)``. The peers run first, one after the other, then
    TokenGate.

    ``fn`` is a plain function, run under TokenGate through ``task_token_guard`` with
    ``weight`` (default ``"medium"``), or a function already decorated with
    ``@task_token_guard`` (its own weight and operation type are used; the peers run its
    ``__wrapped__``). Keyword arguments for ``fn``: use :func:`functools.partial`.

    With ``benchmark`` (pytest-benchmark's fixture) TokenGate's rounds are run by
    ``benchmark.pedantic`` (so the test's benchmark row is TokenGate's), and the figures of
    every system and the ratios go into ``benchmark.extra_info`` (see
    :meth:`Comparison.extra_info`). Under ``--benchmark-disable`` every system runs one
    round without warm-up. Exceptions raised by ``fn`` propagate.

    Call it from synchronous code: ``asyncio.to_thread`` runs on an event loop of its own in
    the calling thread (``peers=("threadpool",)`` avoids it).
    """
    from .. import bench
    from .._core import GuardedFunction
    from ..coordinator import OperationsCoordinator
    from ..decorator import task_token_guard

    if arglist is not None:
        if args or calls is not None:
            raise TypeError("pass either arglist or positional arguments and calls, not both")
        batch = [tuple(a) for a in arglist]
        if not batch:
            raise ValueError("arglist is empty: nothing to run")
    else:
        n = _DEFAULT_CALLS if calls is None else _count("calls", calls, 1)
        batch = [args] * n
    rounds = _count("rounds", rounds, 1)
    warmup_rounds = _count("warmup_rounds", warmup_rounds, 0)
    workers_per_core = _count("workers_per_core", workers_per_core, 1)
    if cores is None:
        cores = bench.available_cores()
    cores = _count("cores", cores, 1)
    if isinstance(peers, str):
        raise TypeError(f"peers must be a sequence of names, e.g. ({peers!r},)")
    chosen = tuple(dict.fromkeys(peers))
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer {unknown[0]!r}; known: {', '.join(PEERS)}")
    if "asyncio.to_thread" in chosen:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "compare_concurrency runs asyncio.to_thread on an event loop of its own and "
                "cannot do so inside a running one: call it from a synchronous test, or pass "
                "peers=('threadpool',)"
            )

    if isinstance(fn, GuardedFunction):
        if weight is not None:
            raise TypeError(
                f"{fn.__qualname__} is already decorated (weight {fn.weight.value!r}): pass "
                "the plain function to choose the weight here"
            )
        guarded, plain = fn, fn.__wrapped__
    else:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        # Refuses async functions and bad weights before anything runs.
        guarded = task_token_guard(
            operation_type=_workload_name(fn),
            tags={"weight": "medium" if weight is None else weight},
        )(fn)
        plain = fn

    if getattr(benchmark, "disabled", False):
        rounds, warmup_rounds = 1, 0  # pytest-benchmark runs its target once
    layout = (cores, workers_per_core)
    seconds: dict[str, tuple[float, ...]] = {}
    for name in chosen:
        with bench.open_system(name, layout) as system:
            seconds[name] = _timed_rounds(
                functools.partial(system.run_batch, plain, batch), rounds, warmup_rounds
            )

    times: list[float] = []

    def tokengate_round() -> None:
        t0 = perf()
        tokens = [guarded(*a) for a in batch]
        for tok in tokens:
            tok.get()
        times.append(perf() - t0)

    with OperationsCoordinator(cores=cores, workers_per_core=workers_per_core):
        if benchmark is None:
            for _ in range(warmup_rounds + rounds):
                tokengate_round()
        else:
            benchmark.pedantic(
                tokengate_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
            )
    seconds[TOKENGATE] = tuple(times[-rounds:])
    comparison = Comparison(
        workload=guarded.operation_type,
        calls=len(batch),
        rounds=len(seconds[TOKENGATE]),
        cores=cores,
        workers_per_core=workers_per_core,
        weight=guarded.weight.value,
        seconds=seconds,
    )
    if benchmark is not None:
        benchmark.extra_info.update(comparison.extra_info())
    return comparison
