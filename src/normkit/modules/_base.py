"""What every normkit module adds to the torch.nn class it subclasses: a backend choice and
precision controls."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .._checks import check_precision
from ..backends import get_backend
from ._tracing import refuse_scripting

# The default of an attribute that __init__ requires (no default): adopt() must be given it.
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()


def _check_options(backend: str | None, stats_dtype: torch.dtype | None, out_dtype: torch.dtype | None) -> None:
    if backend is not None and backend != "auto":
        get_backend(backend)  # a misspelt name fails at construction, not at the first call
    check_precision(stats_dtype, out_dtype)


class BackendMixin:
    """Stores ``backend`` (``None``: resolved at each call, see :mod:`normkit.backends`) and the
    precision controls ``stats_dtype`` and ``out_dtype`` (see :mod:`normkit.functional`).

    The attributes are plain and public: ``module.backend = "reference"`` switches a built
    model. They are not part of the ``state_dict``, so checkpoints move freely between torch and
    normkit.
    """

    # Class-level fallbacks for an instance made by a bare ``__class__`` assignment; adopt()
    # (normkit.convert) sets them, and every other init attribute, on the instance.
    backend: str | None = None
    stats_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None

    # Every attribute __init__ sets beyond the torch.nn class, with __init__'s default. A subclass
    # that adds one declares its own dict (only its additions; init_attributes() merges the
    # MRO), so a class swap sets exactly what __init__ would: a swapped module never lacks an
    # attribute its forward reads (normkit.convert of torch.nn.RMSNorm once lacked ``cast``).
    _init_attributes: ClassVar[dict[str, Any]] = {"backend": None, "stats_dtype": None, "out_dtype": None}

    @classmethod
    def init_attributes(cls) -> dict[str, Any]:
        """The attributes ``cls.__init__`` sets beyond its torch.nn base class, with their
        defaults (:data:`REQUIRED` where ``__init__`` has none)."""
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("_init_attributes", {}))
        return merged

    @classmethod
    def torch_base(cls) -> type[nn.Module]:
        """The torch.nn class this normkit class extends (``nn.Module`` for normkit-only ones)."""
        return next(k for k in cls.__mro__ if k.__module__.startswith("torch.") and issubclass(k, nn.Module))

    @classmethod
    def adopt(cls, module: nn.Module, **attributes: Any) -> nn.Module:
        """Turn ``module``, an instance of :meth:`torch_base`, into an instance of ``cls`` in
        place, as torch turns a Lazy module into its ``cls_to_become``: the same Parameter and
        buffer objects, hooks and training mode, with nothing copied. Sets every attribute
        ``cls.__init__`` would set (:meth:`init_attributes`), from ``attributes`` or the
        defaults; returns ``module``. Raises ``TypeError``, changing nothing, for an unknown or
        a missing required attribute or a module of another class, and ``__init__``'s
        ``ValueError`` for a bad ``backend``/``stats_dtype``/``out_dtype``."""
        defaults = cls.init_attributes()
        unknown = sorted(set(attributes) - set(defaults))
        if unknown:
            raise TypeError(f"{cls.__name__}.adopt() got unknown attributes {unknown}; it sets {sorted(defaults)}")
        values = {**defaults, **attributes}
        missing = sorted(name for name, value in values.items() if value is REQUIRED)
        if missing:
            raise TypeError(f"{cls.__name__}.adopt() needs {missing} (its __init__ has no default for them)")
        base = cls.torch_base()
        if base is nn.Module or not isinstance(module, base):
            raise TypeError(f"{cls.__name__}.adopt() takes a {base.__name__}; got {type(module).__name__}")
        _check_options(values["backend"], values["stats_dtype"], values["out_dtype"])
        module.__class__ = cls
        for name, value in values.items():
            setattr(module, name, value)
        return module

    def _init_backend(self, backend: str | None, stats_dtype: torch.dtype | None = None,
                      out_dtype: torch.dtype | None = None) -> None:
        _check_options(backend, stats_dtype, out_dtype)
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
