"""Retrieval-augmented generation with GRIT's caching modes (paper section 4 / gritlm rag/eval.py).

A GRIT model embeds with bidirectional attention, and the keys/values of that embedding pass
can be reused as a generation prefix. Modes (``cache=``):

    None        no caching: the query and document are written into one prompt
    "doc"       Doc Caching: document KV from its embedding pass, then the query as prompt
    "query"     Query Caching: query KV from its embedding pass, then the document as prompt
    "docquery"  both caches, document first, then a short instruction as prompt
    "querydoc"  both caches, query first, then a short instruction as prompt

Prompt formats are gritlm's (so that models trained on them answer alike). The document cache
is "<s><|embed|>\\n{doc}" except in Query-Doc mode, where it follows the query cache and is
"\\n<|embed|>\\n{doc}" without BOS. Every cache keeps the positions it was computed at and the
prompt continues at position = total cache length, as gritlm's use of HF caches does. Unlike
gritlm, each cache holds one sequence without padding, so rows of a batch may have caches of
different lengths.
"""

from __future__ import annotations

import torch

from .generation import KVPrefix

from .prompts import (  # noqa: E402,F401  (gritlm's RAG prompts; re-exported for callers of rag)
    ANSWER_PREFIX, CACHED_DOC, CACHED_DOC_QUERY, CACHED_QUERY, CACHED_QUERY_DOC, EMBED, FORMAT_DOC_FIRST,
    FORMAT_QUERY_FIRST,
)
from .prompts import RAG_MODES as MODES  # noqa: E402


def passage_text(doc) -> str:
    """A document as text: a string, or gritlm's dict with "text" (and "title")."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and "text" in doc:
        return (doc["title"] + " " + doc["text"]) if doc.get("title") else doc["text"]
    raise TypeError(f"documents: expected strings or dicts with 'text', got {type(doc).__name__}")


def _check_mode(cache) -> None:
    if cache not in MODES:
        raise ValueError(f"cache: expected one of {MODES}, got {cache!r}")


def cache_documents(model, documents, *, cache: str = "doc", batch_size: int = 256,
                    max_length: int | None = None) -> list[KVPrefix]:
    """Offline step of Doc / Doc-Query / Query-Doc caching: one KVPrefix per document, from
    its embedding pass (returns the same list order as ``documents``)."""
    _check_mode(cache)
    if cache is None or "doc" not in cache:
        raise ValueError(f"cache: documents are cached only in 'doc', 'docquery' and 'querydoc' modes, got {cache!r}")
    texts = [passage_text(d) for d in documents]
    instruction, special = ("\n" + EMBED, False) if cache == "querydoc" else (EMBED, True)
    _, caches = model.encode(texts, instruction=instruction, add_special_tokens=special, get_cache=True,
                             convert_to_tensor=True, batch_size=batch_size, max_length=max_length)
    return caches


def cache_query(model, query: str, *, max_length: int | None = None):
    """(embedding (D,), KVPrefix) of a query from its embedding pass "<s><|embed|>\\n{query}"."""
    emb, caches = model.encode([query], instruction=EMBED, get_cache=True, convert_to_tensor=True,
                               max_length=max_length)
    return emb[0], caches[0]


@torch.no_grad()
def rag_generate(model, query: str, documents, *, cache: str | None = None, prompt: str = "doc",
                 doc_caches: list[KVPrefix] | None = None, query_cache: KVPrefix | None = None,
                 answer_prefix: str = ANSWER_PREFIX, max_new_tokens: int = 16, return_ids: bool = False,
                 **generate_kwargs):
    """Answer ``query`` using ``documents`` (a string/dict or a list of them) in mode ``cache``.

    prompt: without caching, "doc" puts the documents before the query, "query" after it.
    doc_caches / query_cache: precomputed caches (``cache_documents`` / ``cache_query``, in
    the mode's format); computed here when absent. Several documents are joined by a blank
    line in the prompt, or their caches concatenated in order.
    Returns the generated text (after ``answer_prefix``), or its token ids with ``return_ids``.
    """
    _check_mode(cache)
    if not isinstance(query, str):
        raise TypeError(f"query: expected a string, got {type(query).__name__}")
    if prompt not in ("doc", "query"):
        raise ValueError(f"prompt: expected 'doc' or 'query', got {prompt!r}")
    docs = [documents] if isinstance(documents, (str, dict)) else list(documents)
    if not docs:
        raise ValueError("documents: expected at least one document")
    doc_text = "\n\n".join(passage_text(d) for d in docs)
    tok = model.tokenizer

    prefix = None
    if cache is None:
        fmt = FORMAT_DOC_FIRST if prompt == "doc" else FORMAT_QUERY_FIRST
        text, special = fmt.format(query=query, doc=doc_text), True
    else:
        parts = {}
        if "doc" in cache:
            if doc_caches is None:
                doc_caches = cache_documents(model, docs, cache=cache)
            if len(doc_caches) != len(docs):
                raise ValueError(f"doc_caches: expected one cache per document ({len(docs)}), got {len(doc_caches)}")
            parts["doc"] = KVPrefix.cat(doc_caches)
        if "query" in cache:
            parts["query"] = query_cache if query_cache is not None else cache_query(model, query)[1]
        prefix = KVPrefix.cat([parts[name] for name in ("doc", "query") if name in parts] if cache != "querydoc"
                              else [parts["query"], parts["doc"]])
        text = {"doc": CACHED_DOC.format(query=query), "query": CACHED_QUERY.format(doc=doc_text),
                "docquery": CACHED_DOC_QUERY, "querydoc": CACHED_QUERY_DOC}[cache]
        special = False  # BOS sits at the start of the cache
    ids = torch.tensor([tok.encode(text + answer_prefix, add_special_tokens=special)], device=model.device)
    out = model.generate(ids, past_key_values=prefix, max_new_tokens=max_new_tokens, **generate_kwargs)
    new = out[0, ids.shape[1]:]
    return new if return_ids else tok.decode(new, skip_special_tokens=True)
