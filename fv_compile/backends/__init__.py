"""Attention backends: FastVideo's API (abstract.py), the registry, and one module per backend."""
