"""Gradient caching: train an encoder under a big-batch loss with the activations of one chunk.

A contrastive loss couples every query with every document, so its batch cannot be split
into independent micro-batches. GradCache (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") splits the encoder instead:

    1. encode every chunk without grad            reps (B, D) for all inputs, no graph kept
    2. loss(reps...) and backward to reps only    grad of each rep, (B, D) each
    3. per chunk: re-encode with grad, replaying that chunk's RNG state (so dropout draws
       the same masks as in 1), and backpropagate the cached rep gradients into the encoder

The parameters' gradients equal those of one unchunked step whose encoder drew the same
random numbers; activation memory is that of one chunk. The price is a second forward
(about +1/3 of a forward-backward). Under DDP or FSDP the gradient all-reduce runs once,
on the last chunk: earlier chunks run under ``no_sync``.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["GradCache"]


@dataclass
class _RngState:
    """The CPU generator and the CUDA generators of the devices a chunk may draw from."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def capture(cls, devices: Sequence[int]) -> "_RngState":
        return cls(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in devices})

    @contextlib.contextmanager
    def replay(self):
        """Run the block under this state; the global generators are restored afterwards."""
        with torch.random.fork_rng(devices=list(self.cuda), enabled=True):
            torch.set_rng_state(self.cpu)
            for i, state in self.cuda.items():
                torch.cuda.set_rng_state(state, i)
            yield


