"""Plain-PyTorch oracles, one module per op: written for clarity; the tests' oracles and the reference backend (GRIT_BACKEND=reference)."""
