"""Kernel backends of normkit; each subpackage is imported only when its backend is used."""
