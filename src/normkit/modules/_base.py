"""What every normkit module adds to the torch.nn class it subclasses: a ``backend`` choice."""

from __future__ import annotations

from ..backends import get_backend


class BackendMixin:
    """Stores ``backend`` (``None``: resolved at each call, see :mod:`normkit.backends`).

    The attribute is plain and public: ``module.backend = "reference"`` switches a built model.
    It is not part of the ``state_dict``, so checkpoints move freely between torch and normkit.
    """

    backend: str | None

    def _init_backend(self, backend: str | None) -> None:
        if backend is not None and backend != "auto":
            get_backend(backend)  # a misspelt name fails at construction, not at the first call
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        if self.backend is None:
            return text
        return f"{text}, backend={self.backend!r}" if text else f"backend={self.backend!r}"
