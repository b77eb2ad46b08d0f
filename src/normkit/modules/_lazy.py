"""Lazy modules that materialize only on a call that succeeds.

torch's Lazy modules materialize in a forward pre-hook: the parameters and buffers take the
input's channel count, the module becomes its non-lazy class, and only then does the forward
check the input. A first call that fails (a 3-D input to LazyBatchNorm2d, an integer input, an
empty channel axis) leaves a materialized module behind, sized by the bad input. normkit's Lazy
modules roll that back: on an error the module is again the untouched Lazy module it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MaterializeOnSuccess"]


class _Saved:
    """What materialization changes: the class, the attributes (the hooks it removes, the
    channel count it sets), the contents of every dict attribute (hook tables, parameter and
    buffer tables), each tensor's class and data (materialize changes them in place) and the
    values of the buffers that were already real (num_batches_tracked, reset to 0)."""

    def __init__(self, module: nn.Module) -> None:
        self.cls = type(module)
        self.attrs = dict(module.__dict__)
        self.dicts = {k: dict(v) for k, v in self.attrs.items() if isinstance(v, dict)}
        tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        self.tensors = [(t, type(t), t.data) for t in tensors]
        self.values = [(t, t.detach().clone()) for t in module._buffers.values()
                       if t is not None and not isinstance(t, nn.parameter.UninitializedTensorMixin)]

    def restore(self, module: nn.Module) -> None:
        module.__class__ = self.cls
        module.__dict__.clear()
        module.__dict__.update(self.attrs)
        for key, contents in self.dicts.items():
            # Refilled in place: the hook handles keep references to these very dicts.
            table = self.attrs[key]
            table.clear()
            table.update(contents)
        for t, cls, data in self.tensors:
            if type(t) is not cls:
                t.data = data
                t.__class__ = cls
        with torch.no_grad():
            for t, value in self.values:
                if not torch.equal(t, value):
                    t.copy_(value)


class MaterializeOnSuccess:
    """Mixin for a torch.nn Lazy module (listed before it): a first call that raises leaves the
    module unmaterialized, with its class, parameters, buffers and hooks as before the call."""

    def _call_impl(self, *args: Any, **kwargs: Any) -> Tensor:
        if not self.has_uninitialized_params():  # type: ignore[attr-defined]
            return super()._call_impl(*args, **kwargs)  # type: ignore[misc]
        saved = _Saved(self)  # type: ignore[arg-type]
        try:
            return super()._call_impl(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            saved.restore(self)  # type: ignore[arg-type]
            raise
