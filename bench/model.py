"""End-to-end GRIT model benchmarks: grit_models vs gritlm + transformers, same run, same files.

* encode: ``GritModel.encode`` vs ``gritlm.GritLM.encode`` on a mixed-length corpus (texts/s =
  extra["texts"] / median). FLOPs count the GEMMs (2 * params * tokens) and attention
  (4 * L^2 * Hq * K per layer, bidirectional) over real tokens only.
* rag: gritlm's RAG latency protocol (its scripts/raglatency.sh + rag/eval.py): batch 1,
  16 new tokens (min = max), the document or the query long (L tokens), the other 1 token.
  Each timed call embeds the query (retrieval needs it; with its cache in the query modes),
  assembles the caches and generates; document caches are built beforehand (offline in
  production, removed from gritlm's timings too). Baselines: gritlm's flow on transformers in
  the same mode, and (op "rag vs no cache") grit_models without caching. Unlike gritlm's
  eval.py, whose encode calls keep encode's default max_length=512 (so a 4000-token query
  or document is cached as its first 512 tokens), both sides here embed and cache the whole
  text (max_length=None), so that every mode sees the same tokens.
* generate: tokens/s of ``generate`` vs transformers' ``generate``, greedy, batch of prompts
  of different lengths (left padded), every row forced to the full length.
* generate compiled (CPU): the same, decode through torch.compile (``cache_implementation=
  "static"`` with a transformers ``CompileConfig``), against transformers' default generate
  (which compiles only on accelerators) and against our eager decode.
* generate graph (GPU): decode captured as a CUDA graph (``cache_implementation="static"``)
  against eager decode and against transformers' ``generate``, batch 1 and 16, on
  GritLM-7B-shaped layers with random weights.

The checkpoint is random (no hub access): its size is picked per device so that the CPU run
finishes in a minute or two in --quick mode. On CPU both sides run with
``GRIT_BENCH_THREADS`` torch threads (default 1): on a shared machine, OpenMP threads that
spin while other processes hold the cores made two-thread timings swing by 10x.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .common import Case, Skipped

EMBED = "<|embed|>\n"
N_NEW = 16


def _model_size(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4 if quick else 8,
                    num_attention_heads=16, num_key_value_heads=8, dtype="bfloat16")
    if quick:
        return dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, dtype="float32")
    return dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, dtype="float32")


_CKPT: dict = {}


# What each backbone adds to the common size (bench rows compare backbones at equal size).
BACKBONES = {
    "mistral": dict(sliding_window=None),
    "llama": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=512), rope_theta=500000.0),
    "qwen2": dict(),  # q/k/v biases
}


def _checkpoint(device, quick, arch: str = "mistral") -> tuple[Path, dict]:
    from grit_models.testing import make_checkpoint

    size = _model_size(device, quick)
    key = (arch, *sorted(size.items()))
    if key not in _CKPT:
        size = dict(size)
        dtype = size.pop("dtype")
        path = Path(tempfile.mkdtemp(prefix="grit_bench_")) / "ckpt"
        make_checkpoint(path, arch, dtype=dtype, init_std=0.02, max_position_embeddings=8192,
                        **BACKBONES[arch], **size)
        _CKPT[key] = path
    return _CKPT[key], _model_size(device, quick)


def _gritlm(gritlm, path, device, dtype, arch):
    ref = gritlm.GritLM(str(path), device=str(device), dtype=dtype)
    ref.model.generation_config.max_length = None
    if arch == "qwen2":
        # transformers 5 loads qwen2 checkpoints with Qwen2Tokenizer whatever tokenizer_config
        # says, which mangles the bench's word-level tokenizer: give gritlm the checkpoint's
        # own tokenizer.json, as grit_models reads it (tests/test_backbones.py does the same).
        from transformers import PreTrainedTokenizerFast

        ref.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                                                padding_side="right")
    return ref


def _encode_flops(size: dict, lengths) -> float:
    D, Fh, n = size["hidden_size"], size["intermediate_size"], size["num_hidden_layers"]
    Hq, Hk = size["num_attention_heads"], size["num_key_value_heads"]
    K = D // Hq
    per_token = 2 * n * (D * (Hq + 2 * Hk) * K + Hq * K * D + 3 * D * Fh)
    return float(per_token * sum(lengths) + n * sum(4 * L * L * Hq * K for L in lengths))


def _words(n: int, seed: int) -> str:
    from grit_models.testing import random_texts

    return random_texts(1, n, n, seed=seed)[0]


def _hf_cache(layers):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def _gritlm_rag(ref, query, doc, mode, doc_kv):
    """gritlm's rag/eval.py loop body for one query (latency mode), on transformers."""
    from grit_models import rag as R

    kv = None
    if mode is not None and "query" in mode:
        _, qc = ref.encode_queries([query], get_cache=True, convert_to_tensor=True, instruction=EMBED, max_length=None)
        kv = [(layer.keys, layer.values) for layer in qc.layers]
    else:
        ref.encode_queries([query], convert_to_tensor=True, instruction=EMBED, max_length=None)
    if mode == "doc":
        kv = doc_kv
    elif mode == "docquery":
        kv = [(torch.cat((d[0], q[0]), 2), torch.cat((d[1], q[1]), 2)) for d, q in zip(doc_kv, kv)]
    elif mode == "querydoc":
        kv = [(torch.cat((q[0], d[0]), 2), torch.cat((q[1], d[1]), 2)) for d, q in zip(doc_kv, kv)]
    text = {None: R.FORMAT_DOC_FIRST.format(query=query, doc=doc), "doc": R.CACHED_DOC.format(query=query),
            "query": R.CACHED_QUERY.format(doc=doc), "docquery": R.CACHED_DOC_QUERY,
            "querydoc": R.CACHED_QUERY_DOC}[mode] + R.ANSWER_PREFIX
    inputs = ref.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(ref.device)
    kwargs = {}
    if kv is not None:
        inputs["attention_mask"] = torch.cat((torch.ones(1, kv[0][0].shape[2], dtype=torch.long, device=ref.device),
                                              inputs["attention_mask"]), 1)
        kwargs["past_key_values"] = _hf_cache(kv)  # fresh: generate appends to it
    return ref.generate(**inputs, min_new_tokens=N_NEW, max_new_tokens=N_NEW, do_sample=False,
                        pad_token_id=ref.tokenizer.pad_token_id, **kwargs)


