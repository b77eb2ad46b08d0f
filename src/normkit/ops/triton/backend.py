"""The ``"triton"`` backend entry: which calls the Triton kernels run, and which ``"auto"`` picks.

Importing this module does not import Triton; :func:`register` does, once, when the registry
first looks the backend up (``normkit.backends.register_lazy_backend("triton", register)``).

* Available: Triton imports and there is a CUDA device, or ``TRITON_INTERPRET=1`` (Triton's
  CPU interpreter: exact but slow, for tests).
* Unsupported (with the reason): tensors on a device Triton cannot run on (a CPU tensor
  without the interpreter), dtypes other than float32/bfloat16/float16 (so no float64), an
  empty input for the row norms (batch_norm takes it, as ATen: an empty output and no update),
  ``instance_norm(use_input_stats=False)`` (a per-channel affine: ATen's job). ``momentum``
  is always a float here: normkit.functional rejects None as torch does, and the modules turn
  ``momentum=None`` into the cumulative-average factor.
* Preferred by ``"auto"``: only CUDA tensors, and only the ops listed in
  :data:`MEASURED_FASTER`, those that ``benchmarks/bench_norms.py`` has shown beating ATen (and
  ``torch.compile``) on a GPU, with the result committed under ``benchmarks/results/``. Until
  then ``"auto"`` keeps ATen and ``backend="triton"`` runs the kernels on request. Never on
  CPU: the interpreter is orders of magnitude slower than ATen.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from normkit.backends import Backend, OpImpl, register_backend

__all__ = ["DTYPES", "MEASURED_FASTER", "is_available", "register"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Looked up once, when the registry first loads this module; find_spec does not import Triton.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """Triton is installed and there is something to run it on."""
    return _TRITON_INSTALLED and (torch.cuda.is_available() or _interpreting())


def _tensors_unsupported(x: Tensor, *others: Tensor | None, empty_ok: bool = False) -> str | None:
    """Why the kernels cannot take ``x`` and ``others`` (weight, bias, residual), or None."""
    if x.device.type == "cpu" and not _interpreting():
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before Triton is "
                "imported, or move the tensors to CUDA")
    if x.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors; got a {x.device.type} tensor"
    for t in (x, *others):
        if t is not None and t.dtype not in DTYPES:
            return f"dtype {t.dtype} is not supported; expected one of float32, bfloat16, float16"
    if x.numel() == 0 and not empty_ok:
        return "empty input: nothing for a kernel to do"
    return None


def _layer_norm_unsupported(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _tensors_unsupported(input, weight, bias)


def _rms_norm_unsupported(input, normalized_shape, weight=None, eps=None):
    return _tensors_unsupported(input, weight)


def _group_norm_unsupported(input, num_groups, weight=None, bias=None, eps=1e-5, act=None):
    return _tensors_unsupported(input, weight, bias)


def _instance_norm_unsupported(input, running_mean=None, running_var=None, weight=None,
                               bias=None, use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return ("use_input_stats=False normalizes with the running statistics, a per-channel "
                "affine; use the torch backend")
    return _tensors_unsupported(input, weight, bias)


def _batch_norm_unsupported(input, running_mean, running_var, weight=None, bias=None,
                            training=False, momentum=0.1, eps=1e-5, act=None):
    return _tensors_unsupported(input, running_mean, running_var, weight, bias, empty_ok=True)


def _add_norm_unsupported(x, residual, normalized_shape, weight=None, bias=None, eps=None,
                          residual_dtype=None):
    if residual is not None and residual.shape != x.shape:
        return f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}"
    if residual_dtype is not None and residual_dtype not in DTYPES:
        return f"residual_dtype {residual_dtype} is not supported"
    return _tensors_unsupported(x, residual, weight, bias)


def _add_rms_norm_unsupported(x, residual, normalized_shape, weight=None, eps=None,
                              residual_dtype=None):
    return _add_norm_unsupported(x, residual, normalized_shape, weight, None, eps, residual_dtype)


# Ops that "auto" gives to Triton on CUDA. Add an op here only with a committed benchmark
# table showing it faster than ATen and torch.compile at the shapes it is picked for; none has
# been measured on a GPU yet.
MEASURED_FASTER: frozenset[str] = frozenset()


def _preferred(op: str):
    def preferred(*args, **kwargs) -> bool:
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        return op in MEASURED_FASTER and x.device.type == "cuda"

    return preferred


def register() -> None:
    """Build the ``"triton"`` backend and add it to :mod:`normkit.backends`."""
    if not _TRITON_INSTALLED:
        register_backend(Backend("triton", ops={}, is_available=lambda: False,
                                 description="Triton kernels (Triton is not installed)"))
        return
    from normkit.ops.triton import batch_norm, row_norm

    ops = {
        "layer_norm": OpImpl(row_norm.layer_norm, _layer_norm_unsupported, _preferred("layer_norm")),
        "rms_norm": OpImpl(row_norm.rms_norm, _rms_norm_unsupported, _preferred("rms_norm")),
        "add_layer_norm": OpImpl(row_norm.add_layer_norm, _add_norm_unsupported, _preferred("add_layer_norm")),
        "add_rms_norm": OpImpl(row_norm.add_rms_norm, _add_rms_norm_unsupported, _preferred("add_rms_norm")),
        "group_norm": OpImpl(row_norm.group_norm, _group_norm_unsupported, _preferred("group_norm")),
        "instance_norm": OpImpl(row_norm.instance_norm, _instance_norm_unsupported, _preferred("instance_norm")),
        "batch_norm": OpImpl(batch_norm.batch_norm, _batch_norm_unsupported, _preferred("batch_norm")),
        "batch_norm_act": OpImpl(batch_norm.batch_norm_act, _batch_norm_unsupported, _preferred("batch_norm_act")),
        "group_norm_act": OpImpl(row_norm.group_norm_act, _group_norm_unsupported, _preferred("group_norm_act")),
    }
    register_backend(Backend("triton", ops=ops, is_available=is_available,
                             description="Triton row-norm and batch-norm kernels (normkit.ops.triton)"))
