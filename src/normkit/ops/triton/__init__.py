"""The Triton backend: row-norm kernels (:mod:`.kernels`), their launchers and custom ops
(:mod:`.row_norm`), BatchNorm's kernels, launchers and custom ops (:mod:`.batch_norm`) and the
backend entry (:mod:`.backend`). Importing this package imports nothing;
:func:`normkit.ops.triton.backend.register` does, on first use."""
