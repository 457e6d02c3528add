"""grit_models' Mistral/Mixtral against transformers on tiny random checkpoints.

The oracles are transformers' MistralForCausalLM / MixtralForCausalLM loading the very same
files (fp32, so tolerances are tight). Checkpoints are written once per session.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

# transformers 5: `is_causal=False` on the base model, `dtype=` in from_pretrained
transformers = pytest.importorskip("transformers", minversion="5.0")

import grit_models as gm
from grit_models.tokenizer import token_ids
from grit_models.mistral import packed_positions
from grit_models.testing import make_checkpoint

ATOL = 2e-5


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        # window 6 < the test sequences, so the sliding window is exercised
        "mistral_sw": make_checkpoint(root / "mistral_sw", "mistral", sliding_window=6, seed=1),
        "mistral": make_checkpoint(root / "mistral", "mistral", seed=2),
        "mixtral": make_checkpoint(root / "mixtral", "mixtral", seed=3),
        "sharded": make_checkpoint(root / "sharded", "mixtral", seed=4, max_shard_size="40KB"),
    }


_HF = {}


def hf_model(path):
    key = str(path)
    if key not in _HF:
        _HF[key] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF[key]


_OURS = {}


def our_model(path):
    key = str(path)
    if key not in _OURS:
        _OURS[key] = gm.load_checkpoint(path)
    return _OURS[key]


def packed(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)
    return rows, cu


def our_forward(model, rows, cu, causal):
    tokens = torch.cat(rows)
    return model(tokens, packed_positions(cu, tokens.numel()), cu_seqlens=cu,
                 max_seqlen=int(max(r.numel() for r in rows)), causal=causal).hidden


@pytest.mark.parametrize("name", ["mistral_sw", "mixtral"])
def test_logits_match_transformers(ckpts, name):
    ours, hf = our_model(ckpts[name]), hf_model(ckpts[name])
    lengths = [17, 5, 11, 1]
    rows, cu = packed(lengths, ours.config.vocab_size)
    with torch.no_grad():
        logits = ours.logits(our_forward(ours, rows, cu, causal=True))
        for b, r in enumerate(rows):
            ref = hf(r[None]).logits[0]
            got = logits[cu[b]:cu[b + 1]]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-5, msg=f"{name} row {b}")


def test_sliding_window_changes_logits(ckpts):
    """Guards the test above: with window 6 and 17 tokens the window must matter."""
    ours = our_model(ckpts["mistral_sw"])
    hf = hf_model(ckpts["mistral_sw"])
    rows, cu = packed([17], ours.config.vocab_size)
    cfg = transformers.AutoConfig.from_pretrained(ckpts["mistral_sw"])
    cfg.sliding_window = None
    no_window = transformers.MistralForCausalLM(cfg).eval()
    no_window.load_state_dict(hf.state_dict())
    with torch.no_grad():
        far = (no_window(rows[0][None]).logits - hf(rows[0][None]).logits).abs().max()
    assert far > 1e-3


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_bidirectional_hidden_match_transformers(ckpts, name):
    """is_causal=False on the base model (what gritlm.GritLM.encode passes), padded batch."""
    ours, hf = our_model(ckpts[name]), hf_model(ckpts[name])
    lengths = [9, 14, 3]
    rows, cu = packed(lengths, ours.config.vocab_size, seed=1)
    S = max(lengths)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :r.numel()], mask[b, :r.numel()] = r, 1
    with torch.no_grad():
        ref = hf.model(input_ids=ids, attention_mask=mask, is_causal=False).last_hidden_state
        got = our_forward(ours, rows, cu, causal=False)
        causal = our_forward(ours, rows, cu, causal=True)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], ref[b, :n], atol=ATOL, rtol=1e-5)
    assert (got - causal).abs().max() > 1e-3  # the mode really differs


def test_incremental_decode_equals_full_forward(ckpts):
    """Rows of a cache at different lengths: prefill 4 and 1 tokens (row 1 padded, its extra
    keys overwritten later, as generate does), then chunks of 3 and 1 tokens. Each chunk's
    logits equal a full causal forward (window 6 < 16 tokens, so the window matters)."""
    model = our_model(ckpts["mistral_sw"])
    rows, cu = packed([16, 13], model.config.vocab_size, seed=2)
    with torch.no_grad():
        full = model.logits(our_forward(model, rows, cu, causal=True))
        cache = model.new_cache(2, 20)
        prefill = torch.stack([rows[0][:4], torch.cat([rows[1][:1], torch.zeros(3, dtype=torch.long)])])
        out = model.logits(model(prefill, torch.arange(4).repeat(2, 1), cache=cache).hidden)
        cache.set_lengths([4, 1])
        torch.testing.assert_close(out[0], full[0:4], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(out[1, :1], full[cu[1]:cu[1] + 1], atol=ATOL, rtol=1e-5)
        for n in (3, 1, 1, 3, 1, 1, 1):
            pos = cache.seqlens.long().tolist()
            toks = torch.stack([rows[b][pos[b]:pos[b] + n] for b in range(2)])
            out = model.logits(model(toks, cache.seqlens.long()[:, None] + torch.arange(n), cache=cache).hidden)
            for b in range(2):
                torch.testing.assert_close(out[b], full[cu[b] + pos[b]:cu[b] + pos[b] + n], atol=ATOL, rtol=1e-5)
    assert cache.seqlens.tolist() == [15, 12]


@pytest.mark.parametrize("name", ["mistral_sw", "mixtral"])
def test_greedy_generate_matches_transformers(ckpts, name):
    """Batched prompts of different lengths (left padded, as HF wants), per-row EOS stop."""
    model, hf = our_model(ckpts[name]), hf_model(ckpts[name])
    rows, _ = packed([7, 3, 10], model.config.vocab_size, seed=3)
    S = 10
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - r.numel():], mask[b, S - r.numel():] = r, 1
    # Pick as EOS a token that row 0 produces early, so that rows stop at different steps.
    probe = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    eos = int(probe[0, S + 3])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = gm.generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, ref), f"\n{got}\n{ref}"
    no_eos = gm.generate(model, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(no_eos, probe)
    assert got.shape[1] < probe.shape[1] or (got[:, S:] == 0).any()  # some row stopped early


def test_generate_right_padding_equals_left_padding(ckpts):
    model = our_model(ckpts["mistral"])
    rows, _ = packed([5, 8], model.config.vocab_size, seed=4)
    left = torch.zeros(2, 8, dtype=torch.long)
    right = torch.zeros(2, 8, dtype=torch.long)
    lm, rm = torch.zeros_like(left), torch.zeros_like(right)
    for b, r in enumerate(rows):
        n = r.numel()
        left[b, 8 - n:], lm[b, 8 - n:] = r, 1
        right[b, :n], rm[b, :n] = r, 1
    a = gm.generate(model, left, lm, max_new_tokens=6, eos_token_id=[])
    b = gm.generate(model, right, rm, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a[:, 8:], b[:, 8:])


def test_sampling(ckpts):
    model = our_model(ckpts["mistral"])
    ids = packed([6], model.config.vocab_size, seed=5)[0][0][None]
    greedy = gm.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    g = torch.Generator().manual_seed(0)
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    assert torch.equal(gm.generate(model, ids, max_new_tokens=8, do_sample=True, top_k=1, generator=g,
                                   eos_token_id=[]), greedy)
    assert torch.equal(gm.generate(model, ids, max_new_tokens=8, do_sample=True, top_k=0, top_p=1e-6,
                                   generator=g, eos_token_id=[]), greedy)
    # high temperature without filtering explores: some token differs from greedy
    outs = [gm.generate(model, ids, max_new_tokens=8, do_sample=True, temperature=5.0, top_k=0, generator=g,
                        eos_token_id=[]) for _ in range(3)]
    assert any(not torch.equal(o, greedy) for o in outs)
    # seeded sampling is reproducible
    a = gm.generate(model, ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(7))
    b = gm.generate(model, ids, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sharded_checkpoint_loads(ckpts):
    path = ckpts["sharded"]
    assert (path / "model.safetensors.index.json").is_file()
    model = gm.load_checkpoint(path)
    hf = hf_model(path)
    rows, cu = packed([9], model.config.vocab_size, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(our_forward(model, rows, cu, True)), hf(rows[0][None]).logits[0],
                                   atol=ATOL, rtol=1e-5)


def test_dtype_auto_and_explicit(ckpts, tmp_path):
    path = make_checkpoint(tmp_path / "bf16", "mistral", dtype="bfloat16", sliding_window=6)
    assert gm.MistralConfig.from_pretrained(path).torch_dtype == torch.bfloat16
    model = gm.load_checkpoint(path)
    assert model.dtype == torch.bfloat16
    # bf16 logits: at most twice as far from the fp32 oracle as transformers' own bf16 run
    from helpers import assert_close_to_oracle

    rows, cu = packed([17, 4], model.config.vocab_size, seed=8)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        got = model.logits(our_forward(model, rows, cu, True))
        for b, r in enumerate(rows):
            assert_close_to_oracle(got[cu[b]:cu[b + 1]], hf32(r[None]).logits[0], hf16(r[None]).logits[0],
                                   atol=1e-2, name=f"bf16 logits row {b}")
    assert gm.load_checkpoint(path, torch_dtype="float32").dtype == torch.float32
    assert gm.load_checkpoint(ckpts["mistral"], torch_dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="torch_dtype"):
        gm.load_checkpoint(ckpts["mistral"], torch_dtype="float8")


def test_tied_embeddings(tmp_path):
    path = make_checkpoint(tmp_path / "tied", "mistral", tie_word_embeddings=True)
    model, hf = gm.load_checkpoint(path), hf_model(path)
    rows, cu = packed([6], model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(our_forward(model, rows, cu, True)), hf(rows[0][None]).logits[0],
                                   atol=ATOL, rtol=1e-5)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_unexpected_misshaped_tensors(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(ckpts["mistral"], tmp_path / "broken")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(gm.CheckpointError) as e:
        gm.load_checkpoint(path)
    msg = str(e.value)
    assert "missing (1): layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): layers.0.extra.weight" in msg
    assert "layers.0.self_attn.k_proj.weight: (5, 64)" in msg


def test_missing_files(ckpts, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        gm.load_checkpoint(tmp_path)
    path = _copy(ckpts["mistral"], tmp_path / "noweights")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        gm.load_checkpoint(path)
    path = _copy(ckpts["mistral"], tmp_path / "notok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        gm.load_tokenizer(path)
    shard = _copy(ckpts["sharded"], tmp_path / "lostshard")
    index = json.loads((shard / "model.safetensors.index.json").read_text())
    (shard / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="shards that do not exist"):
        gm.load_checkpoint(shard)


def test_config_errors(ckpts):
    base = json.loads((ckpts["mistral"] / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type 'gemma' is not supported"):
        gm.MistralConfig.from_dict({**base, "model_type": "gemma"})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        gm.MistralConfig.from_dict({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_scaling"):
        gm.MistralConfig.from_dict({**base, "rope_scaling": {"type": "longrope", "factor": 2.0}})
    # transformers' Mistral computes linear (and llama3, dynamic) RoPE scaling like Llama's
    assert gm.MistralConfig.from_dict({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_scaling == {
        "rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        gm.MistralConfig.from_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match=r"unknown fields \['fancy_new_field'\]"):
        gm.MistralConfig.from_dict({**base, "fancy_new_field": 1})
    with pytest.warns(UserWarning, match="fancy_new_field"):
        gm.MistralConfig.from_dict({**base, "fancy_new_field": 1}, strict=False)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        gm.MistralConfig.from_dict({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="torch_dtype"):
        gm.MistralConfig.from_dict({**base, "dtype": "int8"})
    # transformers 4.x style fields are read too
    old = {k: v for k, v in base.items() if k not in ("rope_parameters", "dtype")}
    cfg = gm.MistralConfig.from_dict({**old, "rope_theta": 5e5, "torch_dtype": "bfloat16"})
    assert cfg.rope_theta == 5e5 and cfg.torch_dtype == torch.bfloat16
    mix = json.loads((ckpts["mixtral"] / "config.json").read_text())
    assert isinstance(gm.MistralConfig.from_dict(mix), gm.MixtralConfig)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        gm.MixtralConfig.from_dict({**mix, "num_experts_per_tok": 9})


def test_generate_bad_input(ckpts):
    model = our_model(ckpts["mistral"])
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="input_ids"):
        gm.generate(model, torch.tensor([[1, 5, 10_000]]))
    with pytest.raises(ValueError, match="input_ids"):
        gm.generate(model, torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        gm.generate(model, ids, torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        gm.generate(model, ids, torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        gm.generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        gm.generate(model, ids, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        gm.generate(model, ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="past_key_values"):
        gm.generate(model, ids, past_key_values=[None, None])


def _gritlm_tokenizer(path):
    """The tokenizer as gritlm.GritLM.__init__ builds it (the oracle)."""
    tok = transformers.AutoTokenizer.from_pretrained(path, padding_side="right")
    if not tok.pad_token and tok.eos_token:
        tok.pad_token = tok.eos_token
    return tok


def _gritlm_ids(tok, texts, add_special_tokens, max_length):
    """gritlm.GritLM.encode's tokenizer call (padded batch), each row without its padding."""
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt", max_length=max_length,
              add_special_tokens=add_special_tokens)
    return [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]


