"""Shared test utilities: tolerances in flash-attn's style and small input builders."""

from __future__ import annotations

import torch


def assert_close_to_oracle(out, oracle_hp, oracle_lp, *, atol=1e-5, factor=2.0, name="output"):
    """flash-attn's rule: |out - oracle_hp| <= factor * |oracle_lp - oracle_hp| + atol.

    ``oracle_hp`` is the reference in high precision (fp64/fp32), ``oracle_lp`` the same
    reference run in the kernel's low precision: the kernel may be at most ``factor`` times
    as wrong as plain PyTorch in that precision.
    """
    out, hp, lp = out.double(), oracle_hp.double(), oracle_lp.double()
    assert out.shape == hp.shape, f"{name}: shape {tuple(out.shape)} != {tuple(hp.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - hp).abs().max().item() if out.numel() else 0.0
    ref_err = (lp - hp).abs().max().item() if out.numel() else 0.0
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol:.1e}"


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    """int32 offsets (B + 1,) of sequences of the given lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)
