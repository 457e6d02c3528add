"""GradCache: a chunked step gives the parameters the gradients of the unchunked step.

With dropout, "unchunked" means one backward through the whole graph of an encoder that
drew the same random numbers: the reference encodes the same chunks in the same order from
the same seed, keeping every graph, then runs one loss.backward(). With whole-batch chunks
(and in eval mode for any chunking) it is the plain one-call forward.
"""

from __future__ import annotations

import functools

import pytest
import torch

from grit_kernels import GradCache, contrastive_loss

D_IN, D_OUT = 6, 8


def make_encoder(dropout=0.2):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, 16), torch.nn.Dropout(dropout), torch.nn.GELU(), torch.nn.Linear(16, D_OUT),
    )


def batch(B=6, group=2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, D_IN, generator=g), torch.randn(B * group, D_IN, generator=g)


LOSS = functools.partial(contrastive_loss, temperature=0.05)


def reference_grads(encoder, queries, docs, chunk_q, chunk_d, seed, loss_fn=LOSS):
    """One backward through the whole graph; chunks encoded in GradCache's order."""
    encoder.zero_grad()
    torch.manual_seed(seed)
    q = torch.cat([encoder(c) for c in torch.split(queries, chunk_q)])
    d = torch.cat([encoder(c) for c in torch.split(docs, chunk_d)])
    loss = loss_fn(q, d)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def cached_grads(encoder, queries, docs, chunk_q, chunk_d, seed, loss_fn=LOSS):
    encoder.zero_grad()
    torch.manual_seed(seed)
    loss = GradCache(encoder, (chunk_q, chunk_d), loss_fn).step(queries, docs)
    return loss, {n: p.grad.clone() for n, p in encoder.named_parameters()}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunks", [(1, 1), (3, 3), (6, 12), (2, 5)])
def test_chunked_equals_unchunked_with_dropout(chunks):
    enc = make_encoder()
    queries, docs = batch()
    loss_ref, want = reference_grads(enc, queries, docs, *chunks, seed=7)
    loss, got = cached_grads(enc, queries, docs, *chunks, seed=7)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert_same_grads(got, want)


def test_dropout_replay_matters():
    """The comparison above can fail: another seed draws other masks, other gradients."""
    enc = make_encoder()
    queries, docs = batch()
    _, want = reference_grads(enc, queries, docs, 3, 3, seed=7)
    _, got = cached_grads(enc, queries, docs, 3, 3, seed=8)
    assert any(not torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6) for n in want)


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_eval_mode_equals_one_call_forward(chunk):
    enc = make_encoder().eval()
    queries, docs = batch()
    enc.zero_grad()
    loss_ref = LOSS(enc(queries), enc(docs))
    loss_ref.backward()
    want = {n: p.grad.clone() for n, p in enc.named_parameters()}
    loss, got = cached_grads(enc, queries, docs, chunk, chunk, seed=0)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-6, atol=1e-6)
    assert_same_grads(got, want)


def test_rng_state_after_step_is_the_first_pass_one():
    """The replays do not disturb the global generator: after the step it is where the
    first (no-grad) pass left it, as after an unchunked forward of the same chunks."""
    enc = make_encoder()
    queries, docs = batch()
    torch.manual_seed(3)
    with torch.no_grad():
        for c in torch.split(queries, 2):
            enc(c)
        for c in torch.split(docs, 4):
            enc(c)
    expected = torch.rand(4)
    torch.manual_seed(3)
    GradCache(enc, (2, 4), LOSS).step(queries, docs)
    assert torch.equal(torch.rand(4), expected)


def test_dict_inputs_two_encoders_and_a_loss_with_parameters():
    """Separate query and document towers, dict batches with a non-tensor entry, and a loss
    with a learnable temperature: every parameter gets the unchunked gradient."""
    torch.manual_seed(4)
    q_tower, d_tower = torch.nn.Linear(D_IN, D_OUT), torch.nn.Linear(D_IN, D_OUT)
    log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode(tower, features):
        return tower(features["x"] * features["gain"]) * features["mask"][:, None]

    def loss_fn(q, d):
        return torch.nn.functional.cross_entropy(log_scale.exp() * (q @ d.T), torch.arange(q.shape[0]) * 2)

    queries, docs = batch(B=5)
    q_in = dict(x=queries, mask=torch.tensor([1.0, 1, 0, 1, 1]), gain=0.5)
    d_in = dict(x=docs, mask=torch.ones(10), gain=2.0)
    params = [*q_tower.parameters(), *d_tower.parameters(), log_scale]

    loss_ref = loss_fn(encode(q_tower, q_in), encode(d_tower, d_in))
    want = torch.autograd.grad(loss_ref, params)
    gc = GradCache([functools.partial(encode, q_tower), functools.partial(encode, d_tower)], [2, 3], loss_fn)
    loss = gc.step(q_in, d_in)
    torch.testing.assert_close(loss, loss_ref.detach())
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)


