"""``normkit bench``'s own timing engine, for the CPU (and a GPU where the repository's
``benchmarks/bench_norms.py`` is not at hand).

It takes the same arguments and yields the same rows as ``benchmarks/bench_norms.run`` (the
repository's benchmark engine, outside the package): ``run(ops, shapes, dtypes, providers)``
with ``shapes = {"rows": [(M, N), ...], "images": [(N, C, H, W, groups), ...]}``, one dict per
(op, shape, dtype, provider) with ``fwd_ms``, ``fwd_GBps``, ``fwd_of_copy`` (and ``bwd``,
``fwd+bwd``), ``max_err_vs_torch``, or ``error``. What it adds:

* providers for normkit's dispatch (``normkit-torch``, ``normkit-reference``, ``normkit-triton``:
  ``normkit.functional`` with that backend, argument checks included);
* a timer for small CPU problems: samples of as many calls as last ~1 ms (one call is near the
  timer's resolution), a warm-up, the median;
* ``torch.compile`` with a budget: one compiled function per op (dynamo specializes, then goes
  dynamic, as a user's model would), a failed compile reported as an ``error`` row, and no
  further compile once they have taken ``compile_budget_s`` in all.

Bytes moved (the benchmarks' model, in benchmarks/README.md): an ideal kernel's traffic. With
``X`` the bytes of one activation, ``P`` of one parameter vector, ``S`` the fp32 statistics::

    fwd:     2X (+2X with a residual) + P (+P with a bias) + S
    bwd:     3X (+2X) + 2P (+P) + S
    fwd+bwd: the sum
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FunctionType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional as nkf
from .backends import backends

__all__ = [
    "DIRECTIONS",
    "OPS",
    "PROVIDERS",
    "REPOSITORY_NAMES",
    "SHAPES",
    "Problem",
    "add_speedups",
    "copy_bandwidth",
    "largest_input_bytes",
    "providers",
    "repository_engine",
    "run",
    "time_ms",
    "width",
]

EPS = 1e-6
ROW_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
OPS = (*ROW_OPS, "group_norm")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("torch", "torch.compile", "normkit-torch", "normkit-reference", "normkit-triton")

# Per device: rows (M, N) for the trailing-axis norms, images (N, C, H, W, groups) for GroupNorm.
# CPU: 2 MiB of fp32 per tensor, widths 256 to 8192: the default run (two ops, forward,
# torch.compile included) takes about half a minute on two cores. CUDA: the benchmarks' table.
SHAPES: dict[str, dict[str, list[tuple[int, ...]]]] = {
    "cpu": {"rows": [(2048, 256), (512, 1024), (128, 4096), (64, 8192)], "images": [(4, 64, 16, 16, 8)]},
    "cuda": {"rows": [(140, 4096), (4096, 1024), (8192, 4096), (32768, 4096), (4096, 16384), (1024, 65536),
                      (256, 262144)],
             "images": [(8, 320, 64, 64, 32), (16, 512, 32, 32, 32)]},
}


@dataclass(frozen=True)
class Problem:
    """One op on one shape and dtype; parameters share the input's dtype."""

    op: str
    shape: tuple[int, ...]  # (M, N); (N, C, H, W) for group_norm; (N, C, *spatial) for batch_norm
    dtype: torch.dtype
    groups: int = 0
    layout: str = "contiguous"  # or channels_last / channels_last_3d (the (N, C, ...) ops)

    @property
    def channel_op(self) -> bool:  # per-channel parameters on axis 1
        return self.op in ("group_norm", "batch_norm", "batch_norm_act")

    @property
    def rows(self) -> int:  # statistics computed (per row; per channel for BatchNorm)
        if self.op.startswith("batch_norm"):
            return self.shape[1]
        return self.shape[0] * self.groups if self.op == "group_norm" else self.shape[0]

    @property
    def params(self) -> int:  # elements of the weight (and of the bias)
        return self.shape[1] if self.channel_op else self.shape[-1]

    def bytes_moved(self, direction: str) -> int:
        """The traffic an ideal kernel cannot avoid (partial-sum buffers not counted).

        fwd: read x (+ residual), weight (+ bias); write y (+ residual_out), mean/rstd (fp32;
             rstd only for RMSNorm).
        bwd: read x (residual_out), dy (+ d residual_out), weight, mean/rstd; write dx
             (+ d residual), dw (+ db).
        """
        if direction == "fwd+bwd":
            return self.bytes_moved("fwd") + self.bytes_moved("bwd")
        x = math.prod(self.shape) * self.dtype.itemsize
        streams = {"fwd": 2, "bwd": 3}[direction] + (2 if self.op.startswith("add_") else 0)
        has_bias = "layer" in self.op or self.channel_op
        param_tensors = {"fwd": 1, "bwd": 2}[direction] + has_bias
        stats = self.rows * 4 * (1 if "rms" in self.op else 2)
        return streams * x + param_tensors * self.params * self.dtype.itemsize + stats

    def make(self, device: str) -> dict[str, Tensor]:
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=self.dtype)

        x = randn(*self.shape)
        if self.layout != "contiguous":
            x = x.contiguous(memory_format=getattr(torch, self.layout))
        t = {"x": x, "weight": randn(self.params), "bias": randn(self.params)}
        if self.op.startswith("add_"):
            t["residual"] = randn(*self.shape)
        return {k: v.requires_grad_() for k, v in t.items()}

    def __str__(self) -> str:
        g = f"/G{self.groups}" if self.groups else ""
        return f"{self.op} {self.label}{g} {str(self.dtype).removeprefix('torch.')}"

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return shape if self.layout == "contiguous" else f"{shape} {self.layout}"


