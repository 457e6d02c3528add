"""Triton kernels and their launchers, one module per op. Imported lazily by grit_kernels.ops."""
