"""An example sparsegraph plugin package (see README.md)."""
