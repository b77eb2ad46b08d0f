"""What runs where: the support matrix, generated from the backend registry.

:func:`support_matrix` calls every op (:data:`normkit.backends.OPS`: :mod:`normkit.functional`'s
and the masked norms) on a table of representative
calls (:data:`CALLS`: each op's variants, such as training and eval, channels_last, an empty
batch, ``stats_dtype=torch.float64``) in float32, float64, bfloat16 and float16, for every
registered backend, on the CPU and on a CUDA device, inside :func:`normkit.backends.probing`:
the call goes through the same argument checks, precision casts and backend resolution as a
real one, and the backend's own ``unsupported`` check answers, but nothing is computed. The
tensors are stand-ins (CPU tensors, and meta tensors that report a CUDA device), so the answer
does not depend on the machine: this machine's GPU, Triton or ``TRITON_INTERPRET`` change only
:attr:`SupportMatrix.available`, never a cell. ``make support-matrix`` writes the markdown
rendering into the README.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .backends import OPS, BackendError, WouldRun, _declared_checks, _known, _lookup, probing
from .norms import NORMS

__all__ = ["CALLS", "DEVICES", "DTYPES", "MARKERS", "Cell", "SupportMatrix", "readme_table", "support_matrix",
           "update_readme"]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DEVICES: tuple[str, ...] = ("cpu", "cuda")
_SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _Reported(Tensor):
    """A meta tensor that reports another device: what a backend's check sees of a tensor on a
    device this machine may not have (checks read shapes, dtypes, strides and devices, never
    data). Results of ops on it report the same device."""

    _where: torch.device

    @staticmethod
    def __new__(cls, meta: Tensor, where: torch.device) -> _Reported:
        t = Tensor._make_subclass(cls, meta)
        t._where = where
        return t

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._where

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return self._where.type == "cuda"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        if any(func is spec.function for spec in OPS.values()):
            # a normkit op hands its call to the subclass first (torch's protocol): run its body on
            # the stand-ins, so that each torch op inside (a cast to stats_dtype) reports the device too
            return func.__wrapped__(*args, **(kwargs or {}))
        where = next(a._where for a in (*args, *(kwargs or {}).values()) if isinstance(a, _Reported))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return tree_map(lambda t: _Reported(t, where) if type(t) is Tensor and t.device.type == "meta" else t, out)


class _Maker:
    """Stand-in tensors of one dtype on one device: ``t(2, 3, 5)``, ``t(..., cl=True)`` for
    channels_last(_3d), ``t(..., dtype=torch.float32)`` for another dtype."""

    def __init__(self, dtype: torch.dtype, device: str) -> None:
        self.dtype, self.device = dtype, torch.device(device)

    filled = False  # random values in (0.5, 1.5) instead of uninitialized memory: to run the call

    def __call__(self, *shape: int, cl: bool = False, dtype: torch.dtype | None = None) -> Tensor:
        real = self.device.type == "cpu"  # a real (uninitialized) CPU tensor: nothing reads it
        t = torch.empty(shape, dtype=dtype or self.dtype, device="cpu" if real else "meta")
        if real and self.filled:
            t = torch.rand(shape).add_(0.5).to(t.dtype)
        if cl:
            t = t.contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
        return t if real else _Reported(t, self.device)


# A call: (functional args, functional kwargs) from a _Maker.
Build = Callable[[_Maker], tuple[tuple[Any, ...], dict[str, Any]]]
F64 = {"stats_dtype": torch.float64}


def _bn(t: _Maker, *, training: bool = True, cl: bool = False, n: int = 4) -> tuple[Any, ...]:
    return (t(n, 3, 4, 5, cl=cl), t(3), t(3), t(3), t(3), training)


def _inorm(t: _Maker, *, stats: bool = False, cl: bool = False, use_input_stats: bool = True) -> tuple[Any, ...]:
    return (t(2, 3, 4, 5, cl=cl), t(3) if stats else None, t(3) if stats else None, t(3), t(3), use_input_stats)


def _masked(t: _Maker, *, training: bool = True) -> tuple[Any, ...]:
    mask = t(2, 5, dtype=torch.bool).fill_(True)
    return (t(2, 3, 5), mask, t(3), t(3), t(3), t(3), training)


# op -> its representative calls, (variant, build). A test checks every op of every backend has
# a row here, so a new op cannot be left out of the matrix.
CALLS: dict[str, tuple[tuple[str, Build], ...]] = {
    "batch_norm": (
        ("training", lambda t: (_bn(t), {})),
        ("eval", lambda t: (_bn(t, training=False), {})),
        ("channels_last", lambda t: (_bn(t, cl=True), {})),
        ("empty batch", lambda t: (_bn(t, n=0), {})),
        ("stats_dtype=float64", lambda t: (_bn(t), F64)),
    ),
    "batch_norm_act": (
        ("training, relu", lambda t: (_bn(t), {"act": "relu"})),
        ("eval, silu", lambda t: (_bn(t, training=False), {"act": "silu"})),
        ("stats_dtype=float64", lambda t: (_bn(t), {"act": "relu", **F64})),
    ),
    "instance_norm": (
        ("input statistics", lambda t: (_inorm(t), {})),
        ("running statistics", lambda t: (_inorm(t, stats=True), {})),
        ("use_input_stats=False", lambda t: (_inorm(t, stats=True, use_input_stats=False), {})),
        ("channels_last", lambda t: (_inorm(t, cl=True), {})),
        ("stats_dtype=float64", lambda t: (_inorm(t), F64)),
    ),
    "group_norm": (
        ("default", lambda t: ((t(2, 6, 4, 5), 3, t(6), t(6)), {})),
        ("channels_last", lambda t: ((t(2, 6, 4, 5, cl=True), 3, t(6), t(6)), {})),
        ("empty batch", lambda t: ((t(0, 6, 4, 5), 3, t(6), t(6)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 6, 4, 5), 3, t(6), t(6)), F64)),
    ),
    "group_norm_act": (
        ("silu", lambda t: ((t(2, 6, 4, 5), 3, t(6), t(6)), {"act": "silu"})),
        ("stats_dtype=float64", lambda t: ((t(2, 6, 4, 5), 3, t(6), t(6)), {"act": "silu", **F64})),
    ),
    "layer_norm": (
        ("default", lambda t: ((t(2, 3, 8), (8,), t(8), t(8)), {})),
        ("empty batch", lambda t: ((t(0, 8), (8,), t(8), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), (8,), t(8), t(8)), F64)),
    ),
    "rms_norm": (
        ("default", lambda t: ((t(2, 3, 8), (8,), t(8)), {})),
        ("empty batch", lambda t: ((t(0, 8), (8,), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), (8,), t(8)), F64)),
    ),
    "add_layer_norm": (
        ("default", lambda t: ((t(2, 8), t(2, 8), (8,), t(8), t(8)), {})),
        ("residual_dtype=float32", lambda t: ((t(2, 8), t(2, 8), (8,), t(8), t(8)), {"residual_dtype": torch.float32})),
        ("stats_dtype=float64", lambda t: ((t(2, 8), t(2, 8), (8,), t(8), t(8)), F64)),
    ),
    "add_rms_norm": (
        ("default", lambda t: ((t(2, 8), t(2, 8), (8,), t(8)), {})),
        ("residual_dtype=float32", lambda t: ((t(2, 8), t(2, 8), (8,), t(8)), {"residual_dtype": torch.float32})),
        ("stats_dtype=float64", lambda t: ((t(2, 8), t(2, 8), (8,), t(8)), F64)),
    ),
    "normalize": (
        ("channels (LayerNorm2d)", lambda t: ((t(2, 6, 4, 5), (1,), t(6), t(6)), {})),
        ("channels, center=False (RMSNorm2d)", lambda t: ((t(2, 6, 4, 5), (1,), t(6)), {"center": False})),
        ("channels_last", lambda t: ((t(2, 6, 4, 5, cl=True), (1,), t(6), t(6)), {})),
        ("dims=(0, 2)", lambda t: ((t(2, 6, 4, 5), (0, 2), t(2, 4), t(2, 4)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 6, 4, 5), (1,), t(6), t(6)), F64)),
    ),
    "masked_batch_norm": (
        ("training", lambda t: (_masked(t), {})),
        ("eval", lambda t: (_masked(t, training=False), {})),
    ),
    "masked_instance_norm": (
        ("input statistics", lambda t: (_masked(t), {})),
        ("running statistics", lambda t: (_masked(t, training=False), {})),
    ),
    "local_response_norm": (
        ("3-D input", lambda t: ((t(2, 6, 7), 3), {})),
        ("4-D input", lambda t: ((t(2, 6, 4, 5), 3), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 6, 4, 5), 3), F64)),
    ),
    # the norms of today's blocks (normkit.functional_blocks)
    "modulated_layer_norm": (
        ("per sample", lambda t: ((t(2, 3, 8), t(2, 1, 8), t(2, 1, 8), t(8), t(8)), {})),
        ("per token", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(2, 3, 8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(2, 1, 8), t(2, 1, 8)), F64)),
    ),
    "modulated_rms_norm": (
        ("per sample", lambda t: ((t(2, 3, 8), t(2, 1, 8), t(2, 1, 8), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(2, 1, 8), t(2, 1, 8)), F64)),
    ),
    "gated_rms_norm": (
        ("gate after the norm", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8)), {})),
        ("groups of 4, gate before", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8)),
                                                {"group_size": 4, "norm_before_gate": True})),
        ("gate=None", lambda t: ((t(2, 3, 8), None, t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8)), F64)),
    ),
    "qk_rms_norm": (
        ("grouped-query heads", lambda t: ((t(2, 3, 4, 8), t(2, 3, 2, 8), t(8), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 4, 8), t(2, 3, 2, 8), t(8), t(8)), F64)),
    ),
    "sandwich_rms_norm": (
        ("default", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8), t(8)), {})),
        ("weight_offset=1", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8), t(8)), {"weight_offset": 1.0})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(2, 3, 8), t(8), t(8)), F64)),
    ),
    "dyt": (
        ("default", lambda t: ((t(2, 3, 8), t(1), t(8), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(1), t(8), t(8)), F64)),
    ),
    "derf": (
        ("default", lambda t: ((t(2, 3, 8), t(1), t(1), t(8), t(8)), {})),
        ("stats_dtype=float64", lambda t: ((t(2, 3, 8), t(1), t(1), t(8), t(8)), F64)),
    ),
}


class _Arguments:
    """A stand-in functional namespace: ``_Arguments().layer_norm(*args)`` is ``args``."""

    def __getattr__(self, op: str) -> Callable[..., tuple[Any, ...]]:
        return lambda *args: args


def _row_call(name: str, t: _Maker, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call of a row of the table of norms, from its example."""
    example = NORMS[name].example()
    return example.call(_Arguments(), *example.tensors(t)), kwargs


