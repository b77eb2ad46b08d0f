"""What the Triton kernels compile to on an H100 (sm_90), found without a GPU.

The CPU interpreter runs the kernels exactly but cannot show registers, spills, load widths or
how many programs a launch gives 132 SMs. This module shows them: it runs a training step
(forward and backward) of each reference case through the real launchers with every Triton
launch recorded instead of run (:func:`recorded_launches`) and grids sized for
:data:`SMS` SMs (:func:`normkit.ops.triton._launch.planned_for`), then compiles each distinct
kernel variant the launchers chose for sm_90 with Triton's own compiler and ptxas, and reads:

* ``registers``, ``spill_bytes``: ptxas ``-v`` with Triton's flags (spill stores + loads);
* ``min_load_bytes``: the narrowest global load of a streamed tensor (x, dy, the residual), in
  bytes per lane, from the TTGIR layout of each load (16 is a full 128-bit vector; the
  element size means one scalar per lane);
* ``programs``: the launch's grid; ``launches_per_step``: ATen kernels plus Triton launches of
  one training forward+backward (an ATen op that only views or allocates launches nothing).

``benchmarks/kernel_report.py`` (``make kernel-report``) writes the records to
``benchmarks/results/sm90_static.{json,md}``; ``tests/test_kernel_report.py`` checks them
against the launchers. Triton must not run interpreted here (``TRITON_INTERPRET`` unset):
recording works either way, compiling needs Triton's JIT functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from normkit.ops.triton._launch import planned_for

__all__ = ["CASES", "SMS", "VECTOR_BYTES", "Case", "Launch", "Step", "claims", "compile_variant", "host_us_per_step",
           "record_step",
           "recorded_launches", "records"]

SMS = 132  # H100 SXM
ARCH = 90

# Pointers the kernels stream through (the tensors as large as the input); the others are
# parameters, statistics and partial sums.
STREAMED = frozenset({"X", "DY", "RESIDUAL", "RESIDUAL_OUT", "DRESIDUAL_OUT",
                      "Z",  # the gated norm's gate
                      "Q", "K", "DQY", "DKY",  # QK-norm
                      "H", "RES", "R_OUT", "DR_OUT"})  # the sandwich norm


@dataclass(frozen=True)
class Case:
    """One reference shape: ``norm`` is a public function of :mod:`~normkit.ops.triton.row_norm`,
    :mod:`~normkit.ops.triton.batch_norm` or a block norm's module (:data:`BLOCK_NORMS`), called
    as a training step."""

    shape_class: str
    norm: str
    shape: tuple[int, ...]
    dtype: str
    layout: str = "contiguous"
    groups: int = 0  # GroupNorm's; the gated norm's groups per row
    act: str | None = None


CASES: tuple[Case, ...] = (
    Case("llm", "rms_norm", (4096, 4096), "bfloat16"),
    Case("llm", "layer_norm", (4096, 4096), "bfloat16"),
    Case("llm", "add_rms_norm", (4096, 4096), "bfloat16"),
    Case("llm-short-rows", "rms_norm", (16384, 768), "bfloat16"),
    Case("llm-long-rows", "rms_norm", (4096, 8192), "float32"),
    # The widest single tiles: a 16384-element forward with a residual, 8192-element bf16
    # backwards (rows, and GroupNorm rows with an activation).
    Case("llm-wide-rows", "add_rms_norm", (1024, 16384), "bfloat16"),
    Case("llm-wide-rows", "rms_norm", (4096, 8192), "bfloat16"),
    Case("sd-unet", "group_norm_act", (2, 640, 16, 16), "bfloat16", "contiguous", 32, "silu"),
    # 16 channels a group: channels_last groups start 16-aligned.
    *(Case("groupnorm-16", "group_norm_act", (8, 512, 32, 32), "bfloat16", layout, 32, "silu")
      for layout in ("contiguous", "channels_last")),
    *(Case(f"resnet-{hw}x{hw}", "batch_norm", (32, c, hw, hw), dtype, layout)
      for hw, c in ((56, 64), (14, 256), (7, 512))
      for layout in ("contiguous", "channels_last") for dtype in ("bfloat16", "float32")),
    *(Case("sd-unet", "group_norm_act", (2, 320, 64, 64), "bfloat16", layout, 32, "silu")
      for layout in ("contiguous", "channels_last")),
    *(Case("style-transfer", "instance_norm", shape, "float32", layout)
      for shape in ((4, 32, 256, 256), (4, 128, 64, 64))
      for layout in ("contiguous", "channels_last")),
    # The block norms (issue 13) at the shapes of the models they come from.
    *(Case("dit-adaln", norm, (8, 1024, 1152), "bfloat16")
      for norm in ("modulated_layer_norm", "modulated_rms_norm")),
    Case("mamba2", "gated_rms_norm", (8, 1024, 2048), "bfloat16", groups=2),  # groups of 1024
    Case("qk-heads", "qk_rms_norm", (8, 32, 1024, 128), "bfloat16"),
    Case("gemma-sandwich", "sandwich_rms_norm", (4096, 4096), "bfloat16"),
    *(Case("norm-free", norm, (4096, 4096), "bfloat16") for norm in ("dyt", "derf")),
)


@dataclass
class Launch:
    kernel: Any  # a JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


@dataclass(frozen=True)
class _Pointer:
    """What compiling a launch needs of a tensor argument: its dtype and address (Triton
    specializes on 16-byte alignment). Not the tensor: a reference held past the launch keeps
    autograd from reusing a gradient buffer for ``.grad`` and makes it copy it, a copy the
    real step does not make (it inflated the launch counts of the QK and sandwich norms)."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Every Triton launch inside the block is recorded, not run (its outputs keep whatever
    ``torch.empty`` gave them): the launchers' choices without a GPU and without the cost
    of the interpreter, and the host cost of a call without the kernel's."""
    from triton.runtime import interpreter, jit

    launches: list[Launch] = []

    def run(self, *args, grid, warmup=False, **kwargs):
        args = tuple(_Pointer(a.dtype, a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        launches.append(Launch(self, tuple(grid), args, kwargs))

    saved = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]
    try:
        for cls, _ in saved:
            cls.run = run
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original


# ATen ops that only make a view or allocate: no kernel launch on a GPU.
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                        "detach", "alias", "lift_fresh", "_unsafe_view"})


