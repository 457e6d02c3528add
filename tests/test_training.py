"""GRIT training (grit_models.training / grit_models.train) on tiny random checkpoints, CPU.

Oracles: transformers' Mistral/Mixtral with gritlm's loss formulas written out here (padded
batches, masked mean pooling, HF's shifted cross-entropy); the unchunked single-process step
for GradCache and for 2-process gloo runs (DDP and FSDP2).
"""

from __future__ import annotations

import json
import shutil
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grit_models import load_checkpoint
from grit_models import training as T
from grit_models.testing import SPECIAL_TOKENS, make_checkpoint

DATA = Path(__file__).resolve().parent.parent / "models" / "data"
EMB_FILE, GEN_FILE = DATA / "embedding.jsonl", DATA / "generative.jsonl"
SMALL = dict(query_max_len=24, passage_max_len=40, generative_max_len=40)


# ----------------------------------------------------------------------------- fixtures


def _tokenizer():
    """Word-level tokenizer over the bundled sample's words (lower-cased, punctuation split),
    so that no sample token is <unk>; BOS added by the post-processor like Mistral's."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    words = set()
    for f in (EMB_FILE, GEN_FILE):
        words.update(re.findall(r"\w+|[^\w\s]", f.read_text().lower()))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|user|>", "<|embed|>", "<|assistant|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return tok, len(vocab)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two cores shared by many processes: one intra-op thread per process is ~10x faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _checkpoint(path, arch="mistral", init_std=0.1, **overrides):
    tok, n_vocab = _tokenizer()
    cfg = dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    make_checkpoint(path, arch, init_std=init_std, **{**cfg, **overrides})
    tok.save(str(Path(path) / "tokenizer.json"))
    return Path(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", intermediate_size=48, router_aux_loss_coef=0.3)


def _data(ckpt, *, batch_size=4, gen_batch_size=4, emb=None, gen=None, **kw):
    emb = T.load_embedding_data(EMB_FILE) if emb is None else emb
    gen = T.load_generative_data(GEN_FILE) if gen is None else gen
    cfg = T.DataConfig(batch_size=batch_size, gen_batch_size=gen_batch_size, **{**SMALL, **kw})
    return T.GritData(T.TextEncoder(ckpt), cfg, emb, gen)


def assert_grad_close(got, want, name, tol=1e-4):
    """Max error relative to the tensor's largest entry: gradients span many orders of
    magnitude, so an elementwise rtol would judge the near-zero entries by atol alone."""
    assert got is not None and got.shape == want.shape, name
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * scale + 1e-8, f"{name}: max error {err:.3e} vs max |grad| {scale:.3e}"


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- bad input


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD_EMB = json.dumps({"query": ["Find it", "what is a cat ?"], "pos": [["", "a cat is an animal ."]],
                       "neg": [["", "a dog is an animal ."]]})


@pytest.mark.parametrize("lines, match", [
    ([GOOD_EMB, GOOD_EMB, '{"query": ["a", "b"], "pos": [["", "c"]'], r"emb\.jsonl:3: not valid JSON"),
    ([GOOD_EMB, '{"query": ["a", "b"], "neg": []}'], r"emb\.jsonl:2: missing field 'pos'"),
    (['{"pos": [["", "c"]], "neg": []}'], r":1: missing field 'query'"),
    ([GOOD_EMB, '{"query": ["a", "b", "c"], "pos": [["", "c"]], "neg": []}'],
     r":2: field 'query': expected \[instruction, text\]"),
    (['{"query": ["a", "b"], "pos": [], "neg": []}'], r":1: field 'pos' is empty"),
    (['{"query": ["a", "b"], "pos": "x", "neg": []}'], r":1: field 'pos': expected a list"),
    (['{"query": ["a", ""], "pos": [["", "c"]], "neg": []}'], r":1: field 'query': the text is empty"),
    (['[1, 2]'], r":1: expected a JSON object"),
    ([], r"emb\.jsonl: the embedding data is empty"),
    (["", "  "], r"the embedding data is empty"),
])
def test_embedding_data_errors(tmp_path, lines, match):
    with pytest.raises(T.DataError, match=match):
        T.load_embedding_data(_write(tmp_path / "emb.jsonl", lines))


@pytest.mark.parametrize("lines, match", [
    (['{"text": ["q", "a"]}', '{"txt": ["q", "a"]}'], r"gen\.jsonl:2: missing field 'text'"),
    (['{"text": ["q", "a", "q2"]}'], r":1: field 'text': expected user/assistant pairs"),
    (['{"text": "q"}'], r":1: field 'text': expected a non-empty list of strings"),
    (['{"text": ["q", 3]}'], r":1: field 'text': expected a non-empty list of strings"),
    (['{"text": ["q", "a"]}', 'nope'], r"gen\.jsonl:2: not valid JSON"),
    ([], r"the generative data is empty"),
])
def test_generative_data_errors(tmp_path, lines, match):
    with pytest.raises(T.DataError, match=match):
        T.load_generative_data(_write(tmp_path / "gen.jsonl", lines))


def test_dataset_level_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        T.load_embedding_data(tmp_path / "missing.jsonl")
    no_neg = T.load_embedding_data(
        _write(tmp_path / "e.jsonl", ['{"query": ["", "cat"], "pos": [["", "dog"]], "neg": []}']))
    with pytest.raises(T.DataError, match="no 'neg' but train_group_size=2"):
        _data(ckpt, emb=no_neg)
    with pytest.raises(T.DataError, match="embedding data: the dataset is empty"):
        _data(ckpt, emb=[])
    # An instruction that fills query_max_len leaves nothing to embed: dropped, then empty.
    long_instr = T.load_embedding_data(_write(tmp_path / "l.jsonl", [json.dumps(
        {"query": ["what is " * 20, "cat"], "pos": [["", "dog"]], "neg": [["", "cat"]]})]))
    with pytest.warns(UserWarning, match="dropped 1 of 1"), pytest.raises(T.DataError, match="no example left"):
        _data(ckpt, emb=long_instr)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer"):
        _data(ckpt, batch_size=0)
    with pytest.raises(ValueError, match="batch_size: the global batch 4 must be divisible by the world size 3"):
        _data(ckpt).local_batch(0, 0, 3)


def test_bad_arguments(ckpt):
    tm = T.GritTrainModel(T.load_model(ckpt, "cpu"))
    with pytest.raises(ValueError, match="emb_chunk_size: expected a positive integer or None, got 0"):
        T.GritStep(tm, T.StepConfig(emb_chunk_size=0))
    with pytest.raises(ValueError, match="gen_chunk_size: expected a positive integer or None, got True"):
        T.GritStep(tm, T.StepConfig(gen_chunk_size=True))
    with pytest.raises(ValueError, match="loss_gen_type: expected one of"):
        T.GritTrainModel(T.load_model(ckpt, "cpu"), loss_gen_type="sum")
    with pytest.raises(ValueError, match="pooling_method: expected 'mean' or 'weightedmean'"):
        T.GritTrainModel(T.load_model(ckpt, "cpu"), pooling_method="cls")
    with pytest.raises(ValueError, match="strategy: expected 'none', 'ddp' or 'fsdp'"):
        T.wrap(tm, "zero3", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="training_state.pt does not exist"):
        T.load_training_state(ckpt, tm, None, None)


def test_cli_reports_bad_lines(ckpt, tmp_path, capsys):
    from grit_models.train import main

    bad = _write(tmp_path / "bad.jsonl", [GOOD_EMB, "{oops"])
    rc = main(["--model", str(ckpt), "--embedding-data", str(bad), "--generative-data", str(GEN_FILE),
               "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    rc = main(["--model", str(ckpt), "--embedding-data", str(tmp_path / "nope.jsonl"), "--generative-data",
               str(GEN_FILE), "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert "embedding data: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- formats


def test_formats_follow_gritlm(ckpt):
    """Token ids and masks against gritlm's collator rules, spelled out independently."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    enc = T.TextEncoder(ckpt)
    got, skip = enc.embedding([(" Find the answer: ", "what is a cat ?"), ("", "a cat is an animal .")], 100)
    assert got[0] == ids("<s><|user|>\nFind the answer\n<|embed|>\nwhat is a cat ?")
    assert skip[0] == len(ids("<s><|user|>\nFind the answer\n<|embed|>\n")) == 9
    assert got[1] == ids("<s><|embed|>\na cat is an animal .") and skip[1] == 3

    # Single turn: gritlm masks len(tokenize(BOS + user prompt)) tokens, keeps the rest.
    g_ids, labels = enc.generative(["what is a cat ?", " a cat is an animal . "], 100)
    assert g_ids == ids("<s><|user|>\nwhat is a cat ?\n<|assistant|>\na cat is an animal .</s>")
    n_user = len(ids("<s><|user|>\nwhat is a cat ?\n<|assistant|>\n"))
    assert labels == [-100] * n_user + g_ids[n_user:]
    # Two turns: exactly the assistant turns and their </s> are targets.
    g_ids, labels = enc.generative(["what is two ?", "two .", "and three ?", "three ."], 100)
    assert g_ids == ids("<s><|user|>\nwhat is two ?\n<|assistant|>\ntwo .</s>"
                        "\n<|user|>\nand three ?\n<|assistant|>\nthree .</s>")
    assert [t for t in labels if t != -100] == ids("two .</s>") + ids("three .</s>")
    assert labels[-1] != -100 and labels[-len(ids("three .</s>")) - 1] == -100
    # Truncation keeps the first tokens.
    assert enc.generative(["what is two ?", "two ."], 5)[0] == g_ids[:5]