def _call(op: str, groups: int, fn: Any, t: dict[str, Tensor], **kw: Any) -> Tensor | tuple[Tensor, Tensor]:
    """``op`` through ``fn``: torch.nn.functional (the add_ ops composed) or normkit.functional."""
    n = t["x"].shape[-1:]
    if op == "group_norm":
        return fn.group_norm(t["x"], groups, t["weight"], t["bias"], EPS, **kw)
    if op.startswith("add_") and fn is F:
        residual_out = t["x"] + t["residual"]
        norm = op.removeprefix("add_")
        return _call(norm, groups, F, {**t, "x": residual_out}), residual_out
    if op == "add_layer_norm":
        return fn.add_layer_norm(t["x"], t["residual"], n, t["weight"], t["bias"], EPS, **kw)
    if op == "add_rms_norm":
        return fn.add_rms_norm(t["x"], t["residual"], n, t["weight"], EPS, **kw)
    if op == "layer_norm":
        return fn.layer_norm(t["x"], n, t["weight"], t["bias"], EPS, **kw)
    if op == "rms_norm":
        return fn.rms_norm(t["x"], n, t["weight"], EPS, **kw)
    raise KeyError(f"no benchmark for op {op!r}; known: {', '.join(OPS)}")


def _eager(t: dict[str, Tensor], op: str = "", groups: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    return _call(op, groups, F, t)


class _Compiler:
    """torch.compile of the eager call, one compiled function per op, within a time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.spent_s = budget_s, 0.0
        self.fns: dict[tuple[str, int], Callable[..., Any]] = {}

    def get(self, p: Problem) -> Callable[[dict[str, Tensor]], Any]:
        if self.spent_s > self.budget_s:
            raise TimeoutError(f"torch.compile skipped: compiling took {self.spent_s:.0f} s, over the "
                               f"--compile-budget of {self.budget_s:.0f} s")
        key = (p.op, p.groups)
        if key not in self.fns:
            # A function of its own per op: dynamo keeps its cache, and its recompile limit,
            # per code object, and the shapes of five ops would overflow a shared one.
            code = _eager.__code__.replace(co_name=f"torch_compile_{p.op}")
            self.fns[key] = torch.compile(FunctionType(code, globals(), code.co_name, (p.op, p.groups)))
        return self.fns[key]


def _rerunnable_backward() -> contextlib.AbstractContextManager[Any]:
    """Compile with buffer donation off: a compiled backward that donates its saved tensors
    refuses ``retain_graph=True``, which timing the backward alone needs."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "donated_buffer"):
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)


