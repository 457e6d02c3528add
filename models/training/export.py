"""Saving a trained model as a Hugging Face checkpoint (safetensors, config, tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn


from .. import weight_map
from ..config import MistralConfig
from .distributed import _dist


def hf_state_dict(sd: dict, cfg: MistralConfig) -> dict:
    """Our parameter names (``Transformer.state_dict()``) -> HF tensor names (Mixtral in the
    hub's per-expert layout): the inverse of ``load_checkpoint``'s mapping, through the same
    table (models/weight_map.py)."""
    sd = {n: t.detach() for n, t in sd.items()}
    out, used = {}, set()
    for entry in weight_map.entries(cfg, with_lm_head="lm_head" in sd):
        missing = [n for n in entry.ours if n not in sd]
        if missing:
            raise KeyError(f"hf_state_dict: parameter {missing[0]!r} of the config is not in the state dict")
        for name, t in zip(entry.hf, entry.to_hf([sd[n] for n in entry.ours])):
            out[weight_map.hf_name(name)] = t
        used.update(entry.ours)
    extra = sorted(set(sd) - used)
    if extra:
        raise KeyError(f"hf_state_dict: no HF name for parameter {extra[0]!r}")
    return out


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json")


def _full_model_state(module: nn.Module) -> dict:
    """Full (unsharded) CPU state dict of the Transformer inside ``module`` (plain, DDP or FSDP2);
    a collective under torch.distributed: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("model."):
            out[k[len("model."):]] = v
    return out


def save_model(module: nn.Module, path, source_dir, *, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 5 * 2**30) -> Path | None:
    """Write the model inside ``module`` as an HF checkpoint folder that ``load_checkpoint``,
    ``GritModel`` and transformers read: ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json``; ``config.json`` (its dtype
    updated) and the tokenizer files copied from ``source_dir``. ``dtype``: cast on save
    (default: the training dtype, which keeps resuming bit-exact). Collective under
    torch.distributed (the shards are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    sd = _full_model_state(module)
    rank, _ = _dist()
    if rank != 0:
        return None
    path, source_dir = Path(path), Path(source_dir)
    path.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads((source_dir / "config.json").read_text())
    cfg = MistralConfig.from_dict(cfg_json, strict=False)
    tensors = hf_state_dict(sd, cfg)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    saved_dtype = next(iter(tensors.values())).dtype
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg_json["torch_dtype"] = str(saved_dtype).removeprefix("torch.")
    cfg_json.pop("dtype", None)
    (path / "config.json").write_text(json.dumps(cfg_json, indent=2))
    for name in _TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, path / name)
    return path