class GradCache:
    """Chunked two-pass training step for one or more encoders under any loss.

    Args:
        encoders: one callable per input (``encoder(chunk) -> reps (b, ...)``), or a single
            callable shared by all inputs (GritLM encodes queries and documents with one
            model). Modules wrapped in DDP or FSDP are found here and get ``no_sync``.
        chunk_sizes: rows per chunk, one int per input or one int for all.
        loss_fn: ``loss_fn(*reps, **loss_kwargs) -> scalar`` on the full-batch reps, one
            (B_k, ...) tensor per input in the order of ``step``'s arguments. Its own
            parameters, if any, get their gradients too.
        no_sync_modules: modules whose gradient sync to hold back on all chunks but the last
            that uses them (DDP and FSDP1 ``no_sync``, FSDP2 ``set_requires_gradient_sync``);
            default: every encoder that is such a module. Pass the wrapped model here when
            the encoder is a function or a bound method of it.
        scaler: an optional ``torch.amp.GradScaler``; the loss is scaled before the backward.

    Example (GritLM's embedding step, documents in [pos, neg] groups)::

        gc = GradCache(model.encode, chunk_sizes=(32, 16), loss_fn=contrastive_loss,
                       no_sync_modules=[ddp_model])
        loss = gc.step(queries, documents)   # dicts of (B, S) and (2B, S) tensors
        optimizer.step(); optimizer.zero_grad()

    ``step`` adds to the parameters' ``.grad`` like ``loss.backward()``; it does not zero
    them or step the optimiser.
    """

    def __init__(
        self,
        encoders: Callable | Sequence[Callable],
        chunk_sizes: int | Sequence[int],
        loss_fn: Callable[..., torch.Tensor],
        *,
        no_sync_modules: Sequence[torch.nn.Module] | None = None,
        scaler: Any | None = None,
    ):
        self.encoders = list(encoders) if isinstance(encoders, (list, tuple)) else encoders
        if isinstance(self.encoders, list):
            if not self.encoders or not all(callable(e) for e in self.encoders):
                raise TypeError("encoders: expected a callable or a non-empty sequence of callables")
        elif not callable(self.encoders):
            raise TypeError(f"encoders: expected a callable or a sequence of callables, got {type(encoders).__name__}")
        def is_int(c):
            return isinstance(c, numbers.Integral) and not isinstance(c, bool)

        if is_int(chunk_sizes):
            sizes = [chunk_sizes]
        elif isinstance(chunk_sizes, Sequence) and not isinstance(chunk_sizes, str):
            sizes = list(chunk_sizes)
        else:
            raise TypeError(f"chunk_sizes: expected a positive int or a sequence of them, got "
                            f"{type(chunk_sizes).__name__} {chunk_sizes!r}")
        if not sizes or not all(is_int(c) and c >= 1 for c in sizes):
            raise ValueError(f"chunk_sizes: expected positive ints, got {chunk_sizes!r}")
        self.chunk_sizes = [int(c) for c in sizes]
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        if no_sync_modules is None:
            pool = self.encoders if isinstance(self.encoders, list) else [self.encoders]
            no_sync_modules = [e for e in pool if isinstance(e, torch.nn.Module)
                               and (hasattr(e, "no_sync") or hasattr(e, "set_requires_gradient_sync"))]
        for m in no_sync_modules:
            if not (hasattr(m, "no_sync") or hasattr(m, "set_requires_gradient_sync")):
                raise TypeError(f"no_sync_modules: {type(m).__name__} has neither no_sync() nor "
                                "set_requires_gradient_sync() (not DDP/FSDP)")
        self.no_sync_modules = list(no_sync_modules)
        self.scaler = scaler

    # -----------------------------------------------------------------------------------

    def step(self, *inputs, **loss_kwargs) -> torch.Tensor:
        """One training step's backward over the full batch; returns the loss (detached).

        Each input is a tensor (B_k, ...) or a mapping of such tensors (e.g. ``input_ids``
        and ``attention_mask``), split into chunks along dim 0; non-tensor mapping values
        are passed to every chunk unchanged. Encoders must return a tensor (b, ...).
        """
        if not inputs:
            raise ValueError("inputs: expected at least one batch to encode")
        if not torch.is_grad_enabled():
            raise RuntimeError("GradCache.step: gradients are disabled (called under torch.no_grad() or "
                               "torch.inference_mode()); step runs backward passes, call it with grad enabled")
        encoders = self._per_input(self.encoders, len(inputs), "encoders")
        sizes = self._per_input(self.chunk_sizes, len(inputs), "chunk_sizes")
        chunks = [_split(x, c, f"inputs[{k}]") for k, (x, c) in enumerate(zip(inputs, sizes))]
        devices = _cuda_devices(inputs)

        # 1. Encode every chunk without a graph, remembering the RNG state it started from.
        states, reps = [], []
        with torch.no_grad():
            for k, (enc, parts) in enumerate(zip(encoders, chunks)):
                states.append([])
                outs = []
                for part in parts:
                    states[-1].append(_RngState.capture(devices))
                    outs.append(_check_reps(enc(part), part, k))
                reps.append(torch.cat(outs).detach().requires_grad_())

        # 2. The loss on the full batch, backpropagated to the reps (and the loss's own
        #    parameters) only: the encoders are not in this graph.
        loss = self.loss_fn(*reps, **loss_kwargs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn: expected a scalar tensor")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        grads = [r.grad if r.grad is not None else torch.zeros_like(r) for r in reps]

        # 3. Re-encode with grad under the saved RNG states; push the cached gradients in.
        last_use = self._last_uses(encoders, chunks)
        for k, (enc, parts) in enumerate(zip(encoders, chunks)):
            offset = 0
            for c, part in enumerate(parts):
                held = [m for m in self.no_sync_modules if last_use.get(id(m)) != (k, c)]
                with contextlib.ExitStack() as stack:
                    for m in held:
                        stack.enter_context(_no_sync(m))
                    with states[k][c].replay():
                        out = _check_reps(enc(part), part, k)
                    g = grads[k][offset:offset + out.shape[0]]
                    offset += out.shape[0]
                    if out.requires_grad:
                        torch.autograd.backward(out, g.to(out.dtype))
        return loss.detach()

    __call__ = step

    # -----------------------------------------------------------------------------------

    @staticmethod
    def _per_input(value, n: int, name: str) -> list:
        if not isinstance(value, list):
            return [value] * n
        if len(value) == 1:
            return value * n
        if len(value) != n:
            raise ValueError(f"{name}: got {len(value)} entries for {n} inputs")
        return value

    def _last_uses(self, encoders, chunks) -> dict[int, tuple[int, int]]:
        """id(module) -> (input, chunk) of the last chunk whose encoder is that module.

        A module that is not itself an encoder (the encoder is e.g. ``model.encode``) is
        taken to be used by every input.
        """
        last = {}
        for m in self.no_sync_modules:
            users = [k for k, e in enumerate(encoders) if e is m or getattr(e, "__self__", None) is m]
            k = max(users) if users else len(encoders) - 1
            last[id(m)] = (k, len(chunks[k]) - 1)
        return last


@contextlib.contextmanager
def _no_sync(module):
    """Hold back the gradient all-reduce: DDP and FSDP1 ``no_sync``, FSDP2's switch."""
    if hasattr(module, "no_sync"):
        with module.no_sync():
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _split(x, size: int, name: str) -> list:
    """Chunks of ``size`` rows of a tensor or of every tensor of a mapping."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"{name}: expected a batch of at least one row, got shape {tuple(x.shape)}")
        return list(torch.split(x, size))
    if isinstance(x, Mapping):
        rows = {k: v.shape[0] for k, v in x.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not rows:
            raise ValueError(f"{name}: expected a mapping with at least one batched tensor")
        if len(set(rows.values())) != 1:
            raise ValueError(f"{name}: tensors disagree on the batch size: {rows}")
        B = next(iter(rows.values()))
        if B == 0:
            raise ValueError(f"{name}: empty batch")
        return [{k: (v[i:i + size] if k in rows else v) for k, v in x.items()} for i in range(0, B, size)]
    raise TypeError(f"{name}: expected a tensor or a mapping of tensors, got {type(x).__name__}")


def _rows(part) -> int:
    if isinstance(part, torch.Tensor):
        return part.shape[0]
    return next(v.shape[0] for v in part.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _check_reps(out, part, k: int) -> torch.Tensor:
    """An encoder's output for one chunk: a floating (b, ...) tensor with the chunk's b rows."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise TypeError(f"encoders: expected each call to return a (b, ...) tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"encoders: the encoder of inputs[{k}] returned dtype {out.dtype}; gradients need a "
                        "floating-point tensor")
    if out.shape[0] != _rows(part):
        raise ValueError(f"encoders: the encoder of inputs[{k}] returned {out.shape[0]} rows for a chunk of "
                         f"{_rows(part)}; expected one row per input row")
    return out


def _cuda_devices(inputs) -> list[int]:
    """CUDA devices whose generators a chunk may draw from: the inputs' and the current one."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    found = {torch.cuda.current_device()}
    for x in inputs:
        for v in (x.values() if isinstance(x, Mapping) else [x]):
            if isinstance(v, torch.Tensor) and v.is_cuda:
                found.add(v.device.index)
    return sorted(found)
