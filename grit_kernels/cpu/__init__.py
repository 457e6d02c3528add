"""The cpu backend: one module per op for CPU tensors (PyTorch's fused CPU kernels, vectorised torch)."""
