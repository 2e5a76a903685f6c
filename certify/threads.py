"""How many CPU threads torch uses: a default from the CPUs this process may really use.

torch's own default is one thread per physical core of the machine. On a shared or small
machine that oversubscribes: a parallel region waits for its slowest thread, and a thread whose
core is busy with another process holds every region up by a scheduler time slice. The models
here are small, so each operation is short and that wait dominates (``certify demo`` on a loaded
2-core machine: 22 minutes with torch's 2 threads, 2 minutes with one).

So the default (:func:`default_threads`) is half the CPUs this process may use -- its affinity
mask, capped by a cgroup CPU quota, shared among the processes of a ``torchrun`` node -- and at
least one; ``OMP_NUM_THREADS`` set by the user wins over it, and ``--threads N`` (or
``CERTIFY_THREADS``) over both. Inter-op parallelism is off (one thread): certify runs one
operation at a time.

Determinism: the same seed *and the same thread count* (on the same machine and torch build)
give bit-identical checkpoints and reports. A different thread count may change float sums in
the last bits (weights by ~1e-5 after training), because a reduction split over more threads
adds in another order. The default depends only on the machine, never on its load, so repeated
runs on one machine agree; pass ``--threads`` to compare machines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV_VAR = "CERTIFY_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup (``cpu.max`` or ``cfs_quota_us / cfs_period_us``), if any."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return float(text[0]) / float(text[1])
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value >= 1 else None


def default_threads() -> int:
    """The thread count used without ``--threads`` (see the module docstring)."""
    omp = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if omp is not None:
        return omp
    per_node = _positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    return max(1, available_cpus() // 2 // per_node)


def set_threads(threads: int | None = None) -> int:
    """Use `threads` intra-op threads (default :func:`default_threads`) and one inter-op thread.

    Returns:
        The intra-op thread count now in use.
    Raises:
        SpecError: `threads` < 1.
    """
    import torch

    from certify.errors import NAME, SpecError

    if threads is None:
        threads = default_threads()
    if threads < 1:
        raise SpecError(f"{{threads}} must be >= 1, got {threads}; e.g. 1", threads=NAME)
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first inter-op work; then it stays as it is
        pass
    return torch.get_num_threads()