# ----------------------------------------------------------------------------- loss vs transformers


def _hf_padded(rows, pad=0):
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _hf_embed(hf_model, items):
    """gritlm's encode: bidirectional pass, instruction zeroed in the pooling mask, mean, normalise."""
    ids, mask = _hf_padded([r for r, _ in items])
    out = hf_model.model(input_ids=ids, attention_mask=mask, is_causal=False).last_hidden_state
    pool = mask.clone()
    for i, (_, skip) in enumerate(items):
        pool[i, :skip] = 0
    m = pool.unsqueeze(-1).to(out.dtype)
    reps = (out * m).sum(1) / m.sum(1)
    return F.normalize(reps, dim=-1)


def _hf_gen_loss(hf_model, rows, labels, loss_gen_type, factor):
    """gritlm's NextTokenLoss on a right-padded batch."""
    ids, mask = _hf_padded(rows)
    lab = torch.full_like(ids, -100)
    for i, l in enumerate(labels):
        lab[i, :len(l)] = torch.tensor(l)
    logits = hf_model(input_ids=ids, attention_mask=mask).logits
    sl, st = logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1)
    if loss_gen_type == "mixed":
        return F.cross_entropy(sl, st) * factor
    return F.cross_entropy(sl, st, reduction="sum") / ids.shape[0] * factor


