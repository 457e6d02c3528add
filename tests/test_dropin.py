"""GritModel as a drop-in for gritlm.GritLM: gritlm's own README examples with only the
import changed, the real Mistral-7B tokenizer against gritlm, loading like gritlm (hub ids
from a Hugging Face cache, every keyword honoured or rejected by name, device=None,
``.device == "cpu"``), any sequence of texts, and gritlm's cache layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gritlm = pytest.importorskip("gritlm")

import grit_models as gm  # noqa: E402
from grit_models.generation import KVPrefix  # noqa: E402
from grit_models.testing import make_checkpoint, random_texts  # noqa: E402


@pytest.fixture(scope="module")
def spm_ckpt(tmp_path_factory):
    """A tiny random Mistral with Mistral-7B's real sentencepiece tokenizer (32000 tokens)."""
    return make_checkpoint(tmp_path_factory.mktemp("spm") / "m", "mistral", seed=3, tokenizer="mistral")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("word") / "m", "mistral", seed=4)


# Strings where sentencepiece details matter: the "▁" prefix, byte fallback, "<0x0A>"
# newlines, special-token text around <|embed|>, leading/trailing/multiple spaces, </s> as text.
TRICKY = [
    "hello world", " hello", "hello ", "  two  spaces", "\n", "line one\nline two\n\n", "<|embed|>",
    "<|user|>\nquestion\n<|embed|>\nanswer", "</s> inside", "<s>", "naïve café résumé", "日本語のテキスト",
    "emoji 🙂🚀 mixed", "tab\tseparated", "x" * 300, "1234567890 3.14159", "a\u200bzero-width", "",
    "Ünïcödé", "https://example.com/path?q=1&r=2", "C++ / C# / F#", "'quoted' \"double\"",
]


def test_tokenizer_is_transformers_with_gritlm_settings(spm_ckpt):
    ours = gm.GritModel(str(spm_ckpt), device="cpu")
    ref = gritlm.GritLM(str(spm_ckpt), device="cpu", torch_dtype=torch.float32)
    tok = ours.tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerBase) and len(tok) == 32000
    assert (tok.pad_token, tok.padding_side) == (ref.tokenizer.pad_token, ref.tokenizer.padding_side) == ("</s>", "right")
    batch = tok(["a cat", "a much longer text here"], return_tensors="pt", padding=True)
    want = ref.tokenizer(["a cat", "a much longer text here"], return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], want["input_ids"])


