"""normkit: normalization layers for PyTorch.

Drop-in twins of torch.nn's normalization modules (``normkit.BatchNorm2d`` is a
``torch.nn.BatchNorm2d``), computed by the backend of your choice: ``"torch"`` (ATen),
``"reference"`` (from scratch, the oracle) or ``"triton"`` (fused GPU kernels).

>>> import normkit
>>> norm = normkit.LayerNorm(512)                  # resolved per call: "auto"
>>> with normkit.use_backend("reference"):
...     y = norm(x)
"""

from . import functional, norms, parallel, reference
from .backends import BackendError, backends, current_backend, use_backend
from .folding import fuse_conv_bn, recalibrate_batch_norm
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct2d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    Derf,
    DyT,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FusedAddLayerNorm,
    FusedAddRMSNorm,
    GatedRMSNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GroupNorm,
    GroupNormAct,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
    LocalResponseNorm,
    ModulatedLayerNorm,
    ModulatedRMSNorm,
    QKRMSNorm,
    RMSNorm,
    RMSNorm2d,
    SandwichRMSNorm,
    ScaleNorm,
    SyncBatchNorm,
    convert_sync_batchnorm,
    freeze_batch_norm,
    unfreeze_batch_norm,
)
from .ops import builtin as _builtin  # noqa: F401  (registers the built-in backends)
from .support import SupportMatrix, support_matrix
from .surgery import ConvertReport, convert, register_adapter, to_torch
from .surgery_norm_free import ReplaceReport, replace_norms

__version__ = "0.1.0"

__all__ = [
    "Derf",
    "DyT",
    "ReplaceReport",
    "replace_norms",
    "GatedRMSNorm",
    "ModulatedLayerNorm",
    "ModulatedRMSNorm",
    "QKRMSNorm",
    "SandwichRMSNorm",
    "BatchNormAct2d",
    "ConvertReport",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GroupNormAct",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "LayerNorm2d",
    "RMSNorm2d",
    "convert",
    "freeze_batch_norm",
    "fuse_conv_bn",
    "recalibrate_batch_norm",
    "register_adapter",
    "to_torch",
    "unfreeze_batch_norm",
    "BackendError",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "LocalResponseNorm",
    "RMSNorm",
    "ScaleNorm",
    "SyncBatchNorm",
    "backends",
    "SupportMatrix",
    "support_matrix",
    "convert_sync_batchnorm",
    "current_backend",
    "functional",
    "norms",
    "parallel",
    "reference",
    "use_backend",
]
