"""The trainable unit: embeddings (bidirectional, pooled) and the generative loss of one model."""

from __future__ import annotations


import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import grit_kernels

from ..mistral import packed_positions
from ..grit import pool
from ..prompts import LOSS_GEN_TYPES
from .data import IGNORE


# =========================================================================================
# model
# =========================================================================================


def _checkpointed(layer, *args):
    """Activation checkpointing of one layer (recomputed in the backward) while grads are on."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class GritTrainModel(nn.Module):
    """The trainable unit (wrap this in DDP / fully_shard): ``forward("embed", batch)`` gives
    (B, D) fp32 pooled embeddings, ``forward("gen", chunk)`` the generative loss of one chunk.

    ``model``: a ``grit_models.Transformer`` (``load_checkpoint(...)``), whose layers are
    called one by one as modules (``Block.forward``). ``pooling_method``: "mean" or
    "weightedmean". ``gradient_checkpointing``: recompute each layer in the backward.
    """

    def __init__(self, model: nn.Module, *, pooling_method: str = "mean", gradient_checkpointing: bool = False,
                 loss_gen_type: str = "mixed", loss_gen_factor: float = 1.0,
                 router_aux_loss_coef: float | None = None):
        super().__init__()
        if pooling_method not in ("mean", "weightedmean"):
            raise ValueError(f"pooling_method: expected 'mean' or 'weightedmean', got {pooling_method!r}")
        if loss_gen_type not in LOSS_GEN_TYPES:
            raise ValueError(f"loss_gen_type: expected one of {LOSS_GEN_TYPES}, got {loss_gen_type!r}")
        if not hasattr(model, "layers") or not hasattr(model, "embed"):
            raise TypeError(f"model: expected a grit_models Transformer, got {type(model).__name__}")
        self.model = model
        self.pooling_method = pooling_method
        self.gradient_checkpointing = gradient_checkpointing
        self.loss_gen_type, self.loss_gen_factor = loss_gen_type, float(loss_gen_factor)
        cfg = model.config
        self.is_moe = bool(getattr(cfg, "is_moe", False))
        if router_aux_loss_coef is None:
            router_aux_loss_coef = getattr(cfg, "router_aux_loss_coef", 0.0) if self.is_moe else 0.0
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.top_k = getattr(cfg, "num_experts_per_tok", 2)

    def hidden(self, tokens_T, cu_seqlens, max_seqlen: int, *, causal: bool):
        """(T, D) final-normed hidden states and the per-layer router logits (Mixtral)."""
        out = self.model(tokens_T, packed_positions(cu_seqlens, tokens_T.numel()), cu_seqlens=cu_seqlens,
                         max_seqlen=max_seqlen, causal=causal, position_bound=max_seqlen,
                         layer_call=_checkpointed if self.gradient_checkpointing else None)
        return out.hidden, out.router_logits

    def encode(self, batch: dict) -> torch.Tensor:
        """{"input_ids" (B, S), "lengths" (B,), "skip" (B,)} -> (B, D) fp32 mean-pooled
        embeddings of a bidirectional pass, instruction tokens left out (not normalised)."""
        ids, lengths = batch["input_ids"], batch["lengths"]
        S = int(lengths.max())
        mask = torch.arange(S, device=ids.device)[None, :] < lengths[:, None]
        tokens = ids[:, :S][mask]
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        hidden, _ = self.hidden(tokens, cu, S, causal=False)
        return pool(hidden, cu, batch["skip"].to(torch.int32), self.pooling_method)

    def generative_loss(self, chunk: dict) -> torch.Tensor:
        """Next-token loss of one packed chunk (``generative_tensors``), gritlm's aggregation,
        plus ``router_aux_loss_coef`` x the load-balancing loss for Mixtral."""
        hidden, router = self.hidden(chunk["tokens"], chunk["cu_seqlens"], chunk["max_seqlen"], causal=True)
        targets = chunk["targets"]
        sel = targets != IGNORE
        # Only target positions reach the LM head: user turns cost no (T, V) logits.
        logits = self.model.logits(hidden[sel]).float()
        ce_sum = F.cross_entropy(logits, targets[sel], reduction="sum")
        if self.loss_gen_type == "mixed":
            loss = ce_sum / sel.sum().clamp_min(1)
        else:
            loss = ce_sum / chunk["n_seqs"]
        loss = loss * self.loss_gen_factor
        if router and self.router_aux_loss_coef:
            loss = loss + self.router_aux_loss_coef * grit_kernels.moe_aux_loss(router, top_k=self.top_k)
        return loss

    def forward(self, kind: str, batch: dict) -> torch.Tensor:
        if kind == "embed":
            return self.encode(batch)
        if kind == "gen":
            return self.generative_loss(batch)
        raise ValueError(f"kind: expected 'embed' or 'gen', got {kind!r}")
