"""One GRIT training step: grit_models.training vs the same step on transformers + gritlm's loss.

A step = generative half (next-token loss, user turns masked, "mixed" aggregation), then the
embedding half (bidirectional pass, instruction left out of the mean, in-batch contrastive
loss at temperature 0.02 over [positive, hard negative] groups), backward, AdamW step.
The baseline writes gritlm's GritLMTrainModel / NextTokenLoss / DistributedContrastiveLoss
formulas (gritlm/training/model.py; that module is not importable without its `datasets`
dependency) on transformers' MistralForCausalLM with padded batches and sdpa.

extra["tokens"]: real (unpadded) tokens per step, so tokens/s = tokens / median seconds;
extra["peak_mb"] / extra["baseline_peak_mb"]: peak memory of one step above what was held
before it (CUDA: max_memory_allocated; CPU: allocator events from torch.profiler).

CPU: a small Mistral, fp32. GPU: GritLM-7B-sized layers (D=4096, F=14336, 32 heads, 8 KV
heads, vocab 32000; 2 layers in --quick, else 4), fp32 master weights under bf16 autocast,
and the same step through GradCache (chunks of 4) next to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import Case, Skipped

TEMPERATURE = 0.02


def _sizes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2 if quick else 4,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
                    B=16, q_len=128, d_len=512, G=8, g_len=1024)
    if quick:
        return dict(model=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=1000), B=8, q_len=32, d_len=64, G=4, g_len=128)
    return dict(model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, vocab_size=1000), B=16, q_len=64, d_len=128, G=8, g_len=256)


def _batch(s: dict, vocab: int, device, gen: torch.Generator):
    """Token lists: B queries, 2B documents, G chat sequences; lengths in [L/2, L]; 8-token
    instructions; generative targets past a 16-token user turn."""
    def lengths(n, L):
        return torch.randint(L // 2, L + 1, (n,), generator=gen).tolist()

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    emb = lambda n, L: [(ids(m), 8) for m in lengths(n, L)]  # noqa: E731
    queries, docs = emb(s["B"], s["q_len"]), emb(2 * s["B"], s["d_len"])
    chats = []
    for m in lengths(s["G"], s["g_len"]):
        toks = ids(m)
        targets = [-100] * 16 + toks[17:] + [-100]
        chats.append((toks, targets[:m]))
    return queries, docs, chats


def _padded(items, device):
    S = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), S, dtype=torch.long)
    mask = torch.zeros(len(items), S, dtype=torch.long)
    for i, (x, _) in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return ids.to(device), mask.to(device)


def _baseline_step(hf, opt, q_items, d_items, chats, device, autocast_dtype):
    """gritlm's GritLMTrainModel.forward (generative first, then embedding) on padded batches."""
    g_ids, g_mask = _padded([(x, None) for x, _ in chats], device)
    labels = torch.full_like(g_ids, -100)
    for i, (x, t) in enumerate(chats):
        labels[i, 1:len(x)] = torch.tensor(t[:-1], device=device)  # HF labels: targets shifted back
    qi, qm = _padded(q_items, device)
    di, dm = _padded(d_items, device)

    def encode(ids, mask, items):
        out = hf.model(input_ids=ids, attention_mask=mask, is_causal=False).last_hidden_state
        pool = mask.clone()
        for i, (_, skip) in enumerate(items):
            pool[i, :skip] = 0
        m = pool.unsqueeze(-1).to(out.dtype)
        reps = (out * m).sum(1) / m.sum(1)
        return F.normalize(reps, dim=-1)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = hf(input_ids=g_ids, attention_mask=g_mask).logits
            V = logits.shape[-1]
            loss_gen = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
        loss_gen.backward()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            q, d = encode(qi, qm, q_items), encode(di, dm, d_items)
            scores = (q @ d.T).float() / TEMPERATURE
            loss_emb = F.cross_entropy(scores, torch.arange(q.shape[0], device=device) * 2)
        loss_emb.backward()
        opt.step()
    return step


def _ours_step(module, opt, step_fn, batch):
    def step():
        opt.zero_grad(set_to_none=True)
        step_fn(batch)
        opt.step()
    return step


def _peak_bytes(fn, device: torch.device) -> int | None:
    fn()  # optimiser states exist before the measured call
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        live = peak = 0
        for e in events:
            live += e.self_cpu_memory_usage
            peak = max(peak, live)
        return peak
    except Exception:  # the profiler's memory events are best effort
        return None


def _flops(cfg: dict, tokens: int, extra_forward_tokens: int = 0) -> float:
    """6 x (non-embedding + head params) x tokens for forward+backward (+2x for re-forwards)."""
    D, Fh, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    Hq, Hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    K = D // Hq
    per_layer = D * (Hq + 2 * Hk) * K + Hq * K * D + 3 * D * Fh
    return float(6 * n * per_layer * tokens + 2 * n * per_layer * extra_forward_tokens)


def cases(device: torch.device, quick: bool):
    try:
        import transformers
    except ImportError as e:
        return [Skipped("training step", "*", f"needs transformers ({e})")]
    from grit_models import MistralConfig, Transformer
    from grit_models import training as T

    out = []
    if device.type != "cuda":
        big = _sizes(torch.device("cuda"), quick)["model"]
        out.append(Skipped("training step", f"GritLM-7B layers D={big['hidden_size']} F={big['intermediate_size']}",
                           "needs a CUDA device"))
    s = _sizes(device, quick)
    cfg = dict(s["model"], max_position_embeddings=8192, sliding_window=None, rms_norm_eps=1e-5, rope_theta=10000.0)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    # Ours: a Transformer built from the config, initialised like transformers (std 0.02).
    with torch.device("meta"):
        model = Transformer(MistralConfig(**cfg))
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p)) if "norm" in name else p.normal_(0.0, 0.02)
    model.train().requires_grad_(True)
    q_items, d_items, chats = _batch(s, cfg["vocab_size"], device, gen)
    batch = {"query": T.embedding_tensors(q_items, device), "passage": T.embedding_tensors(d_items, device),
             "generative": chats}
    tokens = sum(len(x) for x, _ in q_items + d_items) + sum(len(x) for x, _ in chats)
    emb_tokens = sum(len(x) for x, _ in q_items + d_items)

    tm = T.GritTrainModel(model)
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-5)
    step_cfgs = [("grit_models", T.StepConfig(autocast_dtype=autocast), 0)]
    if device.type == "cuda":
        step_cfgs.append(("grit_models GradCache(4)", T.StepConfig(autocast_dtype=autocast, emb_chunk_size=4),
                          emb_tokens))

    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg, attn_implementation="sdpa"))
    hf = hf.to(device).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)
    baseline = _baseline_step(hf, hf_opt, q_items, d_items, chats, device, autocast)
    base_peak = _peak_bytes(baseline, device)

    L = cfg["num_hidden_layers"]
    shape = (f"D={cfg['hidden_size']} L={L} q={s['B']}x{s['q_len']} d={2 * s['B']}x{s['d_len']} "
             f"gen={s['G']}x{s['g_len']} {'bf16 autocast' if autocast else 'fp32'}")
    for name, step_cfg, re_fwd in step_cfgs:
        fn = _ours_step(tm, opt, T.GritStep(tm, step_cfg), batch)
        peak = _peak_bytes(fn, device)
        mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
        out.append(Case(
            "training step", shape, name, fn=fn, baseline=baseline,
            baseline_name="transformers + gritlm loss", flops=_flops(cfg, tokens, re_fwd),
            extra=dict(tokens=tokens, peak_mb=mb(peak), baseline_peak_mb=mb(base_peak)),
        ))
    return out
