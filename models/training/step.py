"""One optimiser step of both objectives (GradCache for the embedding half), and the schedule."""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.checkpoint
from torch import nn

import grit_kernels

from .data import generative_tensors
from .distributed import _dist



# =========================================================================================
# step
# =========================================================================================


@dataclasses.dataclass
class StepConfig:
    temperature: float = 0.02
    normalized: bool = True
    negatives_cross_device: bool = True   # only meaningful under torch.distributed
    emb_chunk_size: int | None = None     # GradCache chunk (rows per forward); None = one pass
    gen_chunk_size: int | None = None     # sequences per generative forward; None = all at once
    autocast_dtype: torch.dtype | None = None   # torch.bfloat16 on GPU


class GritStep:
    """One training step's forward and backward (gradients accumulate in ``.grad``; the
    caller steps the optimiser). ``module`` is the ``GritTrainModel`` or its DDP / FSDP2
    wrapper. Order as in gritlm: the generative half first (its gradient sync held back),
    then the embedding half, whose last backward syncs everything."""

    def __init__(self, module: nn.Module, cfg: StepConfig):
        self.module, self.cfg = module, cfg
        self._syncable = hasattr(module, "no_sync") or hasattr(module, "set_requires_gradient_sync")
        for name in ("emb_chunk_size", "gen_chunk_size"):
            v = getattr(cfg, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {v!r}")
        self._gc = None
        if cfg.emb_chunk_size is not None:
            self._gc = grit_kernels.GradCache(self._encode, cfg.emb_chunk_size, self._emb_loss,
                                              no_sync_modules=[module] if self._syncable else [])

    def _autocast(self, device: torch.device):
        if self.cfg.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.cfg.autocast_dtype)

    def _encode(self, batch):
        with self._autocast(batch["input_ids"].device):
            return self.module("embed", batch)

    def _emb_scale(self) -> float:
        _, world = _dist()
        return float(world) if self._gather() else 1.0

    def _gather(self) -> bool:
        return self.cfg.negatives_cross_device and _dist()[1] > 1

    def _emb_loss(self, q, d):
        loss = grit_kernels.contrastive_loss(q, d, temperature=self.cfg.temperature, normalize=self.cfg.normalized,
                                             gather=self._gather())
        return loss * self._emb_scale()

    def _held(self):
        import contextlib

        if not self._syncable:
            return contextlib.nullcontext()
        if hasattr(self.module, "no_sync"):
            return self.module.no_sync()

        @contextlib.contextmanager
        def fsdp_no_sync():
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        return fsdp_no_sync()

    def __call__(self, batch: dict) -> dict:
        """batch: ``GritData.local_batch`` output. Returns {"loss", "loss_emb", "loss_gen"} as
        floats: loss_emb is the global in-batch loss, loss_gen this rank's (mean over chunks)."""
        import contextlib

        has_emb = "query" in batch
        out = {}
        gen = batch.get("generative")
        if gen:
            n = self.cfg.gen_chunk_size or len(gen)
            chunks = [gen[i:i + n] for i in range(0, len(gen), n)]
            total = 0.0
            for c, items in enumerate(chunks):
                last = c == len(chunks) - 1 and not has_emb
                tensors = generative_tensors(items, device=_device_of(self.module))
                with (contextlib.nullcontext() if last else self._held()):
                    with self._autocast(tensors["tokens"].device):
                        loss = self.module("gen", tensors) / len(chunks)
                    loss.backward()
                total += loss.detach()
            out["loss_gen"] = float(total)
        if has_emb:
            q, d = batch["query"], batch["passage"]
            if self._gc is not None:
                loss = self._gc.step(q, d)
            else:
                loss = self._emb_loss(self._encode(q), self._encode(d))
                loss.backward()
                loss = loss.detach()
            out["loss_emb"] = float(loss) / self._emb_scale()
        out["loss"] = out.get("loss_emb", 0.0) + out.get("loss_gen", 0.0)
        return out


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# =========================================================================================
# optimiser and schedule
# =========================================================================================


def warmup_linear(warmup_steps: int, total_steps: int):
    """transformers' get_linear_schedule_with_warmup as a LambdaLR factor."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    return f
