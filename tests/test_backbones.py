"""GRIT on Llama and Qwen2 backbones: the same model code and GritModel against transformers
(LlamaForCausalLM, Qwen2ForCausalLM) and gritlm on tiny random checkpoints, fp32.

Checkpoints exercise what makes the backbones differ from Mistral: Llama 3's llama3 RoPE
scaling (with an original context of 16 positions, so that the tests' sequences reach the
scaled frequencies), linear and dynamic scaling, q/k/v/o and MLP biases, head_dim != hidden /
heads; Qwen2's q/k/v biases, tied embeddings and its per-layer sliding window. Training on
these backbones is checked in test_training.py (test_unified_loss_and_grads_match_transformers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import grit_models as gm  # noqa: E402
from grit_models.config import MistralConfig  # noqa: E402
from grit_models.mistral import packed_positions  # noqa: E402
from grit_models.testing import make_checkpoint, random_texts  # noqa: E402

ATOL = 2e-5
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
CONFIGS = {
    "llama": ("llama", {}),
    "llama3": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0, attention_bias=True, mlp_bias=True)),
    "llama_linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "llama_dynamic": ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=16)),
    "qwen2": ("qwen2", {}),
    "qwen2_tied_sw": ("qwen2", dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {name: make_checkpoint(root / name, arch, seed=i + 11, **over)
            for i, (name, (arch, over)) in enumerate(CONFIGS.items())}


def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rows_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def forward(model, rows, causal=True):
    tokens = torch.cat(rows)
    cu = torch.tensor([0] + [r.numel() for r in rows]).cumsum(0).to(torch.int32)
    return model(tokens, packed_positions(cu, tokens.numel()), cu_seqlens=cu, max_seqlen=max(r.numel() for r in rows),
                 causal=causal).hidden, cu


def test_configs_read_like_transformers(ckpts):
    for name in CONFIGS:
        cfg = MistralConfig.from_pretrained(ckpts[name])
        theirs = transformers.AutoConfig.from_pretrained(ckpts[name])
        assert cfg.model_type == theirs.model_type
        assert cfg.head_dim == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
        assert cfg.tie_word_embeddings == theirs.tie_word_embeddings
    assert MistralConfig.from_pretrained(ckpts["llama"]).head_dim == 24 != 64 // 4
    qwen = MistralConfig.from_pretrained(ckpts["qwen2_tied_sw"])
    assert [qwen.layer_window(i) for i in range(2)] == [(-1, -1), (4, 0)]  # only layers >= max_window_layers


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "llama_dynamic"])
def test_logits_match_transformers(ckpts, name):
    """Packed rows of different lengths, each against transformers on its own."""
    ours, ref = gm.load_checkpoint(ckpts[name]), hf(ckpts[name])
    rows = rows_of([30, 5, 17, 1], ours.config.vocab_size)
    with torch.no_grad():
        hidden, cu = forward(ours, rows)
        logits = ours.logits(hidden)
        for b, r in enumerate(rows):
            torch.testing.assert_close(logits[cu[b]:cu[b + 1]], ref(r[None]).logits[0], atol=ATOL, rtol=1e-5,
                                       msg=lambda m: f"{name} row {b}: {m}")


def test_dynamic_rope_follows_transformers_state(ckpts):
    """Dynamic NTK scaling recomputes the frequencies when a call reaches past the longest
    length seen (and restores them for short ones): the same sequence of calls on both
    sides gives the same logits, including the short call after the long one."""
    ours, ref = gm.load_checkpoint(ckpts["llama_dynamic"]), hf(ckpts["llama_dynamic"])
    for L in (9, 40, 24, 9):
        (r,) = rows_of([L], ours.config.vocab_size, seed=L)
        with torch.no_grad():
            got = ours.logits(forward(ours, [r])[0])
            torch.testing.assert_close(got, ref(r[None]).logits[0], atol=ATOL, rtol=1e-5, msg=lambda m: f"L={L}: {m}")


@pytest.mark.parametrize("name,change", [
    ("llama3", dict(rope_scaling=None)), ("llama_linear", dict(rope_scaling=None)),
    ("llama_dynamic", dict(rope_scaling=None)), ("qwen2_tied_sw", dict(use_sliding_window=False)),
])
def test_the_feature_matters(ckpts, name, change, tmp_path):
    """The same weights without the scaling (or the window) give other logits on a long row:
    the parity tests above do exercise them."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ckpts[name].iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    if "rope_scaling" in change:
        cfg["rope_theta"] = json.loads((ckpts[name] / "config.json").read_text()).get(
            "rope_parameters", {}).get("rope_theta", 10000.0)
    cfg.update({k: v for k, v in change.items() if k != "rope_scaling"})
    cfg.pop("layer_types", None) if "use_sliding_window" in change else None
    (plain / "config.json").write_text(json.dumps(cfg))
    a, b = gm.load_checkpoint(ckpts[name]), gm.load_checkpoint(plain)
    (r,) = rows_of([40], a.config.vocab_size, seed=5)
    with torch.no_grad():
        assert (a.logits(forward(a, [r])[0]) - b.logits(forward(b, [r])[0])).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2"])
