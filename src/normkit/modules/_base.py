"""What every normkit module adds to the torch.nn class it subclasses: a backend choice and
precision controls."""

from __future__ import annotations

from typing import Any

import torch

from ..backends import get_backend
from ._tracing import refuse_scripting

_STATS_DTYPES = (torch.float32, torch.float64)


class BackendMixin:
    """Stores ``backend`` (``None``: resolved at each call, see :mod:`normkit.backends`) and the
    precision controls ``stats_dtype`` and ``out_dtype`` (see :mod:`normkit.functional`).

    The attributes are plain and public: ``module.backend = "reference"`` switches a built
    model. They are not part of the ``state_dict``, so checkpoints move freely between torch and
    normkit.
    """

    # Class-level defaults, for modules that become normkit ones by a class swap (Lazy modules,
    # normkit.convert) without running __init__.
    backend: str | None = None
    stats_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None

    def _init_backend(self, backend: str | None, stats_dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None) -> None:
        if backend is not None and backend != "auto":
            get_backend(backend)  # a misspelt name fails at construction, not at the first call
        if stats_dtype is not None and stats_dtype not in _STATS_DTYPES:
            raise ValueError(f"stats_dtype must be torch.float32 or torch.float64 (or None); got {stats_dtype}")
        if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise ValueError(f"out_dtype must be a floating-point torch.dtype (or None); got {out_dtype}")
        self.backend, self.stats_dtype, self.out_dtype = backend, stats_dtype, out_dtype

    # torch.jit.script calls this on every submodule first: a clear error instead of
    # TorchScript's opaque one about the annotations.
    __prepare_scriptable__ = refuse_scripting

    def call_options(self, *, masked: bool = False) -> dict[str, Any]:
        """The keyword arguments this module passes to :mod:`normkit.functional`."""
        if masked:
            if self.stats_dtype is not None or self.out_dtype is not None:
                raise NotImplementedError(
                    "masked statistics run at the default precision: build the module without "
                    "stats_dtype/out_dtype to pass a mask"
                )
            return {"backend": self.backend}
        return {"backend": self.backend, "stats_dtype": self.stats_dtype, "out_dtype": self.out_dtype}

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        options = [f"{name}={value!r}" for name, value in
                   (("backend", self.backend), ("stats_dtype", self.stats_dtype), ("out_dtype", self.out_dtype))
                   if value is not None]
        return ", ".join([text, *options] if text else options)
