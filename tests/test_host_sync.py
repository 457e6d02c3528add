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


def test_vouch_stands_for_a_read_until_the_tensor_changes():
    t = torch.tensor([3, 5], dtype=torch.int32)
    calls = []

    def compute():
        calls.append(1)
        return "read"

    _checks.vouch(t, ("k", 8, 1), "vouched", cacheable=True)
    assert _checks.read_once(t, ("k", 8, 1), compute, cacheable=True) == "vouched" and not calls
    assert _checks.read_once(t, ("k", 8, 2), compute, cacheable=True) == "read"  # not what was vouched for
    _checks.vouch(t, ("k", 8, 1), "vouched", cacheable=True)
    t += 1
    assert _checks.read_once(t, ("k", 8, 1), compute, cacheable=True) == "read"  # changed since
    _checks.vouch(t, ("k", 8, 1), "vouched")  # CPU: never remembered, so read
    assert _checks.read_once(t, ("k", 8, 1), compute) == "read"


def _count_length_reads(monkeypatch):
    """Treat CPU tensors as CUDA ones would be (remembered), and count the kv-cache length
    checks that read values (each a device-to-host copy on CUDA)."""
    monkeypatch.setattr(_checks, "_cacheable", lambda t: not t.is_inference())
    reads, read_once = [], _checks.read_once

    def counting(t, against, compute, **kw):
        def counted():
            if against[0] == "cache_seqlens":
                reads.append(against)
            return compute()
        return read_once(t, against, counted, **kw)
    monkeypatch.setattr(_checks, "read_once", counting)
    return reads


@pytest.mark.parametrize("packed_prefill", [True, False], ids=["packed-prefill", "cached-prefill"])
def test_decode_steps_read_no_lengths(tmp_path, monkeypatch, packed_prefill):
    """A generate loop's cache knows its lengths on the host: after the prefill, decode
    steps check them without reading them (on CUDA: no sync). Tokens equal a run that reads."""
    import grit_models as gm
    from grit_models import generation
    from grit_models.testing import make_checkpoint

    model = gm.load_checkpoint(make_checkpoint(tmp_path / "m", "mistral", seed=1))
    rows = [torch.randint(3, model.config.vocab_size, (n,)) for n in (5, 9)]
    prefixes = [None, None]
    if not packed_prefill:  # a cached prefix (RAG's doc caching): the prompts go through the cache
        kv = model(rows[0][:3], torch.arange(3), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32), max_seqlen=3,
                   causal=False, return_kv=True, position_bound=3).kv
        prefixes = [generation.KVPrefix([k for k, _ in kv], [v for _, v in kv]), None]

    def run():
        with torch.no_grad():
            cache, last = generation._prefill(model, rows, prefixes, max_new=4, pad=0)
            out = []
            for _ in range(4):
                nxt = model.logits(last).argmax(-1)
                out.append(nxt)
                last = generation._step(model, cache, nxt)
        return torch.stack(out, 1)

    want = run()
    reads = _count_length_reads(monkeypatch)
    got = run()
    assert torch.equal(got, want)
    assert reads == [], reads


@pytest.mark.gpu
def test_decode_steps_do_not_sync(tmp_path):
    """After the prefill, decode steps (model forward over the cache, greedy pick) run under
    sync_debug_mode('error'): the cache vouches for its lengths, positions need no read."""
    import grit_models as gm
    from grit_models import generation
    from grit_models.testing import make_checkpoint

    model = gm.load_checkpoint(make_checkpoint(tmp_path / "m", "mistral", seed=1), device="cuda")
    rows = [torch.randint(3, model.config.vocab_size, (n,), device="cuda") for n in (5, 9)]
    with torch.no_grad():
        cache, last = generation._prefill(model, rows, [None, None], max_new=4, pad=0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                last = generation._step(model, cache, model.logits(last).argmax(-1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(last).all()
