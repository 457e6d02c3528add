"""grit_models: a minimal Mistral/Mixtral and GritModel on top of grit_kernels.

    MistralConfig, MixtralConfig   from an HF config.json (``.from_pretrained(path)``)
    load_checkpoint(path)          HF safetensors (single or sharded) -> Transformer
    Tokenizer                      the checkpoint's tokenizer.json, BOS added like the original
    GritModel (alias GritLM)       drop-in for gritlm.GritLM: encode, encode_queries/corpus, generate
    KVPrefix                       one sequence's KV cache (encode(..., get_cache=True), RAG caching)
    generate                       HF-style generation on a Transformer
    rag_generate                   a query with retrieved documents in any GRIT caching mode

Usage (a local HF checkpoint folder: config.json, *.safetensors, tokenizer.json)::

    from grit_models import GritModel, gritlm_instruction_format
    model = GritModel("path/to/GritLM-7B", torch_dtype="auto")
    q = model.encode(["what is GRIT?"], instruction=gritlm_instruction_format("Retrieve relevant passages"))
    d, caches = model.encode_corpus(docs, instruction=gritlm_instruction_format(), get_cache=True)
    answer = model.rag("what is GRIT?", docs[0], cache="doc", doc_caches=[caches[0]])
    out = model.generate(input_ids, attention_mask, max_new_tokens=64)   # prompt + new tokens
"""

from .checkpoint import CheckpointError, load_checkpoint
from .config import MistralConfig, MixtralConfig
from .generation import KVPrefix, generate
from .grit import GritLM, GritModel, gritlm_instruction_format
from .mistral import KVCache, Transformer
from .rag import cache_documents, cache_query, rag_generate
from .tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "GritLM", "GritModel", "KVCache", "KVPrefix", "MistralConfig", "MixtralConfig",
    "Tokenizer", "Transformer", "cache_documents", "cache_query", "generate", "gritlm_instruction_format",
    "load_checkpoint", "rag_generate",
]
