"""GritModel against gritlm.GritLM (embeddings, caches, RAG caching modes) on a tiny random
checkpoint with a word-level tokenizer; both load the same files. fp32 throughout.

gritlm's RAG code (rag/eval.py in the gritlm repository) is re-enacted here with gritlm.GritLM
and transformers' generate as the oracle for every caching mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# transformers 5: gritlm's `is_causal=False` is honoured, DynamicCache(ddp_cache_data=...)
DynamicCache = pytest.importorskip("transformers", minversion="5.0").DynamicCache

import grit_models as gm
from helpers import assert_close_reordered
from grit_models.testing import make_checkpoint, random_texts

gritlm = pytest.importorskip("gritlm")

INSTRUCTION = gm.gritlm_instruction_format("represent the question to retrieve a passage")
TEXTS = random_texts(12, 1, 40, seed=0) + ["paris", "the capital of france is paris"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # No sliding window: transformers 5 applies Mistral's window to bidirectional passes too,
    # gritlm as trained (sdpa) did not; grit_models follows the latter (see test_model.py for
    # the window in causal passes).
    return make_checkpoint(tmp_path_factory.mktemp("grit") / "m", "mistral", seed=5)


@pytest.fixture(scope="module")
def ref(ckpt):
    return gritlm.GritLM(str(ckpt), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(ckpt):
    return gm.GritModel(str(ckpt), device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "weightedmean", "lasttoken", "cls"])
@pytest.mark.parametrize("instruction", ["", INSTRUCTION])
def test_embeddings_match_gritlm(ref, ours, pooling, instruction):
    ref.pooling_method = ours.pooling_method = pooling
    want = ref.encode(TEXTS, instruction=instruction, batch_size=5)
    got = ours.encode(TEXTS, instruction=instruction, batch_size=5)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    if instruction and "mean" in pooling:  # the instruction really is left out of the mean
        assert np.abs(ours.encode(TEXTS, instruction=instruction, embed_instruction=True) - got).max() > 1e-3


@pytest.mark.parametrize("kwargs", [
    dict(max_length=10, instruction=INSTRUCTION),    # truncation cuts into the 13-token instruction
    dict(max_length=20, instruction=INSTRUCTION),    # into the texts (16..53 tokens)
    dict(embed_instruction=True, instruction=INSTRUCTION),
    dict(add_special_tokens=False, instruction=INSTRUCTION),
    dict(max_length=None),
])
def test_embedding_options_match_gritlm(ref, ours, kwargs):
    ref.pooling_method = ours.pooling_method = "mean"
    want = ref.encode(TEXTS, **kwargs)
    got = ours.encode(TEXTS, **kwargs)
    # gritlm gives NaN for a row whose every token is instruction (0/0); grit_models gives zeros
    ok = ~np.isnan(want).any(axis=1)
    if kwargs.get("max_length") != 10:
        assert ok.all()
    np.testing.assert_allclose(got[ok], want[ok], atol=2e-6, rtol=1e-5)
    assert np.all(got[~ok] == 0)


def test_mixtral_embeddings_match_gritlm(tmp_path):
    path = make_checkpoint(tmp_path / "mix", "mixtral", seed=6)
    r = gritlm.GritLM(str(path), device="cpu", dtype=torch.float32, pooling_method="weightedmean")
    g = gm.GritModel(str(path), device="cpu", pooling_method="weightedmean")
    np.testing.assert_allclose(g.encode(TEXTS, instruction=INSTRUCTION), r.encode(TEXTS, instruction=INSTRUCTION),
                               atol=2e-6, rtol=1e-5)


def test_causal_embeddings_and_flags(ckpt, ref):
    ref.pooling_method = "mean"
    for attn in ("cccc", "cc"):
        g = gm.GritModel(str(ckpt), device="cpu", attn=attn, normalized=False)
        ref.attn, ref.normalized = attn, False
        try:
            np.testing.assert_allclose(g.encode(TEXTS, instruction=INSTRUCTION),
                                       ref.encode(TEXTS, instruction=INSTRUCTION), atol=2e-6, rtol=1e-5)
        finally:
            ref.attn, ref.normalized = "bbcc", True


def test_projection_embed_eos_and_return_types(ckpt, ref, ours):
    g = gm.GritModel(str(ckpt), device="cpu", projection=16, embed_eos="</s>")
    r = gritlm.GritLM(str(ckpt), device="cpu", dtype=torch.float32, projection=16, embed_eos="</s>")
    g.projection.load_state_dict(r.projection.state_dict())  # both are randomly initialised
    np.testing.assert_allclose(g.encode(TEXTS, instruction=INSTRUCTION), r.encode(TEXTS, instruction=INSTRUCTION),
                               atol=2e-6, rtol=1e-5)
    one = ours.encode("paris is big")
    assert one.shape == (64,)
    t = ours.encode(["paris is big"], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0].numpy(), one)
    docs = [{"title": "paris", "text": "the capital of france"}, {"text": "a river"}]
    np.testing.assert_allclose(ours.encode_corpus(docs), ref.encode_corpus(docs), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(ours.encode_queries(TEXTS[:3]), ref.encode_queries(TEXTS[:3]), atol=2e-6, rtol=1e-5)


def model_terms(model) -> int:
    """The longest chain of fp32 additions behind one embedding element: each layer's
    projections (hidden and MLP widths) and the pooling over the texts' tokens. Batching
    texts differently only changes the order of those sums (matmul blocking)."""
    cfg = model.config
    return cfg.num_hidden_layers * (cfg.hidden_size + cfg.intermediate_size) + 256


def test_embedding_independent_of_batch_mates(ours):
    ours.pooling_method = "mean"
    alone = ours.encode([TEXTS[3]], instruction=INSTRUCTION)[0]
    for batch_size in (1, 3, 64):
        crowd = ours.encode(TEXTS, instruction=INSTRUCTION, batch_size=batch_size)
        assert_close_reordered(crowd[3], alone, n_terms=model_terms(ours), name=f"batch_size={batch_size}")
    shuffled = ours.encode(TEXTS[::-1], instruction=INSTRUCTION)
    assert_close_reordered(shuffled[::-1].copy(), ours.encode(TEXTS, instruction=INSTRUCTION),
                           n_terms=model_terms(ours), name="shuffled")


def test_get_cache_matches_gritlm(ref, ours):
    """Per-text caches equal the real-token part of gritlm's padded batch cache."""
    docs = ["the capital of france is paris", "a big river"]
    _, want = ref.encode_corpus(docs, get_cache=True, instruction="<|embed|>\n", convert_to_tensor=True)
    emb, got = ours.encode_corpus(docs, get_cache=True, instruction="<|embed|>\n", convert_to_tensor=True)
    lengths = [len(ours.tokenizer.encode("<|embed|>\n" + d)) for d in docs]
    assert [c.length for c in got] == lengths
    for b, n in enumerate(lengths):
        for layer in range(2):
            torch.testing.assert_close(got[b].k[layer], want.layers[layer].keys[b, :, :n].transpose(0, 1),
                                       atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got[b].v[layer], want.layers[layer].values[b, :, :n].transpose(0, 1),
                                       atol=2e-6, rtol=1e-5)


