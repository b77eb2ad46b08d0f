"""numba's on-disk cache for normkit's kernels, made stale by a change to any of their sources.

numba stamps a cached kernel with the bytes of the one file that defines it. The machine code it
caches also holds everything the kernel calls or inlines from other files (the vector math of
``_vector_math.py``, ``decode``/``encode``/``row_of`` of ``_engine.py``, the row helpers of
``_row_kernels.py``), so after an edit to such a helper alone, or an upgrade that changes only
it, numba would keep loading the old code for every kernel of the other files.

:func:`cached_njit` is ``numba.njit(cache=True)`` whose stamp also covers every ``.py`` file of
this package (names and bytes) and normkit's version: any change there makes each kernel compile
again on its first call in the next process, then load from the cache as before. numba itself
adds its version and the CPU to every entry. Where entries live is numba's choice, unchanged:
``NUMBA_CACHE_DIR`` if set, else ``__pycache__`` beside the source, else the user's cache
directory. Only functions compiled through :func:`cached_njit` use this stamp; other libraries'
numba caches are left as numba makes them.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import numba
from numba.core import caching
from numba.core.dispatcher import Dispatcher

import normkit

__all__ = ["PackageFunctionCache", "cached_njit", "package_stamp"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def package_stamp() -> str:
    """SHA-256 over normkit's version and the name and bytes of each ``.py`` file of this package.

    Files are re-read only when one's name, size or modification time changes, so the stamp of a
    kernel defined after an edit (a reload in a long-lived session) describes the edited sources.
    """
    names = sorted(n for n in os.listdir(_PACKAGE_DIR) if n.endswith(".py"))
    stats = tuple((n, st.st_mtime_ns, st.st_size) for n in names for st in [os.stat(os.path.join(_PACKAGE_DIR, n))])
    return _hash_sources(normkit.__version__, stats)


@functools.lru_cache(maxsize=8)
def _hash_sources(version: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256(f"normkit {version}\n".encode())
    for name, _, _ in stats:
        with open(os.path.join(_PACKAGE_DIR, name), "rb") as f:
            data = f.read()
        # Name and length before the bytes: no two different trees hash the same stream.
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


class _PackageStampedLocator:
    """The locator numba chose for a function, its source stamp widened to the whole package."""

    def __init__(self, locator: caching._CacheLocator) -> None:
        self._locator = locator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._locator, name)

    def get_source_stamp(self) -> tuple[Any, str]:
        return self._locator.get_source_stamp(), package_stamp()


class _PackageCacheImpl(caching.CompileResultCacheImpl):
    def __init__(self, py_func: Callable[..., Any]) -> None:
        super().__init__(py_func)
        # Wrapping whatever numba picked keeps its cache directory (NUMBA_CACHE_DIR, in-tree,
        # user-wide, or NUMBA_CACHE_LOCATOR_CLASSES) and file names; only the stamp changes.
        self._locator = _PackageStampedLocator(self._locator)


class PackageFunctionCache(caching.FunctionCache):
    """numba's per-function disk cache, its entries stale once any source of this package changes."""

    _impl_class = _PackageCacheImpl


def cached_njit(func: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``numba.njit(**options)`` with the on-disk cache of :class:`PackageFunctionCache`.

    Used as ``@cached_njit`` or ``@cached_njit(option=...)``; ``cache`` is not an option (it is
    always on).
    """
    if "cache" in options:
        raise TypeError("cached_njit() always caches; remove the 'cache' option")
    if func is None:
        return functools.partial(cached_njit, **options)
    dispatcher = numba.njit(func, **options)
    # With NUMBA_DISABLE_JIT=1 numba returns the Python function itself: nothing to cache.
    if isinstance(dispatcher, Dispatcher):
        # What Dispatcher.enable_caching() does for cache=True, with this package's cache class.
        dispatcher._cache = PackageFunctionCache(dispatcher.py_func)
    return dispatcher
