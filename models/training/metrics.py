"""Evaluation metrics computed during training."""

from __future__ import annotations


import torch
import torch.nn.functional as F
import torch.utils.checkpoint


from .model import GritTrainModel


def retrieval_accuracy(module: GritTrainModel, q: dict, d: dict) -> float:
    """Share of queries whose most similar document (cosine) among ``d`` is their own
    (queries and documents paired row by row)."""
    with torch.no_grad():
        qe = F.normalize(module.encode(q), dim=-1)
        de = F.normalize(module.encode(d), dim=-1)
    return float(((qe @ de.T).argmax(dim=1) == torch.arange(qe.shape[0], device=qe.device)).float().mean())