def test_bidirectional_hidden_match_transformers(ckpts, name):
    """is_causal=False on the base model (what gritlm.GritLM.encode passes), padded batch."""
    ours, ref = gm.load_checkpoint(ckpts[name]), hf(ckpts[name])
    lengths = [9, 14, 3]
    rows = rows_of(lengths, ours.config.vocab_size, seed=1)
    S = max(lengths)
    ids, mask = torch.zeros(3, S, dtype=torch.long), torch.zeros(3, S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :r.numel()], mask[b, :r.numel()] = r, 1
    with torch.no_grad():
        want = ref.model(input_ids=ids, attention_mask=mask, is_causal=False).last_hidden_state
        got, cu = forward(ours, rows, causal=False)
        causal, _ = forward(ours, rows, causal=True)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], want[b, :n], atol=ATOL, rtol=1e-5)
    assert (got - causal).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama3", "qwen2_tied_sw"])
def test_greedy_generate_matches_transformers(ckpts, name):
    """Batched prompts of different lengths, left padded, past the sliding window and the
    llama3 original context."""
    ours, ref = gm.load_checkpoint(ckpts[name]), hf(ckpts[name])
    rows = rows_of([7, 3, 12], ours.config.vocab_size, seed=3)
    S = 12
    ids, mask = torch.zeros(3, S, dtype=torch.long), torch.zeros(3, S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - r.numel():], mask[b, S - r.numel():] = r, 1
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0,
                        eos_token_id=None)
    got = gm.generate(ours, ids, mask, max_new_tokens=14, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, want), f"\n{got}\n{want}"


def test_incremental_decode_equals_full_forward_with_per_layer_windows(ckpts):
    """Qwen2 with a window on layer 1 only: chunks decoded over the cache equal a full causal
    forward."""
    model = gm.load_checkpoint(ckpts["qwen2_tied_sw"])
    (r,) = rows_of([16], model.config.vocab_size, seed=4)
    with torch.no_grad():
        full = model.logits(forward(model, [r])[0])
        cache = model.new_cache(1, 20)
        pos = 0
        for n in (4, 3, 1, 5, 3):
            out = model.logits(model(r[None, pos:pos + n], torch.arange(pos, pos + n)[None], cache=cache).hidden)
            torch.testing.assert_close(out[0], full[pos:pos + n], atol=ATOL, rtol=1e-5)
            pos += n


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_embeddings_match_gritlm(ckpts, name):
    gritlm = pytest.importorskip("gritlm")
    ref = gritlm.GritLM(str(ckpts[name]), device="cpu", dtype=torch.float32)
    ours = gm.GritModel(str(ckpts[name]), device="cpu")
    if name.startswith("qwen2"):
        # transformers 5 loads every qwen2 checkpoint with its Qwen2Tokenizer (a byte-level
        # BPE rebuilt from the vocabulary), whatever tokenizer_config.json says: right for
        # real Qwen2 checkpoints, wrong for this word-level test tokenizer (ids past the
        # vocabulary). Both sides get the checkpoint's own tokenizer.json instead.
        ref.tokenizer = ours.tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(ckpts[name] / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
            unk_token="<unk>", pad_token="</s>", padding_side="right")
    texts = random_texts(9, 1, 30, seed=2)
    instruction = gm.gritlm_instruction_format("represent the question to retrieve a passage")
    for inst in ("", instruction):
        want = ref.encode(texts, instruction=inst, batch_size=4)
        got = ours.encode(texts, instruction=inst, batch_size=4)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "qwen2_tied_sw"])
