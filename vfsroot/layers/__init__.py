"""Layers: one source of files for a client view (a local directory, a guest disk)."""
