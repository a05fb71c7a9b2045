"""CPU topology detection and worker-count recommendations.

``detect()`` reads the machine's physical and logical core counts (via ``psutil``) and the set of
CPUs this process may run on (``os.sched_getaffinity`` where the platform has it), and derives a
recommended total worker count for three kinds of workload::

    >>> from tokengate.topology import detect
    >>> topo = detect()
    >>> topo.recommended_workers["mixed"]   # doctest: +SKIP
    24

The recommendations scale with the physical cores the process can actually use: on a machine
where the affinity mask allows every CPU this is simply ``physical_cores``; in a container or
under ``taskset`` it is the allowed CPUs' share of the physical cores (never less than one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import psutil

__all__ = [
    "WORKERS_PER_PHYSICAL_CORE",
    "Topology",
    "allowed_cores",
    "allowed_cpu_count",
    "detect",
]

logger = logging.getLogger("tokengate")

#: Recommended workers per usable physical core, by kind of workload.
WORKERS_PER_PHYSICAL_CORE: Final[dict[str, int]] = {
    "io_bound": 4,
    "mixed": 3,
    "cpu_bound": 2,
}


@dataclass(frozen=True, slots=True)
class Topology:
    """A snapshot of the CPU topology seen by this process.

    Attributes:
        physical_cores: physical cores of the machine.
        logical_cores: logical CPUs (hardware threads) of the machine.
        smt: whether simultaneous multithreading is on (more logical than physical cores).
        allowed_cpus: sorted CPU ids this process may run on.
        recommended_workers: total worker counts for ``io_bound``, ``mixed`` and ``cpu_bound``
            workloads (4, 3 and 2 per usable physical core).
    """

    physical_cores: int
    logical_cores: int
    smt: bool
    allowed_cpus: list[int]
    recommended_workers: dict[str, int] = field(default_factory=dict)

    @property
    def usable_physical_cores(self) -> int:
        """Physical cores this process can use, scaled by its share of the logical CPUs."""
        return _usable_physical(self.physical_cores, self.logical_cores, len(self.allowed_cpus))

    def as_dict(self) -> dict[str, Any]:
        """Return the topology as a JSON-serialisable ``dict`` (copies, not views)."""
        return asdict(self)

    def format(self) -> str:
        """Return a human-readable multi-line description."""
        threads = self.logical_cores // self.physical_cores if self.physical_cores else 1
        smt = f"on ({threads} threads per core)" if self.smt else "off"
        allowed = _format_cpu_list(self.allowed_cpus)
        lines = [
            "CPU topology",
            f"  physical cores      {self.physical_cores}",
            f"  logical cores       {self.logical_cores}",
            f"  SMT                 {smt}",
            f"  allowed CPUs        {allowed} ({len(self.allowed_cpus)} of {self.logical_cores})",
            f"  usable phys. cores  {self.usable_physical_cores}",
            "Recommended workers (total)",
        ]
        for kind, count in self.recommended_workers.items():
            per_core = WORKERS_PER_PHYSICAL_CORE.get(kind)
            hint = f"  ({per_core} per physical core)" if per_core else ""
            lines.append(f"  {kind:<18}  {count}{hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def detect() -> Topology:
    """Detect the CPU topology of this machine and process.

    Never raises for lack of information: a platform without ``sched_getaffinity`` reports every
    logical CPU as allowed, and an unknown physical core count is taken to equal the logical one.
    """
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False)
    if not physical:
        logger.debug("psutil could not count physical cores; assuming %d (logical)", logical)
        physical = logical
    physical = min(physical, logical)
    allowed = _allowed_cpus(logical)
    usable = _usable_physical(physical, logical, len(allowed))
    recommended = {kind: per * usable for kind, per in WORKERS_PER_PHYSICAL_CORE.items()}
    topo = Topology(
        physical_cores=physical,
        logical_cores=logical,
        smt=logical > physical,
        allowed_cpus=allowed,
        recommended_workers=recommended,
    )
    logger.debug("detected topology: %s", topo.as_dict())
    return topo


def allowed_cores(weight: str, cores: int) -> range:
    """The 1-based cores a token of ``weight`` may run on with ``cores`` virtual cores.

    heavy → 1..N, medium → 2..N, light → 3..N; with 2 cores medium and light use core 2, and with
    one core everything runs on core 1.
    """
    if cores <= 1:
        return range(1, 2)
    first = {"heavy": 1, "medium": 2, "light": 3}[weight]
    return range(min(first, cores), cores + 1)


def allowed_cpu_count() -> int:
    """How many CPUs this process may run on (the coordinator's default number of cores)."""
    return len(_allowed_cpus(os.cpu_count() or 1))


def _allowed_cpus(logical: int) -> list[int]:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            cpus = sorted(getaffinity(0))
        except OSError as exc:  # pragma: no cover - exotic kernels / sandboxes
            logger.debug("sched_getaffinity failed (%s); assuming all CPUs", exc)
        else:
            if cpus:
                return cpus
    return list(range(logical))


def _usable_physical(physical: int, logical: int, allowed: int) -> int:
    if allowed >= logical or logical <= 0:
        return max(1, physical)
    # Restricted affinity: count the allowed CPUs' share of the physical cores, rounding up so
    # that e.g. one allowed hardware thread still counts as one core.
    return max(1, -(-allowed * physical // logical))


def _format_cpu_list(cpus: list[int]) -> str:
    """Compress ``[0, 1, 2, 5, 7, 8]`` into ``"0-2,5,7-8"`` (the kernel's cpulist style)."""
    if not cpus:
        return "none"
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in cpus[1:]:
        if cpu == prev + 1:
            prev = cpu
            continue
        parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = cpu
    parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)
