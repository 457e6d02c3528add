"""Plain-PyTorch oracles, one module per op: written for clarity, used by tests and CPU tensors."""