def test_generate_matches_gritlm_passthrough(ref, ours):
    prompts = ["<|user|>\nwhat is the capital of france\n<|assistant|>\n", "<|user|>\nhello\n<|assistant|>\n"]
    ref.tokenizer.padding_side = "left"
    try:
        inputs = ref.tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        ref.tokenizer.padding_side = "right"
    want = ref.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=2)
    got = ours.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=2)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------
# RAG caching: gritlm's rag/eval.py re-enacted with gritlm.GritLM + transformers as oracle
# ---------------------------------------------------------------------------------------

QUERY = "what is the capital of france"
DOC = {"title": "paris", "text": "paris is the capital of france and a big city on a river"}
_ASSISTANT = "\n<|assistant|>\n"
_REF_FORMATS = {
    None: ("<|user|>\n{title} {text}\n\n{query}\n\nAnswer the prior query while optionally using the context "
           "prior to it" + _ASSISTANT),
    "query": ("\n<|user|>\n{title} {text}\n\nOptionally using the prior context answer the query prior to it"
              + _ASSISTANT),
    "doc": "\n<|user|>\n{query}\n\nAnswer the prior query while optionally using the context prior to it" + _ASSISTANT,
    "docquery": "\n<|user|>\nAnswer the prior query while optionally using the context prior to it" + _ASSISTANT,
    "querydoc": "\n<|user|>\nOptionally using the prior context answer the query prior to it" + _ASSISTANT,
}