def test_grit_model_generates_and_caches(ckpts, name):
    """GritModel's generation and doc caching on the backbone: the cached answer equals the
    uncached one with the document in the prompt the cache was built from."""
    model = gm.GritModel(str(ckpts[name]), device="cpu")
    doc, query = "paris is the capital of france", "what is the capital of france ?"
    caches = gm.cache_documents(model, [doc])
    cached = model.rag(query, doc, cache="doc", doc_caches=caches, max_new_tokens=6)
    assert isinstance(cached, str)
    ids = model.tokenizer.encode("<|user|>\n" + query + "\n<|assistant|>\n")
    out = model.generate([ids], max_new_tokens=6)
    assert out.shape[1] == len(ids) + 6


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", dict(rope_type="yarn", factor=2.0), r"rope_scaling.rope_type: 'yarn' is not supported"),
    ("rope_scaling", dict(rope_type="linear"), r"rope_scaling.factor: expected a positive number"),
    ("rope_scaling", dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5),
     "partial_rotary_factor: only 1.0"),
    ("layer_types", ["full_attention"], "layer_types: expected 2 entries"),
    ("attention_bias", "yes", "attention_bias: expected true or false"),
    ("use_sliding_window", 1, "use_sliding_window: expected true or false"),
])
def test_unsupported_backbone_settings_are_named(field, value, match):
    from grit_models.testing import tiny_config

    arch = "qwen2" if field in ("layer_types", "use_sliding_window") else "llama"
    d = dict(tiny_config(arch), model_type=arch, **{field: value})
    with pytest.raises(ValueError, match=match):
        MistralConfig.from_dict(d)


@pytest.mark.parametrize("name", ["llama3", "qwen2_tied_sw"])
def test_trained_model_saves_in_transformers_layout(ckpts, name, tmp_path):
    """training's HF export writes the biases and (un)tied heads back under HF names:
    transformers reads the saved folder to our logits."""
    from grit_models import training as T

    tm = T.GritTrainModel(T.load_model(ckpts[name], "cpu"))
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    T.save_model(tm, tmp_path / "saved", ckpts[name])
    ref = hf(tmp_path / "saved")
    (r,) = rows_of([20], tm.model.config.vocab_size, seed=7)
    with torch.no_grad():
        ours = tm.model.logits(forward(tm.model, [r])[0])
        torch.testing.assert_close(ours, ref(r[None]).logits[0], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama3", "qwen2_tied_sw"])
def test_training_entry_point_runs_on_the_backbone(ckpts, name, tmp_path):
    """python -m grit_models.train on the backbone (bundled sample data): both losses are
    finite, a checkpoint is written, and GritModel loads it."""
    from grit_models.train import train

    result = train(["--model", str(ckpts[name]), "--output-dir", str(tmp_path / "out"), "--max-steps", "2",
                    "--batch-size", "4", "--gen-batch-size", "2", "--query-max-len", "16", "--passage-max-len", "24",
                    "--generative-max-len", "24", "--no-progress"])
    losses = result["history"][-1]
    assert np.isfinite(losses["loss_emb"]) and np.isfinite(losses["loss_gen"])
    model = gm.GritModel(result["checkpoint"], device="cpu")
    assert model.encode("paris").shape == (64,)
