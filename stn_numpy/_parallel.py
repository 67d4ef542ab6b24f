"""Worker threads for the elementwise-heavy stages, and the allocator setting they need.

NumPy runs each ufunc, ``take`` and SciPy sparse product on one core, but releases the
GIL inside them, so independent slices of a batch (whole images, never parts of one) can
run on several cores from a thread pool. Every slice is computed exactly as it would be
alone, so results are bit-identical for any number of workers.

The worker count is, in order of precedence: :func:`set_num_threads`, the environment
variable ``STN_NUMPY_NUM_THREADS``, ``OMP_NUM_THREADS`` (the usual way to ask numerical
libraries for fewer threads), and otherwise the cores this process may run on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

from ._checks import parse_positive_int

__all__ = ["get_num_threads", "set_num_threads", "parallel_map", "bands", "even_split",
           "add_threads_option", "usable_cores", "keep_freed_memory", "freed_memory_kept"]

ENV_VAR = "STN_NUMPY_NUM_THREADS"
_lock = threading.Lock()
_requested: int | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_memory_kept = False


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _from_env() -> int | None:
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
        if n < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return n
    return None


def get_num_threads() -> int:
    """The number of worker threads the sampler, layers and optimizers use."""
    if _requested is not None:
        return _requested
    return _from_env() or usable_cores()


def set_num_threads(n: int | None) -> None:
    """Use ``n`` worker threads from now on; ``None`` returns to the default.

    Parameters
    ----------
    n : int >= 1 or None
    """
    global _requested
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    _requested = n


def add_threads_option(parser) -> None:
    """Add ``--threads N`` to an argparse parser (apply it with :func:`set_num_threads`)."""
    parser.add_argument("--threads", type=parse_positive_int, default=None,
                        help=f"worker threads (default: ${ENV_VAR}, else $OMP_NUM_THREADS, "
                             "else every usable core)")


def parallel_map(fn, items) -> None:
    """Call ``fn(item)`` for every item, on up to :func:`get_num_threads` threads.

    ``fn`` returns nothing; it writes its results into disjoint slices of arrays its
    caller owns. Runs inline when there is one worker or one item (no thread hand-off).
    The first exception raised by a call is re-raised here, once the calls not yet
    started are cancelled and those running have returned: no work goes on after it,
    and nothing writes into the caller's arrays any more.
    """
    items = list(items)
    workers = min(get_num_threads(), len(items))
    if workers <= 1:
        for item in items:
            fn(item)
        return
    # A pool of exactly the requested size: one left larger by an earlier, higher setting
    # would run more calls at once than asked for (and hold their temporaries).
    futures = [_executor(get_num_threads()).submit(fn, item) for item in items]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)
        raise


def bands(n: int, values: int, min_values: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into one ``(start, stop)`` band per worker thread, or into a
    single band when the work touches fewer than ``min_values`` array values.

    Handing work to a thread costs about as much as a pass over a few megabytes, so small
    work runs inline. Bands differ in length by at most one.
    """
    return even_split(n, 1 if values < min_values else max(1, min(get_num_threads(), n)))


def even_split(n: int, count: int) -> list[tuple[int, int]]:
    """``range(n)`` cut into ``count >= 1`` consecutive ``(start, stop)`` parts whose
    lengths differ by at most one."""
    edges = [n * b // count for b in range(count + 1)]
    return list(itertools.pairwise(edges))


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool of ``workers`` threads, replaced when another count is asked for
    (threads start lazily)."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(workers, "stn-numpy"), workers
        return _pool


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems; larger values are refused.
_KEEP_BYTES = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB in the heap instead of unmapping them.

    Fresh multi-megabyte temporaries are otherwise mapped anew on every call, and the
    kernel's page faults then cost as much as the arithmetic done in them. Does nothing
    (and returns False) off glibc, or when the user set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` themselves. Called once by the command line, not on import:
    a library should not change its host's allocator behind its back.
    """
    global _memory_kept
    if _memory_kept:
        return True
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Trim first: the trim threshold must exceed the mmap threshold to keep the blocks.
    _memory_kept = bool(mallopt(_M_TRIM_THRESHOLD, 2 * _KEEP_BYTES)
                        and mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES))
    return _memory_kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _memory_kept
