"""Which precisions of the triton cases run under Triton's CPU interpreter.

The dtype-wide tables (``test_parity``, ``test_state_dict``, ...) cross every case with every
precision and every backend. On a GPU each triton combination is a launch of a few microseconds;
under ``TRITON_INTERPRET=1`` each is NumPy emulating every program of the grid, a second or more,
and the low precisions are one code path the interpreter runs the same way for each of them (the
kernels load, widen to float32 and narrow on store; only the pointer's element type differs).

So under the interpreter a triton case runs float32 (and float64, which the kernels decline at
once), plus ONE of its low-precision variants (bfloat16, float16, each with float32 parameters or
not), the one picked by a hash of the case's other parameters: across a table every low precision
runs on many cases and every case runs one low precision. Nothing is dropped on a GPU
(no ``TRITON_INTERPRET``) or with ``NORMKIT_TEST_ALL_PRECISIONS=1``; the dropped items are
reported as deselected. The choice depends on the collected items alone, so every pytest-xdist
worker makes the same one.

Tests marked ``gpu_schedule`` check what only a GPU's parallel schedule can break (two runs give
the same bits: no atomics, partial sums added in a fixed order). The interpreter runs a grid's
programs one after another in one fixed order, where such a test cannot fail: under it they are
skipped, and ``make gpu-check`` runs them on a device.
"""

from __future__ import annotations

import os
import zlib
from collections import defaultdict
from typing import Any

import torch

__all__ = ["ACTIVE", "INTERPRETED", "SCHEDULE_REASON", "deselected"]

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
    out = []
    for key, members in groups.items():
        members.sort(key=lambda item: item.nodeid)
        keep = zlib.crc32("\0".join(key).encode()) % len(members)
        out += [m for i, m in enumerate(members) if i != keep]
    return out
