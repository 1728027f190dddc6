"""Thread counts for small problems: one thread below a measured size, the user's setting restored after.

On small systems the work of one loss evaluation is a few dozen small tensor operations and
one small LAPACK call each; splitting them over threads costs more in wake-ups and barriers
than it gains, and on a shared machine a waiting OpenMP or OpenBLAS thread can lose its core
for milliseconds. Measured on the project's 2-core machine (docs/benchmarks.md, "Small
problems"): the default fit at N = 60 rows took 1.7 s with one torch thread and 5.2 s with
two, and scipy's L-BFGS-B, whose bundled OpenBLAS keeps its own pool of threads, spent 3 ms
per call waking them (0.37 s of a 0.77 s fit). Both pools are therefore set to one thread while
a small problem is fitted or predicted, and set back afterwards.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["SINGLE_THREAD_ROWS", "blas_threads", "threads_for"]

#: Problems with at most this many observed rows run single-threaded (torch and BLAS). Measured
#: by ``benchmarks/bench_small.py --crossover`` on the shared 2-core machine (docs/benchmarks.md,
#: "Small problems"): at a load average of 1.5, two threads were as fast at N = 60, 15 % faster
#: at N = 300 and 1.1-1.6x faster from N = 600; at load averages of 5-8, one thread was faster at
#: every N up to 3000, by 1.4-15x. 500 keeps the BO sizes single-threaded, where threads gain
#: little even on a free machine and lose many times over on a busy one.
SINGLE_THREAD_ROWS = 500

_controller: list[ThreadpoolController] = []  # created on first use: it scans the loaded libraries once


def _blas_pools() -> ThreadpoolController:
    if not _controller:
        _controller.append(ThreadpoolController())
    return _controller[0]


def blas_threads(threads: int) -> contextlib.AbstractContextManager:
    """Every loaded BLAS pool (scipy's, numpy's) limited to ``threads`` in the body, restored after."""
    return _blas_pools().limit(limits=threads, user_api="blas")


class _Limit:
    """The process-wide single-thread setting: entered by the outermost :func:`threads_for` only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0  # entries that asked for one thread and have not exited yet
        self.previous = 1  # torch's thread count before the outermost entry
        self.blas: contextlib.AbstractContextManager | None = None

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.previous = torch.get_num_threads()
                self.blas = blas_threads(1)
                self.blas.__enter__()
                torch.set_num_threads(1)  # cheap (under a microsecond)
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                torch.set_num_threads(self.previous)
                if self.blas is not None:
                    self.blas.__exit__(None, None, None)
                self.blas = None


_LIMIT = _Limit()


@contextlib.contextmanager
def threads_for(rows: int, device: torch.device) -> Iterator[None]:
    """Run the body single-threaded when a CPU problem has at most :data:`SINGLE_THREAD_ROWS` rows.

    Sets torch's intra-op threads and every loaded BLAS pool (scipy's and numpy's OpenBLAS, used
    by scipy's L-BFGS-B) to one thread, and restores the previous settings on exit, also after an
    exception. Large problems and non-CPU devices are left alone. The setting is process-wide, as
    ``torch.set_num_threads`` is. Only calls from the main thread change it (others run as they
    are), and of nested calls only the outermost saves and restores.

    Args:
        rows: observed rows `N` of the problem (the size of its linear system).
        device: where the problem's tensors live.
    """
    # Only from the main thread: torch's OpenMP thread count is per thread while the BLAS pools'
    # are per process, so calls from several Python threads could not restore both consistently.
    if device.type != "cpu" or rows > SINGLE_THREAD_ROWS or threading.current_thread() is not threading.main_thread():
        yield
        return
    _LIMIT.enter()
    try:
        yield
    finally:
        _LIMIT.exit()
