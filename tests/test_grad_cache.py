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
from grit_kernels.reference import contrastive_loss as ref_loss
from helpers import assert_close_to_oracle, assert_grads_close_to_oracle, scaled_atol

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
# The fp64 oracle of LOSS: the plain-PyTorch reference computed in float64.
LOSS64 = functools.partial(ref_loss.contrastive_loss, temperature=0.05, dtype=torch.float64)


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


def oracle_grads(encoder, queries, docs, chunk_q, chunk_d, seed):
    """``reference_grads`` in float64 (a copy of the encoder, the fp64 reference loss): the
    oracle. Dropout draws the same masks in fp64 as in fp32 from the same seed."""
    import copy

    enc64 = copy.deepcopy(encoder).double()
    loss, grads = reference_grads(enc64, queries.double(), docs.double(), chunk_q, chunk_d, seed, loss_fn=LOSS64)
    return loss, grads


def assert_same_step(encoder, queries, docs, chunks, seed, got_loss, got):
    """GradCache's fp32 loss and gradients are within 2x the error of the unchunked fp32
    step (measured against the fp64 oracle): a tolerance that follows the computation,
    whatever CPU and thread count run it."""
    loss_lp, want_lp = reference_grads(encoder, queries, docs, *chunks, seed=seed)
    loss_hp, want_hp = oracle_grads(encoder, queries, docs, *chunks, seed=seed)
    assert_close_to_oracle(got_loss, loss_hp, loss_lp, atol=scaled_atol(loss_hp, torch.float32), name="loss")
    assert_grads_close_to_oracle(got, want_hp, want_lp)


@pytest.mark.parametrize("chunks", [(1, 1), (3, 3), (6, 12), (2, 5)])
def test_chunked_equals_unchunked_with_dropout(chunks):
    enc = make_encoder()
    queries, docs = batch()
    loss, got = cached_grads(enc, queries, docs, *chunks, seed=7)
    assert_same_step(enc, queries, docs, chunks, 7, loss, got)


def test_dropout_replay_matters():
    """The comparison above can fail: another seed draws other masks, other gradients."""
    enc = make_encoder()
    queries, docs = batch()
    loss, got = cached_grads(enc, queries, docs, 3, 3, seed=8)
    with pytest.raises(AssertionError):
        assert_same_step(enc, queries, docs, (3, 3), 7, loss, got)


@pytest.mark.parametrize("chunk", [1, 3, 6])
def test_eval_mode_equals_one_call_forward(chunk):
    enc = make_encoder().eval()
    queries, docs = batch()
    loss, got = cached_grads(enc, queries, docs, chunk, chunk, seed=0)
    # Whole-batch chunks: the reference is the plain one-call forward.
    n = queries.shape[0] + docs.shape[0]
    assert_same_step(enc, queries, docs, (n, n), 0, loss, got)


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
    towers = torch.nn.Linear(D_IN, D_OUT), torch.nn.Linear(D_IN, D_OUT)
    queries, docs = batch(B=5)

    def setup(dtype):
        """(query encoder, doc encoder, loss, params, query batch, doc batch) in ``dtype``."""
        import copy

        q_tower, d_tower = (copy.deepcopy(t).to(dtype) for t in towers)
        log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=dtype))

        def encode(tower, features):
            return tower(features["x"] * features["gain"]) * features["mask"][:, None]

        def loss_fn(q, d):
            return torch.nn.functional.cross_entropy(log_scale.exp() * (q @ d.T), torch.arange(q.shape[0]) * 2)

        q_in = dict(x=queries.to(dtype), mask=torch.tensor([1.0, 1, 0, 1, 1], dtype=dtype), gain=0.5)
        d_in = dict(x=docs.to(dtype), mask=torch.ones(10, dtype=dtype), gain=2.0)
        params = [*q_tower.parameters(), *d_tower.parameters(), log_scale]
        return (functools.partial(encode, q_tower), functools.partial(encode, d_tower), loss_fn, params,
                q_in, d_in)

    def unchunked(dtype):
        enc_q, enc_d, loss_fn, params, q_in, d_in = setup(dtype)
        loss = loss_fn(enc_q(q_in), enc_d(d_in))
        return loss.detach(), dict(zip(map(str, range(len(params))), torch.autograd.grad(loss, params)))

    enc_q, enc_d, loss_fn, params, q_in, d_in = setup(torch.float32)
    loss = GradCache([enc_q, enc_d], [2, 3], loss_fn).step(q_in, d_in)
    got = {str(i): p.grad for i, p in enumerate(params)}
    (loss_hp, want_hp), (loss_lp, want_lp) = unchunked(torch.float64), unchunked(torch.float32)
    assert_close_to_oracle(loss, loss_hp, loss_lp, atol=scaled_atol(loss_hp, torch.float32), name="loss")
    assert_grads_close_to_oracle(got, want_hp, want_lp)


def test_loss_kwargs_are_forwarded():
    enc = make_encoder().eval()
    queries, docs = batch()
    loss = GradCache(enc, 4, contrastive_loss).step(queries, docs, temperature=0.5, reduction="sum")
    with torch.no_grad():
        lp = contrastive_loss(enc(queries), enc(docs), temperature=0.5, reduction="sum")
        enc64 = enc.double()
        hp = ref_loss.contrastive_loss(enc64(queries.double()), enc64(docs.double()), temperature=0.5,
                                       reduction="sum", dtype=torch.float64)
    assert_close_to_oracle(loss, hp, lp, atol=scaled_atol(hp, torch.float32))
    # Without the kwargs (temperature 0.02, mean) the loss differs: they were forwarded.
    assert not torch.allclose(GradCache(enc.float(), 4, contrastive_loss).step(queries, docs), lp)


@pytest.mark.parametrize(
    "make, err, pattern",
    [
        (lambda e: GradCache(e, 0, LOSS), ValueError, r"^chunk_sizes: "),
        (lambda e: GradCache(e, [2, True], LOSS), ValueError, r"^chunk_sizes: "),
        (lambda e: GradCache(e, 2.0, LOSS), TypeError, r"^chunk_sizes: expected a positive int or a sequence"),
        (lambda e: GradCache(e, [2, 2.5], LOSS), ValueError, r"^chunk_sizes: expected positive ints"),
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
    with pytest.raises(TypeError, match=r"^encoders: the encoder of inputs\[0\] returned dtype torch.int64"):
        GradCache(lambda x: enc(x).long(), 2, LOSS).step(queries, docs)
    with pytest.raises(ValueError, match=r"^encoders: the encoder of inputs\[0\] returned 1 rows for a chunk of 2"):
        GradCache(lambda x: enc(x)[:1], 2, LOSS).step(queries, docs)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx(), pytest.raises(RuntimeError, match=r"^GradCache.step: gradients are disabled"):
            GradCache(enc, 2, LOSS).step(queries, docs)
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
    # CUDA's dropout may draw other masks in fp64 than in fp32, so no fp64 oracle here: the
    # fp32 unchunked step, to 64 units of fp32 rounding at each gradient's magnitude (the
    # reductions are a few dozen terms long).
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=scaled_atol(loss_ref, torch.float32, 64))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=scaled_atol(want[name], torch.float32, 64))
