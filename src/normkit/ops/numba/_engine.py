"""What every numba kernel of normkit shares: compilation, threads and dtypes (the autograd
Functions around them: :mod:`normkit.ops.numba._functions`).

API (for the kernel files of :mod:`normkit.ops.numba`):

* :func:`jit` / :func:`pjit`: ``numba.njit`` with normkit's options (on-disk cache, no GIL,
  strict IEEE arithmetic: no ``fastmath``, so every sum rounds as written); ``pjit`` adds
  ``parallel=True`` (loops over ``numba.prange``).
* :func:`sum_jit`: :func:`jit` for a function holding only a reduction loop, which may be
  reassociated (vectorized): see the comment at its definition for why it stays
  deterministic and batch-invariant. ~10x faster than :data:`LANES`-style strict sums.
* :func:`launch` ``(kernel, *arrays_and_scalars)``: runs a compiled parallel kernel on
  :func:`threads` threads, one launch at a time in the process (see Threads below).
* :func:`split_run` ``(kernel, n_items, elements, *args)``: runs a compiled *serial* kernel
  ``kernel(*args, lo, hi)`` over contiguous ranges of ``[0, n_items)``, one range per thread
  (the calling thread and a small Python thread pool; the kernels release the GIL), or once
  over everything when the call has fewer than :data:`PARALLEL_MIN_ELEMENTS` elements: no
  numba thread pool, no lock, no parfor compilation (see Threads below).
  :func:`split_threads` says how many ranges it will use.
* Inside kernels: ``row_of(a, i)``, row ``i`` of a C-contiguous 2-D array as a 1-D array
  without reference counting (``a[i]`` costs two atomic operations per use);
  ``prefetch_row(row)``, a hint to fetch a row the kernel reads next.
* Inside kernels, for outputs too large to stay in cache (:func:`streams` ``(out)``: at least
  :data:`STREAM_MIN_BYTES`): ``stream_row(buf, bits, row)`` stores a finished row with
  non-temporal stores (:func:`stream_copy`), and ``store_fence()`` orders them before the
  kernel returns.
* :func:`as_array` ``(tensor)``: the NumPy view of a contiguous CPU tensor, no copy; bfloat16
  comes as ``uint16`` (its bits). Where a launcher's Python cost matters (small calls), pass
  ``tensor.data_ptr()`` instead and rebuild the array inside a jitted launcher with
  ``array_at(address, shape, like)`` (:func:`element_like` gives ``like``): ``.numpy()``
  costs 1-2 us a tensor, an address 0.1 us. :func:`acc_np_dtype` is the statistics dtype for an input
  dtype (float64 for float64, else float32); :func:`param` gives a weight/bias as a
  contiguous array in that dtype (a 0-length one for None).
* Inside kernels: ``decode(row, buf)`` returns ``row`` itself when it is float, else fills
  ``buf`` (the statistics dtype) from bf16 bits and returns it; ``staging(row, buf)`` is where
  to write a result that ``encode(buf, row)`` then stores (round to nearest even for bf16, a
  no-op when ``row`` is float and already the staging array).

Threads: a kernel uses ``min(torch.get_num_threads(), numba's pool)`` threads, read at each
call, so ``torch.set_num_threads`` governs both libraries and the two pools never run at
once. numba's threading layer is pinned to ``workqueue`` (present in every wheel; an OpenMP
layer would be a second OpenMP runtime beside torch's) unless ``NUMBA_THREADING_LAYER`` is
set. ``workqueue`` aborts the process when two Python threads launch parallel kernels at the
same time, so every launch holds one process-wide lock: concurrent calls are serialised
(each already uses every thread it is given).

:func:`split_run` (the row norms) avoids that machinery: waking numba's pool, setting its
thread count and taking the lock cost 30-150 us a call on a loaded 2-core machine, more than a
small problem's whole kernel, and ``parallel=True`` kernels take several times longer to
compile. Its serial kernels are plain ``nogil`` functions, safe to run from any number of
Python threads at once; the ranges only spread the work (results never depend on them).

Numerics: no kernel's result depends on the thread count: work is split into fixed blocks of
rows (sized from the shape alone), every reduction runs in a fixed order, and partial sums
across rows are kept per block and summed in block order.
"""

from __future__ import annotations

import functools
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from torch import Tensor

from normkit.ops.numba._cache import cached_njit