# The norms of the table without calls of their own above: their example, and at float64.
CALLS.update({
    name: (("default", functools.partial(_row_call, name)),
           ("stats_dtype=float64", functools.partial(_row_call, name, **F64)))
    for name in NORMS if name not in CALLS
})


@dataclass(frozen=True)
class Cell:
    """One probe: ``op``'s ``variant`` in ``dtype`` on ``device``, on ``backend``; ``reason`` is
    None where it runs, else the backend's reason for declining."""

    backend: str
    device: str
    op: str
    variant: str
    dtype: torch.dtype
    reason: str | None

    @property
    def runs(self) -> bool:
        return self.reason is None


def _declared_ops(backend: str) -> dict[str, Callable[..., str | None]]:
    """The ``{op: unsupported}`` checks probing() asks of ``backend``."""
    return dict(_declared_checks(backend))


def _probe(backend: str, op: str, build: Build, dtype: torch.dtype, device: str) -> str | None:
    args, kwargs = build(_Maker(dtype, device))
    with probing():
        try:
            OPS[op].function(*args, backend=backend, **kwargs)
        except WouldRun:
            return None
        except BackendError as e:
            return e.reason or str(e)
    raise AssertionError(f"probing {op} on {backend!r} neither ran nor declined")  # resolve() always answers


