"""The Triton backend. One idea a module:

* :mod:`.jit_helpers`: the ``@triton.jit`` helpers every kernel shares (rounding, activations,
  the statistics' numerics);
* :mod:`.row_norm_kernels` and :mod:`.row_norm`: the row norms' kernels, then their launchers,
  custom ops and public functions;
* :mod:`.batch_norm_kernels` and :mod:`.batch_norm`: the same for BatchNorm;
* :mod:`._launch`: host-side helpers of both launchers; :mod:`.backend`: the backend entry.

Importing this package imports nothing; :func:`normkit.ops.triton.backend.register` does, on
first use."""
