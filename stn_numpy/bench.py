"""Timings of the sampler and of a training step, ours beside PyTorch's in the same run.

Cases, all float32:

* ``sampler fwd``: ``affine_grid`` + ``grid_sample`` (bilinear, zeros, align_corners=False),
  output size = input size, ``theta`` = identity + a small seeded perturbation; PyTorch's
  ``F.affine_grid`` + ``F.grid_sample`` under ``torch.no_grad()``.
* ``sampler fwd+bwd``: the forward, then the gradients with respect to U and theta. Ours
  runs the path training takes: ``grid_sample_forward`` keeps a cache for
  ``grid_sample_backward_from_cache``, then ``affine_grid_backward``. PyTorch runs autograd
  with respect to U and theta.
* ``sampler fwd+bwd uncached``: the same with the stand-alone pair ``grid_sample`` /
  ``grid_sample_backward``, which checks its arguments twice; against the same PyTorch
  call. (Both of our backward passes recompute the sampling taps.)
* ``sampler double backward``: the second order, ``grid_sample_double_backward`` on the
  affine grid above with random upstream gradients ``ddU``, ``ddgrid`` beside PyTorch's
  (``torch.autograd.grad`` of the backward's ``(dU, dgrid)``, built once with
  ``create_graph=True`` and kept with ``retain_graph=True``, so that only the double
  backward is timed), at ``N=64, C=3, 32x32``.
* ``train step paper-cnn|paper-stcnn``: the same for the paper's distorted-MNIST models
  (:mod:`stn_numpy.models`) on 42x42 (RTS) and 60x60 (TC) images, the ST-CNN also with its
  transformer sampling down to 28x28 (``st28``), where the classifier then runs. The
  PyTorch side is the same architecture written out below.
* ``train step stn|cnn``: one SGD step (lr 0.01, momentum 0.9) of the tutorial's model on
  a batch of 28x28 images: forward in training mode (dropout on), cross-entropy, backward
  (without the images' own gradient, which neither side computes), update. The PyTorch
  side is the tutorial's ``Net`` written out below, with the MNIST normalisation moved
  inside it so both sides run the same operations (our models normalise internally and
  the transformer samples the raw image).

Sampler configurations: ``N=256, C=1, 60x60`` (the translated/cluttered MNIST images) and
``N=64, C=32, 32x32`` (a transformer placed on a feature map); training at batch 64. Volumes
(``sampler fwd`` and ``sampler fwd+bwd`` with the 3-D ``affine_grid``, theta ``(N, 3, 4)``,
and trilinear ``grid_sample`` on 5-D U): ``N=2, C=1, 64x64x64`` (a registration-sized
volume) and ``N=2, C=8, 32x32x32`` (a feature volume).

Each case is timed in ``rounds`` rounds, ours and then PyTorch's in each: a block of
warm-up calls, then the best (minimum) of ``repeats`` calls with ``time.perf_counter``,
which is the figure least disturbed by other processes. A row reports each side's best
over all rounds; since the two sides alternate, a slow spell of the machine (on a shared
host it can last seconds and move one side by 1.5x) reaches both rather than one, and
the per-round ratios' range shows how much it moved them. PyTorch keeps its default
thread count, printed in the header; so does NumPy's BLAS. The ratio is ``ours / torch``:
above 1 means we are slower. Thread pools spread over every core stall
when another process holds one of them, so the header prints the load average and warns
when other processes kept cores busy just before the run.

Environment variables: ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` are set on some
machines, and a wrong core type or cache size makes OpenBLAS pick slow kernels for NumPy's
matrix products (convolutions here). The header prints them, and the thread-count
variables, when set; the benchmark never changes them.

``--memory`` adds the peak memory of the volume sampler's forward + backward at ``N=1, C=1,
128^3`` float32, with the grid given and with the affine grid (:func:`memory_rows`), each
side in a fresh process.

Run with ``python -m stn_numpy.bench`` or ``stn-numpy bench``; ``--quick`` uses tiny sizes
(a smoke test, not a measurement). PyTorch is imported lazily and is optional: without it
the torch columns are empty.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import scipy

from ._checks import check_positive_int, parse_positive_int
from ._io import atomic_write, check_writable
from ._parallel import (
    add_threads_option,
    freed_memory_kept,
    get_num_threads,
    keep_freed_memory,
    set_num_threads,
    usable_cores,
)
from ._torch import import_torch
from .grids import affine_grid, affine_grid_backward
from .layers import cross_entropy
from .models import MNIST_MEAN, MNIST_STD, PAPER_FILTERS, PAPER_POOL_FROM, build_model
from .optim import SGD
from .sampling import (
    grid_sample,
    grid_sample_backward,
    grid_sample_backward_from_cache,
    grid_sample_double_backward,
    grid_sample_forward,
)

__all__ = ["best_ms", "environment", "format_header", "format_memory", "format_table", "main",
           "memory_rows", "run"]

SAMPLER_SIZES = ((256, 1, 60, 60), (64, 32, 32, 32))
QUICK_SAMPLER_SIZES = ((4, 1, 8, 8), (2, 3, 6, 5))
DOUBLE_BACKWARD_SIZE, QUICK_DOUBLE_BACKWARD_SIZE = (64, 3, 32, 32), (2, 3, 6, 5)
VOLUME_SIZES = ((2, 1, 64, 64, 64), (2, 8, 32, 32, 32))
QUICK_VOLUME_SIZES = ((2, 1, 5, 6, 7),)
TRAIN_BATCH, QUICK_TRAIN_BATCH = 64, 4
INPUT_SIZE = (28, 28)
# (arch, input side, transformer output side or None) of the paper-model rows
PAPER_CASES = (("paper-cnn", 42, None), ("paper-stcnn", 42, None), ("paper-stcnn", 42, 28),
               ("paper-cnn", 60, None), ("paper-stcnn", 60, None), ("paper-stcnn", 60, 28))
LR, MOMENTUM = 0.01, 0.9
THETA_NOISE = 0.1
SEED = 0
WARMUP, QUICK_WARMUP = 2, 1
ROUNDS = 3
# Half a core busy elsewhere is enough to stall a thread pool spread over every core.
BUSY_CORES = 0.5
ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "STN_NUMPY_NUM_THREADS",
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_SAMPLER_KW = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": False}


def best_ms(fn, repeats: int, warmup: int = WARMUP) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls, in ms.

    One block: calls alternate with the other side's only between blocks, so that the
    warm-up absorbs lazy initialisation, first-touch page faults of reused buffers, and the
    worker threads of the other library (OpenBLAS, OpenMP) that keep spinning for a while
    after their last call and compete for the same cores.
    """
    for _ in range(warmup):
        fn()
    gc_was_enabled = gc.isenabled()
    # A collection triggered by one call's garbage would be charged to the next call.
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return 1e3 * min(times)


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