@dataclass(frozen=True)
class SupportMatrix:
    """Every :class:`Cell` of :func:`support_matrix`, and which backends this machine runs.

    ``str(matrix)`` is a plain-text rendering, :meth:`to_markdown` the README's,
    :meth:`to_json` a JSON document; :meth:`runs` answers one question.
    """

    cells: tuple[Cell, ...]
    backends: tuple[str, ...]
    available: dict[str, bool] = field(default_factory=dict)

    def runs(self, backend: str, op: str, variant: str | None = None, dtype: torch.dtype = torch.float32,
             device: str = "cuda") -> bool:
        """Whether ``backend`` runs ``op`` (its first variant unless named) in ``dtype`` on ``device``."""
        variant = variant or CALLS[op][0][0]
        for c in self.cells:
            if (c.backend, c.op, c.variant, c.dtype, c.device) == (backend, op, variant, dtype, device):
                return c.runs
        raise KeyError(f"no cell for {backend}/{op}/{variant}/{dtype}/{device}")

    def _columns(self) -> list[tuple[str, tuple[str, ...]]]:
        """(title, devices) per column: a backend whose cells are the same on every device gets
        one column; triton only its CUDA one (on CPU tensors it needs the test interpreter)."""
        cols = []
        for b in self.backends:
            devices = ("cuda",) if b == "triton" else DEVICES
            per = {d: [c.reason for c in self.cells if c.backend == b and c.device == d] for d in devices}
            if len({tuple(v) for v in per.values()}) == 1:
                title = f"{b} (GPU)" if devices == ("cuda",) else b
                cols.append((title, devices[:1]))
            else:
                cols += [(f"{b} ({'CPU' if d == 'cpu' else 'GPU'})", (d,)) for d in devices]
        return cols

    def table(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Header, rows and numbered notes (the reasons) of the rendering."""
        notes: list[str] = []

        def note(reason: str) -> int:
            if reason not in notes:
                notes.append(reason)
            return notes.index(reason) + 1

        cols = self._columns()
        index = {(c.backend, c.device, c.op, c.variant, c.dtype): c for c in self.cells}
        rows = []
        for op, variants in CALLS.items():
            for variant, _ in variants:
                row = [op, variant]
                for title, (device,) in cols:
                    backend = title.split(" ")[0]
                    cells = [index[(backend, device, op, variant, d)] for d in DTYPES]
                    ok = [_SHORT[c.dtype] for c in cells if c.runs]
                    refs = sorted({note(c.reason) for c in cells if not c.runs})  # type: ignore[arg-type]
                    text = "all" if len(ok) == len(DTYPES) else (" ".join(ok) if ok else "no")
                    row.append(text + "".join(f" [{r}]" for r in refs))
                rows.append(row)
        return ["op", "call", *(t for t, _ in cols)], rows, notes

    def to_markdown(self) -> str:
        """The README's table: dtypes that run per op, call and backend; numbered reasons."""
        header, rows, notes = self.table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(row)) + " |" for row in rows]
        lines += ["", *(f"[{i}] {n}  " for i, n in enumerate(notes, 1))]
        return "\n".join(lines).rstrip() + "\n"

    def __str__(self) -> str:
        header, rows, notes = self.table()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
        lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows), ""]
        lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
        lines += ["", *self.availability()]
        return "\n".join(lines)

    def availability(self) -> list[str]:
        """One line per backend: available on this machine, or not (which is not "unsupported":
        the cells say what the backend takes wherever it is available)."""
        return [f"{b}: available here" if self.available.get(b) else
                f"{b}: not available here (its column says what it runs where it is available)"
                for b in self.backends]

    def to_json(self) -> str:
        return json.dumps({
            "backends": list(self.backends),
            "available": self.available,
            "cells": [{"backend": c.backend, "device": c.device, "op": c.op, "variant": c.variant,
                       "dtype": str(c.dtype).removeprefix("torch."), "runs": c.runs, "reason": c.reason}
                      for c in self.cells],
        }, indent=1)


