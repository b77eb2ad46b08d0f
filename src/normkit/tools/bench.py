"""normkit's benchmark engine: every provider of a norm on the same problems, interleaved in
one run, with ms, GB/s from an explicit bytes-moved model, median and spread over repeats.

``normkit bench`` and the scripts under ``benchmarks/`` are thin fronts over this module::

    from normkit.tools import bench, bench_report

    problems = bench.problems(["layer_norm"], {"rows": [(2048, 1024)]}, [torch.float32])
    rows = bench.run(problems, ["torch", "torch.compile", "normkit-reference"],
                     directions=["fwd", "bwd"], threads=[1, 2])
    bench.add_speedups(rows)
    print(bench_report.markdown_table(rows))

The API:

- :class:`Problem`: one op on one shape, dtype and memory layout, with its bytes-moved model
  (:meth:`Problem.bytes_moved`); :func:`problems` builds them from ``{"rows": [(M, N)],
  "images": [(N, C, H, W, groups)], "batches": [(N, C, *spatial)], "blocks": [(B, L, D)]}``.
- The norms of today's blocks (:data:`BLOCK_OPS`) on an activation ``(B, L, D)``: adaLN's
  shift/scale per sample ``(B, 1, D)`` (no affine of its own, DiT's), the gate in 8 groups of
  the last dim (Mamba2's ``n_groups``), QK-norm on heads of 128 (``q (B, L, D/128, 128)``,
  ``k`` with a quarter of the heads: grouped-query attention), the sandwich step with both
  weights, DyT/Derf with their affine. ``torch`` runs the code users write today (diffusers'
  ``norm(x) * (1 + scale) + shift``, HF's ``MambaRMSNormGated`` and ``Qwen3RMSNorm``, the
  papers' DyT/Derf): :data:`TORCH`.
- Providers by name: ``torch`` (torch.nn.functional eager; ``add_*`` composed), ``torch.compile``
  (the same, compiled; one compiled function per op, within a time budget), ``normkit-<backend>``
  (``normkit.functional`` with ``backend=<backend>``, any registered backend; ``normkit-auto``
  is the default call, no backend named, as users make it),
  ``liger`` and ``flash-attn`` (CUDA, when importable); :func:`register_provider` adds one.
- Directions ``infer`` (the forward under ``torch.no_grad()``: inference, nothing saved),
  ``fwd`` (a training forward: inputs require grad), ``bwd`` (backward of one graph, random
  upstream gradients) and ``fwd+bwd``; thread counts (CPU): each row says its own.
- Timing (:func:`run`): per problem, direction and thread count, every provider is warmed up and
  calibrated (a sample is as many calls as last ``budget_s / repeats``), then ``repeats`` rounds
  each take one sample of every provider, the order rotating per round, so that a slow spell of
  a shared machine hits all providers alike. A row has the median, min and max of its samples
  (``fwd_ms``, ``fwd_ms_min``, ``fwd_ms_max``) and its trimmed range (``fwd_ms_lo``,
  ``fwd_ms_hi``: from the second fastest to the second slowest sample, once there are five or
  more, so that one load spike of a shared machine on either side does not decide), and on
  POSIX the process's minor page faults per call, the median over its samples (``fwd_faults``):
  a call that writes its output into freshly mapped memory faults once per 4 KiB page, which
  is what most of a large call's spread is made of on the CPU;
  :func:`add_speedups` calls a provider faster than a baseline only when their trimmed ranges do
  not overlap.
- :func:`copy_bandwidth`: ``y.copy_(x)`` measured the same way, what ``of_copy`` is relative to.

Bytes moved (an ideal kernel's traffic; partial-sum buffers not counted). With ``X`` the bytes of
one activation, ``P`` of one parameter vector and ``S`` the fp32 statistics (two per row, one
for RMSNorm)::

    fwd:     2X (+2X with a residual) + P (+P with a bias) + S (infer: the same)
    bwd:     3X (+2X with a residual) + 2P (+P with a bias) + S
    fwd+bwd: the sum

and for the blocks (``M`` the bytes of one per-sample modulation tensor ``(B, 1, D)``; QK: ``X``
is q's and k's together, ``P`` a head's weight)::

    modulated:  fwd 2X + 2M + S          bwd 3X + 3M + S    (read scale; write dshift, dscale)
    gated:      fwd 3X + P + S           bwd 5X + 2P + S    (x, gate, dy in; dx, dgate out)
    qk:         fwd 2X + 2P + S          bwd 3X + 4P + S
    sandwich:   fwd 4X + 2P + S          bwd 6X + 4P + S    (two statistics per row)
    dyt, derf:  fwd 2X + 2P              bwd 3X + 3P        (no statistics)
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FunctionType, SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as nkf
from ..backends import backends, get_backend

try:
    import resource  # POSIX only: the page-fault count
except ImportError:
    resource = None  # type: ignore[assignment]

__all__ = [
    "BATCH_OPS",
    "BLOCK_OPS",
    "BLOCK_SHAPES",
    "DIRECTIONS",
    "OPS",
    "QUICK_SHAPES",
    "ROW_OPS",
    "SHAPES",
    "TRIM_FROM",
    "TRIM_PER",
    "Problem",
    "add_speedups",
    "copy_bandwidth",
    "largest_input_bytes",
    "problems",
    "provider_names",
    "providers",
    "register_provider",
    "run",
    "threads",
    "trimmed_range",
    "width",
]

EPS = 1e-6
ROW_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
BATCH_OPS = ("batch_norm", "batch_norm_act")  # training mode, no running statistics; _act: relu
OPS = (*ROW_OPS, "group_norm", *BATCH_OPS)
# The norms of today's blocks: benchmarks/bench_blocks.py (not in ``normkit bench``'s default run)
BLOCK_OPS = ("modulated_layer_norm", "modulated_rms_norm", "gated_rms_norm", "qk_rms_norm", "sandwich_rms_norm",
             "dyt", "derf")
DIRECTIONS = ("infer", "fwd", "bwd", "fwd+bwd")
TRIM_FROM = 5  # samples from which a range leaves out the fastest and the slowest one
TRIM_PER = 7  # ...and one more at each end for each further 7 samples (14: two, 21: three)
GATE_GROUPS = 8  # Mamba2's n_groups
HEAD_DIM = 128  # QK-norm's D: Qwen3's, Gemma3's, OLMo2's

# (M, N) rows for the trailing-axis norms, (N, C, H, W, groups) for GroupNorm, (N, C, *spatial)
# for the BatchNorms (each contiguous and channels_last). CPU: ~2 MiB of fp32 per tensor, widths
# 256 to 8192 (the default CLI run takes about half a minute on two cores); CUDA: up to 1 GiB.
SHAPES: dict[str, dict[str, list[tuple[int, ...]]]] = {
    "cpu": {"rows": [(2048, 256), (512, 1024), (128, 4096), (64, 8192)], "images": [(4, 64, 16, 16, 8)],
            "batches": [(8, 64, 32, 32)]},
    "cuda": {"rows": [(140, 4096), (4096, 1024), (8192, 4096), (32768, 4096), (4096, 16384), (1024, 65536),
                      (256, 262144)],
             "images": [(8, 320, 64, 64, 32), (16, 512, 32, 32, 32)],
             "batches": [(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7), (2, 32, 64, 64, 64)]},
}
QUICK_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "rows": [(64, 256), (512, 1024)], "images": [(2, 32, 16, 16, 8)], "batches": [(4, 16, 8, 8), (2, 4, 4, 4, 4)]}
# (B, L, D) activations of the blocks: CPU ~2 MiB of fp32; CUDA: DiT-XL/2 at 256 px (256 tokens of
# 1152), Flux at 1024 px (4096 of 3072), LLM batches of 4096 wide (Qwen3-8B: 32 heads of 128).
BLOCK_SHAPES: dict[str, list[tuple[int, ...]]] = {
    "cpu": [(4, 256, 512), (2, 64, 4096)],
    "cuda": [(32, 256, 1152), (1, 4096, 3072), (4, 2048, 4096), (16, 4096, 4096)],
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
        return self.op == "group_norm" or self.op in BATCH_OPS

    @property
    def block(self) -> bool:  # one of BLOCK_OPS, on a (B, L, D) activation
        return self.op in BLOCK_OPS

    def _qk_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        b, seq, d = self.shape
        heads = d // HEAD_DIM
        return (b, seq, heads, HEAD_DIM), (b, seq, max(1, heads // 4), HEAD_DIM)

    def _block_bytes(self, direction: str) -> int:
        """The blocks' bytes-moved model (the module docstring's table)."""
        e, (b, seq, d) = self.dtype.itemsize, self.shape
        x, p, tokens = b * seq * d * e, d * e, b * seq
        fwd = direction == "fwd"
        if self.op.startswith("modulated_"):
            m, stats = b * d * e, tokens * 4 * (2 if "layer" in self.op else 1)
            return (2 * x + 2 * m if fwd else 3 * x + 3 * m) + stats
        if self.op == "gated_rms_norm":
            return (3 * x + p if fwd else 5 * x + 2 * p) + tokens * GATE_GROUPS * 4
        if self.op == "qk_rms_norm":
            q, k = self._qk_shapes()
            rows = math.prod(q[:-1]) + math.prod(k[:-1])
            x, p = rows * HEAD_DIM * e, HEAD_DIM * e
            return (2 * x + 2 * p if fwd else 3 * x + 4 * p) + rows * 4
        if self.op == "sandwich_rms_norm":
            return (4 * x + 2 * p if fwd else 6 * x + 4 * p) + tokens * 4 * 2
        return 2 * x + 2 * p if fwd else 3 * x + 3 * p  # dyt, derf: no statistics

    def _block_tensors(self, randn: Callable[..., Tensor]) -> dict[str, Tensor]:
        b, seq, d = self.shape
        if self.op == "qk_rms_norm":
            q, k = self._qk_shapes()
            return {"x": randn(*q), "k": randn(*k), "weight": randn(HEAD_DIM), "k_weight": randn(HEAD_DIM)}
        t = {"x": randn(b, seq, d)}
        if self.op.startswith("modulated_"):  # DiT's: no affine of its own
            return {**t, "shift": randn(b, 1, d), "scale": randn(b, 1, d)}
        if self.op == "gated_rms_norm":
            return {**t, "gate": randn(b, seq, d), "weight": randn(d)}
        if self.op == "sandwich_rms_norm":
            return {**t, "residual": randn(b, seq, d), "weight": randn(d), "next_weight": randn(d)}
        t.update(alpha=randn(1), weight=randn(d), bias=randn(d))
        return {**t, "shift": randn(1)} if self.op == "derf" else t

    @property
    def rows(self) -> int:  # statistics computed (per row; per channel for BatchNorm)
        if self.op in BATCH_OPS:
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
        if direction == "infer":  # (the forward's traffic: ATen writes the statistics without autograd too)
            direction = "fwd"
        if self.block:
            return self._block_bytes(direction)
        x = math.prod(self.shape) * self.dtype.itemsize
        streams = {"fwd": 2, "bwd": 3}[direction] + (2 if self.op.startswith("add_") else 0)
        has_bias = "layer" in self.op or self.channel_op
        param_tensors = {"fwd": 1, "bwd": 2}[direction] + has_bias
        stats = self.rows * 4 * (1 if "rms" in self.op else 2)
        return streams * x + param_tensors * self.params * self.dtype.itemsize + stats

    def make(self, device: str) -> dict[str, Tensor]:
        """Random ``x``, ``weight``, ``bias`` (and ``residual``), all requiring grad."""
        gen = torch.Generator(device=device).manual_seed(0)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, device=device, dtype=self.dtype)

        if self.block:
            return {k: v.requires_grad_() for k, v in self._block_tensors(randn).items()}
        x = randn(*self.shape)
        if self.layout != "contiguous":
            x = x.contiguous(memory_format=getattr(torch, self.layout))
        t = {"x": x, "weight": randn(self.params), "bias": randn(self.params)}
        if self.op.startswith("add_"):
            t["residual"] = randn(*self.shape)
        return {k: v.requires_grad_() for k, v in t.items()}

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.shape))
        return shape if self.layout == "contiguous" else f"{shape} {self.layout}"

    def __str__(self) -> str:
        g = f"/G{self.groups}" if self.groups else ""
        return f"{self.op} {self.label}{g} {str(self.dtype).removeprefix('torch.')}"


def problems(ops: Sequence[str], shapes: dict[str, list[tuple[int, ...]]],
             dtypes: Sequence[torch.dtype]) -> list[Problem]:
    """Every (op, shape, dtype): ``rows`` for the row norms, ``images`` (with the group count
    last) for group_norm, ``batches`` for the BatchNorms, each contiguous and channels_last,
    ``blocks`` for :data:`BLOCK_OPS`."""
    unknown = sorted(set(ops) - set(OPS) - set(BLOCK_OPS))
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; choose from {', '.join(OPS + BLOCK_OPS)}")
    out = []
    for op in ops:
        for dtype in dtypes:
            if op in BLOCK_OPS:
                out += [Problem(op, tuple(s), dtype, GATE_GROUPS if op == "gated_rms_norm" else 0)
                        for s in shapes.get("blocks", [])]
            elif op == "group_norm":
                out += [Problem(op, tuple(s[:4]), dtype, s[4]) for s in shapes.get("images", [])]
            elif op in BATCH_OPS:
                out += [Problem(op, tuple(s), dtype, layout=layout) for s in shapes.get("batches", [])
                        for layout in ("contiguous", "channels_last" if len(s) == 4 else "channels_last_3d")]
            else:
                out += [Problem(op, tuple(s), dtype) for s in shapes.get("rows", [])]
    return out


# ---- providers: name -> factory(problem, device) -> callable(tensors) -> outputs, or None where
# the provider has no such op


def _call(p: Problem, norms: Any, **kw: Any) -> Callable[[dict[str, Tensor]], Any] | None:
    """``p``'s call through ``norms``, any namespace with torch.nn.functional's signatures (and
    normkit's ``add_*`` and ``batch_norm_act``); None where ``norms`` lacks the op."""
    if not hasattr(norms, p.op):
        return None
    fn, n = getattr(norms, p.op), [p.shape[-1]]
    return {
        "layer_norm": lambda t: fn(t["x"], n, t["weight"], t["bias"], EPS, **kw),
        "rms_norm": lambda t: fn(t["x"], n, t["weight"], EPS, **kw),
        "add_layer_norm": lambda t: tuple(fn(t["x"], t["residual"], n, t["weight"], t["bias"], EPS, **kw)),
        "add_rms_norm": lambda t: tuple(fn(t["x"], t["residual"], n, t["weight"], EPS, **kw)),
        "group_norm": lambda t: fn(t["x"], p.groups, t["weight"], t["bias"], EPS, **kw),
        "batch_norm": lambda t: fn(t["x"], None, None, t["weight"], t["bias"], True, 0.1, EPS, **kw),
        "batch_norm_act": lambda t: fn(t["x"], None, None, t["weight"], t["bias"], True, 0.1, EPS, act="relu", **kw),
        "modulated_layer_norm": lambda t: fn(t["x"], t["shift"], t["scale"], None, None, EPS, **kw),
        "modulated_rms_norm": lambda t: fn(t["x"], t["shift"], t["scale"], None, EPS, **kw),
        "gated_rms_norm": lambda t: fn(t["x"], t["gate"], t["weight"], EPS, group_size=n[0] // p.groups, **kw),
        "qk_rms_norm": lambda t: tuple(fn(t["x"], t["k"], t["weight"], t["k_weight"], EPS, **kw)),
        "sandwich_rms_norm": lambda t: tuple(fn(t["x"], t["residual"], t["weight"], t["next_weight"], EPS, **kw)),
        "dyt": lambda t: fn(t["x"], t["alpha"], t["weight"], t["bias"], **kw),
        "derf": lambda t: fn(t["x"], t["alpha"], t["shift"], t["weight"], t["bias"], **kw),
    }[p.op]


def _add_then(norm: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, Tensor]]:
    """torch's spelling of a residual-add norm: ``(norm(x + residual), x + residual)``."""

    def add_norm(x: Tensor, residual: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        residual_out = x + residual
        return norm(residual_out, *args), residual_out

    return add_norm


# The blocks as their users write them today (what normkit's fused ops replace).


def _modulate(norm: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """diffusers' / DiT's adaLN: ``norm(x) * (1 + scale) + shift`` in the input's dtype."""

    def modulated(x: Tensor, shift: Tensor, scale: Tensor, *args: Any) -> Tensor:
        return norm(x, x.shape[-1:], *args) * (1 + scale) + shift

    return modulated


def _hf_rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """HF's ``Qwen3RMSNorm`` / ``LlamaRMSNorm``: float32 statistics, ``weight * x_hat.to(dtype)``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) if weight is None else weight * h.to(x.dtype)


def _hf_gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float, *, group_size: int) -> Tensor:
    """HF's ``MambaRMSNormGated`` with Mamba2's groups: gate, then grouped RMSNorm, in float32."""
    h = x.to(torch.float32) * F.silu(gate.to(torch.float32))
    g = h.view(*h.shape[:-1], -1, group_size)
    h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).view(h.shape)
    return weight * h.to(x.dtype)


def _hf_sandwich(hidden: Tensor, residual: Tensor, post_weight: Tensor, next_weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """A Gemma 2/3 decoder layer's post-norm, residual add and next pre-norm, unfused."""
    residual_out = residual + _hf_rms_norm(hidden, post_weight, eps)
    return _hf_rms_norm(residual_out, next_weight, eps), residual_out


# torch eager: F itself, the add-norms and the norm + activation composed, the blocks as written today.
TORCH = SimpleNamespace(
    layer_norm=F.layer_norm, rms_norm=F.rms_norm, group_norm=F.group_norm, batch_norm=F.batch_norm,
    add_layer_norm=_add_then(F.layer_norm), add_rms_norm=_add_then(F.rms_norm),
    batch_norm_act=lambda *args, act: F.relu(F.batch_norm(*args)),
    modulated_layer_norm=_modulate(F.layer_norm), modulated_rms_norm=_modulate(F.rms_norm),
    gated_rms_norm=_hf_gated_rms_norm,
    qk_rms_norm=lambda q, k, q_weight, k_weight, eps: (_hf_rms_norm(q, q_weight, eps), _hf_rms_norm(k, k_weight, eps)),
    sandwich_rms_norm=_hf_sandwich,
    dyt=lambda x, alpha, weight, bias: weight * torch.tanh(alpha * x) + bias,
    derf=lambda x, alpha, shift, weight, bias: weight * torch.erf(alpha * x + shift) + bias,
)


def _eager(t: dict[str, Tensor], p: Problem) -> Any:
    return _call(p, TORCH)(t)  # type: ignore[misc]


class _Compiler:
    """torch.compile of the eager call, one compiled function per op, within a time budget."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.spent_s = budget_s, 0.0
        self.fns: dict[str, Callable[..., Any]] = {}

    def __call__(self, p: Problem, device: str) -> Callable[[dict[str, Tensor]], Any]:
        if self.spent_s > self.budget_s:
            raise TimeoutError(f"torch.compile skipped: compiling took {self.spent_s:.0f} s, over the "
                               f"budget of {self.budget_s:.0f} s")
        if p.op not in self.fns:
            # A function of its own per op: dynamo keeps its cache, and its recompile limit,
            # per code object, and the shapes of seven ops would overflow a shared one.
            code = _eager.__code__.replace(co_name=f"torch_compile_{p.op}")
            self.fns[p.op] = torch.compile(FunctionType(code, globals(), code.co_name))
        compiled = self.fns[p.op]
        return lambda t: compiled(t, p)


def _normkit(backend: str) -> Callable[[Problem, str], Callable[[dict[str, Tensor]], Any] | None]:
    def factory(p: Problem, device: str) -> Callable[[dict[str, Tensor]], Any] | None:
        if backend == "auto":
            return _call(p, nkf)  # the default call users make: no backend named
        if p.op not in get_backend(backend).ops:
            return None  # the backend has no such op: left out, not an error row
        return _call(p, nkf, backend=backend)

    return factory


def _liger(p: Problem, device: str) -> Callable[[dict[str, Tensor]], Any] | None:
    try:
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return {
        "layer_norm": lambda t: LigerLayerNormFunction.apply(t["x"], t["weight"], t["bias"], EPS),
        "rms_norm": lambda t: LigerRMSNormFunction.apply(t["x"], t["weight"], EPS),
        "group_norm": lambda t: LigerGroupNormFunction.apply(t["x"], t["weight"], t["bias"], p.shape[1], p.groups, EPS),
    }.get(p.op)


def _flash_attn(p: Problem, device: str) -> Callable[[dict[str, Tensor]], Any] | None:
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn
    except ImportError:
        return None
    return {
        "layer_norm": lambda t: layer_norm_fn(t["x"], t["weight"], t["bias"], eps=EPS),
        "rms_norm": lambda t: layer_norm_fn(t["x"], t["weight"], None, eps=EPS, is_rms_norm=True),
        "add_layer_norm": lambda t: tuple(layer_norm_fn(t["x"], t["weight"], t["bias"], residual=t["residual"],
                                                        eps=EPS, prenorm=True)),
        "add_rms_norm": lambda t: tuple(layer_norm_fn(t["x"], t["weight"], None, residual=t["residual"], eps=EPS,
                                                      prenorm=True, is_rms_norm=True)),
    }.get(p.op)


_PROVIDERS: dict[str, Callable[[Problem, str], Callable[[dict[str, Tensor]], Any] | None]] = {
    "torch": lambda p, device: _call(p, TORCH),
    "liger": _liger,
    "flash-attn": _flash_attn,
}
_GPU_ONLY = frozenset({"liger", "flash-attn"})


def register_provider(name: str, factory: Callable[[Problem, str], Callable[[dict[str, Tensor]], Any] | None]) -> None:
    """Add provider ``name``: ``factory(problem, device)`` returns a callable taking the problem's
    tensors (``{"x", "weight", "bias"[, "residual"]}``) and returning its output(s), or None
    where it has no such op (the pair is then left out, not an error)."""
    _PROVIDERS[name] = factory


def provider_names() -> list[str]:
    """Every provider name :func:`run` accepts here."""
    return ["torch", "torch.compile", *(f"normkit-{b}" for b in ("auto", *backends())),
            *(n for n in _PROVIDERS if n != "torch")]


def providers(device: str) -> list[str]:
    """The default providers on ``device``: torch eager, torch.compile and normkit on every
    backend that runs there (Triton's CPU interpreter is a test tool, not a provider), and on
    CUDA liger and flash-attn where importable."""
    names = [b for b in backends() if device == "cuda" or b != "triton"]
    extra = [n for n in _PROVIDERS if n != "torch" and (device == "cuda" or n not in _GPU_ONLY)]
    return ["torch", "torch.compile", *(f"normkit-{b}" for b in names), *extra]


def _factory(name: str, compiler: _Compiler) -> Callable[[Problem, str], Callable[[dict[str, Tensor]], Any] | None]:
    if name == "torch.compile":
        return compiler
    if name.startswith("normkit-") and name.removeprefix("normkit-") in ("auto", *backends()):
        return _normkit(name.removeprefix("normkit-"))
    if name in _PROVIDERS:
        return _PROVIDERS[name]
    raise ValueError(f"unknown provider {name!r}; choose from {', '.join(provider_names())}")


# ---- timing


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (None: unchanged) within the block."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def minor_faults() -> int | None:
    """The minor page faults of this process so far (all its threads), None where the platform
    does not count them (no ``resource`` module: Windows)."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Timer:
    """Samples of ``fn``: each ``inner`` calls long, ``inner`` chosen so that one lasts ~``sample_s``;
    ``faults``: the minor page faults per call of each sample (empty where not counted)."""

    def __init__(self, fn: Callable[[], Any], device: str, sample_s: float,
                 before: Callable[[], None] = lambda: None) -> None:
        self.fn, self.sync, self.before = fn, _sync(device), before
        self.faults: list[float] = []
        self.calls(2)  # warm-up
        self.inner = max(1, int(sample_s / max(self.calls(1), 1e-7)))

    def calls(self, k: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(k):
            self.before()
            self.fn()
        self.sync()
        return time.perf_counter() - start

    def sample_ms(self) -> float:
        faults = minor_faults()
        ms = self.calls(self.inner) / self.inner * 1e3
        if faults is not None:
            self.faults.append((minor_faults() - faults) / self.inner)  # type: ignore[operator]
        return ms


def _interleaved(timers: dict[str, _Timer], repeats: int,
                 errors: dict[str, str] | None = None) -> dict[str, list[float]]:
    """``repeats`` rounds, one sample of every timer each, the starting timer rotating. A timer
    that raises is dropped from the rounds, its error kept in ``errors``."""
    names = list(timers)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if errors is not None and name in errors:
                continue
            try:
                samples[name].append(timers[name].sample_ms())
            except Exception as e:
                if errors is None:
                    raise
                errors[name] = _error_text(e)
    return {n: v for n, v in samples.items() if errors is None or n not in errors}


def copy_bandwidth(device: str, nbytes: int, *, repeats: int = 5, budget_s: float = 0.2) -> float:
    """Copy bandwidth in GB/s, the median over ``repeats`` samples: ``y.copy_(x)`` moves 2 * nbytes."""
    x = torch.empty(max(1, nbytes // 4), device=device).uniform_()
    y = torch.empty_like(x)
    timers = {"copy": _Timer(lambda: y.copy_(x), device, budget_s / repeats)}
    ms = statistics.median(_interleaved(timers, repeats)["copy"])
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def largest_input_bytes(problem_list: Sequence[Problem]) -> int:
    """Bytes of the largest ``x`` among the problems: the size to measure the copy at, so that the
    copy and the norms work from the same level of the memory hierarchy."""
    return max(math.prod(p.shape) * p.dtype.itemsize for p in problem_list)


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _error_text(e: BaseException) -> str:
    first = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _prepare(p: Problem, fn: Callable[[dict[str, Tensor]], Any], device: str, directions: Sequence[str],
             reference: tuple[Tensor, ...], sample_s: float) -> tuple[dict[str, Any], dict[str, _Timer]]:
    """First call (torch.compile compiles here), error against torch, and a timer per direction."""
    t = p.make(device)
    leaves = list(t.values())

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    start = time.perf_counter()
    outs = _as_tuple(fn(t))
    row: dict[str, Any] = {"first_call_s": time.perf_counter() - start,
                           "max_err_vs_torch": max((a.float() - b.float()).abs().max().item()
                                                   for a, b in zip(outs, reference, strict=True))}
    gen = torch.Generator().manual_seed(1)
    # Each upstream gradient in its output's layout, as the next layer of a network hands it back
    # (a channels_last output gets a channels_last gradient: a contiguous one would time torch's
    # mixed-layout backward, ten times slower than its channels_last one).
    grads = [torch.empty_like(o, device="cpu").copy_(torch.randn(o.shape, generator=gen, dtype=o.dtype)).to(device)
             for o in outs]

    def infer() -> Any:
        with torch.no_grad():
            return fn(t)

    calls = {
        "infer": infer,
        "fwd": lambda: fn(t),  # a training forward: inputs require grad, statistics are saved
        "bwd": lambda: torch.autograd.backward(outs, grads, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.backward(_as_tuple(fn(t)), grads),
    }
    return row, {d: _Timer(calls[d], device, sample_s, clear) for d in directions}


def _rerunnable_backward(name: str) -> contextlib.AbstractContextManager[Any]:
    """Compile with buffer donation off: a compiled backward that donates its saved tensors
    refuses ``retain_graph=True``, which timing the backward alone needs."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if name != "torch.compile" or config is None or not hasattr(config, "donated_buffer"):
        return contextlib.nullcontext()
    return config.patch(donated_buffer=False)


def run(
    problem_list: Sequence[Problem],
    provider_list: Sequence[str],
    *,
    device: str | None = None,
    directions: Sequence[str] = ("fwd",),
    thread_counts: Sequence[int | None] = (None,),
    repeats: int = 5,
    budget_s: float = 0.2,
    copy_gbps: float | None = None,
    compile_budget_s: float = 60.0,
    log: Callable[[str], None] = lambda text: None,
) -> list[dict[str, Any]]:
    """Time every (problem, thread count, provider) in ``directions``: one dict per triple with
    ``op, shape, groups, dtype, provider, threads`` and per direction ``<d>_ms`` (median),
    ``<d>_ms_min``, ``<d>_ms_max``, ``<d>_GBps``, ``<d>_of_copy``; also ``max_err_vs_torch``
    (forward, against torch eager) and ``first_call_s``. A provider that fails gets an ``error``
    row and the run goes on; one without the op is left out. ``budget_s`` is the timing of one
    provider in one direction, split into ``repeats`` samples. An unknown provider or direction
    raises ValueError before anything runs."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compiler = _Compiler(compile_budget_s)
    factories = {name: _factory(name, compiler) for name in provider_list}
    bad = sorted(set(directions) - set(DIRECTIONS))
    if bad:
        raise ValueError(f"unknown direction {', '.join(bad)}; choose from {', '.join(DIRECTIONS)}")
    if copy_gbps is None:
        copy_gbps = copy_bandwidth(device, 1 << (30 if device == "cuda" else 26))
    rows: list[dict[str, Any]] = []
    for p in problem_list:
        with torch.no_grad():
            reference = _as_tuple(_call(p, TORCH)(p.make(device)))  # type: ignore[misc]
        for count in thread_counts:
            # the whole timing, not only the first call: a recompiled graph (a new shape) compiles
            # its backward at its first backward call, inside the timer
            with threads(count), _rerunnable_backward("torch.compile" if "torch.compile" in factories else ""):
                got = _run_problem(p, factories, device, directions, reference, repeats, budget_s, compiler)
            for row in got:
                for d in directions:
                    if f"{d}_ms" in row:
                        row[f"{d}_GBps"] = p.bytes_moved(d) / (row[f"{d}_ms"] * 1e-3) / 1e9
                        row[f"{d}_of_copy"] = row[f"{d}_GBps"] / copy_gbps
                log(f"{p} {row['provider']}" + (f" ({row['threads']} threads)" if row["threads"] else "")
                    + (f": {row['error']}" if "error" in row else ""))
            rows += got
    return rows


def _run_problem(p: Problem, factories: dict[str, Any], device: str, directions: Sequence[str],
                 reference: tuple[Tensor, ...], repeats: int, budget_s: float,
                 compiler: _Compiler) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    timers: dict[str, dict[str, _Timer]] = {}
    for name, factory in factories.items():
        row: dict[str, Any] = {"op": p.op, "shape": p.label, "groups": p.groups,
                               "dtype": str(p.dtype).removeprefix("torch."), "provider": name,
                               "threads": torch.get_num_threads() if device == "cpu" else None}
        try:
            fn = factory(p, device)
            if fn is None:
                continue
            with _rerunnable_backward(name):
                info, timers[name] = _prepare(p, fn, device, directions, reference, budget_s / repeats)
            row.update(info)
            if name == "torch.compile":
                compiler.spent_s += info["first_call_s"]
        except Exception as e:  # a provider's limit (dtype, width, no compiler): report it, go on
            row["error"] = _error_text(e)
        rows[name] = row
    for d in directions:
        errors: dict[str, str] = {}
        samples = _interleaved({n: t[d] for n, t in timers.items() if "error" not in rows[n]}, repeats, errors)
        for n, text in errors.items():
            rows[n]["error"] = text
        for n, values in samples.items():
            lo, hi = trimmed_range(values)
            rows[n].update({f"{d}_ms": statistics.median(values), f"{d}_ms_min": min(values),
                            f"{d}_ms_max": max(values), f"{d}_ms_lo": lo, f"{d}_ms_hi": hi})
            faults = timers[n][d].faults
            if faults:
                rows[n][f"{d}_faults"] = statistics.median(faults)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return list(rows.values())


def trimmed_range(values: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` of ``values``: from :data:`TRIM_FROM` values on, the range less the ``k``
    fastest and ``k`` slowest, ``k = max(1, len // TRIM_PER)`` (7 samples: the second smallest to
    the second largest, 21: the fourth of each end), else the smallest and the largest. The same
    share of spikes is left out however many samples a problem takes."""
    ordered = sorted(values)
    k = max(1, len(ordered) // TRIM_PER) if len(ordered) >= TRIM_FROM else 0
    return ordered[k], ordered[-1 - k]


def add_speedups(rows: list[dict[str, Any]],
                 baselines: Sequence[str] = ("torch", "torch.compile")) -> list[dict[str, Any]]:
    """Add ``<d>_speedup_vs_<baseline>`` (the baseline's median time over this provider's; above
    1: faster) and ``<d>_verdict_vs_<baseline>``: ``"faster"`` / ``"slower"`` only when the two
    trimmed ranges of samples (``<d>_ms_lo`` to ``<d>_ms_hi``, see :func:`trimmed_range`; min to
    max in rows without them) do not overlap, else ``"within spread"``. Baselines are matched on
    op, shape, dtype and thread count; ``torch.compile`` is spelled ``compile``."""
    def key(r: dict[str, Any], d: str) -> tuple[Any, ...]:
        return r["op"], r["shape"], r["groups"], r["dtype"], r.get("threads"), d

    base: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["provider"] in baselines:
            for d in DIRECTIONS:
                if f"{d}_ms" in r:
                    base.setdefault(key(r, d), {})[r["provider"]] = r
    for r in rows:
        for d in DIRECTIONS:
            if f"{d}_ms" not in r:
                continue
            for name, b in base.get(key(r, d), {}).items():
                suffix = "torch" if name == "torch" else name.removeprefix("torch.")
                r[f"{d}_speedup_vs_{suffix}"] = b[f"{d}_ms"] / r[f"{d}_ms"]
                lo, hi = r.get(f"{d}_ms_lo", r[f"{d}_ms_min"]), r.get(f"{d}_ms_hi", r[f"{d}_ms_max"])
                b_lo, b_hi = b.get(f"{d}_ms_lo", b[f"{d}_ms_min"]), b.get(f"{d}_ms_hi", b[f"{d}_ms_max"])
                if hi < b_lo:
                    verdict = "faster"
                elif lo > b_hi:
                    verdict = "slower"
                else:
                    verdict = "within spread"
                r[f"{d}_verdict_vs_{suffix}"] = verdict
    return rows


def width(row: dict[str, Any]) -> int:
    """Elements per statistic: N of an (M, N) row problem, C/G x H x W of a GroupNorm one,
    N x spatial of a BatchNorm one, a group of the last dim of a gated one, the head dim of QK."""
    dims = [int(d) for d in row["shape"].split()[0].split("x")]
    if row["op"] in BLOCK_OPS:
        if row["op"] == "qk_rms_norm":
            return HEAD_DIM
        return dims[-1] // row["groups"] if row["groups"] else dims[-1]
    if row["groups"]:
        return dims[1] // row["groups"] * math.prod(dims[2:])
    if row["op"] in BATCH_OPS:
        return dims[0] * math.prod(dims[2:])
    return dims[-1]
