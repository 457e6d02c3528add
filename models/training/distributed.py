"""Loading a trainable model onto devices and wrapping it for DDP / FSDP2."""

from __future__ import annotations


import torch
import torch.utils.checkpoint
from torch import nn


from ..checkpoint import load_checkpoint
from ..config import MistralConfig
from .model import GritTrainModel


def _dist() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) without it."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def load_model(path, device, *, dtype=torch.float32) -> nn.Module:
    """``load_checkpoint`` for training: fp32 master weights, requires_grad on."""
    model = load_checkpoint(path, device=device, torch_dtype=dtype)
    return model.train().requires_grad_(True)


def load_sharded(path, device, **train_kwargs) -> GritTrainModel:
    """FSDP2 without a full copy per rank: every rank builds the model on the meta device and
    shards it (``wrap(..., "fsdp")``); rank 0 reads the checkpoint on the CPU and its
    tensors are broadcast one by one into the shards. Returns the sharded GritTrainModel."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ..mistral import Transformer

    cfg = MistralConfig.from_pretrained(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    tm = GritTrainModel(model, **train_kwargs)
    wrap(tm, "fsdp", device)
    tm.to_empty(device=device)
    full = {}
    if _dist()[0] == 0:
        full = {f"model.{k}": v for k, v in load_model(path, "cpu").state_dict().items()}
    set_model_state_dict(tm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return tm.train()


def wrap(module: GritTrainModel, strategy: str, device: torch.device) -> nn.Module:
    """"none", "ddp" or "fsdp" (FSDP2: ``fully_shard`` per decoder layer, then the root)."""
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # Embedding passes leave the LM head unused.
        return DDP(module, device_ids=ids, find_unused_parameters=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in module.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    raise ValueError(f"strategy: expected 'none', 'ddp' or 'fsdp', got {strategy!r}")
