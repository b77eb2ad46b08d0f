"""numba's disk cache of normkit's kernels goes stale with any source of normkit.ops.numba.

numba stamps a cached kernel with its own file only, while the cached machine code also holds the
helpers it calls from other files. These tests edit a helper file of a temporary copy of the
package and run fresh processes on a temporary NUMBA_CACHE_DIR: the kernel must compile again and
compute with the edited helper, and an unchanged tree must load from the cache. A control kernel
under plain ``numba.njit(cache=True)`` in the same files shows the stale load the tests guard
against (so a harness that could not see one would fail there).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

import numba  # noqa: E402
from numba.core.caching import FunctionCache  # noqa: E402
from numba.core.dispatcher import Dispatcher  # noqa: E402

import normkit  # noqa: E402
import normkit.ops.numba as numba_pkg  # noqa: E402
from normkit.ops.numba import _cache  # noqa: E402

SRC = Path(normkit.__file__).parent

# A helper and a kernel in two files of the package, through normkit's jit and, as the control,
# through plain numba.njit(cache=True). ADD is the helper's behaviour the test edits.
HELPER = """
import numba
from normkit.ops.numba._engine import jit

@jit
def helper(x):
    return x + ADD

@numba.njit(cache=True)
def stock_helper(x):
    return x + ADD
"""

KERNEL = """
import numba
from normkit.ops.numba._engine import jit
from normkit.ops.numba._probe_helper import helper, stock_helper

@jit
def kernel(x):
    return helper(x) * 2.0

@numba.njit(cache=True)
def stock_kernel(x):
    return stock_helper(x) * 2.0
"""

RUN = """
import json
from normkit.ops.numba import _probe_kernel as k

def stats(f):
    value = f(1.0)
    return value, sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())

print(json.dumps({"ours": stats(k.kernel), "stock": stats(k.stock_kernel)}))
"""


def _write_helper(pkg: Path, add: str) -> None:
    (pkg / "_probe_helper.py").write_text(HELPER.replace("ADD", add))


def _run(root: Path) -> dict[str, list[float]]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), NUMBA_CACHE_DIR=str(root / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_edit_of_another_file_recompiles_and_unchanged_tree_loads(tmp_path: Path) -> None:
    shutil.copytree(SRC, tmp_path / "src" / "normkit", ignore=shutil.ignore_patterns("__pycache__"))
    pkg = tmp_path / "src" / "normkit" / "ops" / "numba"
    _write_helper(pkg, "1.0")
    (pkg / "_probe_kernel.py").write_text(KERNEL)

    # value, cache hits, cache misses of the first call in a fresh process
    assert _run(tmp_path) == {"ours": [4.0, 0, 1], "stock": [4.0, 0, 1]}  # cold: compiled
    assert _run(tmp_path) == {"ours": [4.0, 1, 0], "stock": [4.0, 1, 0]}  # unchanged: loaded

    # Only the helper's file changes: normkit's kernel compiles again with the new helper;
    # numba's own stamp (the kernel's file) still matches, so the control loads the stale code.
    _write_helper(pkg, "10.0")
    assert _run(tmp_path) == {"ours": [22.0, 0, 1], "stock": [4.0, 1, 0]}

    # NUMBA_CACHE_DIR is where the entries went, not the package's __pycache__.
    assert list((tmp_path / "cache").rglob("_probe_kernel.kernel-*.nbi"))
    assert not list((tmp_path / "src").rglob("*.nbi"))


def _kernel_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(numba_pkg.__path__, numba_pkg.__name__ + ".")]
    return [n for n in names if not n.endswith((".backend", "._cache"))]


jit_enabled = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT=1: no compiled kernels")


@jit_enabled
def test_every_kernel_uses_the_package_stamp() -> None:
    kernels = []
    for name in _kernel_modules():
        module = importlib.import_module(name)
        kernels += [v for v in vars(module).values() if isinstance(v, Dispatcher) and v.py_func.__module__ == name]
    assert len(kernels) > 20, [k.py_func.__qualname__ for k in kernels]
    stale = [k.py_func.__qualname__ for k in kernels if not isinstance(k._cache, _cache.PackageFunctionCache)]
    assert not stale


@jit_enabled
def test_other_numba_functions_keep_numbas_cache() -> None:
    def f(x):
        return x

    assert type(numba.njit(cache=True)(f)._cache) is FunctionCache


def test_stamp_follows_any_byte_of_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "numba"
    shutil.copytree(Path(numba_pkg.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_cache, "_PACKAGE_DIR", str(copy))
    stamps = [_cache.package_stamp()]
    with open(copy / "_vector_math.py", "a") as f:  # a comment in a helper file
        f.write("# edited\n")
    stamps.append(_cache.package_stamp())
    (copy / "_new_kernels.py").write_text("")  # a new, empty file
    stamps.append(_cache.package_stamp())
    (copy / "notes.txt").write_text("not a source")  # not Python: no effect
    stamps.append(_cache.package_stamp())
    assert len(set(stamps[:3])) == 3 and stamps[3] == stamps[2]


def test_stamp_follows_normkit_version(monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = _cache.package_stamp()
    assert _cache.package_stamp() == stamp
    monkeypatch.setattr(normkit, "__version__", normkit.__version__ + ".post1")
    assert _cache.package_stamp() != stamp


def test_cache_option_is_refused() -> None:
    with pytest.raises(TypeError, match="always caches"):
        _cache.cached_njit(cache=False)
