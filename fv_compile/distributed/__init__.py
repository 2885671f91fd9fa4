"""Sequence parallelism (Ulysses) on torch.distributed functional collectives."""
