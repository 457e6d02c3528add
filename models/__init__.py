"""grit_models: a minimal Mistral/Mixtral/Llama/Qwen2 and GritModel on top of grit_kernels.

    MistralConfig, MixtralConfig,  from an HF config.json (``MistralConfig.from_pretrained(path)``
    LlamaConfig, Qwen2Config       picks the class from model_type)
    load_checkpoint(path)          HF safetensors (single or sharded) -> Transformer
    load_tokenizer(path)           the checkpoint's Hugging Face tokenizer, with gritlm's settings
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

import importlib

# public name -> module defining it. Resolved on first use, so that light entry points
# (``python -m grit_models.train --help``) do not import torch.
_API = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "MistralConfig": "config", "MixtralConfig": "config", "LlamaConfig": "config", "Qwen2Config": "config",
    "KVPrefix": "generation", "generate": "generation",
    "GritLM": "grit", "GritModel": "grit", "gritlm_instruction_format": "grit",
    "KVCache": "mistral", "Transformer": "mistral",
    "cache_documents": "rag", "cache_query": "rag", "rag_generate": "rag",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'grit_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