__all__ = [
    "LANES",
    "STREAM_MIN_BYTES",
    "acc_np_dtype",
    "array_at",
    "as_array",
    "decode",
    "element_like",
    "encode",
    "jit",
    "launch",
    "param",
    "param_tensor",
    "pjit",
    "prefetch_row",
    "row_of",
    "split_run",
    "split_threads",
    "staging",
    "store_fence",
    "stream_copy",
    "stream_row",
    "streams",
    "sum_jit",
    "threads",
]

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Options of every kernel: compiled once per signature and cached on disk (__pycache__, or
# NUMBA_CACHE_DIR; stale after a change to any file of this package: see _cache.py), GIL
# released, IEEE arithmetic (no reassociation: sums round in the order written, which is what
# makes results reproducible and batch-invariant).
jit = functools.partial(cached_njit, nogil=True, fastmath=False, error_model="numpy")
pjit = functools.partial(jit, parallel=True)

# Reductions along a row written with LANES interleaved partial sums (element j to lane
# j % LANES, folded in a fixed tree) have their order fixed by the source; numba/LLVM keeps
# such lanes in memory, so they run scalar.
LANES = 8

# For a plain loop ``acc += f(v[j])`` that is a reduction: reassociation allowed, so LLVM
# vectorizes it (measured 12x faster than strict order for a float32 row sum). The order it
# picks is fixed in the compiled code and depends on the trip count only (no alignment
# peeling on the CPU targets numba compiles for): the same for every row, batch and thread
# count on a machine (not across CPUs of other vector widths). Keep such sums in their own
# small functions: the flag then covers only them, and elementwise arithmetic stays strict.
sum_jit = functools.partial(jit, fastmath={"reassoc"})


# Bytes of the next row a row kernel asks for while it works on the current one (the first
# 16 KiB: all of a 4096-float row). The CPU's own prefetchers follow a stream only within a
# 4 KiB page and start cold at each row, so without the hint a row's first pass waits on
# memory while nothing is written, then its last pass writes while nothing is read. A hint
# changes no result (it loads nothing into registers and cannot fault).
PREFETCH_BYTES = 16384


@intrinsic
def _prefetch(typingctx, row, j):
    """``llvm.prefetch`` (read, keep in all cache levels) of the cache line holding ``row[j]``."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.gep(data, [args[1]])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(row, types.intp), codegen


@intrinsic
def row_of(typingctx, a, i):
    """Row ``i`` of the C-contiguous 2-D array ``a``, as a 1-D array that does not own or count
    a reference to ``a``'s memory. ``a[i]`` takes one (an atomic increment and decrement, with
    every slice and call of the row doing the same): measured 40-60% of a row kernel's time on
    rows in cache, and a cache line the threads contend for. The row must not outlive ``a``:
    use it only inside the kernel that received ``a``."""
    if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C"):
        return None
    row_type = a.copy(ndim=1, layout="C")

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        n = cgutils.unpack_tuple(builder, src.shape, 2)[1]
        step = cgutils.unpack_tuple(builder, src.strides, 2)[1]
        row = context.make_array(sig.return_type)(context, builder)
        context.populate_array(
            row,
            data=builder.gep(src.data, [builder.mul(args[1], n)]),
            shape=[n],
            strides=[step],
            itemsize=src.itemsize,
            meminfo=None,
            parent=None,
        )
        return row._getvalue()

    return row_type(a, types.intp), codegen


@jit
def prefetch_row(row):
    """Hint the CPU to fetch the first :data:`PREFETCH_BYTES` of ``row`` (a contiguous 1-D array)."""
    step = max(1, 64 // row.itemsize)
    for j in range(0, min(row.shape[0], PREFETCH_BYTES // row.itemsize), step):
        _prefetch(row, j)


# Outputs (y, dx) of at least this many bytes are written with non-temporal stores
# (:func:`stream_row`): straight to memory, without first reading each line into the cache
# and without evicting the rows being read. Below it an output may still be in the
# last-level cache (32 MiB on the machines measured) when the next operation reads it, and
# streaming was no faster there. AMD Zen 4, kernel CPU time per row, each call with cold
# caches: 4096x4096 float32 LayerNorm/RMSNorm forward and backward 1.12-1.18x faster
# streamed; 4096x1024 float32 (16 MiB) 0.9-1.1x; bf16 1.0x. The stored bits are the same.
STREAM_MIN_BYTES = 1 << 25
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def stream_copy(typingctx, src, dst):
    """``dst[:] = src[:]`` (two contiguous 1-D arrays of one dtype and length), the 64-byte
    aligned middle of ``dst`` with non-temporal 64-byte stores, its ends element by element.
    Such stores are weakly ordered: :func:`store_fence` before the kernel returns."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[1])(context, builder, args[1])
        n = cgutils.unpack_tuple(builder, da.shape, 1)[0]
        elt = context.get_data_type(sig.args[1].dtype)
        size = context.get_abi_sizeof(elt)
        lanes = 64 // size
        i64 = ir.IntType(64)
        lead = builder.urem(builder.sub(i64(0), builder.ptrtoint(da.data, i64)), i64(64))
        head = builder.udiv(lead, i64(size))
        head = builder.select(builder.icmp_unsigned("<", head, n), head, n)
        vectors = builder.udiv(builder.sub(n, head), i64(lanes))
        tail = builder.add(head, builder.mul(vectors, i64(lanes)))

        def copy_one(j):
            builder.store(builder.load(builder.gep(sa.data, [j])), builder.gep(da.data, [j]))

        with cgutils.for_range(builder, head) as loop:
            copy_one(loop.index)
        vec = ir.VectorType(elt, lanes)
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range(builder, vectors) as loop:
            j = builder.add(head, builder.mul(loop.index, i64(lanes)))
            value = builder.load(builder.bitcast(builder.gep(sa.data, [j]), vec.as_pointer()), align=size)
            store = builder.store(value, builder.bitcast(builder.gep(da.data, [j]), vec.as_pointer()), align=64)
            store.set_metadata("nontemporal", nontemporal)
        with cgutils.for_range(builder, builder.sub(n, tail)) as loop:
            copy_one(builder.add(tail, loop.index))
        return context.get_dummy_value()

    return types.void(src, dst), codegen


