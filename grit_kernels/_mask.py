"""The attention mask, defined once: which keys a query sees (flash-attn's conventions).

Used by the reference oracles and by the CPU backend. The Triton kernels evaluate the same
rule tile by tile (``grit_kernels/triton/_common.py``, ``visible``).

With ``shift = Sk - Sq`` (the diagonal aligned to the bottom-right corner: the last query
sits on the last key), query i sees key j iff ``0 <= j < Sk`` and::

    j <= i + shift + right      (right = 0 when causal; no bound when right == -1)
    j >= i + shift - left       (no bound when left == -1)

causal, Sq=3, Sk=5 (shift 2)     window (1, 0), Sq=Sk=4      causal, Sq=5, Sk=3 (shift -2)
    1 1 1 0 0                        1 0 0 0                     0 0 0   <- sees nothing
    1 1 1 1 0                        1 1 0 0                     0 0 0   <- sees nothing
    1 1 1 1 1                        0 1 1 0                     1 0 0
                                     0 0 1 1                     1 1 0
                                                                 1 1 1
"""

from __future__ import annotations

import torch


def visible(Sq: int, Sk, causal: bool, window: tuple[int, int], *, L: int | None = None,
            device=None) -> torch.Tensor:
    """(Sq, L) bool (or (B, Sq, L) for per-row ``Sk``), True where query i sees key j.

    ``Sk``: an int, or a (B, 1, 1) int64 tensor of per-row key counts (a KV cache whose rows
    hold different lengths); then ``L >= max Sk`` columns, those at or past a row's Sk False.
    ``L`` defaults to ``Sk`` for an int.
    """
    left, right = window
    if causal:
        right = 0
    per_row = isinstance(Sk, torch.Tensor)
    L = L if L is not None else int(Sk)
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    diag = i + (Sk - Sq)  # the key aligned with query i
    seen = j < Sk if per_row else torch.ones(Sq, L, dtype=torch.bool, device=device)
    if right >= 0:
        seen = seen & (j <= diag + right)
    if left >= 0:
        seen = seen & (j >= diag - left)
    return seen