def _layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def gritlm_rag(model, mode, n_new=8):
    kv = None
    if mode is not None and "query" in mode:
        _, qc = model.encode_queries([QUERY], get_cache=True, convert_to_tensor=True, instruction="<|embed|>\n")
        kv = _layers(qc)
    if mode is not None and "doc" in mode:
        dc = _layers(model.encode_corpus([DOC], get_cache=True, convert_to_tensor=False,
                                         instruction="\n<|embed|>\n" if mode == "querydoc" else "<|embed|>\n",
                                         add_special_tokens=mode != "querydoc")[1])
        if kv is None:
            kv = dc
        elif mode == "docquery":
            kv = [(torch.cat((d[0], q[0]), 2), torch.cat((d[1], q[1]), 2)) for d, q in zip(dc, kv)]
        else:
            kv = [(torch.cat((q[0], d[0]), 2), torch.cat((q[1], d[1]), 2)) for d, q in zip(dc, kv)]
    text = _REF_FORMATS[mode].format(query=QUERY, **DOC) + "The answer is"
    inputs = model.tokenizer(text, return_tensors="pt", add_special_tokens=mode is None)
    kwargs = {}
    if kv is not None:
        inputs["attention_mask"] = torch.cat((torch.ones(1, kv[0][0].shape[2], dtype=torch.long),
                                              inputs["attention_mask"]), 1)
        kwargs["past_key_values"] = DynamicCache(ddp_cache_data=kv)
    out = model.generate(**inputs, min_new_tokens=n_new, max_new_tokens=n_new, do_sample=False,
                         pad_token_id=2, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("mode", [None, "doc", "query", "docquery", "querydoc"])
def test_rag_modes_match_gritlm(ref, ours, mode):
    """Doc caching equals generation after the bidirectional prefix computed by the reference;
    likewise for the other modes (each cache at its own positions)."""
    want = gritlm_rag(ref, mode)
    got = ours.rag(QUERY, [DOC], cache=mode, max_new_tokens=8, min_new_tokens=8, return_ids=True)
    assert torch.equal(got, want), f"{mode}: {got.tolist()} != {want.tolist()}"


def test_rag_modes_differ_and_precomputed_caches(ours):
    outs = {m: ours.rag(QUERY, DOC, cache=m, max_new_tokens=8, min_new_tokens=8, return_ids=True)
            for m in ("doc", "query", None)}
    assert not torch.equal(outs["doc"], outs[None]) or not torch.equal(outs["query"], outs[None])
    caches = gm.cache_documents(ours, [DOC], cache="doc")
    again = ours.rag(QUERY, DOC, cache="doc", doc_caches=caches, max_new_tokens=8, min_new_tokens=8, return_ids=True)
    assert torch.equal(again, outs["doc"])


def test_batched_generation_after_unpadded_caches(ours):
    """Rows whose caches have different lengths, batched, equal each row run alone."""
    docs = ["paris is the capital of france", "a river", "the blue sky is big and the sun is hot"]
    _, caches = ours.encode_corpus(docs, get_cache=True, instruction="<|embed|>\n")
    tok = ours.tokenizer
    prompts = ["\n<|user|>\nwhat is it\n<|assistant|>\n", "\n<|user|>\nwhy\n<|assistant|>\n",
               "\n<|user|>\nwhere is the sun\n<|assistant|>\n"]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    S = max(map(len, ids))
    batch = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for b, x in enumerate(ids):
        batch[b, S - len(x):], mask[b, S - len(x):] = torch.tensor(x), 1
    out = ours.generate(batch, mask, past_key_values=caches, max_new_tokens=6, eos_token_id=[])
    for b in range(3):
        alone = ours.generate(torch.tensor([ids[b]]), past_key_values=caches[b], max_new_tokens=6, eos_token_id=[])
        assert torch.equal(out[b, S:], alone[0, len(ids[b]):]), b


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def test_bad_input(ckpt, ours, tmp_path):
    with pytest.raises(ValueError, match="sentences"):
        ours.encode([])
    with pytest.raises(TypeError, match="sentences"):
        ours.encode([1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        ours.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        ours.encode(["a"], max_length=0)
    with pytest.raises(ValueError, match="pooling_method"):
        gm.GritModel(str(ckpt), device="cpu", pooling_method="max")
    with pytest.raises(ValueError, match="attn"):
        gm.GritModel(str(ckpt), device="cpu", attn="bbbb")
    with pytest.raises(ValueError, match="mode"):
        gm.GritModel(str(ckpt), device="cpu", mode="both")
    with pytest.raises(ValueError, match="torch_dtype"):
        gm.GritModel(str(ckpt), device="cpu", torch_dtype="float64")
    with pytest.raises(ValueError, match="embed_eos"):
        gm.GritModel(str(ckpt), device="cpu", embed_eos="<eos-not-there>")
    with pytest.raises(TypeError, match="unexpected keyword"):
        gm.GritModel(str(ckpt), device="cpu", pooling="mean")
    with pytest.raises(FileNotFoundError, match="config.json"):
        gm.GritModel(str(tmp_path), device="cpu")
    emb_only = gm.GritModel(str(ckpt), device="cpu", mode="embedding")
    assert emb_only.model.lm_head is None and emb_only.encode("paris").shape == (64,)
    with pytest.raises(RuntimeError, match="embedding"):
        emb_only.generate(torch.tensor([[1, 5]]))
    with pytest.raises(ValueError, match="cache"):
        ours.rag(QUERY, DOC, cache="both")
    with pytest.raises(ValueError, match="documents"):
        ours.rag(QUERY, [], cache="doc")
    with pytest.raises(ValueError, match="doc_caches"):
        ours.rag(QUERY, [DOC, DOC], cache="doc", doc_caches=gm.cache_documents(ours, [DOC]))


def test_progress_bar_for_long_inputs(ours, capsys):
    """Like gritlm: a tqdm bar over the batches from 256 texts on, none below."""
    few = ours.encode(TEXTS, batch_size=4)
    assert "Batches" not in capsys.readouterr().err
    many = ours.encode(TEXTS * 20, batch_size=64)
    assert "Batches" in capsys.readouterr().err
    assert_close_reordered(many[:len(TEXTS)], few, n_terms=model_terms(ours))


def test_device_none_and_a_missing_gpu(ckpt):
    """device=None is gritlm's default (CUDA when available, else CPU); asking for a CUDA
    device that is not there says so instead of failing inside the loader."""
    model = gm.GritModel(str(ckpt), device=None)
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asked for, but no CUDA device is available"):
            gm.GritModel(str(ckpt), device="cuda")
    with pytest.raises(ValueError, match="device: 'tpu9' is not a device"):
        gm.GritModel(str(ckpt), device="tpu9")


def test_generate_rejects_text_and_ragged_prompts(ours):
    with pytest.raises(TypeError, match="input_ids: expected token ids .* got text"):
        ours.generate("what is the capital of france ?")
    with pytest.raises(TypeError, match="input_ids: expected token ids .* got text"):
        ours.generate(["a prompt", "another"])
    with pytest.raises(ValueError, match=r"input_ids: rows of different lengths \[2, 3\]; pad them"):
        ours.generate([[1, 5, 6], [1, 7]], max_new_tokens=2)