def _ours_rag(ours, query, doc, mode, doc_caches):
    if mode is None or "query" not in mode:
        ours.encode_queries([query], convert_to_tensor=True, instruction=EMBED, max_length=None)  # for retrieval
    return ours.rag(query, doc, cache=mode, doc_caches=doc_caches, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                    return_ids=True)


def cases(device: torch.device, quick: bool):
    try:
        import warnings

        import gritlm
        import transformers  # noqa: F401
    except ImportError as e:
        return [Skipped("model", "*", f"needs gritlm and transformers ({e})")]
    import grit_models as gm
    from grit_models.testing import random_texts

    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    path, size = _checkpoint(device, quick)
    dtype = getattr(torch, size["dtype"])
    ours = gm.GritModel(str(path), device=str(device))
    ref = _gritlm(gritlm, path, device, dtype, "mistral")
    threads = int(os.environ.get("GRIT_BENCH_THREADS", "1")) if device.type == "cpu" else None
    backend = f"grit_models ({size['dtype']}" + (f", {threads} thread{'s' if threads > 1 else ''})" if threads else ")")
    dims = f"D={size['hidden_size']} layers={size['num_hidden_layers']}"
    out = []

    # 1. encoding throughput on a mixed-length corpus
    n_texts, max_words = (32, 200) if quick else (256, 500)  # quick: rounds short enough to repeat
    if device.type == "cuda":
        n_texts, max_words = (512, 500) if quick else (2048, 500)
    corpus = random_texts(n_texts, 4, max_words, seed=1)
    lengths = [len(x) for x in ours.tokenizer(corpus, truncation=True, max_length=512)["input_ids"]]
    bs = 32 if device.type == "cpu" else 128
    out.append(Case(
        "model encode", f"N={n_texts} L={min(lengths)}..{max(lengths)} bs={bs} {dims} mistral", backend,
        fn=lambda: ours.encode(corpus, batch_size=bs, max_length=512, convert_to_tensor=True),
        baseline=lambda: ref.encode(corpus, batch_size=bs, max_length=512, convert_to_tensor=True),
        baseline_name="gritlm.GritLM.encode", flops=_encode_flops(size, lengths),
        extra=dict(texts=n_texts, tokens=sum(lengths)),
    ))

    # 2. RAG latency protocol
    long_lengths = (1000,) if quick else (250, 500, 1000, 2000, 4000)
    modes = (None, "doc", "query", "docquery", "querydoc")
    # Quick (the CPU default): the long document side only; --full adds the long query side.
    for L in long_lengths:
        for long_side in (("doc",) if quick else ("doc", "query")):
            doc = _words(L if long_side == "doc" else 1, seed=L)
            query = _words(L if long_side == "query" else 1, seed=L + 1)
            shape = f"{long_side}={L} other=1 new={N_NEW} {dims}"
            for mode in modes:
                doc_caches, doc_kv = None, None
                if mode is not None and "doc" in mode:
                    doc_caches = gm.cache_documents(ours, [doc], cache=mode)
                    instruction = "\n" + EMBED if mode == "querydoc" else EMBED
                    dc = ref.encode_corpus([doc], get_cache=True, convert_to_tensor=True, instruction=instruction,
                                           add_special_tokens=mode != "querydoc", max_length=None)[1]
                    doc_kv = [(layer.keys, layer.values) for layer in dc.layers]
                label = mode or "none"
                fn = (lambda m=mode, q=query, d=doc, c=doc_caches: _ours_rag(ours, q, d, m, c))
                out.append(Case(
                    f"model rag {label}", shape, backend, fn=fn,
                    baseline=(lambda m=mode, q=query, d=doc, kv=doc_kv: _gritlm_rag(ref, q, d, m, kv)),
                    baseline_name=f"gritlm rag {label}", extra=dict(mode=label, long_side=long_side, L=L),
                ))
                # Quick mode keeps one speed-up row per side: the mode that caches the long side.
                if mode is not None and (not quick or mode == long_side):
                    out.append(Case(
                        f"model rag {label} vs no cache", shape, backend, fn=fn,
                        baseline=(lambda q=query, d=doc: _ours_rag(ours, q, d, None, None)),
                        baseline_name="grit_models rag none", extra=dict(mode=label, long_side=long_side, L=L),
                    ))

    # 3. generation tokens/s
    B, n_new = (4, 16) if quick else (8, 64)
    prompts = random_texts(B, 16, 96, seed=2)
    ref.tokenizer.padding_side = "left"
    inputs = ref.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    ref.tokenizer.padding_side = "right"
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=ref.tokenizer.pad_token_id)
    out.append(Case(
        "model generate", f"B={B} prompt={inputs['input_ids'].shape[1]} new={n_new} {dims} mistral", backend,
        fn=lambda: ours.generate(**inputs, **gen),
        baseline=lambda: ref.model.generate(**inputs, **gen),
        baseline_name="transformers generate", extra=dict(new_tokens=B * n_new),
    ))
    if device.type == "cpu":
        # 3b. decode compiled (static cache + transformers' compile_config opt-in; on a GPU
        # 'static' is the CUDA-graph row below), against transformers' default generate and
        # against our eager decode. The first call (not timed) compiles: about 7 s here.
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=True, mode="default")
        shape = f"B={B} prompt={inputs['input_ids'].shape[1]} new={n_new} {dims} mistral"
        def compiled():
            return ours.generate(**inputs, cache_implementation="static", compile_config=cc, **gen)
        for base, name in ((lambda: ref.model.generate(**inputs, **gen), "transformers generate"),
                           (lambda: ours.generate(**inputs, **gen), "grit_models eager")):
            out.append(Case("model generate compiled", shape, backend + " compiled", fn=compiled, baseline=base,
                            baseline_name=name, extra=dict(new_tokens=B * n_new)))
    # 4. the other backbones at the same size: encode and generate beside Mistral's rows
    for arch in ("llama", "qwen2"):
        bpath, _ = _checkpoint(device, quick, arch)
        b_ours = gm.GritModel(str(bpath), device=str(device))
        b_ref = _gritlm(gritlm, bpath, device, dtype, arch)
        b_ours.tokenizer = b_ref.tokenizer  # the same ids on both sides (see _gritlm for qwen2)
        out.append(Case(
            "model encode", f"N={n_texts} L={min(lengths)}..{max(lengths)} bs={bs} {dims} {arch}", backend,
            fn=lambda m=b_ours: m.encode(corpus, batch_size=bs, max_length=512, convert_to_tensor=True),
            baseline=lambda r=b_ref: r.encode(corpus, batch_size=bs, max_length=512, convert_to_tensor=True),
            baseline_name="gritlm.GritLM.encode", flops=_encode_flops(size, lengths),
            extra=dict(texts=n_texts, tokens=sum(lengths), arch=arch),
        ))
        b_ref.tokenizer.padding_side = "left"
        b_inputs = b_ref.tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        b_ref.tokenizer.padding_side = "right"
        b_gen = dict(gen, pad_token_id=b_ref.tokenizer.pad_token_id)
        out.append(Case(
            "model generate", f"B={B} prompt={b_inputs['input_ids'].shape[1]} new={n_new} {dims} {arch}", backend,
            fn=lambda m=b_ours, i=b_inputs, k=b_gen: m.generate(**i, **k),
            baseline=lambda r=b_ref, i=b_inputs, k=b_gen: r.model.generate(**i, **k),
            baseline_name="transformers generate", extra=dict(new_tokens=B * n_new, arch=arch),
        ))
    # 5. decode through a CUDA graph (cache_implementation="static") on GritLM-7B-shaped layers
    out += _graph_decode_cases(device, quick, gm) if device.type == "cuda" else [Skipped(
        "model generate graph", "B=1, 16 GritLM-7B layers bf16 (cache_implementation='static')", "needs a CUDA device")]
    for case in out:
        case.threads = threads or 1  # run_case pins (and records) the count on the CPU
    return out


