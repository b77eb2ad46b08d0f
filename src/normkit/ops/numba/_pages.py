"""Output tensors of the numba kernels, with their pages made resident before the kernel writes them.

A large fresh tensor can cost more in the operating system than in the kernel that fills it: the
first write to each 4 KiB page of memory the process has not touched yet is a page fault that
zeroes the page. On the 2-core machine of ``benchmarks/results/pages_cpu.md`` a 4096x4096 float32
output is 16,384 faults, about 30 ms, more than the LayerNorm kernel that writes it. Two kinds of
fresh memory reach the kernels' outputs, and each gets its own remedy:

* **Mapped blocks.** glibc serves every block of 32 MiB or more with a new anonymous mapping and
  unmaps it on free, so every such output is fresh. Advised with ``madvise(MADV_HUGEPAGE)`` before
  its first write, Linux fills the block with 2 MiB pages instead: ~540 faults, most of them in
  the unaligned head and tail, and about a third of the time (:func:`advise`).
* **Regrown heap.** Smaller blocks come from glibc's heap once a block of their size has been
  freed (glibc raises its mmap threshold then). That heap is trimmed whenever 2x the threshold
  lies free at its top, so in a loop of forward and backward calls one call in two or three finds
  one of its 8-32 MiB outputs in pages the heap has just grown into: a 4096x1024 float32 output,
  4,096 faults, a forward of ~12 ms instead of ~2.5. Huge pages are no remedy there (the advice
  would outlive the tensor, see below), but the missing pages can be made resident in one
  ``madvise(MADV_POPULATE_WRITE)`` call before the kernel runs, which takes 60-70% of the time of
  the same faults taken one by one inside the kernel (:func:`prefault`; the "Regrown heap" table
  of the results: LayerNorm 4096x1024 forward 12.0 -> 7.5 ms, forward+backward 26.6 -> 18.2 ms).

:func:`empty_like` and :func:`empty` are ``torch.empty_like`` and ``torch.empty``, then the huge
page advice on the 2 MiB-aligned interior of a tensor of at least :data:`MIN_BYTES`, or where
that advice was not taken, the prefault of every page of a tensor of at least
:data:`PREFAULT_MIN_BYTES` not yet resident. The
tensor is torch's own in every respect (torch's allocator, a resizable storage, ``share_memory_``,
pickling, a gradient autograd may keep as ``.grad``); only the page size under its interior and
when its pages become resident differ. Both act on the page-aligned interior only (the head and
tail pages, which the tensor may share with its neighbours, are left to the kernel), so no byte
outside the tensor becomes resident. Callers write every element of these tensors: the pages made
resident are pages the kernel would have faulted in anyway.

The huge page advice applies only where all of this holds:

* Linux, with ``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise`` or ``always``
  (read once per process) and ``madvise`` in the C library (not macOS or Windows);
* a tensor of at least :data:`MIN_BYTES` (32 MiB): glibc's largest mmap threshold, so the block
  is a mapping of its own that ``free`` unmaps, and the advice ends with the tensor. Below that
  the block is heap memory in the steady state; the fresh mappings glibc hands out there before
  its threshold rises (first calls) cannot be told from a thread arena's fresh heap without
  reading glibc's chunk headers, so they are not advised either;
* the start of the interior not yet resident and above the program break (memory recycled by an
  allocator, for instance glibc with ``M_MMAP_THRESHOLD`` raised or jemalloc, is left alone);
* the interior holding at least one whole huge page (``hpage_pmd_size``: 2 MiB on x86-64).

The prefault applies on Linux 5.14 or later (``MADV_POPULATE_WRITE``; older kernels refuse it
once, and it is not tried again), with one NUMA node: on a machine with several, the kernel's
threads fault their own rows in on their own nodes, which one prefaulting thread would undo. It
leaves no trace once done (no advice, no change to the mapping), so unlike huge pages it is safe
on heap memory. A regrown heap lacks the tail of a block, a fresh mapping all of it, so the last
page is asked about first (one ``mincore`` call, ~2 us) and only where it is missing the rest
(~7 us for 16 MiB); resident pages are never populated again (that costs ~0.5 ms per 16 MiB). A
block missing pages in its middle alone (after an explicit ``malloc_trim``) takes its faults.

Both are hints: without a free 2 MiB page the kernel uses 4 KiB pages, and a failed ``madvise``
is ignored (the tensor is valid either way). With the ``defrag`` setting ``madvise`` (a common
default) a fault in advised memory may wait for the kernel to compact memory when free 2 MiB
blocks are scarce, so on a long-running, fragmented machine one allocation can take longer than
without the advice. Processes run with ``THP_MEM_ALLOC_ENABLE=1`` already get the same advice from
torch's allocator for every tensor of 2 MiB or more; this adds nothing there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["MIN_BYTES", "PREFAULT_MIN_BYTES", "advise", "empty", "empty_like", "huge_page_size", "prefault"]

MIN_BYTES = 32 << 20
"""Smallest tensor (bytes) given huge pages: glibc's largest mmap threshold on 64-bit systems, so
every block advised is one glibc mapped afresh for this call (its request adds a header)."""

PREFAULT_MIN_BYTES = 4 << 20
"""Smallest tensor (bytes) whose missing pages are made resident before the kernel writes it. At
4 MiB a refaulted output costs the kernel ~2 ms; the check for missing pages costs ~3 us."""

SYSFS = "/sys/kernel/mm/transparent_hugepage"
NODES = "/sys/devices/system/node"

_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # 14 on every Linux architecture
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # 23 on every Linux architecture
_PAGE = mmap.PAGESIZE
_LOW_BIT = bytes(i & 1 for i in range(256))  # mincore's residency bit; the other bits are reserved
_prefault_refused = False  # set when the kernel predates MADV_POPULATE_WRITE
# mincore's answer for one page, shared by all calls (1.3 us less than a buffer per call): two
# threads racing on it can only make one of them advise or prefault less, never wrongly.
_one_page = ctypes.create_string_buffer(1)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@functools.cache
def _libc() -> (
    tuple[Callable[[int, int, int], int], Callable[[int, int, object], int], Callable[[int], int], int] | None
):
    """``(madvise, mincore, sbrk, huge page size)`` on Linux, the size 0 where the OS does not
    offer huge pages to ``madvise``; None where the C library has no ``madvise`` (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise, mincore, sbrk = libc.madvise, libc.mincore, libc.sbrk
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    madvise.restype = mincore.restype = ctypes.c_int
    sbrk.argtypes, sbrk.restype = (ctypes.c_ssize_t,), ctypes.c_void_p
    huge = 0
    try:
        enabled = _read(f"{SYSFS}/enabled")  # e.g. "always [madvise] never"
        if enabled[enabled.index("[") + 1 : enabled.index("]")] in ("always", "madvise"):
            try:
                huge = int(_read(f"{SYSFS}/hpage_pmd_size"))
            except (OSError, ValueError):
                huge = 2 << 20
    except (OSError, ValueError):
        pass
    return madvise, mincore, sbrk, huge


@functools.cache
def _one_node() -> bool:
    """Whether the machine has one NUMA node (read once per process; no sysfs: one node)."""
    try:
        return sum(n.startswith("node") and n[4:].isdigit() for n in os.listdir(NODES)) <= 1
    except OSError:
        return True


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
    if found is None or not found[3]:
        return False
    madvise, mincore, sbrk, huge = found
    start = t.data_ptr()
    lo = -(-start // huge) * huge
    hi = (start + t.nbytes) // huge * huge
    if hi <= lo or lo < (sbrk(0) or 0):
        return False
    if mincore(lo, 1, _one_page) != 0 or _one_page.raw[0] & 1:
        return False
    return madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def prefault(t: Tensor) -> bool:
    """Make the pages of ``t``'s page-aligned interior that are not resident yet resident, in one
    ``madvise(MADV_POPULATE_WRITE)`` over the span from the first missing page to the last, where
    the last page is missing. True if pages were missing and the call succeeded. For tensors
    whose every element is about to be written: the pages come zeroed, as a write fault would
    bring them."""
    global _prefault_refused
    found = _libc()
    if found is None or _prefault_refused or not _one_node():
        return False
    madvise, mincore = found[0], found[1]
    start = t.data_ptr()
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + t.nbytes) // _PAGE * _PAGE
    if hi <= lo:
        return False
    # A heap that grew again lacks the tail of the block, a fresh mapping all of it: with the
    # last page resident the rest is taken as resident too (one page to ask about, not thousands).
    if mincore(hi - _PAGE, _PAGE, _one_page) != 0 or _one_page.raw[0] & 1:
        return False
    resident = ctypes.create_string_buffer((hi - lo) // _PAGE)
    if mincore(lo, hi - lo, resident) != 0:
        return False
    bits = resident.raw.translate(_LOW_BIT)
    first = bits.find(0)
    if first < 0:
        return False
    last = bits.rfind(0)
    if madvise(lo + first * _PAGE, (last + 1 - first) * _PAGE, _MADV_POPULATE_WRITE) == 0:
        return True
    _prefault_refused = ctypes.get_errno() == errno.EINVAL
    return False


def _made(t: Tensor) -> Tensor:
    """``t`` (just allocated, not written) in huge pages or prefaulted, where it is large enough."""
    n = t.nbytes
    if n >= min(MIN_BYTES, PREFAULT_MIN_BYTES) and t.is_cpu and type(t) is Tensor:
        # Huge pages fault in 2 MiB at a time already: prefaulting them as well measured slower.
        if not (n >= MIN_BYTES and advise(t)) and n >= PREFAULT_MIN_BYTES:
            prefault(t)
    return t


def empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)`` (same dtype, device, shape and strides; no autograd history),
    its pages made resident and, when it is large, huge (see the module docstring)."""
    return _made(torch.empty_like(x))


def empty(shape: int | Sequence[int], dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, its pages made resident and, when it is
    large, huge."""
    return _made(torch.empty(shape, dtype=dtype))