def test_real_tokenizer_embeddings_and_ids_match_gritlm(spm_ckpt):
    """3,000+ texts through the real tokenizer: gritlm's token ids (its padded batch, padding
    removed) and its instruction length are what reach the model, and the embeddings agree."""
    ours = gm.GritModel(str(spm_ckpt), device="cpu")
    ref = gritlm.GritLM(str(spm_ckpt), device="cpu", torch_dtype=torch.float32)
    texts = TRICKY + [t.replace(" ", "  ") if i % 3 == 0 else t.title() for i, t in
                      enumerate(random_texts(3000, 1, 12, seed=9))]
    seen = []
    orig = ours._encode_packed
    ours._encode_packed = lambda ids, skip, *a: (seen.append((ids, skip)), orig(ids, skip, *a))[1]
    instruction = gm.gritlm_instruction_format("Represent the question for retrieving passages")
    for inst in ("", instruction):
        for max_length in (512, 7):
            seen.clear()
            got = ours.encode(texts, instruction=inst, max_length=max_length, batch_size=1024)
            enc = ref.tokenizer([inst + t for t in texts], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
            want_ids = sorted(ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"]))
            assert sorted(x for ids, _ in seen for x in ids) == want_ids
            if inst:
                n = len(ref.tokenizer(inst, truncation=True, max_length=max_length)["input_ids"])
                assert {skip for _, skip in seen} == {n}
            sample = texts[:40]
            mine = ours.encode(sample, instruction=inst, max_length=max_length)
            theirs = ref.encode(sample, instruction=inst, max_length=max_length)
            # Rows whose instruction fills max_length pool nothing: gritlm divides 0 by 0 (NaN),
            # GritModel gives zeros (documented); every other row must agree.
            empty = np.isnan(theirs).any(axis=1)
            assert (mine[empty] == 0).all() and not np.isnan(mine).any()
            np.testing.assert_allclose(mine[~empty], theirs[~empty], atol=2e-6, rtol=1e-5)
            assert got.shape == (len(texts), ours.config.hidden_size)


def test_gritlm_readme_examples_run_unchanged(spm_ckpt, capsys):
    """gritlm's README (embedding, then chat-template generation), with only the import line
    changed and the hub id replaced by the local checkpoint."""
    path = str(spm_ckpt)
    from scipy.spatial.distance import cosine

    from grit_models import GritLM

    model = GritLM(path, torch_dtype="auto")
    queries = ['Bitcoin: A Peer-to-Peer Electronic Cash System', 'Generative Representational Instruction Tuning']
    documents = ["A purely peer-to-peer version of electronic cash would allow online payments to be sent "
                 "directly from one party to another without going through a financial institution.",
                 "All text-based language problems can be reduced to either generation or embedding."]

    def gritlm_instruction(instruction):
        return "<|user|>\n" + instruction + "\n<|embed|>\n" if instruction else "<|embed|>\n"

    d_rep = model.encode(documents, instruction=gritlm_instruction(""))
    q_rep = model.encode(queries, instruction=gritlm_instruction("Given a scientific paper title, retrieve the "
                                                                 "paper's abstract"))
    cosine_sim_q0_d0 = 1 - cosine(q_rep[0], d_rep[0])
    print("Cosine similarity between \"%s\" and \"%s\" is: %.3f" % (queries[0][:15], documents[0][:15],
                                                                   cosine_sim_q0_d0))
    messages = [{"role": "user", "content": "Please write me a poem about my recent hike of Mt. Fuji."}]
    encoded = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    encoded = encoded.to(model.device)
    gen = model.generate(encoded, max_new_tokens=16, do_sample=False)
    decoded = model.tokenizer.batch_decode(gen)
    print(decoded[0])

    ref = gritlm.GritLM(path, device="cpu", torch_dtype=torch.float32)
    np.testing.assert_allclose(d_rep, ref.encode(documents, instruction=gritlm_instruction("")), atol=2e-6, rtol=1e-5)
    want = ref.model.generate(**ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                  return_tensors="pt"), max_new_tokens=16,
                              do_sample=False)
    assert gen.tolist() == want.tolist()
    assert decoded[0].startswith("<s><|user|>\nPlease write me a poem")


def test_gritlm_cache_layout_works_or_says_what_to_use(ckpt):
    model = gm.GritModel(str(ckpt), device="cpu")
    docs = random_texts(3, 3, 9, seed=1)
    _, caches = model.encode(docs, instruction="<|embed|>\n", get_cache=True)
    assert len(caches) == 3 and all(isinstance(c, KVPrefix) for c in caches)
    with pytest.raises(TypeError, match="to_legacy"):
        caches[0][0]  # gritlm's cache[layer][0]
    legacy = KVPrefix.to_legacy(caches[:1])  # gritlm's per-layer (k, v) of the batch, (B, Hkv, L, Dh)
    assert len(legacy) == model.config.num_hidden_layers and legacy[0][0].shape[2] == caches[0].length
    prompt = torch.tensor([model.tokenizer("\n<|user|>\nwhy\n<|assistant|>\n", add_special_tokens=False)["input_ids"]])
    a = model.generate(prompt, past_key_values=caches[0], max_new_tokens=5, do_sample=False)
    b = model.generate(prompt, past_key_values=legacy, max_new_tokens=5, do_sample=False)
    dyn = transformers.DynamicCache()
    for layer, (k, v) in enumerate(legacy):
        dyn.update(k, v, layer)
    c = model.generate(prompt, past_key_values=dyn, max_new_tokens=5, do_sample=False)
    assert a.tolist() == b.tolist() == c.tolist()


def test_device_like_gritlm(ckpt):
    model = gm.GritModel(str(ckpt), device=None)  # gritlm's default: CUDA when available
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device == want and model.device.type == want and want == model.device
    assert torch.zeros(1).to(model.device).device.type == want
    assert model.device != "meta"


def test_any_sequence_of_texts(ckpt):
    model = gm.GritModel(str(ckpt), device="cpu")
    texts = random_texts(5, 2, 8, seed=2)
    want = model.encode(texts, batch_size=2, max_length=64)  # the same batches: the same sums
    pandas = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    column = datasets.Dataset.from_dict({"text": texts})["text"]  # dataset["text"], as users pass it
    for seq in (tuple(texts), np.array(texts), pandas.Series(texts), (t for t in texts), column):
        np.testing.assert_array_equal(model.encode(seq, batch_size=np.int64(2), max_length=np.int32(64)), want)
    with pytest.raises(TypeError, match=r"sentences\[2\]: expected a string, got int"):
        model.encode(texts[:2] + [7])
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(texts, batch_size=2.0)


def _hf_cache(cache_dir, repo: str, src):
    """A Hugging Face hub cache holding ``src`` as ``repo`` at main (the layout huggingface_hub
    writes: models--owner--name/{refs/main, snapshots/<commit>/...})."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache_dir / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit


def test_hub_id_from_the_cache_offline(ckpt, tmp_path, monkeypatch):
    _hf_cache(tmp_path / "hub", "GritLM/GritLM-tiny", ckpt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = gm.GritModel("GritLM/GritLM-tiny", device="cpu", cache_dir=str(tmp_path / "hub"), revision="main")
    local = gm.GritModel(str(ckpt), device="cpu")
    np.testing.assert_array_equal(model.encode(["a test"]), local.encode(["a test"]))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        gm.GritModel("GritLM/not-there", device="cpu", cache_dir=str(tmp_path / "hub"), local_files_only=True)


@pytest.mark.parametrize("kw", [dict(attn_implementation="sdpa"), dict(attn_implementation="flash_attention_2"),
                                dict(trust_remote_code=True), dict(low_cpu_mem_usage=True),
                                dict(torch_dtype=torch.float32), dict(dtype="float32"), dict(device_map="cpu"),
                                dict(device_map="auto"), dict(device_map={"": "cpu"})])
def test_gritlm_keywords_honoured(ckpt, kw):
    model = gm.GritModel(str(ckpt), device="cpu", **kw)
    assert model.encode(["x y"]).shape == (1, model.config.hidden_size)


@pytest.mark.parametrize("kw, match", [
    (dict(device_map={"model.layers": "cpu"}), "device_map"), (dict(max_memory={0: "10GB"}), "max_memory"),
    (dict(load_in_8bit=True), "load_in_8bit"), (dict(attn_implementation="paged"), "attn_implementation"),
    (dict(not_an_option=1), "not_an_option"),
])
def test_gritlm_keywords_rejected_by_name(ckpt, kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        gm.GritModel(str(ckpt), device="cpu", **kw)


def test_generation_config_json_gives_the_defaults(ckpt, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(ckpt, path)
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg["max_new_tokens"] = 3
    (path / "generation_config.json").write_text(json.dumps(cfg))
    model = gm.GritModel(str(path), device="cpu")
    ids = torch.tensor([[1, 5, 6]])
    assert model.generate(ids, do_sample=False).shape[1] == 6
    assert model.generate(ids, do_sample=False, max_new_tokens=5).shape[1] == 8


# ---------------------------------------------------------------------------------------
# device_map: the placement plan (CPU) and the real split over every visible GPU
# ---------------------------------------------------------------------------------------

MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=32768)


def _runs(placement):
    """The devices in placement order, each once (layers must sit in contiguous runs)."""
    return list(dict.fromkeys(str(d) for d in placement.values()))


def test_plan_splits_gritlm_8x7b_over_two_80gb_cards():
    from grit_models.config import MistralConfig
    from grit_models.placement import module_sizes, plan

    cfg = MistralConfig.from_dict(MIXTRAL_8X7B, strict=False)
    total = sum(module_sizes(cfg, torch.bfloat16).values())
    assert 90e9 < total < 95e9  # GritLM-8x7B in bf16: does not fit one 80 GB card
    with pytest.raises(ValueError, match="max_memory: the model .* does not fit"):
        plan(cfg, "auto", max_memory={0: "80GB"})
    for how in ("auto", "balanced", "sequential"):
        p = plan(cfg, how, max_memory={0: "80GB", 1: "80GB"})
        assert _runs(p) == ["cuda:0", "cuda:1"]
        assert p["embed"] == p["layers.0"] and p["norm"] == p["lm_head"] == p["layers.31"]
        for dev in ("cuda:0", "cuda:1"):  # every card within its budget
            assert sum(module_sizes(cfg, torch.bfloat16)[m] for m, d in p.items() if str(d) == dev) <= 80e9
    balanced = plan(cfg, "balanced", max_memory={0: "80GB", 1: "80GB"})
    sequential = plan(cfg, "sequential", max_memory={0: "80GB", 1: "80GB"})
    n0 = lambda p: sum(str(d) == "cuda:0" for d in p.values())  # noqa: E731
    assert n0(sequential) > n0(balanced)  # sequential fills card 0 first
    spill = plan(cfg, "sequential", max_memory={0: "60GiB", "cpu": "100GiB"})
    assert _runs(spill) == ["cuda:0", "cpu"]


def test_plan_from_a_dict_and_bad_input():
    from grit_models.config import MistralConfig
    from grit_models.placement import parse_bytes, plan

    cfg = MistralConfig.from_dict(dict(MIXTRAL_8X7B, num_hidden_layers=4), strict=False)
    p = plan(cfg, {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers": 1,
                   "model.norm": 1, "lm_head": "cpu"})
    assert [str(p[m]) for m in ("embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head")] == \
        ["cuda:0", "cuda:0", "cuda:0", "cuda:1", "cuda:1", "cuda:1", "cpu"]
    with pytest.raises(ValueError, match="no entry places 'lm_head'"):
        plan(cfg, {"model": 0})
    with pytest.raises(ValueError, match="disk"):
        plan(cfg, {"": "disk"})
    assert parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("500MB") == 500 * 10**6 and parse_bytes(7) == 7
    with pytest.raises(ValueError, match="max_memory"):
        parse_bytes("lots")


@pytest.mark.gpu
def test_device_map_split_over_every_visible_gpu(tmp_path):
    """The real split: every visible GPU holds layers; embeddings and greedy generations equal
    the single-device model's."""
    if torch.cuda.device_count() < 1:
        pytest.skip("needs a CUDA device")
    path = make_checkpoint(tmp_path / "m", "mixtral", seed=5, num_hidden_layers=4)
    n = torch.cuda.device_count()
    layers_per = -(-4 // n)
    dmap = {"model.embed_tokens": 0, "model.norm": n - 1, "lm_head": n - 1}
    dmap.update({f"model.layers.{i}": min(i // layers_per, n - 1) for i in range(4)})
    split = gm.GritModel(str(path), device_map=dmap, torch_dtype=torch.float32)
    one = gm.GritModel(str(path), device="cuda:0", torch_dtype=torch.float32)
    assert {str(d) for d in split.device_map.values()} == {f"cuda:{i}" for i in range(n)}
    texts = random_texts(6, 2, 20, seed=3)
    np.testing.assert_allclose(split.encode(texts), one.encode(texts), atol=1e-5, rtol=1e-4)
    ids = torch.tensor([[1, 5, 6, 7]], device="cuda:0")
    assert split.generate(ids, max_new_tokens=8, do_sample=False).tolist() == \
        one.generate(ids, max_new_tokens=8, do_sample=False).tolist()