@intrinsic
def store_fence(typingctx):
    """``sfence`` on x86 (elsewhere a full fence): the non-temporal stores before it are
    visible to every core before any store after it (so before the kernel's caller learns it
    has returned). LLVM's own fence may be a locked instruction, which x86 does not promise to
    order non-temporal stores with."""

    def codegen(context, builder, sig, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


def stream_row(buf, bits, row):  # pragma: no cover - replaced by the overload inside kernels
    """Store ``buf`` (the statistics dtype) into ``row`` with :func:`stream_copy`, through
    ``bits`` (a scratch row of ``row``'s dtype) when ``row`` is bf16."""


@overload(stream_row)
def _stream_row_impl(buf, bits, row):
    if isinstance(row.dtype, types.Float):
        return lambda buf, bits, row: stream_copy(buf, row)

    def narrow_then_stream(buf, bits, row):
        encode(buf, bits)
        stream_copy(bits, row)

    return narrow_then_stream


@jit(inline="always")
def streams(out):
    """Whether the kernel writes ``out`` (a whole output array) with non-temporal stores."""
    return out.size * out.itemsize >= STREAM_MIN_BYTES


@intrinsic
def _pointer(typingctx, address):
    """The integer ``address`` as a ``void*``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@jit(inline="always")
def array_at(address, shape, like):
    """The C-contiguous array of ``shape`` and ``like``'s dtype at ``address`` (a tensor's
    ``data_ptr()``), neither owning nor counting a reference to the memory, as :func:`row_of`'s
    rows: the tensor must outlive the kernel call, which the Python caller holding it ensures.
    A 0-size array may have address 0."""
    return numba.carray(_pointer(address), shape, like.dtype)


_LAUNCH = threading.Lock()


def threads() -> int:
    """Threads a kernel launched now may use: torch's count, capped by numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def launch(kernel: Callable[..., Any], *args: Any) -> Any:
    """``kernel(*args)`` on :func:`threads` threads, one launch at a time in the process."""
    n = threads()
    with _LAUNCH:
        numba.set_num_threads(n)
        return kernel(*args)


# Below this many elements a call runs on the calling thread alone: handing ranges to other
# threads costs ~20-60 us, what a serial kernel needs for ~2^16 elements.
PARALLEL_MIN_ELEMENTS = 1 << 16

_POOL: list[ThreadPoolExecutor] = []