def test_loss_kwargs_are_forwarded():
    enc = make_encoder().eval()
    queries, docs = batch()
    loss = GradCache(enc, 4, contrastive_loss).step(queries, docs, temperature=0.5, reduction="sum")
    with torch.no_grad():
        want = contrastive_loss(enc(queries), enc(docs), temperature=0.5, reduction="sum")
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize(
    "make, err, pattern",
    [
        (lambda e: GradCache(e, 0, LOSS), ValueError, r"^chunk_sizes: "),
        (lambda e: GradCache(e, [2, True], LOSS), ValueError, r"^chunk_sizes: "),
        (lambda e: GradCache("encoder", 2, LOSS), TypeError, r"^encoders: "),
        (lambda e: GradCache(e, 2, None), TypeError, r"^loss_fn: "),
        (lambda e: GradCache(e, 2, LOSS, no_sync_modules=[e]), TypeError, r"^no_sync_modules: "),
    ],
)
def test_bad_construction(make, err, pattern):
    with pytest.raises(err, match=pattern):
        make(make_encoder())


def test_bad_step_inputs():
    enc = make_encoder()
    queries, docs = batch()
    with pytest.raises(ValueError, match=r"^encoders: got 3 entries for 2 inputs"):
        GradCache([enc, enc, enc], 2, LOSS).step(queries, docs)
    with pytest.raises(ValueError, match=r"^inputs\[1\]: expected a batch"):
        GradCache(enc, 2, LOSS).step(queries, docs[:0])
    with pytest.raises(ValueError, match=r"^inputs\[0\]: tensors disagree"):
        GradCache(lambda f: enc(f["x"]), 2, LOSS).step(dict(x=queries, y=queries[:2]), dict(x=docs))
    with pytest.raises(TypeError, match=r"^inputs\[0\]: expected a tensor or a mapping"):
        GradCache(enc, 2, LOSS).step(queries.tolist(), docs)
    with pytest.raises(TypeError, match=r"^encoders: expected each call to return"):
        GradCache(lambda x: (enc(x),), 2, LOSS).step(queries, docs)
    with pytest.raises(ValueError, match=r"^loss_fn: expected a scalar"):
        GradCache(enc, 2, functools.partial(LOSS, reduction="none")).step(queries, docs)
    with pytest.raises(ValueError, match=r"^inputs: "):
        GradCache(enc, 2, LOSS).step()


class _LiveActivations:
    """Elements of the encoder's saved activations alive at once (autograd saved-tensor hooks)."""

    def __init__(self):
        self.live = self.peak = 0

    def encoder(self, module):
        def encode(x):
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor):
                return module(x)
        return encode

    def _pack(self, t):
        return _Held(t, self)


class _Held:
    def __init__(self, tensor, meter):
        self.tensor, self.meter, self.numel = tensor, meter, tensor.numel()
        meter.live += self.numel
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.numel


def test_activation_memory_is_one_chunk():
    """With chunks of 4, the activations alive at once do not grow with the batch; without
    GradCache they grow with it (so the meter does see them)."""
    enc = torch.nn.Sequential(torch.nn.Linear(D_IN, 256), torch.nn.GELU(), torch.nn.Linear(256, D_OUT))
    peaks, plain = [], []
    for B in (8, 32):
        queries, docs = batch(B=B)
        meter = _LiveActivations()
        GradCache(meter.encoder(enc), 4, LOSS).step(queries, docs)
        peaks.append(meter.peak)
        assert meter.live == 0  # every chunk's graph was freed
        meter = _LiveActivations()
        LOSS(meter.encoder(enc)(queries), meter.encoder(enc)(docs)).backward()
        plain.append(meter.peak)
    assert peaks[0] == peaks[1] > 0, peaks
    assert plain[1] >= 3 * plain[0] and plain[0] > peaks[0], plain


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", [(1, 1), (3, 5)])
def test_cuda_dropout_replay(chunks):
    """The CUDA generator's state is saved and replayed per chunk too."""
    enc = make_encoder(dropout=0.3).cuda()
    queries, docs = (x.cuda() for x in batch())
    loss_ref, want = reference_grads(enc, queries, docs, *chunks, seed=7)
    loss, got = cached_grads(enc, queries, docs, *chunks, seed=7)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert_same_grads(got, want)
