"""Thread count and OpenMP waiting that behave on a shared machine.

Two problems this solves, both measured in docs/performance.md:

* torch's default thread count is the machine's core count, not the cores this process may run on
  (a container, ``taskset``, a cgroup CPU set) and not the cores other processes leave free;
* OpenMP worker threads spin-wait at every barrier (libgomp spins ~300k iterations by default). When the
  cores are oversubscribed, a spinning thread burns the time slice its sibling needs to finish the work
  it waits for, so 2 threads on a loaded 2-core machine ran several times slower than 1.

:func:`choose_wait_policy` must run before torch is imported (libgomp reads its environment when the
library loads); the ``fluxmusic`` CLI does it first thing. :func:`configure_threads` picks and sets the count.
This module does not import torch at module load for that reason.
"""

from __future__ import annotations

import math
import os

from fluxmusic.errors import FluxMusicError

#: OpenMP settings that make idle workers sleep at once instead of spinning (GNU and Intel runtimes).
PASSIVE_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
#: OpenMP settings that let idle workers spin briefly, then sleep: for a machine whose cores are free. GNU
#: libgomp spins GOMP_SPINCOUNT iterations (its default is 300 000), Intel's runtime KMP_BLOCKTIME ms.
SHORT_SPIN_ENV = {"GOMP_SPINCOUNT": "100000", "KMP_BLOCKTIME": "1"}
#: Every variable either policy sets (a user's own value of any of them is kept, and then neither is applied).
WAIT_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def choose_wait_policy(cores: int | None = None, load: float | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy for this process from the machine's load; returns what it set.

    Sleeping at once (:data:`PASSIVE_WAIT_ENV`) protects a loaded machine, but on an idle one it costs every op
    a wake-up: the bundled default took 0.78 s per clip with 2 passive threads, 0.40 s spinning and 0.64 s with
    1 thread (docs/performance.md). So when the cores are free (:func:`default_threads` would use all of them)
    workers spin briefly (:data:`SHORT_SPIN_ENV`), otherwise they sleep. Nothing is set where the user set any
    of :data:`WAIT_ENV_KEYS`. Must run before torch is imported (OpenMP reads these when it loads).
    """
    if any(k in os.environ for k in WAIT_ENV_KEYS):
        return {}
    cores = available_cores() if cores is None else cores
    free = default_threads(cores, load) >= cores
    chosen = SHORT_SPIN_ENV if free else PASSIVE_WAIT_ENV
    os.environ.update(chosen)
    return dict(chosen)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), falling back to the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def machine_load() -> float:
    """The 1-minute load average (runnable processes), or 0.0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads to use: the available cores minus what other processes keep busy, at least 1.

    ``OMP_NUM_THREADS`` in the environment wins (it is the user's explicit choice, and torchrun sets it).
    ``load`` is the 1-minute load average; a process that has just started contributes ~0 to it, so the
    load is what others use. Rounding keeps 2 threads on a 2-core machine up to a load of ~0.5.
    """
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = available_cores() if cores is None else cores
    load = machine_load() if load is None else load
    free = cores - load
    return max(1, min(cores, math.floor(free + 0.5)))


def parse_threads(value: str | int | None) -> int | None:
    """A thread option: ``None`` or ``"auto"`` (choose), or an integer >= 1; one clear error otherwise."""
    if value is None or value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise FluxMusicError(f"threads {value!r} must be an integer >= 1 or 'auto'")


def configure_threads(threads: str | int | None = None) -> int:
    """Set torch's intra-op thread count (``threads``, or :func:`default_threads` for None/"auto"); return it.

    A count above the available cores is allowed (the user asked) but never chosen automatically.
    """
    import torch

    n = parse_threads(threads)
    if n is None:
        n = default_threads()
    torch.set_num_threads(n)
    return n


def add_threads_argument(parser) -> None:
    """``--threads N|auto`` for a subcommand; ``fluxmusic.cli.main`` applies it with :func:`configure_threads`."""
    parser.set_defaults(torch_threads_option=True)  # the CLI applies args.threads before running the command
    parser.add_argument(
        "--threads",
        default=None,
        metavar="N|auto",
        help="torch threads (default auto: the cores this process may use minus the machine's load, "
        "or OMP_NUM_THREADS when set)",
    )
