"""The ``"triton"`` backend entry: which calls the Triton kernels run, and which ``"auto"`` picks.

Importing this module does not import Triton; :func:`register` does, once, when the registry
first looks the backend up (``normkit.backends.register_lazy_backend("triton", register)``).

* Available: Triton imports and there is a CUDA device, or ``TRITON_INTERPRET=1`` (Triton's
  CPU interpreter: exact but slow, for tests).
* Unsupported (with the reason): tensors on a device Triton cannot run on (a CPU tensor
  without the interpreter), dtypes other than float32/bfloat16/float16 (so no float64 input
  and no ``stats_dtype=torch.float64``: the kernels accumulate in float32), an empty input for
  the row norms (batch_norm takes it, as ATen: an empty output and no update),
  ``instance_norm(use_input_stats=False)`` (a per-channel affine: ATen's job), and
  ``local_response_norm`` (no kernel). ``momentum`` is always a float here: normkit.functional
  rejects None as torch does, and the modules turn ``momentum=None`` into the
  cumulative-average factor. :func:`declared_ops` gives these checks without importing Triton,
  so ``normkit.support_matrix()`` shows what the kernels take on any machine.
* The norms of today's blocks (``modulated_layer_norm``/``modulated_rms_norm``, ``gated_rms_norm``,
  ``qk_rms_norm``/``sandwich_rms_norm``, ``dyt``/``derf``: :mod:`.modulated`, :mod:`.gated`,
  :mod:`.qk_sandwich`, :mod:`.norm_free`) take any call whose tensors all pass the checks above.
* ``normalize`` (LayerNorm2d, RMSNorm2d and any other dims) moves the normalized dims last
  (a view), runs the layer_norm / rms_norm kernels (which copy only a layout whose rows are not
  evenly strided) and moves them back.
* Preferred by ``"auto"``: only CUDA tensors, and only the ops listed in
  :data:`MEASURED_FASTER`, those that ``benchmarks/bench_norms.py`` has shown beating ATen (and
  ``torch.compile``) on a GPU, with the result committed under ``benchmarks/results/``. Until
  then ``"auto"`` keeps ATen and ``backend="triton"`` runs the kernels on request. Never on
  CPU: the interpreter is orders of magnitude slower than ATen.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from normkit._environ import EnvWatch
from normkit.backends import Backend, OpImpl, register_backend

__all__ = ["DTYPES", "MEASURED_FASTER", "declared_ops", "interpreting", "is_available", "normalize", "register"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Looked up once, when the registry first loads this module; find_spec does not import Triton.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


# Read on every launch (the kernels' RNE_BY_HAND) and every support check: cached between
# changes of the variable (normkit._environ), a change still seen on the next call.
_INTERPRET = EnvWatch("TRITON_INTERPRET")


def interpreting() -> bool:
    """Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``), read at each call."""
    return _INTERPRET.get() == "1"


def is_available() -> bool:
    """Triton is installed and there is something to run it on."""
    return _TRITON_INSTALLED and (torch.cuda.is_available() or interpreting())


def _tensors_unsupported(x: Tensor, *others: Tensor | None, empty_ok: bool = False) -> str | None:
    """Why the kernels cannot take ``x`` and ``others`` (weight, bias, residual), or None."""
    if x.device.type == "cpu" and not interpreting():
        return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before Triton is "
                "imported, or move the tensors to CUDA")
    if x.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors; got a {x.device.type} tensor"
    for t in (x, *others):
        if t is not None and t.dtype not in DTYPES:
            if t.dtype == torch.float64:
                return ("float64 is not supported (the kernels accumulate in float32): for float64 input or "
                        "stats_dtype=torch.float64 use backend='torch' or 'reference'")
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


def _normalize_unsupported(input, dims, weight=None, bias=None, eps=1e-5, center=True):
    # Any dims: moved last, they are the trailing rows the layer_norm / rms_norm kernels take.
    return _tensors_unsupported(input, weight, bias)


def normalize(input: Tensor, dims: tuple[int, ...], weight: Tensor | None = None,
              bias: Tensor | None = None, eps: float = 1e-5, center: bool = True) -> Tensor:
    """``normkit.functional.normalize`` on the row kernels: ``dims`` moved last (a view; a
    channels_last input's channels are then already unit-stride rows, read in place), the
    layer_norm (``center``) or rms_norm kernel over them, moved back. RMS with a bias adds it
    afterwards, as the torch backend does."""
    from normkit.ops.triton import row_norm

    k = len(dims)
    last = tuple(range(input.dim() - k, input.dim()))
    moved = input.movedim(dims, last)
    shape = tuple(moved.shape[-k:])
    if center:
        y = row_norm.layer_norm(moved, shape, weight, bias, eps)
    else:
        y = row_norm.rms_norm(moved, shape, weight, eps)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.movedim(last, dims)


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


def _block_unsupported(*args, **kwargs):
    """The norms of today's blocks (normkit.functional_blocks): every tensor argument on a device
    and of a dtype the kernels take, a non-empty input."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
    return _tensors_unsupported(*tensors)


# Ops that "auto" gives to Triton on CUDA. Add an op here only with a committed benchmark
# table showing it faster than ATen and torch.compile at the shapes it is picked for; none has
# been measured on a GPU yet.
MEASURED_FASTER: frozenset[str] = frozenset()


def _may_prefer(op: str):
    def may_prefer(x: Tensor) -> bool:  # the input alone decides (OpImpl.may_prefer)
        return op in MEASURED_FASTER and x.device.type == "cuda"

    return may_prefer


def _preferred(op: str):
    may_prefer = _may_prefer(op)

    def preferred(*args, **kwargs) -> bool:
        return may_prefer(args[0] if args else kwargs.get("input", kwargs.get("x")))

    return preferred


# op -> (where its function lives, the check of what it cannot run). No Triton import here.
_OPS: dict[str, tuple[str, object]] = {
    "layer_norm": ("row_norm", _layer_norm_unsupported),
    "rms_norm": ("row_norm", _rms_norm_unsupported),
    "add_layer_norm": ("row_norm", _add_norm_unsupported),
    "add_rms_norm": ("row_norm", _add_rms_norm_unsupported),
    "group_norm": ("row_norm", _group_norm_unsupported),
    "instance_norm": ("row_norm", _instance_norm_unsupported),
    "batch_norm": ("batch_norm", _batch_norm_unsupported),
    "batch_norm_act": ("batch_norm", _batch_norm_unsupported),
    "group_norm_act": ("row_norm", _group_norm_unsupported),
    "normalize": ("backend", _normalize_unsupported),
    "modulated_layer_norm": ("modulated", _block_unsupported),
    "modulated_rms_norm": ("modulated", _block_unsupported),
    "gated_rms_norm": ("gated", _block_unsupported),
    "qk_rms_norm": ("qk_sandwich", _block_unsupported),
    "sandwich_rms_norm": ("qk_sandwich", _block_unsupported),
    "dyt": ("norm_free", _block_unsupported),
    "derf": ("norm_free", _block_unsupported),
}


def declared_ops() -> dict[str, object]:
    """``{op: unsupported check}`` of the triton backend, importable without Triton (for
    :func:`normkit.support_matrix`). The checks are the registered backend's own."""
    return {op: check for op, (_, check) in _OPS.items()}


def register() -> None:
    """Build the ``"triton"`` backend and add it to :mod:`normkit.backends`."""
    if not _TRITON_INSTALLED:
        register_backend(Backend("triton", ops={}, is_available=lambda: False,
                                 description="Triton kernels (Triton is not installed)"))
        return
    # Plain imports, not importlib: the first call naming the backend may come while
    # torch.compile traces, and dynamo refuses to trace importlib.
    from normkit.ops.triton import batch_norm, gated, modulated, norm_free, qk_sandwich, row_norm

    homes = {"row_norm": row_norm, "batch_norm": batch_norm, "modulated": modulated, "gated": gated,
             "qk_sandwich": qk_sandwich, "norm_free": norm_free}
    ops = {}
    for op, (home, check) in _OPS.items():
        fn = globals()[op] if home == "backend" else getattr(homes[home], op)
        ops[op] = OpImpl(fn, check, _preferred(op), _may_prefer(op))  # type: ignore[arg-type]
    register_backend(Backend("triton", ops=ops, is_available=is_available,
                             description="Triton row-norm, batch-norm and block-norm kernels (normkit.ops.triton)"))
