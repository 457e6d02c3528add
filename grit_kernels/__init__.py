"""grit-kernels: fused kernels for GRIT models (one LLM that embeds and generates).

Public API (shapes and semantics in each op's docstring and in DESIGN.md):

    mean_pool                  masked mean / weighted-mean pooling, padded or packed
    attention                  flash attention, causal or bidirectional per call
    attention_with_kvcache     attention over a KV cache with in-place append
    contrastive_loss           in-batch InfoNCE without materialising the logits
    GradCache                  gradient caching for batches larger than memory
    moe_route, moe_experts     Mixtral top-k routing and grouped SwiGLU experts
    moe_aux_loss               Mixtral's load-balancing loss

Shapes, one legend for the whole package (docstrings and tensor-name suffixes use it):

    B   batch rows / sequences           T      packed tokens (sequences back to back)
    S   tokens per row (Sq, Sk: query /  L_max  KV cache capacity
        key lengths)
    D   model (hidden) dim               Dh     head dim
    Hq  query heads                      Hkv    key/value heads (G = Hq / Hkv per group)
    N   documents (contrastive loss)     E      experts
    K   experts per token (top-k)        TK     T * K routing slots
    F   MLP / expert hidden size         V      vocabulary

Names are resolved on first use, so ``import grit_kernels`` neither touches ``torch.cuda``
nor imports Triton.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module defining it
_API = {
    "mean_pool": "grit_kernels.ops.mean_pool",
    "attention": "grit_kernels.ops.attention",
    "attention_with_kvcache": "grit_kernels.ops.attention_kvcache",
    "contrastive_loss": "grit_kernels.ops.contrastive_loss",
    "GradCache": "grit_kernels.grad_cache",
    "moe_route": "grit_kernels.ops.moe",
    "moe_experts": "grit_kernels.ops.moe",
    "moe_aux_loss": "grit_kernels.ops.moe",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'grit_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
