"""Output tensors of the numba kernels backed by transparent huge pages where the OS offers them.

A large fresh tensor can cost more in the operating system than in the kernel that fills it.
glibc serves every block of 32 MiB or more with a new anonymous mapping and unmaps it on free, so
the first write to each 4 KiB page of every such output is a page fault that zeroes the page: a
4096x4096 float32 output is 16,384 faults, about 30 ms on the 2-core machine of
``benchmarks/results/pages_cpu.md``, more than the LayerNorm kernel that writes it. Advised with
``madvise(MADV_HUGEPAGE)`` before its first write, Linux fills the block with 2 MiB pages instead:
~540 faults, most of them in the unaligned head and tail, and about a third of the time.

:func:`empty_like` and :func:`empty` are ``torch.empty_like`` and ``torch.empty``, then that
advice on the 2 MiB-aligned interior of the new tensor's data. The tensor is torch's own in every
respect (torch's allocator, a resizable storage, ``share_memory_``, pickling, a gradient autograd
may keep as ``.grad``); only the page size under its interior differs. The head and tail (up to
2 MiB each) stay in 4 KiB pages, so no byte outside the tensor becomes resident.

It applies only where all of this holds, and is a plain ``torch.empty`` otherwise:

* Linux, with ``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise`` or ``always``
  (read once per process) and ``madvise`` in the C library (not macOS or Windows);
* a tensor of at least :data:`MIN_BYTES` (32 MiB). Below that glibc keeps freed blocks in its
  heap and hands them out again with their pages present: no faults to save, and advice on heap
  memory would outlive the tensor;
* the start of the interior not yet resident (memory recycled by an allocator, for instance
  glibc with ``M_MMAP_THRESHOLD`` raised or jemalloc, is left alone);
* the interior holding at least one whole huge page (``hpage_pmd_size``: 2 MiB on x86-64).

The advice is a hint: without a free 2 MiB page the kernel uses 4 KiB pages, and a failed
``madvise`` is ignored (the tensor is valid either way). With the ``defrag`` setting ``madvise``
(a common default) a fault in advised memory may wait for the kernel to compact memory when free
2 MiB blocks are scarce, so on a long-running, fragmented machine one allocation can take longer
than without the advice. Processes run with ``THP_MEM_ALLOC_ENABLE=1`` already get the same
advice from torch's allocator for every tensor of 2 MiB or more; this adds nothing there.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "advise", "empty", "empty_like", "huge_page_size"]

MIN_BYTES = 32 << 20
"""Smallest tensor (bytes) given huge pages: glibc's largest mmap threshold on 64-bit systems, so
every block advised is one glibc mapped afresh for this call (its request adds a header)."""

SYSFS = "/sys/kernel/mm/transparent_hugepage"

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # 14 on every Linux architecture


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@functools.cache
def _libc() -> (
    tuple[Callable[[int, int, int], int], Callable[[int, int, object], int], Callable[[int], int], int] | None
):
    """``(madvise, mincore, sbrk, huge page size)`` where the OS offers huge pages to ``madvise``,
    else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        enabled = _read(f"{SYSFS}/enabled")  # e.g. "always [madvise] never"
        mode = enabled[enabled.index("[") + 1 : enabled.index("]")]
        if mode not in ("always", "madvise"):
            return None
        try:
            huge = int(_read(f"{SYSFS}/hpage_pmd_size"))
        except (OSError, ValueError):
            huge = 2 << 20
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore, sbrk = libc.madvise, libc.mincore, libc.sbrk
    except (OSError, ValueError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    madvise.restype = mincore.restype = ctypes.c_int
    sbrk.argtypes, sbrk.restype = (ctypes.c_ssize_t,), ctypes.c_void_p
    return madvise, mincore, sbrk, huge


def huge_page_size() -> int:
    """The huge page size this process would advise (0 where huge pages are not offered)."""
    found = _libc()
    return 0 if found is None else found[3]


def advise(t: Tensor) -> bool:
    """Ask for huge pages under the whole 2 MiB-aligned interior of ``t``'s data, which nothing
    may have written yet. True if the advice was taken.

    Heap memory is left alone: below the program break (glibc's main heap), or with its first
    interior page already resident (recycled by some allocator). It has few faults to save, and
    the advice would outlive the tensor: glibc keeps huge pages of its heap resident after free,
    and each advised range splits the heap's mapping (see ``benchmarks/results/pages_cpu.md``)."""
    found = _libc()
    if found is None:
        return False
    madvise, mincore, sbrk, huge = found
    start = t.data_ptr()
    lo = -(-start // huge) * huge
    hi = (start + t.nbytes) // huge * huge
    if hi <= lo or lo < (sbrk(0) or 0):
        return False
    resident = ctypes.create_string_buffer(1)
    if mincore(lo, 1, resident) != 0 or resident.raw[0] & 1:
        return False
    return madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def _large(t: Tensor) -> bool:
    return t.nbytes >= MIN_BYTES and t.device.type == "cpu" and type(t) is Tensor


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)`` (same dtype, device, shape and strides; no autograd history),
    in huge pages when it is large (see the module docstring)."""
    t = torch.empty_like(x)
    if _large(t):
        advise(t)
    return t


def empty(shape: int | Sequence[int], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, in huge pages when it is large."""
    t = torch.empty(shape, dtype=dtype)
    if _large(t):
        advise(t)
    return t