class _AtenCounter(TorchDispatchMode):
    """Counts the ATen ops that launch a kernel, looking inside normkit's custom ops (whose
    Python bodies call the launchers and their torch ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        if namespace == "normkit":
            opdef = torch._library.custom_ops.OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _NO_KERNEL):
            self.ops[name] += 1
        return func(*args, **kwargs)


@dataclass
class Step:
    case: Case
    launches: list[Launch]
    aten_ops: Counter[str]

    @property
    def launches_per_step(self) -> int:
        return len(self.launches) + sum(self.aten_ops.values())


# The block norms (issue 13), called as models call them: DiT's adaLN (a shift and scale per
# sample, no affine), Mamba2's gated norm (gate before the norm), QK-norm with weights, Gemma's
# sandwich (weight offset 1) and the norm-free drop-ins with every parameter.
BLOCK_NORMS = ("modulated_layer_norm", "modulated_rms_norm", "gated_rms_norm", "qk_rms_norm",
               "sandwich_rms_norm", "dyt", "derf")


def _inputs(case: Case) -> tuple[torch.Tensor, ...]:
    """x and the parameters and extra inputs of ``case`` (values are never read: every launch
    is recorded, not run)."""
    dtype = getattr(torch, case.dtype)
    x = torch.empty(case.shape, dtype=dtype)
    if case.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()

    def leaf(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).requires_grad_()

    n = case.shape[-1]
    if case.norm in ("modulated_layer_norm", "modulated_rms_norm"):
        return x, leaf(case.shape[0], 1, n), leaf(case.shape[0], 1, n)
    if case.norm in ("gated_rms_norm", "qk_rms_norm", "sandwich_rms_norm"):
        second = leaf(*case.shape)  # the gate, k, or the residual stream
        return (x, second, leaf(n)) if case.norm == "gated_rms_norm" else (x, second, leaf(n), leaf(n))
    if case.norm in ("dyt", "derf"):
        return x, leaf(1), *((leaf(1),) if case.norm == "derf" else ()), leaf(n), leaf(n)
    rows = case.norm in ("rms_norm", "layer_norm", "add_rms_norm")
    features = n if rows else case.shape[1]
    w, b = leaf(features), leaf(features)
    extra = (torch.empty_like(x),) if case.norm == "add_rms_norm" else (torch.zeros(features),
                                                                        torch.ones(features))
    return x, w, b, *extra


def _forward(case: Case, *inputs: torch.Tensor) -> list[torch.Tensor]:
    from normkit.ops.triton import batch_norm, gated, modulated, norm_free, qk_sandwich, row_norm

    x, *rest = inputs
    n = case.shape[-1]
    calls: dict[str, Callable[[], Any]] = {
        "rms_norm": lambda: row_norm.rms_norm(x, (n,), rest[0]),
        "layer_norm": lambda: row_norm.layer_norm(x, (n,), *rest[:2]),
        "add_rms_norm": lambda: row_norm.add_rms_norm(x, rest[2], (n,), rest[0]),
        "group_norm_act": lambda: row_norm.group_norm_act(x, case.groups, *rest[:2], act=case.act),
        "instance_norm": lambda: row_norm.instance_norm(x, weight=rest[0], bias=rest[1]),
        "batch_norm": lambda: batch_norm.batch_norm(x, *rest[2:], *rest[:2], training=True),
        "modulated_layer_norm": lambda: modulated.modulated_layer_norm(x, *rest),
        "modulated_rms_norm": lambda: modulated.modulated_rms_norm(x, *rest),
        "gated_rms_norm": lambda: gated.gated_rms_norm(x, rest[0], rest[1], 1e-5, n // case.groups, False),
        "qk_rms_norm": lambda: qk_sandwich.qk_rms_norm(x, *rest),
        "sandwich_rms_norm": lambda: qk_sandwich.sandwich_rms_norm(x, *rest, weight_offset=1.0),
        "dyt": lambda: norm_free.dyt(x, *rest),
        "derf": lambda: norm_free.derf(x, *rest),
    }
    if case.norm not in calls:
        raise ValueError(f"no reference step for {case.norm!r}")
    out = calls[case.norm]()
    return list(out) if isinstance(out, tuple) else [out]


def record_step(case: Case, sms: int = SMS) -> Step:
    """One training forward+backward of ``case`` on the CPU, grids sized for ``sms`` SMs, its
    Triton launches recorded (not run) and its kernel-launching ATen ops counted (inputs and
    upstream gradients are made outside the count)."""
    inputs = _inputs(case)
    counter = _AtenCounter()
    with planned_for(sms), recorded_launches() as launches:
        with counter:
            outs = _forward(case, *inputs)
        grads = [torch.empty_like(o) for o in outs]
        with counter:
            torch.autograd.backward(outs, grads)
    return Step(case, launches, counter.ops)


# ---------------------------------------------------------------------------------------------
# Compiling a recorded launch for sm_90


@functools.cache
def _gpu_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", ARCH, 32)
    return target, make_backend(target)


def variant_of(launch: Launch) -> tuple[str, str, dict, dict, dict, Any]:
    """``(module, kernel, signature, constexprs, attrs, options)`` of the variant Triton would
    compile for ``launch`` on sm_90: its own binder decides what is specialized (a stride
    equal to 1, 16-divisible integers and pointers), exactly as at a launch."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    _, backend = _gpu_backend()
    k = launch.kernel
    if not hasattr(k, "_pack_args"):
        raise RuntimeError("compiling needs Triton's JIT (TRITON_INTERPRET must not be 1)")
    kwargs = dict(launch.kwargs, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = k._pack_args(backend, kwargs, bound, spec, options)
    return k.fn.__module__, k.fn.__name__, signature, constexprs, attrs, options


def variant_key(variant: tuple) -> str:
    module, name, signature, constexprs, attrs, options = variant
    return repr((module, name, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), sorted(dataclasses.asdict(options).items())))