def _numpy_blas() -> str | None:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    except Exception:  # the config layout is not a stable API
        return None
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def _threadpools() -> list[str] | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')}"
            for p in threadpool_info()]


def _busy_cores(seconds: float = 0.25) -> float | None:
    """Cores kept busy by other processes, sampled from ``/proc/stat`` while we sleep.

    The load average trails by minutes, so it still reports a job that ended a minute ago
    and hides one that just began; a fresh sample does neither.
    """

    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def environment() -> dict:
    """Versions, BLAS, cores, current and average load, and the BLAS environment variables."""
    torch = import_torch(required=False)
    usable = usable_cores()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        load = None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "threads": get_num_threads(),
        "allocator_keeps_freed_memory": freed_memory_kept(),
        "numpy_blas": _numpy_blas(),
        "threadpools": _threadpools(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "load_average": load,
        "busy_cores": _busy_cores(),
        "machine": platform.machine(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def format_header(env: dict) -> str:
    """The environment as the lines printed above the table."""
    torch = "not installed" if env["torch"] is None else (
        f"{env['torch']} ({env['torch_threads']} threads)")
    machine = (f"{env['machine']}, {env['usable_cores']} usable cores of {env['cpu_count']}, "
               f"numpy BLAS {env['numpy_blas'] or 'unknown'}")
    if env["busy_cores"] is not None:
        machine += f", busy cores before the run {env['busy_cores']:g}"
    if env["load_average"] is not None:
        machine += ", load (1/5/15 min) " + " ".join(f"{v:g}" for v in env["load_average"])
    lines = [f"numpy {env['numpy']} | scipy {env['scipy']} | torch {torch} | "
             f"python {env['python']}", machine,
             f"ours: {env['threads']} worker thread(s), allocator keeps freed memory: "
             f"{'yes' if env['allocator_keeps_freed_memory'] else 'no'}"]
    if env["busy_cores"] is not None and env["busy_cores"] >= BUSY_CORES:
        lines.append(f"warning: other processes kept {env['busy_cores']:g} cores busy just "
                     "before the run; the times, PyTorch's most of all, can be several times "
                     "too high")
    if env["threadpools"]:
        lines.append("threadpools: " + "; ".join(env["threadpools"]))
    if env["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in env["env"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------


def _sampler_inputs(N: int, C: int, *spatial: int):
    """U, theta and dV for images (``spatial = (H, W)``) or volumes (``(D, H, W)``)."""
    rng = np.random.default_rng(SEED)
    U = rng.standard_normal((N, C, *spatial)).astype(np.float32)
    d = len(spatial)
    identity = np.eye(d, d + 1, dtype=np.float32)
    theta = identity + THETA_NOISE * rng.standard_normal((N, d, d + 1)).astype(np.float32)
    dV = rng.standard_normal((N, C, *spatial)).astype(np.float32)
    return U, theta, dV


def _ours_sampler(U, theta, dV):
    size = U.shape

    def forward():
        return grid_sample(U, affine_grid(theta, size, align_corners=False), **_SAMPLER_KW)

    def forward_backward():
        grid = affine_grid(theta, size, align_corners=False)
        _, cache = grid_sample_forward(U, grid, **_SAMPLER_KW)
        dU, dgrid = grid_sample_backward_from_cache(dV, cache)
        return dU, affine_grid_backward(dgrid, theta, size, align_corners=False)

    def forward_backward_uncached():
        grid = affine_grid(theta, size, align_corners=False)
        grid_sample(U, grid, **_SAMPLER_KW)
        dU, dgrid = grid_sample_backward(dV, U, grid, **_SAMPLER_KW)
        return dU, affine_grid_backward(dgrid, theta, size, align_corners=False)

    return forward, forward_backward, forward_backward_uncached


def _torch_sampler(torch, U, theta, dV):
    import torch.nn.functional as F

    size = list(U.shape)
    U_t, theta_t, dV_t = (torch.from_numpy(a) for a in (U, theta, dV))
    U_leaf = U_t.clone().requires_grad_(True)
    theta_leaf = theta_t.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            grid = F.affine_grid(theta_t, size, align_corners=False)
            return F.grid_sample(U_t, grid, **_SAMPLER_KW)

    def forward_backward():
        grid = F.affine_grid(theta_leaf, size, align_corners=False)
        V = F.grid_sample(U_leaf, grid, **_SAMPLER_KW)
        return torch.autograd.grad(V, (U_leaf, theta_leaf), dV_t)

    return forward, forward_backward


def _sampler_rows(torch, sizes, timing, uncached: bool = True) -> list[dict]:
    """The sampler rows of every size, images ``(N, C, H, W)`` or volumes
    ``(N, C, D, H, W)``; ``uncached`` adds the stand-alone pair's row."""
    rows = []
    for N, C, *spatial in sizes:
        shape = f"N={N} C={C} {'x'.join(str(s) for s in spatial)}"
        U, theta, dV = _sampler_inputs(N, C, *spatial)
        ours = _ours_sampler(U, theta, dV)
        theirs = (None, None) if torch is None else _torch_sampler(torch, U, theta, dV)
        cases = (("sampler fwd", ours[0], theirs[0]),
                 ("sampler fwd+bwd", ours[1], theirs[1]),
                 ("sampler fwd+bwd uncached", ours[2], theirs[1]))[:3 if uncached else 2]
        for name, fn_ours, fn_torch in cases:
            rows.append(_row(f"{name} {shape}", fn_ours, fn_torch, timing))
    return rows


def _double_backward_row(torch, size, timing) -> dict:
    """The ``sampler double backward`` row (see the module docstring)."""
    N, C, H, W = size
    U, theta, dV = _sampler_inputs(N, C, H, W)
    grid = np.ascontiguousarray(affine_grid(theta, U.shape, align_corners=False))
    rng = np.random.default_rng([SEED, 2])
    ddU = rng.standard_normal(U.shape).astype(np.float32)
    ddgrid = rng.standard_normal(grid.shape).astype(np.float32)

    def ours():
        return grid_sample_double_backward(ddU, ddgrid, dV, U, grid, **_SAMPLER_KW)

    theirs = None
    if torch is not None:
        dV_t, U_t, grid_t = (torch.from_numpy(a).clone().requires_grad_(True)
                             for a in (dV, U, grid))
        V = torch.nn.functional.grid_sample(U_t, grid_t, **_SAMPLER_KW)
        grads = torch.autograd.grad(V, (U_t, grid_t), dV_t, create_graph=True)
        upstream = (torch.from_numpy(ddU), torch.from_numpy(ddgrid))

        def theirs():
            return torch.autograd.grad(grads, (dV_t, U_t, grid_t), upstream, retain_graph=True)

    return _row(f"sampler double backward N={N} C={C} {H}x{W}", ours, theirs, timing)


# --------------------------------------------------------------------------------------
# Peak memory of the volume sampler
# --------------------------------------------------------------------------------------

MEMORY_SIZE, QUICK_MEMORY_SIZE = (1, 1, 128, 128, 128), (1, 1, 8, 8, 8)
# Run in a fresh interpreter: the inputs, a tiny warm-up call (lazy imports and
# initialisation are not counted), then the call, between a reset of the peak resident set
# (Linux's clear_refs; else the peak so far stands) and its reading.
_MEMORY_SCRIPT = """
import json, resource, sys, tracemalloc
import numpy as np
from stn_numpy import affine_grid, bench

side, kind, size = sys.argv[1], sys.argv[2], tuple(int(s) for s in sys.argv[3:])


def status(field):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


torch = bench.import_torch() if side == "torch" else None
fwd_bwd = {"chain": bench._ours_sampler, "sampler": bench._ours_grid_sampler}[kind]
if torch:
    fwd_bwd = {"chain": bench._torch_sampler, "sampler": bench._torch_grid_sampler}[kind]
    fwd_bwd = (lambda make: lambda *a: make(torch, *a))(fwd_bwd)
fwd_bwd(*bench._sampler_inputs(1, 1, 2, 2, 2))[1]()
call = fwd_bwd(*bench._sampler_inputs(*size))[1]
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS:")
tracemalloc.start()
call()
traced = tracemalloc.get_traced_memory()[1]
print(json.dumps({"rss": status("VmHWM:") - base, "traced": None if torch else traced}))
"""


def _ours_grid_sampler(U, theta, dV):
    """``(None, forward_backward)`` of ours with the grid given: the sampler alone."""
    grid = affine_grid(theta, U.shape, align_corners=False)

    def forward_backward():
        _, cache = grid_sample_forward(U, grid, **_SAMPLER_KW)
        return grid_sample_backward_from_cache(dV, cache)

    return None, forward_backward


def _torch_grid_sampler(torch, U, theta, dV):
    """``(None, forward_backward)`` of PyTorch's sampler alone, U and grid leaves."""
    import torch.nn.functional as F

    U_leaf = torch.from_numpy(U).clone().requires_grad_(True)
    grid = F.affine_grid(torch.from_numpy(theta), list(U.shape), align_corners=False)
    grid_leaf = grid.detach().clone().requires_grad_(True)
    dV_t = torch.from_numpy(dV)

    def forward_backward():
        V = F.grid_sample(U_leaf, grid_leaf, **_SAMPLER_KW)
        return torch.autograd.grad(V, (U_leaf, grid_leaf), dV_t)

    return None, forward_backward


def memory_rows(quick: bool = False) -> list[dict]:
    """Peak memory of the volume sampler's forward + backward, ours and PyTorch's, in MB.

    Two rows at ``N=1, C=1, 128^3`` float32 (a tiny volume with ``quick``): ``sampler``,
    the grid given (gradients for U and the grid), and ``affine_grid + sampler``, the
    ``sampler fwd+bwd`` case of the timings (gradients for U and theta, so the grid and
    its gradient, 3 coordinates a voxel each, are allocated within the call). Each side
    runs once in a fresh Python process: ``rss`` is the growth of its peak resident set
    over the call, which includes what the allocator keeps; ``traced`` (ours only:
    PyTorch's allocator is not traced) is tracemalloc's peak of what was allocated during
    the call. ``inout`` is the size of U plus V, the target's unit.

    Returns
    -------
    list of dict ``{"case", "inout_mb", "ours_rss_mb", "ours_traced_mb", "torch_rss_mb"}``
    (``torch_rss_mb`` None without PyTorch)
    """
    size = QUICK_MEMORY_SIZE if quick else MEMORY_SIZE
    has_torch = import_torch(required=False) is not None
    # The child imports this copy of the package, wherever the parent found it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}

    def measure(side, kind):
        if side == "torch" and not has_torch:
            return {"rss": None, "traced": None}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, side, kind,
                               *map(str, size)], capture_output=True, text=True, check=True,
                              env=env)
        return {k: None if v is None else v / 2**20
                for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}

    N, C, *spatial = size
    shape = f"N={N} C={C} {'x'.join(map(str, spatial))}"
    rows = []
    for kind, label in (("sampler", "sampler"), ("chain", "affine_grid + sampler")):
        ours, theirs = measure("ours", kind), measure("torch", kind)
        rows.append({"case": f"peak memory {label} fwd+bwd {shape}",
                     "inout_mb": 2 * 4 * int(np.prod(size)) / 2**20,
                     "ours_rss_mb": ours["rss"], "ours_traced_mb": ours["traced"],
                     "torch_rss_mb": theirs["rss"]})
    return rows


def format_memory(rows: list[dict]) -> str:
    """The memory rows as lines: each figure in MB and as a multiple of U + V."""
    def cell(r, name):
        v = r[name]
        return "-" if v is None else f"{v:.1f} MB ({v / r['inout_mb']:.2f}x U+V)"

    return "\n".join(
        f"{r['case']} (U + V = {r['inout_mb']:.1f} MB): ours traced "
        f"{cell(r, 'ours_traced_mb')}, ours peak RSS growth {cell(r, 'ours_rss_mb')}, "
        f"torch peak RSS growth {cell(r, 'torch_rss_mb')}" for r in rows)


# --------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------


def _torch_net(torch, arch: str):
    """The PyTorch spatial transformer tutorial's ``Net`` (``stn``) or its classifier alone."""
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        def __init__(self, with_stn: bool):
            super().__init__()
            self.with_stn = with_stn
            self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
            self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
            self.conv2_drop = nn.Dropout2d()
            self.fc1 = nn.Linear(320, 50)
            self.fc2 = nn.Linear(50, 10)
            if with_stn:
                self.localization = nn.Sequential(
                    nn.Conv2d(1, 8, kernel_size=7), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
                    nn.Conv2d(8, 10, kernel_size=5), nn.MaxPool2d(2, stride=2), nn.ReLU(True),
                )
                self.fc_loc = nn.Sequential(nn.Linear(10 * 3 * 3, 32), nn.ReLU(True),
                                            nn.Linear(32, 3 * 2))
                self.fc_loc[2].weight.data.zero_()
                self.fc_loc[2].bias.data.copy_(torch.tensor([1, 0, 0, 0, 1, 0],
                                                            dtype=torch.float))

        def stn(self, x):
            xs = self.localization((x - MNIST_MEAN) / MNIST_STD)
            theta = self.fc_loc(xs.view(-1, 10 * 3 * 3)).view(-1, 2, 3)
            grid = F.affine_grid(theta, x.size(), align_corners=False)
            return F.grid_sample(x, grid, align_corners=False)

        def forward(self, x):
            if self.with_stn:
                x = self.stn(x)
            x = (x - MNIST_MEAN) / MNIST_STD
            x = F.relu(F.max_pool2d(self.conv1(x), 2))
            x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
            x = x.view(-1, 320)
            x = F.relu(self.fc1(x))
            x = F.dropout(x, training=self.training)
            return self.fc2(x)

    return Net(arch == "stn")


def _torch_paper_net(torch, arch: str, size: int, st_size: int | None):
    """``paper-cnn`` / ``paper-stcnn`` of :mod:`stn_numpy.models` in PyTorch."""
    from torch import nn
    from torch.nn import functional as F

    def after(side, kernel):
        return (side - kernel + 1) // 2

    c1, c2 = PAPER_FILTERS
    out = st_size or size
    h = after(after(out, 9), 7)

    class PaperNet(nn.Module):
        def __init__(self, with_st: bool):
            super().__init__()
            self.classifier = nn.Sequential(
                nn.Conv2d(1, c1, 9), nn.MaxPool2d(2), nn.ReLU(),
                nn.Conv2d(c1, c2, 7), nn.MaxPool2d(2), nn.ReLU(),
                nn.Flatten(), nn.Linear(c2 * h * h, 10))
            self.localization = None
            if with_st:
                pool_first = size >= PAPER_POOL_FROM
                side = size // 2 if pool_first else size
                hl = after(after(side, 5), 5)
                self.localization = nn.Sequential(
                    *([nn.MaxPool2d(2)] if pool_first else []),
                    nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
                    nn.Conv2d(20, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
                    nn.Flatten(), nn.Linear(20 * hl * hl, 20), nn.ReLU(), nn.Linear(20, 6))
                self.localization[-1].weight.data.zero_()
                self.localization[-1].bias.data.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))

        def forward(self, x):
            if self.localization is not None:
                theta = self.localization((x - MNIST_MEAN) / MNIST_STD).view(-1, 2, 3)
                grid = F.affine_grid(theta, [x.shape[0], 1, out, out], align_corners=False)
                x = F.grid_sample(x, grid, align_corners=False)
            return self.classifier((x - MNIST_MEAN) / MNIST_STD)

    return PaperNet(arch == "paper-stcnn")


