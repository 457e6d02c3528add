"""The cuda backend: launchers over grit_kernels._C (csrc/), one module per op that has csrc kernels."""
