"""The numba kernels compiled once per test run, shared out between the pytest-xdist workers.

Every numba kernel compiles on its first call in a process (seconds each) unless the on-disk
cache has it. Under xdist each worker would otherwise meet, and compile, nearly every kernel
itself, the two of them side by side. At the start of the session each worker here compiles its
share of the kernels the suite calls (one call of each op of :data:`double_backward_cases.CASES`,
forward and backward, in each dtype and layout, and the kernels that only larger shapes reach:
:data:`LARGER`), written to the shared cache, and loads the other workers' share from it when a
test first needs it.
"""

from __future__ import annotations

import itertools
import os

import torch

from double_backward_cases import CASES, tensors

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Ops whose cases above are too small for one of their kernels: BatchNorm NCHW's blocks of
# channels (channel_kernels.bn_seg_bwd, bn_seg_fwd; segments of at least 4 KiB; about 40 s of
# compiling per dtype, which one worker would otherwise meet late in the run, the other idle).
LARGER = {"batch_norm": (2, 4, 32, 64)}


def _items() -> list[tuple[str, torch.dtype, bool | None]]:
    """(op, dtype, channels_last) of every warm-up call, in a fixed order."""
    out = []
    for op, dtype in itertools.product(CASES, DTYPES):
        layouts = {CASES[op].channels_last}
        if len(CASES[op].shapes[0]) == 4 and op != "normalize":
            layouts |= {False, True}
        out += [(op, dtype, cl) for cl in sorted(layouts)]
    # (first: the slowest compiles start before the many short ones)
    return [(op, dtype, None) for op, dtype in itertools.product(LARGER, DTYPES)] + out


def _call(op: str, dtype: torch.dtype, channels_last: bool | None) -> None:
    """One warm-up call; ``channels_last`` None: the contiguous call at :data:`LARGER`'s shape."""
    case = CASES[op]._replace(channels_last=bool(channels_last))
    if channels_last is None:
        shape = LARGER[op]
        case = case._replace(shapes=(shape, *((shape[1],),) * (len(case.shapes) - 1)))
    leaves = [t.requires_grad_() for t in tensors(case, dtype, seed=0)]
    out = case.call("numba", *leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def warm(worker: int, workers: int) -> None:
    """Compile (or load) this worker's share of the kernels: every ``workers``-th warm-up call
    from ``worker``. A call that fails is left to the tests to report."""
    for op, dtype, channels_last in _items()[worker::workers]:
        try:
            _call(op, dtype, channels_last)
        except Exception:  # noqa: BLE001  (a test will meet the same failure and say what it is)
            pass


def from_xdist() -> None:
    """:func:`warm` for this pytest-xdist worker, where there are several and numba compiles."""
    name, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if name is None or count < 2 or os.environ.get("NUMBA_DISABLE_JIT") == "1":
        return
    try:
        import numba  # noqa: F401
    except ImportError:
        return
    warm(int(name.removeprefix("gw")), count)