def _single_turn_gen(ckpt):
    """Single-turn examples only (gritlm's user-turn length rule is exact there), with labels
    from that rule: everything up to the assistant text masked."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    gen = [t for t in T.load_generative_data(GEN_FILE) if len(t) == 2][:4]
    rows, labels = [], []
    for u, a in gen:
        r = tok.encode(f"<s><|user|>\n{u}\n<|assistant|>\n{a.strip()}</s>", add_special_tokens=False).ids[:40]
        n = len(tok.encode(f"<s><|user|>\n{u}\n<|assistant|>\n", add_special_tokens=False).ids)
        rows.append(r)
        labels.append([-100] * n + r[n:])
    return gen, rows, labels


@pytest.fixture(scope="module")
def backbone_ckpts(ckpt, tmp_path_factory):
    """Mistral and the other backbones: Llama 3 (llama3 RoPE scaling, q/k/v/o and MLP
    biases, head_dim != hidden / heads), Qwen2 (q/k/v biases, tied embeddings)."""
    llama3 = dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=16), rope_theta=500000.0,
                  attention_bias=True, mlp_bias=True)
    return {"mistral": ckpt,
            "llama": _checkpoint(tmp_path_factory.mktemp("llama"), "llama", **llama3),
            "qwen2": _checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tie_word_embeddings=True)}


@pytest.mark.parametrize("arch, loss_gen_type, factor", [("mistral", "mixed", 1.0), ("mistral", "token", 0.5),
                                                         ("llama", "mixed", 1.0), ("qwen2", "token", 0.5)])
def test_unified_loss_and_grads_match_transformers(backbone_ckpts, arch, loss_gen_type, factor):
    """Three optimiser steps of GRIT's unified loss: ours (GritStep) against transformers'
    model with gritlm's loss formulas, the same AdamW on both: equal losses every step and
    equal gradients of the first."""
    import transformers

    ckpt = backbone_ckpts[arch]
    gen, gen_rows, gen_labels = _single_turn_gen(ckpt)
    data = _data(ckpt, batch_size=3, gen_batch_size=4, gen=gen)
    model = T.GritTrainModel(T.load_model(ckpt, "cpu"), loss_gen_type=loss_gen_type, loss_gen_factor=factor)
    step_fn = T.GritStep(model, T.StepConfig())
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ours_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3)
    for step in range(3):
        batch = data.local_batch(step)
        ours_opt.zero_grad()
        hf_opt.zero_grad()
        got = step_fn(batch)
        g = data.global_batch(step)  # texts; tokenisation is checked by test_formats_follow_gritlm
        q_items = list(zip(*data.encoder.embedding(g["query"], SMALL["query_max_len"])))
        d_items = list(zip(*data.encoder.embedding(g["passage"], SMALL["passage_max_len"])))
        q, d = _hf_embed(hf, q_items), _hf_embed(hf, d_items)
        scores = q @ d.T / 0.02
        loss_emb = F.cross_entropy(scores, torch.arange(3) * 2)
        # The generative batch is the 4 examples in some order; the loss does not depend on it.
        loss_gen = _hf_gen_loss(hf, gen_rows, gen_labels, loss_gen_type, factor)
        (loss_emb + loss_gen).backward()
        assert got["loss_emb"] == pytest.approx(loss_emb.item(), rel=1e-4), f"step {step}"
        assert got["loss_gen"] == pytest.approx(loss_gen.item(), rel=1e-4), f"step {step}"
        assert loss_emb.item() > 0.05 and loss_gen.item() > 0.1
        if step == 0:
            _assert_first_grads_match(model, hf, arch)
        ours_opt.step()
        hf_opt.step()


def _assert_first_grads_match(model, hf, arch):
    ours = dict(model.model.named_parameters())
    hp = dict(hf.named_parameters())
    pairs = [("embed", "model.embed_tokens.weight"),
             ("layers.1.mlp_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
             ("layers.0.attn.wo", "model.layers.0.self_attn.o_proj.weight")]
    if "lm_head" in ours:
        pairs.append(("lm_head", "lm_head.weight"))
    if arch == "llama":
        pairs += [("layers.0.attn.bo", "model.layers.0.self_attn.o_proj.bias"),
                  ("layers.1.mlp.b2", "model.layers.1.mlp.down_proj.bias")]
    for a, b in pairs:
        assert_grad_close(ours[a].grad, hp[b].grad, f"grad of {a}")
    q_rows = hp["model.layers.0.self_attn.q_proj.weight"].shape[0]
    assert_grad_close(ours["layers.0.attn.wqkv"].grad[:q_rows], hp["model.layers.0.self_attn.q_proj.weight"].grad,
                      "grad of q_proj")
    if arch in ("llama", "qwen2"):
        assert_grad_close(ours["layers.0.attn.bqkv"].grad[:q_rows], hp["model.layers.0.self_attn.q_proj.bias"].grad,
                          "grad of q_proj.bias")


def test_mixtral_generative_loss_matches_transformers(moe_ckpt):
    """Mixtral: next-token loss + router_aux_loss_coef x load-balancing loss, as HF's
    MixtralForCausalLM(labels=..., output_router_logits=True).loss on a padded batch."""
    import transformers

    gen, rows, labels = _single_turn_gen(moe_ckpt)
    items = [(r, lab[1:] + [-100]) for r, lab in zip(rows, labels)]
    model = T.GritTrainModel(T.load_model(moe_ckpt, "cpu"))
    assert model.router_aux_loss_coef == 0.3
    ours = model("gen", T.generative_tensors(items))

    hf = transformers.MixtralForCausalLM.from_pretrained(moe_ckpt, dtype=torch.float32)
    ids, mask = _hf_padded(rows)
    lab = torch.full_like(ids, -100)
    for i, l in enumerate(labels):
        lab[i, :len(l)] = torch.tensor(l)
    out = hf(input_ids=ids, attention_mask=mask, labels=lab, output_router_logits=True)
    assert out.aux_loss.item() > 0.5
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GradCache, checkpointing


def test_gradcache_and_checkpointing_equal_unchunked_step(ckpt):
    """GradCache (chunks of 2 and 3 of 5 queries / 10 documents) and per-layer checkpointing
    give the loss and gradients of the plain unchunked step."""
    batch = _data(ckpt, batch_size=5, gen_batch_size=4).local_batch(3)
    for emb_chunk, gen_chunk, ckpting in ((2, None, False), (3, 2, True)):
        ref = T.GritTrainModel(T.load_model(ckpt, "cpu"))
        want = T.GritStep(ref, T.StepConfig(gen_chunk_size=gen_chunk))(batch)
        m = T.GritTrainModel(T.load_model(ckpt, "cpu"), gradient_checkpointing=ckpting)
        got = T.GritStep(m, T.StepConfig(emb_chunk_size=emb_chunk, gen_chunk_size=gen_chunk))(batch)
        assert got["loss_emb"] == pytest.approx(want["loss_emb"], rel=1e-6)
        assert got["loss_gen"] == pytest.approx(want["loss_gen"], rel=1e-6)
        want_g, got_g = _grads(ref), _grads(m)
        assert len(want_g) == len(got_g) == len(list(ref.parameters()))
        for n, g in want_g.items():
            assert_grad_close(got_g[n], g, f"grad of {n}")


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_bf16_autocast_step_is_close_to_fp32(ckpt, moe_ckpt, arch):
    """The GPU recipe (fp32 master weights, bf16 autocast), run on CPU autocast: the step
    runs (q, k, v reach attention in one dtype) and stays near the fp32 step."""
    src = ckpt if arch == "mistral" else moe_ckpt
    batch = _data(src).local_batch(1)
    out = {}
    for dt in (None, torch.bfloat16):
        m = T.GritTrainModel(T.load_model(src, "cpu"))
        out[dt] = T.GritStep(m, T.StepConfig(autocast_dtype=dt, emb_chunk_size=2))(batch), _grads(m)
    (lo, glo), (hi, ghi) = out[torch.bfloat16], out[None]
    assert lo["loss_gen"] == pytest.approx(hi["loss_gen"], rel=2e-2)
    assert lo["loss_emb"] == pytest.approx(hi["loss_emb"], rel=5e-2)
    assert all(g.dtype == torch.float32 for g in glo.values())
    for n in ("model.embed", "model.lm_head", "model.layers.0.attn.wqkv"):
        assert_grad_close(glo[n], ghi[n], f"bf16 grad of {n}", tol=0.1)


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, ckpt, out_dir, strategies):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = _data(Path(ckpt), batch_size=4, gen_batch_size=4)
        for strategy in strategies:
            tm = T.GritTrainModel(T.load_model(ckpt, "cpu"))
            module = T.wrap(tm, strategy, torch.device("cpu"))
            step = T.GritStep(module, T.StepConfig(emb_chunk_size=1, gen_chunk_size=1))
            losses = step(data.local_batch(0, rank, world))
            t = torch.tensor([losses["loss_gen"]], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            losses["loss_gen"] = float(t) / world
            grads = {}
            for n, p in tm.model.named_parameters():
                g = p.grad
                grads[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
            opt = torch.optim.SGD(module.parameters(), lr=0.5)
            opt.step()
            T.save_training_state(Path(out_dir) / strategy, module, opt, None, 1, ckpt)
            if rank == 0:
                torch.save({"losses": losses, "grads": grads}, Path(out_dir) / strategy / "result.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_step_equals_one_process(ckpt, tmp_path):
    """2 gloo ranks holding 2 queries (4 documents) and 2 sequences each, under DDP and under
    FSDP2, GradCache in chunks of 1 == 1 process holding all of it, unchunked: same loss,
    same gradients, and the same weights after an SGD step, read back from the checkpoint
    (gathered from the shards under FSDP2)."""
    import torch.multiprocessing as mp

    strategies = ("ddp", "fsdp")
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(ckpt), str(tmp_path), strategies), nprocs=2,
                       join=True, start_method="spawn")

    data = _data(ckpt, batch_size=4, gen_batch_size=4)
    tm = T.GritTrainModel(T.load_model(ckpt, "cpu"))
    # The "mixed" gen loss of 2 ranks x 1-sequence chunks is the mean of 4 sequence means.
    want = T.GritStep(tm, T.StepConfig(gen_chunk_size=1))(data.local_batch(0))
    init = dict(T.load_model(ckpt, "cpu").named_parameters())
    for strategy in strategies:
        res = torch.load(tmp_path / strategy / "result.pt")
        assert res["losses"]["loss_emb"] == pytest.approx(want["loss_emb"], rel=1e-5), strategy
        assert res["losses"]["loss_gen"] == pytest.approx(want["loss_gen"], rel=1e-5), strategy
        for n, p in tm.model.named_parameters():
            assert_grad_close(res["grads"][n], p.grad, f"grad of {n} ({strategy})")
        saved = load_checkpoint(tmp_path / strategy)
        for n, p in saved.named_parameters():
            want_g = dict(tm.model.named_parameters())[n].grad
            assert_grad_close((p - init[n]) / -0.5, want_g, f"saved {n} ({strategy})")


def test_entry_point_under_torchrun_fsdp(ckpt, tmp_path):
    """``torchrun --nproc-per-node 2 -m grit_models.train --strategy fsdp`` (model broadcast
    from rank 0 into the shards) logs the losses of the single-process run on the same global
    batches, writes a loadable checkpoint, and resumes from step 1 bit for bit."""
    import subprocess

    args = ["--model", str(ckpt), "--max-steps", "2", "--batch-size", "4", "--gen-batch-size", "4",
            "--emb-chunk-size", "2", "--gen-chunk-size", "1", "--lr", "1e-3", "--warmup-steps", "0",
            "--save-steps", "1", "--gradient-checkpointing", "--no-progress",
            *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in SMALL.items()), [])]

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "grit_models.train", *args, "--strategy", "fsdp", "--output-dir", str(out),
               *extra]
        run = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    dist = torchrun(tmp_path / "dist")
    from grit_models.train import train

    single = train([*args, "--output-dir", str(tmp_path / "single")])["history"]
    assert len(dist) == len(single) == 2
    for a, b in zip(dist, single):
        assert a["loss_emb"] == pytest.approx(b["loss_emb"], rel=1e-5)
        assert a["loss_gen"] == pytest.approx(b["loss_gen"], rel=1e-5)
    x, y = load_checkpoint(tmp_path / "dist" / "checkpoint-2"), load_checkpoint(tmp_path / "single" / "checkpoint-2")
    for (n, p), q in zip(x.named_parameters(), y.parameters()):
        # Adam normalises each entry: near-zero gradients that differ in rounding move by up to
        # ~lr / 10, hence atol at lr scale (step 2's losses above already pin the gradients).
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=n)

    resumed = torchrun(tmp_path / "resumed", "--resume", str(tmp_path / "dist" / "checkpoint-1"))
    assert [r["step"] for r in resumed] == [2]
    assert (resumed[0]["loss_emb"], resumed[0]["loss_gen"]) == (dist[1]["loss_emb"], dist[1]["loss_gen"])


# ----------------------------------------------------------------------------- end to end


def _train(ckpt, out, *extra):
    from grit_models.train import train

    args = ["--model", str(ckpt), "--output-dir", str(out), "--no-progress", "--batch-size", "8",
            "--gen-batch-size", "4", "--query-max-len", "24", "--passage-max-len", "40",
            "--generative-max-len", "40", *extra]
    return train(args)["history"]


def test_training_lowers_losses_and_raises_retrieval(tmp_path):
    """30 steps of the entry point on the bundled sample lower both losses and raise in-batch
    retrieval accuracy on held-out pairs: 12 queries phrased as training never saw them
    ("Define X." instead of "What is X?", another instruction) against their documents.
    The model starts near transformers' init (std 0.02): with std 0.1 its random attention
    washes the token identities out of the mean and 30 steps do not recover them."""
    ckpt = _checkpoint(tmp_path / "ckpt", init_std=0.02)
    held = T.load_embedding_data(EMB_FILE)[::3][:12]
    enc = T.TextEncoder(ckpt)

    def accuracy(path):
        m = T.GritTrainModel(T.load_model(path, "cpu"))
        queries = [("Find the definition", e.query[1].replace("What is", "Define").replace("?", ".")) for e in held]
        q, qs = enc.embedding(queries, 24)
        d, ds = enc.embedding([e.pos[0] for e in held], 40)
        return T.retrieval_accuracy(m, T.embedding_tensors(list(zip(q, qs))), T.embedding_tensors(list(zip(d, ds))))

    hist = _train(ckpt, tmp_path / "out", "--max-steps", "30", "--lr", "1e-3", "--warmup-steps", "2",
                  "--emb-chunk-size", "4")
    first = lambda k: sum(h[k] for h in hist[:5]) / 5  # noqa: E731
    last = lambda k: sum(h[k] for h in hist[-5:]) / 5  # noqa: E731
    assert last("loss_emb") < 0.5 * first("loss_emb"), [h["loss_emb"] for h in hist]
    assert last("loss_gen") < first("loss_gen") - 0.05, [h["loss_gen"] for h in hist]
    before, after = accuracy(ckpt), accuracy(tmp_path / "out" / "checkpoint-30")
    assert after >= before + 0.25 and after >= 0.5, (before, after)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))


def test_resume_is_bit_for_bit(ckpt, tmp_path):
    steps = ["--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "1", "--emb-chunk-size", "4",
             "--save-steps", "2", "--gradient-checkpointing"]
    full = _train(ckpt, tmp_path / "a", *steps)
    resumed = _train(ckpt, tmp_path / "b", *steps, "--resume", str(tmp_path / "a" / "checkpoint-2"))
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert (a["loss_emb"], a["loss_gen"], a["lr"]) == (b["loss_emb"], b["loss_gen"], b["lr"])
    # Resuming from the output folder picks its latest checkpoint (the final one here).
    assert T.resolve_resume(tmp_path / "a") == tmp_path / "a" / "checkpoint-4"
    a = load_checkpoint(tmp_path / "a" / "checkpoint-4")
    b = load_checkpoint(tmp_path / "b" / "checkpoint-4")
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_saved_model_reads_back_in_transformers(ckpt, moe_ckpt, tmp_path, arch):
    """save_model writes HF names: transformers and load_checkpoint read it back to the same
    logits as the model in memory."""
    import transformers

    src = ckpt if arch == "mistral" else moe_ckpt
    tm = T.GritTrainModel(T.load_model(src, "cpu"))
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # Mixtral: sharded (index json) and saved in bf16; Mistral: one file, fp32.
    kw = {} if arch == "mistral" else dict(max_shard_bytes=60_000, dtype=torch.bfloat16)
    T.save_model(tm, tmp_path / "saved", src, **kw)
    cls = transformers.MistralForCausalLM if arch == "mistral" else transformers.MixtralForCausalLM
    hf = cls.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    ids = torch.tensor([[1, 3, 6, 40, 50, 60, 6, 5, 6, 70, 80]])
    want = hf(input_ids=ids).logits[0]
    with torch.no_grad():
        ours = tm.model.logits(tm.hidden(ids[0], torch.tensor([0, ids.shape[1]], dtype=torch.int32), ids.shape[1],
                                         causal=True)[0])
        back = load_checkpoint(tmp_path / "saved")
        cu = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
        pos = torch.arange(ids.shape[1])
        reread = back.logits(back(ids[0], pos, cu_seqlens=cu, max_seqlen=ids.shape[1], causal=True).hidden)
    if arch == "mixtral":
        assert len(list((tmp_path / "saved").glob("model-0000*-of-*.safetensors"))) > 2
        assert back.dtype == torch.bfloat16 and hf.dtype == torch.float32
        back = back.float()
        with torch.no_grad():
            for p in tm.parameters():
                p.copy_(p.to(torch.bfloat16).float())
            ours = tm.model.logits(tm.hidden(ids[0], cu, ids.shape[1], causal=True)[0])
            reread = back.logits(back(ids[0], pos, cu_seqlens=cu, max_seqlen=ids.shape[1], causal=True).hidden)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reread, want, rtol=1e-4, atol=1e-5)
    saved_dtype = json.loads((tmp_path / "saved" / "config.json").read_text())["torch_dtype"]
    assert saved_dtype == ("float32" if arch == "mistral" else "bfloat16")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()


@pytest.mark.parametrize("mode", ["embedding", "generative"])
def test_single_objective_modes(ckpt, tmp_path, mode):
    hist = _train(ckpt, tmp_path / "out", "--mode", mode, "--max-steps", "2", "--lr", "1e-3")
    want = {"embedding": "loss_emb", "generative": "loss_gen"}[mode]
    other = {"embedding": "loss_gen", "generative": "loss_emb"}[mode]
    assert all(want in h and other not in h and h["loss"] == h[want] for h in hist)
    with pytest.raises(SystemExit, match="--generative-data: required in mode 'unified'"):
        _train(ckpt, tmp_path / "x", "--embedding-data", str(EMB_FILE))


@pytest.mark.gpu
def test_bf16_step_on_gpu_matches_fp32(ckpt):
    """On a GPU (Triton/CUDA kernels): the bf16-autocast step stays near the fp32 step."""
    batch = _data(ckpt).local_batch(0, device="cuda")
    out = {}
    for dt in (None, torch.bfloat16):
        m = T.GritTrainModel(T.load_model(ckpt, "cuda"), gradient_checkpointing=True)
        out[dt] = T.GritStep(m, T.StepConfig(autocast_dtype=dt, emb_chunk_size=2))(batch), _grads(m)
    (lo, glo), (hi, ghi) = out[torch.bfloat16], out[None]
    assert lo["loss_gen"] == pytest.approx(hi["loss_gen"], rel=2e-2)
    assert lo["loss_emb"] == pytest.approx(hi["loss_emb"], rel=5e-2)
    for n in ("model.embed", "model.lm_head", "model.layers.0.attn.wqkv"):
        assert_grad_close(glo[n], ghi[n], f"bf16 grad of {n}", tol=0.1)


def test_sample_data_is_valid():
    emb, gen = T.load_embedding_data(EMB_FILE), T.load_generative_data(GEN_FILE)
    assert len(emb) >= 24 and len(gen) >= 24
    assert all(e.neg for e in emb)
    assert sys.modules["grit_models.training"].SAMPLE_EMBEDDING.is_file()


# ---------------------------------------------------------------------------------------
# reliability: atomic checkpoints, resume, log, data encodings, option values
# ---------------------------------------------------------------------------------------


def test_killed_resave_leaves_the_old_checkpoint_and_resume_finds_it(ckpt, tmp_path, monkeypatch):
    """Resuming into the same output folder re-saves checkpoint-4; a kill while writing it
    (simulated: torch.save of the training state raises) must leave the earlier checkpoints
    intact and `latest` naming a complete one, and --resume OUT must pick it."""
    steps = ["--max-steps", "4", "--lr", "1e-3", "--warmup-steps", "1", "--save-steps", "2"]
    out = tmp_path / "out"
    _train(ckpt, out, *steps)
    before = (out / "checkpoint-4" / "model.safetensors").read_bytes()

    real_save = torch.save

    def killed(obj, f, *a, **k):
        if str(f).endswith("training_state.pt"):
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(ckpt, out, *steps, "--resume", str(out / "checkpoint-2"))
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "latest").read_text() == "checkpoint-4"
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == before
    assert T.is_complete_checkpoint(out / "checkpoint-4")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".partial-")]
    assert leftovers, "the simulated kill should have left a partial folder behind"
    with pytest.warns(UserWarning, match=r"ignoring incomplete checkpoint folders .*\.partial-checkpoint-4"):
        assert T.resolve_resume(out) == out / "checkpoint-4"


def test_resume_skips_a_half_written_latest(ckpt, tmp_path):
    """A folder `latest` names but that lacks its training state (written in place by an
    older version and killed) is skipped for the newest complete one, with a warning."""
    out = tmp_path / "out"
    _train(ckpt, out, "--max-steps", "4", "--save-steps", "2")
    (out / "checkpoint-4" / "training_state.pt").unlink()
    with pytest.warns(UserWarning, match="checkpoint-4"):
        assert T.resolve_resume(out) == out / "checkpoint-2"
    shutil.rmtree(out / "checkpoint-2")
    with pytest.warns(UserWarning):
        assert T.resolve_resume(out) is None
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="--resume: .* holds no complete checkpoint"):
        _train(ckpt, tmp_path / "again", "--max-steps", "4", "--resume", str(out))


def test_log_does_not_repeat_steps_after_resume(ckpt, tmp_path):
    out = tmp_path / "out"
    steps = ["--max-steps", "4", "--save-steps", "2"]
    _train(ckpt, out, *steps)
    _train(ckpt, out, *steps, "--resume", str(out / "checkpoint-2"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_data_with_a_byte_order_mark_and_bad_utf8(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (GOOD_EMB + "\n").encode())
    assert len(T.load_embedding_data(bom)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((GOOD_EMB + "\n").encode() + b'{"query": "caf\xe9"}\n')
    with pytest.raises(T.DataError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 15\)"):
        T.load_embedding_data(bad)


@pytest.mark.parametrize("option,value", [
    ("--temperature", "0"), ("--temperature", "-1"), ("--temperature", "nan"), ("--loss-gen-factor", "nan"),
    ("--loss-gen-factor", "-1"), ("--lr", "inf"), ("--max-grad-norm", "nan"), ("--adam-beta1", "1"),
    ("--adam-eps", "0"), ("--weight-decay", "nan"), ("--emb-chunk-size", "0"), ("--warmup-steps", "-1"),
    ("--query-max-len", "0"), ("--router-aux-loss-coef", "nan"),
])
def test_bad_option_values_fail_before_the_model_loads(tmp_path, option, value):
    """The model path does not exist: an error about it would mean the values were not
    checked first."""
    from grit_models.train import train

    with pytest.raises(SystemExit, match=f"^{option}: expected"):
        train(["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"), option, value])


def test_a_run_ends_with_a_summary_line(ckpt, tmp_path, capsys):
    """Even with --no-progress: what ran, the last losses, where the checkpoint is."""
    out = tmp_path / "out"
    _train(ckpt, out, "--max-steps", "2")
    err = capsys.readouterr().err
    assert "trained steps 1-2 in" in err and "loss_emb" in err and "loss_gen" in err
    assert f"checkpoint: {out / 'checkpoint-2'}" in err and (out / "checkpoint-2" / "training_state.pt").is_file()
    _train(ckpt, out, "--max-steps", "2", "--resume", str(out))
    assert "no step (already at step 2)" in capsys.readouterr().err