def compile_variant(variant: tuple) -> dict[str, Any]:
    """Compile one variant for sm_90 and read its registers, spills and load widths."""
    import triton
    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options = variant
    kernel = getattr(importlib.import_module(module), name)
    target, _ = _gpu_backend()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=dataclasses.asdict(options))
    registers, spill_bytes = _ptxas_usage(compiled.asm["ptx"], options.enable_fp_fusion)
    return {
        "registers": registers,
        "spill_bytes": spill_bytes,
        "min_load_bytes": min(streamed_load_bytes(compiled.asm["ttgir"]).values(), default=None),
        "ptx_load_bytes": sorted(set(ptx_load_bytes(compiled.asm["ptx"]))),
        "num_warps": options.num_warps,
    }


def _ptxas_usage(ptx: str, fp_fusion: bool) -> tuple[int, int]:
    """(registers, spill store + load bytes per thread) from ``ptxas -v``, run with the flags
    Triton's own compile uses (``make_cubin``)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(ARCH).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a", src, "-o", src + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


_PTX_LOAD = re.compile(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def ptx_load_bytes(ptx: str) -> list[int]:
    """Bytes per lane of every ``ld.global`` in the PTX (``.v4.b32``: 16)."""
    return [int(v or 1) * int(bits) // 8 for v, bits in _PTX_LOAD.findall(ptx)]


_DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8, "i8": 1, "i1": 1}
_BLOCKED = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]")
_DEF = re.compile(r"^\s*(%[\w.#:]+(?:, %[\w.#]+)*) = ([\w.]+)(.*)$")
_LOADS = ("tt.load", "ttg.async_copy_global_to_local", "tt.descriptor_load")


def streamed_load_bytes(ttgir: str) -> dict[str, int]:
    """``{pointer argument: bytes per lane of its narrowest tensor load}`` for the streamed
    tensors (:data:`STREAMED`): the load layout's elements per thread along its fastest axis
    times the element size, which is what the coalescing pass found contiguous and aligned
    (a scalar per lane where the unit-stride axis is not the tile's fast axis, or where
    alignment is unknown)."""
    layouts: dict[str, tuple[list[int], list[int]]] = {}
    defs: dict[str, list[str]] = {}
    loads: list[tuple[str, str]] = []
    for line in ttgir.splitlines():
        if m := _BLOCKED.match(line):
            layouts[m.group(1)] = ([int(v) for v in m.group(2).split(",")],
                                   [int(v) for v in m.group(3).split(",")])
            continue
        line = line.split(" loc(")[0]
        for inner, init in re.findall(r"(%[\w.]+) = (%[\w.#]+)", line.split("iter_args(")[-1]
                                      if "iter_args(" in line else ""):
            defs.setdefault(inner, []).append(init)
        m = _DEF.match(line)
        if not m:
            continue
        results, op, rest = m.groups()
        operands = re.findall(r"%[\w.]+", rest.split(" : ")[0])
        for r in results.split(", "):
            defs.setdefault(r.split(":")[0].split("#")[0], []).extend(operands)
        if op in _LOADS and operands and "tensor<" in rest:
            loads.append((operands[0], rest))
    out: dict[str, int] = {}
    for ptr, rest in loads:
        for arg in _pointer_args(ptr, defs):
            ty = re.search(r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)", rest)
            if ty is None or arg.lstrip("%") not in STREAMED:
                continue
            size, order = layouts.get(ty.group(3), ([1], [0]))
            width = size[order[0]] * _DTYPE_BYTES[ty.group(2)]
            out[arg.lstrip("%")] = min(width, out.get(arg.lstrip("%"), width))
    return out


def _pointer_args(value: str, defs: dict[str, list[str]]) -> set[str]:
    """The function arguments ``value`` is computed from (the ones with no definition)."""
    seen, stack, roots = set(), [value.split("#")[0]], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in defs:
            stack.extend(o.split("#")[0] for o in defs[v])
        elif not re.fullmatch(r"%(c|cst|arg)[\w_]*", v):
            roots.add(v)
    return roots


# ---------------------------------------------------------------------------------------------
# The records


def _layout_of(case: Case) -> str:
    return case.layout


def records(cases: tuple[Case, ...] = CASES, compile_many: Callable[[list], list] | None = None,
            progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    """One record per (kernel variant, reference case): the fields the issue lists, plus the
    kernel's tile, warps and the widths of every PTX load. ``compile_many`` maps
    :func:`compile_variant` over a list (a process pool); each distinct variant once."""
    steps = [record_step(case) for case in cases]
    variants: dict[str, tuple] = {}
    plan = []
    for step in steps:
        for launch in step.launches:
            variant = variant_of(launch)
            key = variant_key(variant)
            variants.setdefault(key, variant)
            plan.append((step, launch, key))
    progress(f"{len(plan)} launches, {len(variants)} distinct variants to compile")
    keys = list(variants)
    compiled = (compile_many or (lambda vs: list(map(compile_variant, vs))))([variants[k] for k in keys])
    by_key = dict(zip(keys, compiled, strict=True))
    out = []
    for step, launch, key in plan:
        c = step.case
        info = by_key[key]
        out.append({
            "kernel": launch.name,
            "norm": c.norm,
            "layout": _layout_of(c),
            "dtype": c.dtype,
            "shape": list(c.shape),
            "shape_class": c.shape_class,
            "registers": info["registers"],
            "spill_bytes": info["spill_bytes"],
            "min_load_bytes": info["min_load_bytes"],
            "programs": launch.programs,
            "sms": SMS,
            "launches_per_step": step.launches_per_step,
            "grid": list(launch.grid),
            "tile": {k: v for k, v in launch.kwargs.items() if k.startswith("BLOCK_")},
            "num_warps": info["num_warps"],
            "ptx_load_bytes": info["ptx_load_bytes"],
            "aten_ops": dict(sorted(step.aten_ops.items())),
        })
    return out


# A full 128-bit vector per lane: what a unit-stride axis reads when it is the tile's fast axis
# and its rows are aligned.
VECTOR_BYTES = 16


def claims(record: dict[str, Any]) -> dict[str, bool]:
    """What a kernel ready for the GPU shows statically: no spills, full-vector loads along the
    unit-stride axis, a grid with a program for every SM, and, where the launcher sized the
    grid as one wave of resident programs (:mod:`~normkit.ops.triton.occupancy`), registers
    within the budget that wave was planned for and no more programs than it. A kernel that
    streams no input tensor (BatchNorm's finalize: a few numbers per channel) is held to the
    first only."""
    from normkit.ops.triton import occupancy

    streams = record["min_load_bytes"] is not None
    planned = record["kernel"] in occupancy.PLANNED
    wave = record["sms"] * occupancy.ctas_per_sm(record["num_warps"])
    return {
        "no_spills": record["spill_bytes"] == 0,
        "vector_loads": not streams or record["min_load_bytes"] >= VECTOR_BYTES,
        "fills_sms": not streams or record["programs"] >= record["sms"],
        "planned_occupancy": not planned or (record["registers"] <= occupancy.REGISTER_BUDGET
                                             and record["programs"] <= wave),
    }


# Small shapes for the host cost: what a call costs before any kernel runs.
HOST_CASES: tuple[Case, ...] = (
    Case("host", "rms_norm", (8, 64), "float32"),
    Case("host", "add_rms_norm", (8, 64), "float32"),
    Case("host", "group_norm_act", (2, 8, 4, 4), "float32", groups=4, act="silu"),
    Case("host", "batch_norm", (2, 8, 4, 4), "float32"),
)


def host_us_per_step(case: Case, repeats: int = 200) -> float:
    """Median host microseconds of one eager training forward+backward of ``case`` with every
    Triton launch recorded instead of run (the Python, dispatch and ATen cost a GPU would wait
    behind at small shapes)."""
    import time

    inputs = _inputs(case)
    times = []
    with recorded_launches() as launches:
        for _ in range(repeats):
            start = time.perf_counter()
            outs = _forward(case, *inputs)
            torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
            times.append(time.perf_counter() - start)
            launches.clear()
    times.sort()
    return times[len(times) // 2] * 1e6
