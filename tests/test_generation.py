"""GritModel.generate against transformers' generate on the same checkpoint (the oracle):
token for token for every deterministic configuration (greedy, beam search, sampling with
top_k=1), for Mistral and Mixtral, batched and left-padded; scores against transformers'
scores; and the arguments it cannot honour rejected by name."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grit_models as gm  # noqa: E402
from grit_models.testing import make_checkpoint  # noqa: E402

PROMPTS = [[1, 11, 12, 13, 14, 15, 16], [1, 21, 22], [1, 31, 32, 33, 34]]


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def pair(request, tmp_path_factory):
    """(ours, transformers' model, checkpoint path) for one tiny random checkpoint."""
    arch = request.param
    path = make_checkpoint(tmp_path_factory.mktemp(arch) / "m", arch, seed=11)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = gm.GritModel(str(path), device="cpu")
    return ours, theirs, path


def left_padded(pad=2):
    S = max(map(len, PROMPTS))
    ids = torch.tensor([[pad] * (S - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


DETERMINISTIC = {
    "greedy": dict(max_new_tokens=12, do_sample=False),
    "greedy-default-length": dict(do_sample=False),  # max_length 20 means 20 new tokens
    "two-eos-min-new": dict(max_new_tokens=10, eos_token_id=[2, 5], min_new_tokens=4, do_sample=False),
    "repetition-ngram": dict(max_new_tokens=14, repetition_penalty=1.3, no_repeat_ngram_size=2, do_sample=False),
    "bad-words": dict(max_new_tokens=10, bad_words_ids=[[7], [8, 9]], do_sample=False),
    "max-length": dict(max_length=15, do_sample=False),
    "top-k-1": dict(max_new_tokens=10, do_sample=True, top_k=1, temperature=0.7),
    "beams": dict(max_new_tokens=8, num_beams=3, do_sample=False),
    "beams-return-2": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, length_penalty=0.7,
                           do_sample=False),
    "beams-early": dict(max_new_tokens=8, num_beams=4, early_stopping=True, eos_token_id=[2, 6], do_sample=False),
    "beams-never": dict(max_new_tokens=8, num_beams=2, early_stopping="never", length_penalty=1.5, do_sample=False),
    # Many EOS ids: hypotheses finish at different lengths, so the length penalty decides.
    "beams-finish-long": dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, eos_token_id=list(range(2, 40)),
                              length_penalty=3.0, do_sample=False),
    "beams-finish-short": dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, eos_token_id=list(range(2, 40)),
                               length_penalty=-2.0, early_stopping=True, do_sample=False),
    # transformers' static cache; here the same cache (a CUDA graph decode on a GPU).
    "greedy-static": dict(max_new_tokens=12, do_sample=False, cache_implementation="static"),
}


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_same_tokens_as_transformers(pair, name):
    ours, theirs, _ = pair
    kw = DETERMINISTIC[name]
    ids, mask = left_padded()
    want = theirs.generate(input_ids=ids, attention_mask=mask, **kw)
    got = ours.generate(ids, mask, **kw)
    assert got.tolist() == want.tolist()


def test_generation_config_object_and_checkpoint_defaults(pair):
    ours, theirs, path = pair
    ids, mask = left_padded()
    cfg = transformers.GenerationConfig.from_pretrained(path)
    cfg.max_new_tokens, cfg.num_beams = 6, 2
    assert ours.generate(ids, mask, generation_config=cfg).tolist() == \
        theirs.generate(input_ids=ids, attention_mask=mask, generation_config=cfg).tolist()
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id


def test_scores_and_dict_output_like_transformers(pair):
    ours, theirs, _ = pair
    ids, mask = left_padded()
    for kw in (dict(max_new_tokens=5), dict(max_new_tokens=5, num_beams=2, num_return_sequences=2)):
        kw = dict(kw, return_dict_in_generate=True, output_scores=True, output_logits=True, do_sample=False)
        want = theirs.generate(input_ids=ids, attention_mask=mask, **kw)
        got = ours.generate(ids, mask, **kw)
        assert type(got).__name__ == type(want).__name__
        assert got.sequences.tolist() == want.sequences.tolist()
        assert len(got.scores) == len(want.scores)
        for g, w in zip(got.scores, want.scores):
            fin = torch.isfinite(w)
            assert torch.equal(torch.isfinite(g), fin)
            torch.testing.assert_close(g[fin], w[fin], atol=2e-4, rtol=1e-4)
        for g, w in zip(got.logits, want.logits):
            torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)
        if "num_beams" in kw:
            torch.testing.assert_close(got.sequences_scores, want.sequences_scores, atol=2e-4, rtol=1e-4)
            assert got.beam_indices.tolist() == want.beam_indices.tolist()