# The columns' order: the two built-in backends, then the optional ones.
_FIRST = ("torch", "reference")


def _registered() -> list[str]:
    names = [n for n in _known() if n != "auto"]
    return sorted(names, key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))


def _cells(backends: list[str]) -> Iterator[Cell]:
    for backend in backends:
        for op, variants in CALLS.items():
            for variant, build in variants:
                for device in DEVICES:
                    for dtype in DTYPES:
                        yield Cell(backend, device, op, variant, dtype, _probe(backend, op, build, dtype, device))


def support_matrix(backends: Sequence[str] | None = None) -> SupportMatrix:
    """What every registered backend (or those named) runs: each op of :data:`CALLS` x variant
    x dtype x device, probed through the real dispatch without computing anything (see the
    module docstring). The same on every machine, except :attr:`SupportMatrix.available`."""
    names = _registered() if backends is None else list(backends)
    available = {}
    for n in names:
        backend = _lookup(n)
        available[n] = bool(backend is not None and backend.is_available())
    return SupportMatrix(tuple(_cells(names)), tuple(names), available)


# The README's generated block sits between these lines (``make support-matrix`` rewrites it).
MARKERS = ("<!-- support-matrix:start (generated by make support-matrix; do not edit) -->",
           "<!-- support-matrix:end -->")


def readme_table(text: str) -> str:
    """The generated block of a README's ``text`` (between :data:`MARKERS`)."""
    start, end = MARKERS
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"the README needs exactly one pair of lines {start!r} ... {end!r}")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def update_readme(path: str) -> bool:
    """Write :func:`support_matrix`'s markdown between the :data:`MARKERS` of the file at
    ``path``; returns whether it changed."""
    with open(path) as f:
        text = f.read()
    old = readme_table(text)
    new = support_matrix().to_markdown()
    if new == old:
        return False
    start, end = MARKERS
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{new}{end}{tail}")
    return True