def test_tokenizer_matches_transformers(ckpts):
    path = ckpts["mistral"]
    ours = gm.load_tokenizer(path)
    ref = _gritlm_tokenizer(path)
    texts = ["<|user|>\nrepresent the query\n<|embed|>\nthe cat is blue", "paris", "", "zebra unknown words"]
    for add in (True, False):
        for max_length in (None, 3):
            assert token_ids(ours, texts, add_special_tokens=add, max_length=max_length) == \
                _gritlm_ids(ref, texts, add, max_length), (add, max_length)
    assert ours.pad_token_id == ours.eos_token_id == 2 and ours.bos_token_id == 1
    assert ours.padding_side == "right"


def test_sentencepiece_style_tokenizer_matches_transformers(ckpts, tmp_path):
    """A Mistral-like tokenizer.json (BPE, "▁" prepended by the normalizer, added special
    tokens inside the text) in a mistral checkpoint: same ids as transformers' AutoTokenizer,
    also where tokenizer_config.json's add_bos/add_eos flags disagree with the post-processor."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    from grit_models.testing import random_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|embed|>", "<|assistant|>"]
    tok.train_from_iterator(random_texts(200, 1, 30, seed=3) + ["\n"], trainers.BpeTrainer(vocab_size=150,
                                                                                           special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = _copy(ckpts["mistral"], tmp_path / "spm")
    tok.save(str(path / "tokenizer.json"))
    texts = ["<|user|>\nrepresent the query\n<|embed|>\nthe cat is blue", "paris", "",
             "\n<|user|>\nwhy\n<|assistant|>\nthe answer is", "  two  spaces </s>"]
    for flags in ({}, {"add_bos_token": False, "add_eos_token": True}):
        (path / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="LlamaTokenizer", legacy=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            **flags)))
        ours, ref = gm.load_tokenizer(path), _gritlm_tokenizer(path)
        for add in (True, False):
            for max_length in (None, 4):
                assert token_ids(ours, texts, add_special_tokens=add, max_length=max_length) == \
                    _gritlm_ids(ref, texts, add, max_length)
