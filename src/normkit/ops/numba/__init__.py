"""The numba backend: CPU kernels for the row norms (:mod:`.row_norm`) and the channel norms
(:mod:`.channel_norm`), their shared engine (:mod:`._engine`: threads, dtypes), their autograd
Functions (:mod:`._functions`) and the backend entry (:mod:`.backend`). Importing this package
imports nothing; :func:`normkit.ops.numba.backend.register` does, on first use."""
