"""The ``"numba"`` backend entry: fused CPU kernels, which calls they run, and which ``"auto"`` picks.

Importing this module imports neither numba nor the kernels; :func:`register` does, once, when
the registry first looks the backend up (``normkit.ops.builtin``).

* Available: numba is installed (the kernels run on any CPU numba supports).
* Ops: ``layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm`` and ``normalize``
  (:mod:`.row_norm`; LayerNorm2d/RMSNorm2d are ``normalize`` over dim 1), and, from
  :mod:`.channel_norm`, ``batch_norm``, ``batch_norm_act``, ``group_norm``,
  ``group_norm_act`` and ``instance_norm``; forward and backward each one fused kernel.
  From :mod:`.blocks`, the norms of today's blocks: ``modulated_layer_norm``,
  ``modulated_rms_norm``, ``gated_rms_norm``, ``sandwich_rms_norm`` (one fused kernel each
  way), ``qk_rms_norm`` (the row kernels' RMSNorm on q and on k), and the normalization-free
  ``dyt`` and ``derf`` (elementwise: one pass each way, all five gradients in the backward's).
* Derivatives: reverse mode runs the kernels' fused backward, also under ``torch.func.grad``
  and ``vmap(grad)``. A backward that must itself be differentiated (``create_graph=True``:
  gradient penalties, MAML, Hessian-vector products; ``jacrev`` of a gradient) computes its
  gradients with the op's torch composition instead (:mod:`._graph_backward`), so second and
  higher derivatives are exact; running statistics are never updated twice. Forward mode
  (``jvp``, ``jacfwd``) raises; ``"auto"`` does not pick this backend for a call carrying
  tangents.
* Unsupported (with the reason): tensors not on the CPU; dtypes other than float32, float64
  and bfloat16 (float16 is declined: the CPU has no float16 arithmetic, so the kernels would
  convert every element both ways and gain nothing over float32 or ATen); empty row-norm
  input; ``instance_norm(use_input_stats=False)``; ``local_response_norm`` (no kernel);
  modulated norms whose ``shift``/``scale`` broadcast otherwise than per sample, per token or
  once for the batch (:func:`modulation_rows`); a sandwich whose residual has another dtype
  than hidden's.
  :func:`declared_ops` gives these checks without importing numba.
* Preferred by ``"auto"``: only where :data:`MEASURED_FASTER` lists the op and the call's
  shape class (:func:`shape_class`), filled from the committed CPU benchmark
  (``make bench-cpu`` -> ``benchmarks/results/cpu.md``) where the kernels beat ATen.

Numerics contract (every op of this backend):

* **Deterministic**: the same call gives the same bits on every run and at every thread count
  (``torch.set_num_threads(1 .. N)``). Work is split into blocks sized from the shape alone,
  every reduction runs in an order fixed by the compiled code and the reduced length, and the
  weight/bias gradients are summed per fixed block of rows, then over the blocks in block
  order (never per thread, never with atomics).
* **Batch-invariant**: a row's output and input gradient (LayerNorm, RMSNorm, the add-norms,
  ``normalize``; a sample's for GroupNorm and InstanceNorm) are bit-identical whatever the other
  rows in the batch and however many there are: the reduction order depends only on the row
  length. BatchNorm's statistics are over the batch by definition, so it is deterministic only.
  The bits may differ between CPUs of different vector widths (the row sums are vectorized to
  the machine's width) and from the other backends' bits.
* Statistics in float32 (float64 for float64 input), bf16 read and written as bits, rounded
  once to nearest even. A centred row is shifted by its first element before its moments
  (a large common offset cancels exactly), and ``rstd = 0`` where ``var + eps == 0``.
* Of the other backends, ``"reference"`` and ``"torch"`` are deterministic on the CPU run to
  run but not promised batch-invariant (ATen splits rows by thread and vectorizes by
  alignment); ``"triton"``'s row kernels reduce a row in a fixed tile order (batch-invariant
  on one GPU model) and sum its dw/db per program in a fixed order.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from normkit.backends import Backend, OpImpl, register_backend
from normkit.ops._autograd import inference_mode

__all__ = [
    "DTYPES",
    "MEASURED_FASTER",
    "declared_ops",
    "is_available",
    "modulation_rows",
    "register",
    "shape_class",
    "tensors_unsupported",
]

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_DTYPE_SET = frozenset(DTYPES)

_NUMBA_INSTALLED = importlib.util.find_spec("numba") is not None

# A row-norm call of fewer elements than this is "small": the kernels' fixed cost per call
# (custom op, autograd, numba's dispatch and thread wake-up) outweighs their speed there.
SMALL_ELEMENTS = 1 << 18
# The shortest reduction the benchmark measured: rows of 1024 (LLM rows 1024 and 4096), 56x56
# spatial maps. Shorter ones ("/short") were never measured, so "auto" keeps ATen there (rows
# of 1-16 elements ran 2-15x slower than ATen).
SHORT_EXTENT = 1024


def is_available() -> bool:
    """numba is installed (the kernels run on the CPU)."""
    return _NUMBA_INSTALLED


def tensors_unsupported(x: Tensor, *others: Tensor | None, empty_ok: bool = False) -> str | None:
    """Why the kernels cannot take ``x`` with ``others`` (parameters, residual), or None."""
    # (asked on every call the backend runs: a loop, not a generator; is_cpu, not device.type)
    if not x.is_cpu:
        return f"numba kernels run on CPU tensors; got a {x.device.type} tensor"
    bad = None if x.dtype in _DTYPE_SET else x.dtype
    for t in others:
        if bad is None and t is not None and t.dtype not in _DTYPE_SET:
            bad = t.dtype
    if bad == torch.float16:
        return ("float16 is declined by the numba kernels (the CPU has no float16 arithmetic: every "
                "element converted both ways, no faster than float32): use bfloat16, float32, or "
                "backend='torch'")
    if bad is not None:
        return f"dtype {bad} is not supported; expected one of float32, float64, bfloat16"
    if x.numel() == 0 and not empty_ok:
        return "empty input: nothing for a kernel to do"
    return None


def _layer_norm_unsupported(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return tensors_unsupported(input, weight, bias)


def _rms_norm_unsupported(input, normalized_shape, weight=None, eps=None):
    return tensors_unsupported(input, weight)


def _add_norm_unsupported(x, residual, normalized_shape, weight=None, bias=None, eps=None,
                          residual_dtype=None):
    if residual_dtype is not None and residual_dtype not in DTYPES:
        return f"residual_dtype {residual_dtype} is not supported; expected one of float32, float64, bfloat16"
    return tensors_unsupported(x, residual, weight, bias)


def _add_rms_norm_unsupported(x, residual, normalized_shape, weight=None, eps=None, residual_dtype=None):
    return _add_norm_unsupported(x, residual, normalized_shape, weight, None, eps, residual_dtype)


def _normalize_unsupported(input, dims, weight=None, bias=None, eps=1e-5, center=True):
    return tensors_unsupported(input, weight, bias)


def _group_norm_unsupported(input, num_groups, weight=None, bias=None, *_, **__):
    return tensors_unsupported(input, weight, bias)


def _batch_norm_unsupported(input, running_mean, running_var, weight=None, bias=None, *_, **__):
    return tensors_unsupported(input, running_mean, running_var, weight, bias, empty_ok=True)


def _instance_norm_unsupported(input, running_mean=None, running_var=None, weight=None, bias=None,
                               use_input_stats=True, *_, **__):
    if not use_input_stats:
        return ("use_input_stats=False is a per-channel affine with the running statistics, not a "
                "reduction: the numba kernels do not take it; use backend='torch'")
    return tensors_unsupported(input, running_mean, running_var, weight, bias)


def modulation_rows(t: Tensor, shape: Sequence[int]) -> int | None:
    """How many rows ``S`` of ``D`` values ``t`` holds when it broadcasts to ``shape`` (``(*, D)``)
    with one row per index of a leading prefix of ``shape``'s dims: per sample ``(N, 1, D)``
    -> N, per token ``(N, L, D)`` -> N*L, ``(D,)`` -> 1 (the modulated kernels read row ``i //
    (M / S)`` for row ``i`` of the input); None for other broadcasts (along ``D``, or a size-1
    dim before a full one, as ``(1, L, D)``)."""
    padded = (1,) * (len(shape) - t.dim()) + tuple(t.shape)
    if padded[-1] != shape[-1]:
        return None
    lead = 0
    while lead < len(shape) - 1 and padded[lead] == shape[lead]:
        lead += 1
    if any(s != 1 for s in padded[lead:-1]):
        return None
    return math.prod(shape[:lead])


def _modulated_unsupported(input, shift, scale, weight=None, bias=None, eps=None):
    why = tensors_unsupported(input, shift, scale, weight, bias)
    if why is None and (modulation_rows(shift, input.shape) is None or modulation_rows(scale, input.shape) is None):
        why = (f"shift {list(shift.shape)} / scale {list(scale.shape)} broadcast to {list(input.shape)} otherwise "
               "than per sample (N, 1, D), per token (N, L, D) or once (D,): the numba kernels take those; "
               "use backend='torch' or expand them")
    return why


def _modulated_rms_unsupported(input, shift, scale, weight=None, eps=None):
    return _modulated_unsupported(input, shift, scale, weight, None, eps)


def _gated_unsupported(input, gate, weight=None, *_, **__):
    return tensors_unsupported(input, gate, weight)


def _qk_unsupported(q, k, q_weight, k_weight, eps=None):
    return tensors_unsupported(q, q_weight) or tensors_unsupported(k, k_weight)


def _dyt_unsupported(input, alpha, weight=None, bias=None):
    return tensors_unsupported(input, alpha, weight, bias)


def _derf_unsupported(input, alpha, shift, weight=None, bias=None):
    return tensors_unsupported(input, alpha, shift, weight, bias)


def _sandwich_unsupported(hidden, residual, post_weight, next_weight, eps=None, weight_offset=0.0):
    why = tensors_unsupported(hidden, residual, post_weight, next_weight)
    if why is None and residual.dtype != hidden.dtype:
        why = (f"a residual of dtype {residual.dtype} beside hidden of {hidden.dtype}: the numba kernel keeps "
               "both in one dtype; use backend='torch'")
    return why


# op -> (module of its function, its check). The channel ops' checks are channel_norm's own
# UNSUPPORTED where numba is installed; these stand-ins say the same without importing it.
_ROW_OPS = {
    "layer_norm": _layer_norm_unsupported,
    "rms_norm": _rms_norm_unsupported,
    "add_layer_norm": _add_norm_unsupported,
    "add_rms_norm": _add_rms_norm_unsupported,
    "normalize": _normalize_unsupported,
}
# The norms of today's blocks (normkit.functional_blocks), from .blocks; "short" as the row norms (last dim).
_BLOCK_OPS = {
    "modulated_layer_norm": _modulated_unsupported,
    "modulated_rms_norm": _modulated_rms_unsupported,
    "gated_rms_norm": _gated_unsupported,
    "qk_rms_norm": _qk_unsupported,
    "sandwich_rms_norm": _sandwich_unsupported,
    "dyt": _dyt_unsupported,
    "derf": _derf_unsupported,
}
_CHANNEL_OPS = {
    "batch_norm": _batch_norm_unsupported,
    "batch_norm_act": _batch_norm_unsupported,
    "group_norm": _group_norm_unsupported,
    "group_norm_act": _group_norm_unsupported,
    "instance_norm": _instance_norm_unsupported,
}


_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES}


def shape_class(op: str, x: Tensor, training: bool = True, autograd: bool | None = None, *,
                group_size: int | None = None) -> str:
    """The benchmark's class of a call: ``"<dtype>/<small|large>"``, plus ``"/short"`` where
    each reduction is shorter than any the benchmark measured (a row of fewer than
    :data:`SHORT_EXTENT` elements for the row norms, fewer than that many spatial positions per
    channel for the channel norms: BatchNorm1d's ``(N, C)``, 1x1 maps), ``"/channels_last"``
    for a channels_last input, ``"/eval"`` for a BatchNorm that normalizes with its running
    statistics (a per-channel affine: not what the benchmark measures), and ``"/train"`` where
    autograd will record the call (``autograd``; by default whether ``x`` requires grad; the
    benchmark's forward+backward column decides those)."""
    size = "small" if x.numel() < SMALL_ELEMENTS else "large"
    parts = [_DTYPE_NAMES.get(x.dtype) or str(x.dtype).removeprefix("torch."), size]
    if op == "gated_rms_norm":  # its reductions are the groups of the last dim
        extent = group_size or x.shape[-1]
    elif op in _ROW_OPS or op in _BLOCK_OPS:
        extent = x.shape[-1]
    else:
        extent = math.prod(x.shape[2:])
    if extent < SHORT_EXTENT:
        parts.append("short")
    if x.dim() in (4, 5) and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d):
        parts.append("channels_last")
    if not training:
        parts.append("eval")
    if torch.is_grad_enabled() and (x.requires_grad if autograd is None else autograd) and not inference_mode():
        parts.append("train")
    return "/".join(parts)


# op -> the shape classes where the committed CPU benchmark (benchmarks/results/cpu.md, 1 and
# 2 threads, float32) shows these kernels faster than torch eager at every benchmarked shape of
# the class and both thread counts, the samples' trimmed ranges apart ("train": the forward+backward
# column; otherwise the inference column, the forward under torch.no_grad()). "auto" picks numba
# there and nowhere else.
MEASURED_FASTER: dict[str, frozenset[str]] = {
    # benchmarks/results/cpu.md (run at commit 369a46c, AMD EPYC, 2 cores, no other load, copy
    # 16.7 GB/s on this VM that day; verdicts on trimmed ranges of 7 samples, 21 for 8x4096; a
    # claimed class may take its verdict from the numba row or the auto row, which run the same
    # kernels there): fwd+bwd 5.9-8.7x (4096x1024), 9.2-11.3x (4096x4096) and 1.9-2.4x
    # (8x4096) torch eager; without autograd 1.4-3.1x (4096x1024) and 5.0-7.5x (4096x4096).
    # Without autograd at 8x4096 not claimed: 1.23-1.49x at one thread, ranges overlapping (a
    # run of the same commit 8 minutes before had 1.68x apart).
    "rms_norm": frozenset({"float32/large/train", "float32/small/train", "float32/large"}),
    # the same run: fwd+bwd 2.9-3.3x (4096x1024), 5.1-8.0x (4096x4096), 1.6-1.9x (8x4096);
    # without autograd 1.3-1.9x (4096x1024), 4.5-4.9x (4096x4096). Without autograd at 8x4096 not
    # claimed: the numba row 1.5-1.8x with overlapping ranges at one thread, the auto row 0.8x.
    "add_rms_norm": frozenset({"float32/large/train", "float32/small/train", "float32/large"}),
    # the same run: NCHW without autograd 2.0-3.5x, NCHW fwd+bwd 2.4x (one thread) and 1.75x
    # (two; 1.14x with overlapping ranges in the run 8 minutes before), numba's NCHW kernels now
    # one task per block of channels. Not claimed: channels_last fwd+bwd (1.7-2.1x at one thread,
    # 0.5-1.0x at two, ranges overlapping), channels_last without autograd (0.6-1.0x).
    "batch_norm": frozenset({"float32/large", "float32/large/train"}),
    # The block norms against their torch composition (benchmarks/results/blocks_numba_cpu.md of
    # 2026-12-02 11:00, a loaded machine): DiT (8,1024,1152) per-sample and (4,1024,1024)
    # per-token adaLN, fwd+bwd 1.7-3.6x (LN) and 3.3-9.3x (RMS), forward 2.4-4.3x and 2.8-7.7x.
    "modulated_layer_norm": frozenset({"float32/large/train", "float32/large"}),
    "modulated_rms_norm": frozenset({"float32/large/train", "float32/large"}),
    # Mamba2 (8,1024,2048) groups of 1024 and 4096x1024: fwd+bwd 2.0-3.3x. Its forward (1.5-4.5x
    # by the medians) is not claimed: one cell's ranges overlapped on the loaded machine.
    "gated_rms_norm": frozenset({"float32/large/train"}),
    # 4096x1024: fwd+bwd 5.2-12.2x, forward 2.2-6.4x. qk_rms_norm is not claimed: its rows are
    # head dims ("/short"), measured at 128 only (fwd+bwd 3.7-9.9x); shorter heads were not.
    "sandwich_rms_norm": frozenset({"float32/large/train", "float32/large"}),
    # 4096x1024 and DiT's (8,1024,1152) against the authors' composition (blocks_numba_cpu.md,
    # 11:53 run, commit de859a1): fwd+bwd 2.7-4.6x (DyT) and 2.0-6.5x (Derf) torch eager; Derf's
    # forward 3.0-4.9x. DyT's forward (1.5-3.6x by the medians) is not claimed: one cell's ranges
    # overlapped (a load spike), and on a quiet core it is about even with eager's (ATen's tanh is
    # a vectorized AVX-512 Sleef call; ours a polynomial on 256-bit vectors). Rows under 1024
    # ("/short", e.g. ViT's 768) were not measured.
    "dyt": frozenset({"float32/large/train"}),
    "derf": frozenset({"float32/large/train", "float32/large"}),
}


def _claims_small(classes: frozenset[str]) -> tuple[bool, bool, bool]:
    """Whether a class of ``classes`` is small, whether one of those is also short, and whether
    every one of those is a ``/train`` class (autograd recording)."""
    small = [c for c in classes if "/small" in c]
    return bool(small), any("/short" in c for c in small), all(c.endswith("/train") for c in small)


# MEASURED_FASTER's sets of classes -> _claims_small of them (asked per call). Filled at import,
# never after: torch.compile guards what it reads here, and a memo filled on the first call would
# make a module compiled before it recompile on its second call.
_CLAIMS_SMALL: dict[frozenset[str], tuple[bool, bool, bool]] = {
    classes: _claims_small(classes) for classes in MEASURED_FASTER.values()}


def _claims_unrecorded(classes: frozenset[str]) -> tuple[bool, bool, bool]:
    """Of the classes of ``classes`` that are not ``/train`` (calls autograd does not record):
    whether one is large, whether one is small, and whether one of those is also short."""
    small = [c for c in classes if "/small" in c and not c.endswith("/train")]
    large = any("/large" in c and not c.endswith("/train") for c in classes)
    return large, bool(small), any("/short" in c for c in small)


# MEASURED_FASTER's sets of classes -> _claims_unrecorded of them (filled at import, as _CLAIMS_SMALL)
_CLAIMS_UNRECORDED: dict[frozenset[str], tuple[bool, bool, bool]] = {
    classes: _claims_unrecorded(classes) for classes in MEASURED_FASTER.values()}


def _may_prefer(op: str):
    rows = op in _ROW_OPS

    def may_prefer(x: Tensor) -> bool:
        # "auto" asks this first, on every call: a small CPU tensor, the common case where no
        # class claims small calls (or, for the row norms, none claims short small rows, or
        # every small claim is for autograd and grad mode is off), is answered without building
        # its class, in the fewest reads (the row length before the grad mode: tiny rows are
        # the commonest small call). may_prefer_unrecorded gives the same answer for calls
        # autograd does not record, asked after this one; the grad-mode exit here is its
        # cheapest case, kept for no-grad calls where every small claim is for training (when
        # rms_norm's were, auto_choice at 8x4096 no-grad: 0.7 us with it, 1.3-3 without).
        classes = MEASURED_FASTER.get(op)
        if not classes:
            return False
        if x.numel() >= SMALL_ELEMENTS:
            return True
        claims = _CLAIMS_SMALL.get(classes)
        if claims is None:  # a table changed since import: asked, not kept
            claims = _claims_small(classes)
        small, short, train_only = claims
        if not small or not (short or not rows or x.dim() == 0 or x.shape[-1] >= SHORT_EXTENT):
            return False
        # (torch.jit.trace: its check reruns the call under no_grad, which must take the path
        # the trace took; the traced call stays on torch's op either way)
        return not (train_only and (not torch.is_grad_enabled() or inference_mode()
                                    or torch._C._get_tracing_state() is not None))

    return may_prefer


def _may_prefer_unrecorded(op: str):
    rows = op in _ROW_OPS

    def may_prefer_unrecorded(x: Tensor) -> bool:
        # "auto" asks this after may_prefer said yes, for a call autograd will not record (grad
        # mode off, or no tensor argument requiring grad): where every claim of the input's size
        # is a "/train" one (the forward+backward column), ATen runs it, answered from the input.
        if torch._C._get_tracing_state() is not None:
            return True  # (torch.jit.trace's check reruns the call under no_grad: may_prefer's route)
        classes = MEASURED_FASTER.get(op)
        if not classes:
            return False
        claims = _CLAIMS_UNRECORDED.get(classes)
        if claims is None:  # a table changed since import: asked, not kept
            claims = _claims_unrecorded(classes)
        large, small, short = claims
        if x.numel() >= SMALL_ELEMENTS:
            return large
        if not small:
            return False
        return short or not rows or x.dim() == 0 or x.shape[-1] >= SHORT_EXTENT

    return may_prefer_unrecorded


def _preferred(op: str):
    may_prefer = _may_prefer(op)
    batch, gated = "batch" in op, op == "gated_rms_norm"

    def preferred(*args, **kwargs) -> bool:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not may_prefer(x) or torch._C._get_tracing_state() is not None:
            return False  # (torch.jit.trace records torch's own op)
        # The kernels have no forward-mode rule: a call carrying tangents stays on a backend with
        # one. Tangents exist only inside a dual_level (unpacking each argument: ~1 us apiece).
        if fwAD._current_level >= 0 and not torch.compiler.is_compiling() and any(
                isinstance(a, Tensor) and fwAD.unpack_dual(a).tangent is not None for a in (*args, *kwargs.values())):
            return False
        training = bool(args[5] if len(args) > 5 else kwargs.get("training", False)) if batch else True
        # Autograd records the call if grad mode is on outside inference mode and any tensor
        # argument (the input, a weight) requires grad (a loop: this runs on every call "auto"
        # may send here).
        autograd = False
        if torch.is_grad_enabled():
            for a in (*args, *kwargs.values()) if kwargs else args:
                if isinstance(a, Tensor) and a.requires_grad:
                    autograd = not inference_mode()
                    break
            if autograd and not torch.compiler.is_compiling() and x.is_inference():
                return False  # (torch decides, op by op, whether an inference tensor may be saved)
        group = args[4] if gated and len(args) > 4 else kwargs.get("group_size")
        return shape_class(op, x, training, autograd, group_size=group) in MEASURED_FASTER[op]

    return preferred


def declared_ops() -> dict[str, object]:
    """``{op: unsupported check}`` of the numba backend, importable without numba (for
    :func:`normkit.support_matrix`)."""
    checks: dict[str, object] = dict(_ROW_OPS)
    checks.update(_BLOCK_OPS)
    checks.update(_CHANNEL_OPS)
    if _NUMBA_INSTALLED:
        channel = _channel_module()
        if channel is not None:
            checks.update({op: channel.UNSUPPORTED[op] for op in _CHANNEL_OPS if op in channel.UNSUPPORTED})
    return checks


def _channel_module():
    try:
        from normkit.ops.numba import channel_norm
    except ImportError:  # not written yet, or numba missing
        return None
    return channel_norm


def register() -> None:
    """Build the ``"numba"`` backend and add it to :mod:`normkit.backends`."""
    if not _NUMBA_INSTALLED:
        register_backend(Backend("numba", ops={}, is_available=lambda: False,
                                 description="numba CPU kernels (numba is not installed)"))
        return
    from normkit.ops.numba import blocks, row_norm

    ops = {op: OpImpl(getattr(row_norm, op), check, _preferred(op), _may_prefer(op),
                      may_prefer_unrecorded=_may_prefer_unrecorded(op))
           for op, check in _ROW_OPS.items()}
    ops.update({op: OpImpl(getattr(blocks, op), check, _preferred(op), _may_prefer(op),
                           may_prefer_unrecorded=_may_prefer_unrecorded(op))
                for op, check in _BLOCK_OPS.items()})
    channel = _channel_module()
    if channel is not None:
        for op in _CHANNEL_OPS:
            if hasattr(channel, op):
                ops[op] = OpImpl(getattr(channel, op), channel.UNSUPPORTED.get(op, _CHANNEL_OPS[op]),
                                 _preferred(op), _may_prefer(op), may_prefer_unrecorded=_may_prefer_unrecorded(op))
    register_backend(Backend("numba", ops=ops, is_available=is_available,
                             description="fused CPU kernels compiled by numba (normkit.ops.numba)"))