def largest_input_bytes(ops: Sequence[str], shapes: dict[str, list[tuple[int, ...]]],
                        dtypes: Sequence[torch.dtype]) -> int:
    """Bytes of the largest ``x`` among the problems: the size to measure the copy at, so
    that the copy and the norms work from the same level of the memory hierarchy."""
    return max(math.prod(shape[:4] if op == "group_norm" else shape) * dtype.itemsize
               for op in ops for shape in shapes["images" if op == "group_norm" else "rows"] for dtype in dtypes)


def providers(device: str) -> list[str]:
    """torch eager, torch.compile and normkit on every backend that runs on ``device`` (Triton's
    CPU interpreter is a test tool, not a provider)."""
    names = [b for b in backends() if device == "cuda" or b != "triton"]
    return ["torch", "torch.compile", *(f"normkit-{b}" for b in names)]


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def time_ms(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 2, budget_s: float = 0.2,
            min_samples: int = 5, before: Callable[[], None] | None = None) -> float:
    """Median milliseconds per call of ``fn``: ``warmup`` calls, then samples of as many calls
    as last ~1 ms, until ``budget_s`` is spent and at least ``min_samples`` are taken.
    ``before`` runs ahead of each call, untimed only in the sense that it is cheap (clearing
    ``.grad``)."""
    sync = _sync(device)
    before = before or (lambda: None)

    def calls(k: int) -> float:
        start = time.perf_counter()
        for _ in range(k):
            before()
            fn()
        sync()
        return time.perf_counter() - start

    calls(warmup)
    inner = max(1, int(1e-3 / max(calls(1), 1e-7)))
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < min_samples or time.perf_counter() < deadline:
        samples.append(calls(inner) / inner)
    return statistics.median(samples) * 1e3


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device copy bandwidth in GB/s: ``y.copy_(x)`` moves 2 * nbytes."""
    x = torch.empty(nbytes // 4, device=device).uniform_()
    y = torch.empty_like(x)
    return 2 * nbytes / (time_ms(lambda: y.copy_(x), device=device) * 1e-3) / 1e9


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _measure(p: Problem, fn: Callable[[dict[str, Tensor]], Any], device: str, directions: Sequence[str],
             reference: tuple[Tensor, ...], budget_s: float) -> dict[str, float]:
    t = p.make(device)
    leaves = list(t.values())

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    start = time.perf_counter()
    outs = _as_tuple(fn(t))  # torch.compile compiles here
    first_call_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in outs]
    row = {"max_err_vs_torch": max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, reference, strict=True)),
           "first_call_s": first_call_s}
    timed = {
        "fwd": lambda: fn(t),  # a training forward: inputs require grad, statistics are saved
        "bwd": lambda: torch.autograd.backward(outs, grads, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.backward(_as_tuple(fn(t)), grads),
    }
    for direction in directions:
        row[f"{direction}_ms"] = time_ms(timed[direction], device=device, budget_s=budget_s, before=clear)
    return row


def run(
    ops: Sequence[str],
    shapes: dict[str, list[tuple[int, ...]]],
    dtypes: Sequence[torch.dtype],
    providers: Sequence[str],
    device: str | None = None,
    copy_gbps: float | None = None,
    log: Callable[[str], None] = print,
    *,
    directions: Sequence[str] = DIRECTIONS,
    budget_s: float = 0.2,
    compile_budget_s: float = 60.0,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every (op, shape, dtype, provider) in ``directions``; one dict per measurement,
    fields as ``benchmarks/bench_norms.run``'s plus ``first_call_s`` (torch.compile: the
    compile). A provider that fails gets an ``error`` row
    (torch.compile without a compiler, or past its budget; a backend that cannot run here) and
    the run goes on."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device, 1 << (30 if device == "cuda" else 26))
    compiler = _Compiler(compile_budget_s)
    rows = []
    for op in ops:
        for shape in shapes["images" if op == "group_norm" else "rows"]:
            for dtype in dtypes:
                p = (Problem(op, tuple(shape[:4]), dtype, shape[4]) if op == "group_norm"
                     else Problem(op, tuple(shape), dtype))
                with torch.no_grad():
                    reference = _as_tuple(_call(op, p.groups, F, p.make(device)))
                for name in providers:
                    row: dict[str, Any] = {"op": op, "shape": p.label, "groups": p.groups,
                                           "dtype": str(dtype).removeprefix("torch."), "provider": name}
                    try:
                        if name == "torch":
                            fn = lambda t, p=p: _call(p.op, p.groups, F, t)
                        elif name == "torch.compile":
                            fn = compiler.get(p)
                        elif name.startswith("normkit-"):
                            backend = name.removeprefix("normkit-")
                            fn = lambda t, p=p, b=backend: _call(p.op, p.groups, nkf, t, backend=b)
                        else:
                            raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
                        with _rerunnable_backward() if name == "torch.compile" else contextlib.nullcontext():
                            row.update(_measure(p, fn, device, directions, reference, budget_s))
                        if name == "torch.compile":
                            compiler.spent_s += row["first_call_s"]
                    except Exception as e:  # a provider's limit: report it, go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
                    for direction in directions:
                        if f"{direction}_ms" in row:
                            gbps = p.bytes_moved(direction) / (row[f"{direction}_ms"] * 1e-3) / 1e9
                            row[f"{direction}_GBps"] = gbps
                            row[f"{direction}_of_copy"] = gbps / copy_gbps
                    log(f"{op} {p.label} {row['dtype']} {name}" + (f": {row['error']}" if "error" in row else ""))
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``<direction>_speedup_vs_torch`` and ``_vs_compile``: torch eager's (torch.compile's)
    time over this provider's, on the same op, shape and dtype (above 1: faster)."""
    base: dict[tuple[Any, ...], dict[str, float]] = {}
    for r in rows:
        if r["provider"] in ("torch", "torch.compile"):
            for d in DIRECTIONS:
                if f"{d}_ms" in r:
                    base.setdefault((r["op"], r["shape"], r["groups"], r["dtype"], d), {})[r["provider"]] = r[f"{d}_ms"]
    for r in rows:
        for d in DIRECTIONS:
            if f"{d}_ms" not in r:
                continue
            times = base.get((r["op"], r["shape"], r["groups"], r["dtype"], d), {})
            for provider, key in (("torch", "vs_torch"), ("torch.compile", "vs_compile")):
                if provider in times:
                    r[f"{d}_speedup_{key}"] = times[provider] / r[f"{d}_ms"]
    return rows


# normkit.bench's provider names -> the repository engine's, where they differ
REPOSITORY_NAMES = {"normkit-reference": "reference"}


def repository_engine() -> Any | None:
    """The repository's engine, ``benchmarks/bench_norms.py`` next to ``src/`` in a source
    checkout, imported as ``bench_norms`` if it is there and imports; None in an installed
    package."""
    import importlib.util
    import sys
    from pathlib import Path

    if "bench_norms" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_norms.py"
        spec = importlib.util.spec_from_file_location("bench_norms", path) if path.is_file() else None
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_norms"] = module  # its dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules["bench_norms"]
            return None
    module = sys.modules["bench_norms"]
    return module if callable(getattr(module, "run", None)) and hasattr(module, "PROVIDERS") else None


def width(row: dict[str, Any]) -> int:
    """Elements per statistic: N of an (M, N) row problem, C/G x H x W of a GroupNorm one."""
    dims = [int(d) for d in row["shape"].split("x")]
    if row["groups"]:
        return dims[1] // row["groups"] * math.prod(dims[2:])
    return dims[-1]