def test_user_processor_stopping_criteria_and_streamer(pair):
    ours, theirs, _ = pair
    ids, mask = left_padded()

    class Ban(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.index_fill(1, torch.tensor([3, 4]), float("-inf"))

    class After(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 5, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    one, s1 = ids[1:2, -3:], Collect()
    kw = dict(max_new_tokens=9, do_sample=False)
    want = theirs.generate(input_ids=ids, attention_mask=mask, logits_processor=transformers.LogitsProcessorList([Ban()]),
                           stopping_criteria=transformers.StoppingCriteriaList([After()]), **kw)
    got = ours.generate(ids, mask, logits_processor=[Ban()], stopping_criteria=[After()], **kw)
    assert got.tolist() == want.tolist() and got.shape[1] == ids.shape[1] + 5
    s2 = Collect()
    theirs.generate(input_ids=one, streamer=s2, **kw)
    ours.generate(one, streamer=s1, **kw)
    assert s1.calls == s2.calls and s1.calls[-1] == "end"


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory):
    """A tiny Mistral with Mistral-7B's real tokenizer (stop strings need real token text)."""
    path = make_checkpoint(tmp_path_factory.mktemp("spm") / "m", "mistral", seed=12, tokenizer="mistral")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return gm.GritModel(str(path), device="cpu"), theirs


def test_stop_strings_with_the_tokenizer(sentencepiece_pair):
    ours, theirs = sentencepiece_pair
    tok = ours.tokenizer
    ids = tok(["<|user|>\nWrite a poem\n<|assistant|>\n"], return_tensors="pt")["input_ids"]
    free = ours.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    stop = tok.decode(free[3:5])  # the text of the 4th and 5th new tokens
    want = theirs.generate(input_ids=ids, max_new_tokens=10, do_sample=False, stop_strings=[stop], tokenizer=tok)
    got = ours.generate(ids, max_new_tokens=10, do_sample=False, stop_strings=[stop])
    assert got.tolist() == want.tolist() and got.shape[1] < ids.shape[1] + 10


def test_inference_and_no_grad_modes(pair):
    ours, _, _ = pair
    ids, mask = left_padded()
    plain = ours.generate(ids, mask, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=4, do_sample=False), plain)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=4, do_sample=False), plain)


def test_batch_encoding_input(pair):
    """What ``tokenizer(..., return_tensors="pt")`` and ``apply_chat_template`` return."""
    ours, _, _ = pair
    ids, mask = left_padded()
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(ours.generate(enc, max_new_tokens=4), ours.generate(ids, mask, max_new_tokens=4))


@pytest.mark.parametrize("kw, match", [
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(output_attentions=True), "output_attentions"),
    (dict(assistant_model=object()), "assistant_model"),
    (dict(not_a_field=1), "not_a_field"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(cache_implementation="offloaded"), "cache_implementation"),
    (dict(stop_strings=["x"], tokenizer=None), "stop_strings"),
])
def test_what_cannot_be_honoured_is_rejected(pair, kw, match):
    ours, _, _ = pair
    with pytest.raises((ValueError, TypeError), match=match):
        ours.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=3, **kw)


@pytest.mark.parametrize("name", ["greedy", "beams"])
def test_compiled_static_decode_gives_the_eager_tokens_with_one_graph(pair, name):
    """cache_implementation='static' with a compile_config (transformers' opt-in) decodes
    through torch.compile off a GPU: the eager tokens, one compiled graph for every token and
    for a second call of the same shape, and disable_compile still decodes eagerly."""
    from transformers import CompileConfig

    ours, _, _ = pair
    ids, mask = left_padded()
    kw = DETERMINISTIC[name]
    eager = ours.generate(ids, mask, **kw)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cc = CompileConfig(backend="eager", fullgraph=True)  # dynamo's tracing without inductor's build
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = ours.generate(ids, mask, cache_implementation="static", compile_config=cc, **kw)
        again = ours.generate(ids, mask, cache_implementation="static", compile_config=cc, **kw)
    assert first.tolist() == again.tolist() == eager.tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.utils.counters.clear()
    off = ours.generate(ids, mask, cache_implementation="static", compile_config=cc, disable_compile=True, **kw)
    assert off.tolist() == eager.tolist()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["greedy", "two-eos-min-new", "beams", "top-k-1"])
def test_cuda_graph_decode_gives_the_eager_tokens(tmp_path, name):
    """cache_implementation='static' captures the decode step in a CUDA graph and replays it
    per token: the same tokens as eager decoding, and as transformers."""
    path = make_checkpoint(tmp_path / "m", "mistral", seed=11)
    ours = gm.GritModel(str(path), device="cuda")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids, mask = (t.cuda() for t in left_padded())
    kw = DETERMINISTIC[name]
    eager = ours.generate(ids, mask, **kw)
    graph = ours.generate(ids, mask, cache_implementation="static", **kw)
    assert graph.tolist() == eager.tolist()
    assert graph.tolist() == theirs.generate(input_ids=ids, attention_mask=mask, **kw).tolist()
