"""Which precisions of the triton cases run under Triton's CPU interpreter.

The dtype-wide tables (``test_parity``, ``test_state_dict``, ...) cross every case with every
precision and every backend. On a GPU each triton combination is a launch of a few microseconds;
under ``TRITON_INTERPRET=1`` each is NumPy emulating every program of the grid, a second or more,
and the low precisions are one code path the interpreter runs the same way for each of them (the
kernels load, widen to float32 and narrow on store; only the pointer's element type differs).

So under the interpreter a triton case runs float32 (and float64, which the kernels decline at
once), plus ONE of its low-precision variants (bfloat16, float16, each with float32 parameters or
not), spread over the test function's cases (taken in a fixed order, each keeps the variant the
function has run least so far): every case runs one low precision and every low precision the
function has runs on some of its cases (a function with fewer cases than variants keeps more).
Nothing is dropped on a GPU (no ``TRITON_INTERPRET``) or with ``NORMKIT_TEST_ALL_PRECISIONS=1``;
the dropped items are reported as deselected. The choice depends on the collected items alone, so every pytest-xdist
worker makes the same one.

Tests marked ``gpu_schedule`` check what only a GPU's parallel schedule can break (two runs give
the same bits: no atomics, partial sums added in a fixed order). The interpreter runs a grid's
programs one after another in one fixed order, where such a test cannot fail: under it they are
skipped, and ``make gpu-check`` runs them on a device.

:func:`patch_language_once` makes the interpreter itself cheaper, with the same results: see there.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import defaultdict
from typing import Any

import torch

__all__ = ["ACTIVE", "INTERPRETED", "SCHEDULE_REASON", "deselected", "patch_language_once"]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVE = INTERPRETED and os.environ.get("NORMKIT_TEST_ALL_PRECISIONS") != "1"
SCHEDULE_REASON = (
    "Triton's CPU interpreter runs the programs of a grid one after another in a fixed order: "
    "only a GPU schedule can break this (make gpu-check)"
)

# Parameters that only choose a precision; every other parameter is part of the case.
PRECISION_PARAMS = frozenset({"dtype", "param_dtype"})
ALWAYS = frozenset({torch.float32, torch.float64})


def _stable(value: Any) -> str:
    """A text for ``value`` that is the same in every process (no object addresses)."""
    if hasattr(value, "id") and isinstance(value.id, str):
        return value.id
    text = str(value)
    return type(value).__name__ if " at 0x" in text else text


def _variant(item: Any) -> str:
    """The precision of a parametrized item, as text: its precision parameters' values."""
    params = item.callspec.params
    return "/".join(f"{k}={params[k]}" for k in sorted(PRECISION_PARAMS & params.keys()))


def deselected(items: list[Any]) -> list[Any]:
    """The items of ``items`` that the interpreter leaves out (empty unless :data:`ACTIVE`)."""
    if not ACTIVE:
        return []
    groups: dict[tuple[str, ...], list[Any]] = defaultdict(list)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") != "triton" or not PRECISION_PARAMS & params.keys():
            continue
        if all(params.get(p, torch.float32) in ALWAYS for p in PRECISION_PARAMS if p in params):
            continue
        key = (
            str(item.path),
            item.originalname,
            *sorted(f"{k}={_stable(v)}" for k, v in params.items() if k not in PRECISION_PARAMS),
        )
        groups[key].append(item)
    by_function: dict[tuple[str, str], list[tuple[str, ...]]] = defaultdict(list)
    for key in groups:
        by_function[key[:2]].append(key)
    out = []
    for keys in by_function.values():
        # Case by case (in a fixed order) keep the variant this function has kept least so far
        # (the earliest in a fixed order on a tie), then add back any variant no case kept.
        kept: dict[str, int] = {}
        chosen = []
        for key in sorted(keys):
            members = sorted(groups[key], key=_variant)
            pick = min(members, key=lambda item: kept.get(_variant(item), 0))
            kept[_variant(pick)] = kept.get(_variant(pick), 0) + 1
            chosen.append((members, pick))
        missing = {_variant(m) for members, _ in chosen for m in members} - kept.keys()
        for members, pick in chosen:
            out += [m for m in members if m is not pick and _variant(m) not in missing]
            missing -= {_variant(m) for m in members}
    return out


# One launch's record of the language modules its patch covers, per thread (a launch in another
# thread patches and restores for itself, as the interpreter does).
_launch = threading.local()


def patch_language_once() -> bool:
    """Under Triton's interpreter, patch ``triton.language`` once per launch, not once per call.

    The interpreter replaces the builtins of ``triton.language`` (and ``triton.language.core``)
    with NumPy versions when a launch starts, and restores them when it ends. It also repeats the
    whole patch on every call of a ``@triton.jit`` device function inside the kernel (an
    ``inspect.getmembers`` over the modules each time, never restored: the launch's restore
    undoes it), which was about a quarter of the interpreter's time in normkit's kernels (a
    BatchNorm and a LayerNorm step with small tiles: median 11.2 -> 8.4 s).

    With this, a device call inside a launch whose patch already covers every language module
    the device function sees does nothing more; any other call goes through Triton's own patch.
    The kernels run the same NumPy operations either way, so results are the same bits
    (``tests/test_interpreter_share.py`` checks). Returns whether the shortcut is in place: not
    without the interpreter, with ``NORMKIT_TEST_PLAIN_INTERPRETER=1``, or where Triton's
    interpreter no longer has the function it wraps.
    """
    if not INTERPRETED or os.environ.get("NORMKIT_TEST_PLAIN_INTERPRETER") == "1":
        return False
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None:
        return False
    if not getattr(patch, "normkit_once", False):
        interpreter._patch_lang = once_per_launch(patch, (tl, tl.core))
    return True


class _Nothing:
    def restore(self) -> None:
        pass


class _LaunchScope:
    """A launch's patch: restoring it also ends the launch's record."""

    def __init__(self, scope: Any) -> None:
        self._scope = scope

    def restore(self) -> None:
        _launch.covered = None
        self._scope.restore()


def once_per_launch(patch: Any, languages: tuple[Any, ...]) -> Any:
    """``patch`` (Triton's ``_patch_lang(fn)``) called for a launch, and for a device call only if
    it sees a language module (one of ``languages`` among ``fn.__globals__``) that no patch since
    the launch began has covered."""

    seen: dict[Any, frozenset[int]] = {}  # by function: a module's imports stay as they are

    def seen_by(fn: Any) -> frozenset[int]:
        if fn not in seen:
            seen[fn] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages)
        return seen[fn]

    def patch_lang(fn: Any) -> Any:
        covered = getattr(_launch, "covered", None)
        if covered is None:  # a launch: Triton patches, and the record ends with its restore
            scope = patch(fn)
            _launch.covered = seen_by(fn)
            return _LaunchScope(scope)
        seen = seen_by(fn)
        if seen <= covered:
            return _Nothing()
        # Triton never restores a device call's patch: what it patches stays patched until the
        # launch's restore (or after it, as without this), so once per launch is enough.
        _launch.covered = covered | seen
        return patch(fn)

    patch_lang.normkit_once = True
    patch_lang.plain = patch
    return patch_lang