def _train_inputs(batch: int, size=INPUT_SIZE):
    rng = np.random.default_rng(SEED)
    x = rng.random((batch, 1) + tuple(size), dtype=np.float32)
    y = rng.integers(0, 10, size=batch)
    return x, y


def _ours_train_step(arch: str, x, y, st_size=None):
    model = build_model(arch, input_size=x.shape[2:], seed=SEED, dtype=np.float32,
                        st_size=st_size)
    optimizer = SGD(model.params, lr=LR, momentum=MOMENTUM)

    def step():
        _, dlogits = cross_entropy(model.forward(x, train=True), y)
        model.backward(dlogits, input_grad=False)
        optimizer.step(model.grads)

    return step


def _torch_train_step(torch, arch: str, x, y, st_size=None):
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    if arch.startswith("paper-"):
        net = _torch_paper_net(torch, arch, x.shape[2], st_size).train()
    else:
        net = _torch_net(torch, arch).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x_t), y_t).backward()
        optimizer.step()

    return step


def _train_rows(torch, batch: int, timing) -> list[dict]:
    x, y = _train_inputs(batch)
    rows = []
    for arch in ("stn", "cnn"):
        theirs = None if torch is None else _torch_train_step(torch, arch, x, y)
        name = f"train step {arch} N={batch} {INPUT_SIZE[0]}x{INPUT_SIZE[1]}"
        rows.append(_row(name, _ours_train_step(arch, x, y), theirs, timing))
    for arch, size, st_size in PAPER_CASES:
        x, y = _train_inputs(batch, (size, size))
        theirs = None if torch is None else _torch_train_step(torch, arch, x, y, st_size)
        st = f" st{st_size}" if st_size else ""
        name = f"train step {arch}{st} N={batch} {size}x{size}"
        rows.append(_row(name, _ours_train_step(arch, x, y, st_size), theirs, timing))
    return rows


