"""normkit's modules: each subclasses its torch.nn twin and adds a keyword-only ``backend``."""

from .batch_variants import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, GhostBatchNorm1d, GhostBatchNorm2d
from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .blocks import GatedRMSNorm, ModulatedLayerNorm, ModulatedRMSNorm, QKRMSNorm, SandwichRMSNorm
from .channels_first import LayerNorm2d, RMSNorm2d
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batch_norm,
    unfreeze_batch_norm,
)
from .instancenorm import (
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
)
from .norm_act import BatchNormAct2d, GroupNormAct
from .norm_free import Derf, DyT
from .stateless import (
    FusedAddLayerNorm,
    FusedAddRMSNorm,
    GroupNorm,
    LayerNorm,
    LocalResponseNorm,
    RMSNorm,
    ScaleNorm,
)
from .syncbatchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "Derf",
    "DyT",
    "GatedRMSNorm",
    "ModulatedLayerNorm",
    "ModulatedRMSNorm",
    "QKRMSNorm",
    "SandwichRMSNorm",
    "BatchNormAct2d",
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
    "freeze_batch_norm",
    "unfreeze_batch_norm",
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
    "convert_sync_batchnorm",
]