def _graph_decode_cases(device, quick, gm):
    """Tokens/s of greedy decode captured as a CUDA graph against eager decode and against
    transformers' generate: Mistral-7B / GritLM-7B layers (4096 wide, 32/8 heads, 14336 MLP),
    random weights, 2 (quick) or 4 of them, bf16, 128-token prompts, 64 new tokens."""
    import transformers

    from grit_models.testing import make_checkpoint

    layers = 2 if quick else 4
    path = Path(tempfile.mkdtemp(prefix="grit_bench_7b_")) / "ckpt"
    make_checkpoint(path, "mistral", dtype="bfloat16", init_std=0.02, max_position_embeddings=8192,
                    hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                    num_key_value_heads=8, sliding_window=None)
    ours = gm.GritModel(str(path), device=str(device), torch_dtype="bfloat16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    out, n_new = [], 64
    for B in (1, 16):
        ids = torch.randint(3, 32000, (B, 128), device=device, generator=torch.Generator(device).manual_seed(B))
        gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        shape = f"B={B} prompt=128 new={n_new} D=4096 layers={layers} GritLM-7B layers bf16"
        def graph(i=ids):
            return ours.generate(i, cache_implementation="static", **gen)
        out.append(Case("model generate graph", shape, "grit_models cuda graph", fn=graph,
                        baseline=lambda i=ids: ours.generate(i, **gen), baseline_name="grit_models eager",
                        extra=dict(new_tokens=B * n_new)))
        out.append(Case("model generate graph", shape, "grit_models cuda graph", fn=graph,
                        baseline=lambda i=ids: ref.generate(i, **gen), baseline_name="transformers generate",
                        extra=dict(new_tokens=B * n_new)))
    return out
