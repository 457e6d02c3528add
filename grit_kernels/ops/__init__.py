"""One module per op: validation, backend dispatch, torch.library registration, autograd."""