# --------------------------------------------------------------------------------------
# Rows, table, command line
# --------------------------------------------------------------------------------------


def _row(case: str, fn_ours, fn_torch, timing: tuple[int, int, int]) -> dict:
    """Time both sides in alternating blocks (see the module docstring).

    ``timing`` is ``(repeats, warmup, rounds)``. Returns the row :func:`run` describes.
    """
    repeats, warmup, rounds = timing
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(best_ms(fn_ours, repeats, warmup))
        if fn_torch is not None:
            theirs.append(best_ms(fn_torch, repeats, warmup))
    per_round = [o / t for o, t in zip(ours, theirs, strict=True)] if theirs else []
    return {"case": case, "ours_ms": min(ours), "torch_ms": min(theirs) if theirs else None,
            "ratio": min(ours) / min(theirs) if theirs else None,
            "ratio_range": [min(per_round), max(per_round)] if theirs else None,
            "ours_rounds_ms": ours, "torch_rounds_ms": theirs or None}


def run(repeats: int = 5, quick: bool = False, rounds: int = ROUNDS) -> list[dict]:
    """Time every case; torch columns are ``None`` when PyTorch is not importable.

    Parameters
    ----------
    repeats : int
        Timed calls per block after the block's warm-up; a block reports the fastest.
    quick : bool
        Tiny sizes, for smoke tests: the numbers mean nothing.
    rounds : int
        Blocks per side, ours and PyTorch's alternating; each side reports its fastest.

    Returns
    -------
    rows : list of dict
        ``{"case": str, "ours_ms": float, "torch_ms": float | None,
        "ratio": float | None, "ratio_range": [float, float] | None,
        "ours_rounds_ms": [float] * rounds, "torch_rounds_ms": [float] * rounds | None}``
        with ``ratio = ours_ms / torch_ms`` (each side's best over the rounds) and
        ``ratio_range`` the smallest and largest ratio of one round's two blocks.
    """
    check_positive_int("repeats", repeats)
    check_positive_int("rounds", rounds)
    torch = import_torch(required=False)
    sizes = QUICK_SAMPLER_SIZES if quick else SAMPLER_SIZES
    volumes = QUICK_VOLUME_SIZES if quick else VOLUME_SIZES
    batch = QUICK_TRAIN_BATCH if quick else TRAIN_BATCH
    timing = (repeats, QUICK_WARMUP if quick else WARMUP, rounds)
    double = QUICK_DOUBLE_BACKWARD_SIZE if quick else DOUBLE_BACKWARD_SIZE
    return (_sampler_rows(torch, sizes, timing)
            + _sampler_rows(torch, volumes, timing, uncached=False)
            + [_double_backward_row(torch, double, timing)]
            + _train_rows(torch, batch, timing))


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width table: case, ours ms, torch ms, ours/torch, and the range
    of the per-round ratios."""
    width = max([len("case")] + [len(r["case"]) for r in rows])

    def cell(value, suffix=""):
        return "-" if value is None else f"{value:.2f}{suffix}"

    def spread(r):
        span = r.get("ratio_range")
        return "-" if span is None else f"{span[0]:.2f}-{span[1]:.2f}x"

    lines = [f"{'case':<{width}}  {'ours ms':>10}  {'torch ms':>10}  {'ours/torch':>10}  "
             f"{'per round':>12}",
             f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 10}  {'-' * 12}"]
    for r in rows:
        lines.append(f"{r['case']:<{width}}  {cell(r['ours_ms']):>10}  "
                     f"{cell(r['torch_ms']):>10}  {cell(r['ratio'], 'x'):>10}  "
                     f"{spread(r):>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: print the environment and the table; ``--json PATH`` also saves them.

    Returns the exit code: 0, or 2 (before anything is timed) when ``PATH`` cannot be
    written. The JSON file is replaced atomically, so a crash never leaves half of it.
    """
    parser = argparse.ArgumentParser(
        prog="stn-numpy bench",
        description="Time the sampler and a training step, ours beside PyTorch's.",
    )
    parser.add_argument("--repeats", type=parse_positive_int, default=5,
                        help="timed calls per block after its warm-up; the best is kept "
                             "(default 5)")
    parser.add_argument("--rounds", type=parse_positive_int, default=ROUNDS,
                        help="blocks per side, ours and PyTorch's alternating; each side's "
                             f"best is kept (default {ROUNDS})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a smoke test rather than a measurement")
    parser.add_argument("--memory", action="store_true",
                        help="also measure the peak memory of the volume sampler's forward "
                             "+ backward (N=1 C=1 128^3), each side in a fresh process")
    parser.add_argument("--json", metavar="PATH",
                        help="also write {'environment': ..., 'rows': [...]} to PATH")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)
    # As the training command does: freed multi-MB temporaries stay mapped (see _parallel).
    keep_freed_memory()
    if args.json:
        # Checked first: the benchmark takes minutes, and its results would be lost.
        try:
            check_writable(args.json)
        except OSError as exc:
            print(f"stn-numpy bench: error: cannot write --json {args.json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 2
    env = environment()
    print(format_header(env), flush=True)
    rows = run(repeats=args.repeats, quick=args.quick, rounds=args.rounds)
    warmup = QUICK_WARMUP if args.quick else WARMUP
    print(f"best of {args.rounds} rounds, each ours then torch, of {args.repeats} calls "
          f"after {warmup} warm-up calls; float32"
          + (" (quick: tiny sizes)" if args.quick else ""))
    print(format_table(rows))
    memory = memory_rows(args.quick) if args.memory else []
    if memory:
        print(format_memory(memory))
    if args.json:
        text = json.dumps({"environment": env, "quick": args.quick, "repeats": args.repeats,
                           "rounds": args.rounds, "rows": rows, "memory": memory}, indent=2)
        atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
