"""GritModel: a drop-in for ``gritlm.GritLM`` on the packed Mistral/Mixtral of this package.

Same constructor and ``encode`` signatures and defaults as gritlm.GritLM, same embeddings.
What differs is how the work is laid out:

* texts are sorted by length and packed back to back (``cu_seqlens``), so no compute is spent
  on padding, and results come back in input order;
* the instruction is attended to but left out of the mean through the pooling kernel's
  ``skip`` (gritlm zeroes those positions of the padding mask);
* ``get_cache=True`` returns one ``KVPrefix`` per text, holding no padding, for any number of
  batches (gritlm returns the padded HF cache of a single batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import grit_kernels

from . import generation as _generation
from .checkpoint import load_checkpoint
from .generation import KVPrefix
from .mistral import packed_positions
from .tokenizer import load_tokenizer, token_ids

from .prompts import ATTN_MODES, MODES, POOLING_METHODS
from .prompts import instruction_format as gritlm_instruction_format  # noqa: F401  (gritlm's name)


def pool(hidden_TD: torch.Tensor, cu_seqlens: torch.Tensor, skip_B: torch.Tensor, method: str, *,
         normalize: bool = False) -> torch.Tensor:
    """(B, D) embeddings of packed hidden states: GritLM's pooling, shared by GritModel.encode
    and training. ``skip_B`` (B,) int32: leading (instruction) tokens left out of the mean.

    "mean" / "weightedmean": fp32 (``grit_kernels.mean_pool``, L2-normalised in the kernel
    when ``normalize``); "cls": the first token; "lasttoken": the last one, in fp32 (gritlm's
    float mask product). ``normalize`` applies to the mean methods only."""
    if method in ("mean", "weightedmean"):
        return grit_kernels.mean_pool(hidden_TD, cu_seqlens=cu_seqlens, skip=skip_B, normalize=normalize,
                                      weighted=method == "weightedmean")
    if method == "cls":
        return hidden_TD[cu_seqlens[:-1].long()]
    if method == "lasttoken":
        return hidden_TD[cu_seqlens[1:].long() - 1].float()
    raise ValueError(f"pooling_method: expected one of {POOLING_METHODS}, got {method!r}")


class GritModel(torch.nn.Module):
    def __init__(
        self,
        model_name_or_path: str = None,
        mode: str = "unified",  # 'unified', 'embedding' (no lm_head) or 'generative'
        pooling_method: str = "mean",  # 'cls', 'lasttoken', 'mean', 'weightedmean'
        normalized: bool = True,
        projection: int = None,
        is_inference: bool = True,
        embed_eos: str = "",
        attn: str = "bbcc",
        device: str | torch.device | None = None,
        torch_dtype="auto",
        **kwargs,
    ) -> None:
        super().__init__()
        if model_name_or_path is None:
            raise ValueError("model_name_or_path: a local checkpoint folder is required")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if pooling_method not in POOLING_METHODS:
            raise ValueError(f"pooling_method: expected one of {POOLING_METHODS}, got {pooling_method!r}")
        if attn is not None and attn not in ATTN_MODES:
            raise ValueError(f"attn: expected one of {ATTN_MODES} (mixed attention is not supported), got {attn!r}")
        dtype_kw = kwargs.pop("dtype", None)
        if dtype_kw is not None:
            torch_dtype = dtype_kw
        # transformers' loading options that have no meaning here are accepted and ignored so
        # that gritlm call sites keep working; anything else is probably a typo.
        ignored = {"attn_implementation", "trust_remote_code", "low_cpu_mem_usage", "revision"}
        unknown = sorted(set(kwargs) - ignored)
        if unknown:
            raise TypeError(f"GritModel: unexpected keyword arguments {unknown}")
        self.device = _resolve_device(device)
        self.model = load_checkpoint(model_name_or_path, device=self.device, torch_dtype=torch_dtype,
                                     with_lm_head=mode != "embedding")
        self.config = self.model.config
        self.generation_config = _generation.default_generation_config(self.model, model_name_or_path)
        self.tokenizer = load_tokenizer(model_name_or_path) if is_inference else None
        self.projection = torch.nn.Linear(
            self.config.hidden_size, int(projection), dtype=self.model.dtype, device=self.device,
        ) if projection is not None else None
        self.mode, self.normalized, self.pooling_method = mode, normalized, pooling_method
        self.embed_eos, self.attn = embed_eos, attn
        self.num_gpus = 1
        if embed_eos and (self.tokenizer is None or embed_eos not in self.tokenizer.get_vocab()):
            raise ValueError(f"embed_eos: token {embed_eos!r} is not in the vocabulary")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ encoding

    def encode_queries(self, queries, **kwargs):
        """Used for encoding the queries of retrieval or reranking tasks."""
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """Documents: strings or dicts with "text" (and "title", joined as "title text")."""
        if isinstance(corpus, dict):
            corpus = [corpus]
        if isinstance(corpus, list) and corpus and isinstance(corpus[0], dict):
            corpus = [doc["title"] + " " + doc["text"] if "title" in doc else doc["text"] for doc in corpus]
        return self.encode(corpus, **kwargs)

    @torch.no_grad()
    def encode(
        self,
        sentences,
        batch_size: int = 256,
        max_length: int = 512,
        instruction: str = "",
        embed_instruction: bool = False,
        get_cache: bool = False,
        convert_to_tensor: bool = False,
        recast: bool = False,
        add_special_tokens: bool = True,
        **kwargs,
    ):
        """Embeddings (N, D) of ``sentences`` (one (D,) row for a single string), as gritlm.

        Each text is ``instruction + text + embed_eos``, tokenised with BOS and truncated to
        ``max_length`` tokens. Mean pooling leaves the instruction's tokens out unless
        ``embed_instruction``. Returns a float32 numpy array, or a tensor with
        ``convert_to_tensor``; with ``get_cache`` also a list of one KVPrefix per text.
        """
        if self.tokenizer is None:
            raise RuntimeError("encode: the model was created with is_inference=False (no tokenizer)")
        input_was_string = isinstance(sentences, str)
        if input_was_string:
            sentences = [sentences]
        if not isinstance(sentences, (list, tuple)) or not all(isinstance(s, str) for s in sentences):
            raise TypeError("sentences: expected a string or a list of strings")
        if len(sentences) == 0:
            raise ValueError("sentences: expected at least one text, got an empty list")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected a positive integer or None, got {max_length!r}")
        if not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a string, got {type(instruction).__name__}")

        tok = self.tokenizer
        ids = token_ids(tok, [instruction + s + self.embed_eos for s in sentences],
                        add_special_tokens=add_special_tokens, max_length=max_length)
        if any(len(x) == 0 for x in ids):
            raise ValueError("sentences: a text tokenised to zero tokens (empty text with add_special_tokens=False)")
        V = self.config.vocab_size
        for i, x in enumerate(ids):  # checked here: F.embedding would fail with a bare IndexError
            if max(x) >= V or min(x) < 0:
                raise ValueError(f"sentences[{i}]: the tokenizer gave token id {max(x) if max(x) >= V else min(x)}, "
                                 f"outside the model's vocabulary [0, {V}) (config.json vocab_size); the "
                                 "tokenizer does not belong to this checkpoint")
        skip = 0
        if instruction and not embed_instruction and "mean" in self.pooling_method:
            # gritlm: the instruction tokenised on its own, with BOS, counts the masked tokens.
            skip = len(token_ids(tok, [instruction], add_special_tokens=add_special_tokens, max_length=max_length)[0])
        bidirectional = self.attn is not None and self.attn[:2] == "bb"

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        embeddings: list = [None] * len(ids)
        caches: list = [None] * len(ids)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="Batches", disable=len(sentences) < 256):
            idx = order[start:start + batch_size]
            emb, kv = self._encode_packed([ids[i] for i in idx], skip, bidirectional, get_cache, recast)
            for j, i in enumerate(idx):
                embeddings[i] = emb[j]
                if get_cache:
                    caches[i] = kv[j]
        out = torch.stack(embeddings)
        if not convert_to_tensor:
            out = out.cpu().to(torch.float32).numpy()
        if input_was_string:
            out = out[0]
        return (out, caches) if get_cache else out

    def _encode_packed(self, batch_ids, skip: int, bidirectional: bool, get_cache: bool, recast: bool):
        """One packed forward: (B, D) embeddings and, with get_cache, B KVPrefix."""
        dev = self.device
        lengths = [len(x) for x in batch_ids]
        tokens = torch.tensor([t for x in batch_ids for t in x], dtype=torch.long, device=dev)
        cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        hidden, _, kv = self.model(tokens, packed_positions(cu, tokens.numel()), cu_seqlens=cu,
                                   max_seqlen=max(lengths), causal=not bidirectional, return_kv=get_cache,
                                   position_bound=max(lengths))
        method = self.pooling_method
        normalize_in_kernel = self.normalized and self.projection is None and not recast and method in (
            "mean", "weightedmean")
        skip_t = torch.full((len(lengths),), skip, dtype=torch.int32, device=dev)
        emb = pool(hidden, cu, skip_t, method, normalize=normalize_in_kernel)
        if self.projection is not None:
            # Pooling is a weighted average with weights summing to 1, so projecting the pooled
            # vector equals gritlm's projection of every token, at 1/L of the cost.
            p = self.projection
            emb = F.linear(emb.to(torch.float32), p.weight.float(), p.bias.float())
            if method == "cls":
                emb = emb.to(hidden.dtype)
        if recast:
            emb = emb.to(hidden.dtype)
        if self.normalized and not normalize_in_kernel:
            emb = F.normalize(emb, dim=-1).to(emb.dtype)
        caches = None
        if get_cache:
            caches = [KVPrefix([k[a:b].clone() for k, _ in kv], [v[a:b].clone() for _, v in kv])
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return emb, caches

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """transformers' ``generate`` (see grit_models.generation.generate): prompt + new tokens,
        with the checkpoint's generation_config.json as defaults and this model's tokenizer for
        ``stop_strings``. ``input_ids`` may be what the tokenizer returned (a BatchEncoding)."""
        if self.mode == "embedding":
            raise RuntimeError("generate: mode='embedding' loads no lm_head; use mode='unified'")
        kwargs.setdefault("tokenizer", self.tokenizer)
        return _generation.generate(self.model, input_ids, attention_mask, defaults=self.generation_config, **kwargs)

    def rag(self, query, documents, *, cache=None, **kwargs):
        """Answer ``query`` with retrieved ``documents`` in one of gritlm's RAG modes
        (see grit_models.rag.rag_generate)."""
        from .rag import rag_generate

        return rag_generate(self, query, documents, cache=cache, **kwargs)


GritLM = GritModel


def _resolve_device(device) -> torch.device:
    """gritlm's rule for None (CUDA when available, else CPU); a named device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but no CUDA device is available "
                             "(torch.cuda.is_available() is False); pass device='cpu' or None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device: {device!r} is not supported (expected 'cpu', 'cuda' or 'cuda:N')")
    return dev