def _pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of at least ``workers`` threads (started lazily, kept for the process)."""
    if not _POOL or _POOL[0]._max_workers < workers:
        _POOL[:] = [ThreadPoolExecutor(max_workers=workers, thread_name_prefix="normkit-numba")]
    return _POOL[0]


def split_threads(n_items: int, elements: int) -> int:
    """How many ranges :func:`split_run` ``(kernel, n_items, elements, ...)`` runs now: one per
    thread of ``torch.get_num_threads()``, at most ``n_items``, and 1 below
    :data:`PARALLEL_MIN_ELEMENTS` elements."""
    return min(torch.get_num_threads(), n_items) if elements >= PARALLEL_MIN_ELEMENTS else 1


def split_run(kernel: Callable[..., Any], n_items: int, elements: int, *args: Any) -> None:
    """``kernel(*args, lo, hi)`` over contiguous ranges ``[lo, hi)`` covering ``[0, n_items)``:
    one range per thread of ``torch.get_num_threads()`` (at most ``n_items``), the first on the
    calling thread; a single call ``kernel(*args, 0, n_items)`` when ``elements`` (the call's
    size) is below :data:`PARALLEL_MIN_ELEMENTS` or one thread is allowed."""
    if elements < PARALLEL_MIN_ELEMENTS:  # (before split_threads: small calls are the common ones)
        kernel(*args, 0, n_items)
        return
    n = split_threads(n_items, elements)
    if n <= 1:
        kernel(*args, 0, n_items)
        return
    bounds = [n_items * t // n for t in range(n + 1)]
    pool = _pool(n - 1)
    futures = [pool.submit(kernel, *args, bounds[t], bounds[t + 1]) for t in range(1, n)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def acc_np_dtype(dtype: torch.dtype) -> type:
    """NumPy dtype of the statistics for input of ``dtype``: float64 for float64, else float32."""
    return np.float64 if dtype == torch.float64 else np.float32


def as_array(t: Tensor) -> np.ndarray:
    """The NumPy array sharing ``t``'s memory (``t`` a contiguous CPU tensor); bfloat16 as its
    ``uint16`` bit patterns, which the kernels decode."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# A 0-length array per dtype the kernels see, by torch dtype: bfloat16 as its uint16 bits.
_ELEMENT_LIKE = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
    torch.bfloat16: np.empty(0, np.uint16),
}


def element_like(dtype: torch.dtype) -> np.ndarray:
    """A 0-length array whose dtype is how the kernels see elements of torch ``dtype`` (bfloat16
    as ``uint16`` bits): the ``like`` of :func:`array_at`, which also selects the kernel's
    compiled specialisation."""
    return _ELEMENT_LIKE[dtype]


def param_tensor(t: Tensor | None, dtype: torch.dtype, n: int, fill: float) -> Tensor:
    """A weight or bias as a contiguous tensor of the statistics ``dtype`` (itself where it is
    one already; exact widening of bf16/fp32 parameters); for None, ``n`` copies of ``fill``
    (1 for a weight, 0 for a bias: ``h * 1 + 0`` is ``h`` exactly, so a kernel needs no branch
    for a missing parameter), shared between calls: the kernels only read parameters."""
    if t is None:
        return _filled(n, dtype, fill)
    if t.dtype is dtype and t.is_contiguous():
        return t
    return t.detach().reshape(-1).to(dtype).contiguous()


def param(t: Tensor | None, dtype: type, n: int, fill: float) -> np.ndarray:
    """:func:`param_tensor` as a flat array, ``dtype`` the statistics' NumPy type."""
    return param_tensor(t, _TORCH_DTYPE[dtype], n, fill).detach().numpy().reshape(-1)


@functools.lru_cache(maxsize=64)
def _filled(n: int, dtype: torch.dtype, fill: float) -> Tensor:
    """``n`` copies of ``fill``, shared between calls (left writable: a read-only array would be
    another numba specialisation of every kernel)."""
    return torch.full((n,), fill, dtype=dtype)


_TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


# ---- dtype codecs, resolved at compile time ----------------------------------------------


def decode(row, buf):  # pragma: no cover - replaced by the overload inside kernels
    """``row`` in the statistics dtype: itself when float, else bf16 bits widened into ``buf``."""


def staging(row, buf):  # pragma: no cover
    """Where a kernel writes results bound for ``row``: ``row`` when float, else ``buf``."""


def encode(buf, row):  # pragma: no cover
    """Store ``buf`` into ``row``: round to nearest even for bf16; nothing when float."""


@overload(decode)
def _decode(row, buf):
    if isinstance(row.dtype, types.Float):
        return lambda row, buf: row

    def widen(row, buf):
        bits = buf.view(np.uint32)
        for j in range(row.shape[0]):
            bits[j] = np.uint32(row[j]) << np.uint32(16)
        return buf

    return widen


@overload(staging)
def _staging(row, buf):
    if isinstance(row.dtype, types.Float):
        return lambda row, buf: row
    return lambda row, buf: buf


@overload(encode)
def _encode(buf, row):
    if isinstance(row.dtype, types.Float):
        return lambda buf, row: None

    def narrow(buf, row):
        bits = buf.view(np.uint32)
        for j in range(row.shape[0]):
            b = bits[j]
            if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it quiet
                row[j] = np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
            else:
                row[j] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1)))
                                   >> np.uint32(16))

    return narrow
