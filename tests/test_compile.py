"""torch.compile(fullgraph=True) of the model's packed forward and of one cached decode step:
a graph break is a failure (the grit_kernels ops are registered custom ops with fake
implementations, and the model's Python must not leave the graph), and the compiled results
equal eager's."""

from __future__ import annotations

import pytest
import torch

import grit_models as gm
from grit_models.mistral import packed_positions
from grit_models.testing import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gm.load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("c") / "m", "mistral", seed=2))


def test_packed_forward_compiles_fullgraph(model):
    torch._dynamo.reset()
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    tokens = torch.randint(3, model.config.vocab_size, (20,))
    positions = packed_positions(cu, 20)

    def packed(tokens, positions, cu):
        return model(tokens, positions, cu_seqlens=cu, max_seqlen=13, causal=False, position_bound=13).hidden

    compiled = torch.compile(packed, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, positions, cu), packed(tokens, positions, cu),
                                   atol=1e-5, rtol=1e-5)


def test_decode_step_compiles_fullgraph(model):
    torch._dynamo.reset()
    eager_cache, comp_cache = model.new_cache(2, 32), model.new_cache(2, 32)
    prompt = torch.randint(3, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        for cache in (eager_cache, comp_cache):
            model(prompt, torch.arange(5).repeat(2, 1), cache=cache, position_bound=32)

        def step(tokens, cache):
            return model(tokens, cache.seqlens.long()[:, None], cache=cache, position_bound=32).hidden

        compiled = torch.compile(step, fullgraph=True)
        tokens = torch.tensor([[4], [6]])
        # One graph for every token: a guard on host state that changes per step (the cache's
        # host bound once did) would recompile each step and, past the limit, fail.
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):  # the cache's lengths advance inside the graph
                want, got = step(tokens, eager_cache), compiled(tokens, comp_cache)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
                tokens = model.logits(want[:, 0]).argmax(-1)[:, None]
    assert comp_cache.seqlens.tolist() == eager_cache.seqlens.tolist() == [8, 8]
    # Compiled steps do not track the host bound: it is unknown afterwards (no wrong vouch),
    # and an eager step after them checks the lengths itself.
    assert comp_cache._bound is None
    with torch.no_grad():
        torch.testing.assert_close(step(tokens, comp_cache), step(tokens, eager_cache), atol=1e-5, rtol=1e-5)
