"""Host reads of tensor values: once per tensor, never per layer (``_checks.read_once``).

On CUDA a read is a device-to-host copy and a stream sync. The attention and mean_pool ops
read cu_seqlens to check them; a model forward calls attention once per layer with the same
tensor, so only the first call may read it. CPU tensors are read every time (no sync to save,
and a change made through ``.numpy()`` must be seen)."""

from __future__ import annotations

import pytest
import torch

from grit_kernels import attention
from grit_kernels.ops import _checks


def test_read_once_remembers_until_the_tensor_changes():
    t = torch.tensor([0, 3, 5], dtype=torch.int32)
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    assert _checks.read_once(t, ("a", 5), compute, cacheable=True) == 1
    assert _checks.read_once(t, ("a", 5), compute, cacheable=True) == 1      # remembered
    assert _checks.read_once(t, ("a", 6), compute, cacheable=True) == 2      # checked against another total
    t.add_(0)                                                                # any in-place op bumps the version
    assert _checks.read_once(t, ("a", 6), compute, cacheable=True) == 3
    u = t.clone()
    assert _checks.read_once(u, ("a", 6), compute, cacheable=True) == 4      # another tensor
    assert _checks.read_once(t, ("a", 6), compute) == 5                      # CPU: never remembered
    with torch.inference_mode():
        w = torch.tensor([0, 1], dtype=torch.int32)
    assert _checks.read_once(w, ("a", 1), compute) == 6                      # no version counter: read


def test_cpu_cu_seqlens_are_read_on_every_call():
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    attention(q, q, q, cu_seqlens_q=cu)
    cu.numpy()[1] = 7  # behind the version counter
    with pytest.raises(ValueError, match="non-decreasing"):
        attention(q, q, q, cu_seqlens_q=cu)


@pytest.mark.gpu
def test_packed_forward_does_not_sync_once_cu_seqlens_were_checked(tmp_path):
    """A forward repeated with the same cu_seqlens runs under sync_debug_mode('error')."""
    import grit_models as gm
    from grit_models.mistral import packed_positions
    from grit_models.testing import make_checkpoint

    model = gm.load_checkpoint(make_checkpoint(tmp_path / "m", "mistral", seed=1), device="cuda")
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device="cuda")
    tokens = torch.randint(3, model.config.vocab_size, (20,), device="cuda")
    positions = packed_positions(cu, 20)
    with torch.no_grad():
        want = model(tokens, positions, cu_seqlens=cu, max_seqlen=13, causal=False, position_bound=13).hidden
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = model(tokens, positions, cu_seqlens=cu, max_seqlen=13, causal=False, position_bound=13).hidden
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want)
