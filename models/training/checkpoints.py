"""Training state on disk: atomic checkpoints (model, optimiser, schedule, RNG), resume."""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.utils.checkpoint


from .distributed import _dist
from .export import save_model


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk (before a rename makes
    the folder visible as a checkpoint)."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PARTIAL_PREFIX = ".partial-"


def save_training_state(path, module, optimizer, scheduler, step: int, source_dir, extra: dict | None = None,
                        **save_kwargs) -> Path:
    """A resumable checkpoint folder: the HF model (``save_model``, ``save_kwargs`` passed on)
    + ``training_state.pt`` (full optimiser state keyed by parameter name, scheduler, step,
    RNG states per rank).

    Atomic: everything is written into ``.partial-<name>`` beside ``path``, flushed to disk,
    and renamed into place; the ``latest`` marker in the parent folder is replaced last. A
    process killed at any point leaves either the previous checkpoint or the new one, never
    a half-written folder under a checkpoint's name (a stale ``.partial-*`` is ignored by
    ``resolve_resume``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    path = Path(path)
    tmp = path.parent / f"{PARTIAL_PREFIX}{path.name}"
    rank, world = _dist()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier kill
    save_model(module, tmp, source_dir, **save_kwargs)
    osd = get_optimizer_state_dict(module, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    if rank == 0:
        torch.save({"step": step, "optimizer": osd, "scheduler": scheduler.state_dict() if scheduler else None,
                    "rng": rngs, "world_size": world, "extra": extra or {}}, tmp / "training_state.pt")
        _fsync_tree(tmp)
        old = path.parent / f"{PARTIAL_PREFIX}old-{path.name}"
        if path.exists():  # re-saving a step (after a resume): keep the old one until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        marker = path.parent / ".latest.tmp"
        marker.write_text(path.name)
        with open(marker, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(marker, path.parent / "latest")
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return path


def load_training_state(path, module, optimizer, scheduler) -> dict:
    """Restore optimiser, scheduler and this rank's RNG from ``save_training_state``'s folder
    (the model weights are loaded by ``load_checkpoint(path)`` before wrapping). Returns the
    saved dict (``step``, ``extra``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(path)
    file = path / "training_state.pt"
    if not file.is_file():
        raise FileNotFoundError(f"resume: {file} does not exist (not a checkpoint written by save_training_state)")
    state = torch.load(file, map_location="cpu", weights_only=False)
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank, world = _dist()
    if world != state["world_size"]:
        warnings.warn(f"resume: saved with world size {state['world_size']}, resuming with {world}; "
                      "the data order is kept, RNG states are not restored", stacklevel=2)
    else:
        _set_rng_state(state["rng"][rank])
    return state


def is_complete_checkpoint(folder: Path) -> bool:
    """A folder holding all that a resume reads: training state, config and weights."""
    return ((folder / "training_state.pt").is_file() and (folder / "config.json").is_file()
            and ((folder / SINGLE_WEIGHTS).is_file() or (folder / INDEX_WEIGHTS).is_file()))


SINGLE_WEIGHTS, INDEX_WEIGHTS = "model.safetensors", "model.safetensors.index.json"


def resolve_resume(path) -> Path | None:
    """The checkpoint to resume from: ``path`` itself when it is a complete checkpoint
    folder; for an output folder, the newest complete ``checkpoint-N`` inside (the one its
    ``latest`` marker names when that one is complete). None when there is none. Partial
    folders left by a kill are skipped, each named in a warning."""
    path = Path(path)
    if is_complete_checkpoint(path):
        return path
    if not path.is_dir():
        return None
    partial = sorted(p.name for p in path.iterdir() if p.is_dir() and (
        p.name.startswith(PARTIAL_PREFIX) or (p.name.startswith("checkpoint-") and not is_complete_checkpoint(p))))
    if partial:
        warnings.warn(f"resume: ignoring incomplete checkpoint folders in {path} (left by an interrupted save): "
                      f"{', '.join(partial)}", stacklevel=2)
    latest = path / "latest"
    if latest.is_file():
        named = path / latest.read_text().strip()
        if is_complete_checkpoint(named):
            return named
    steps = []
    for p in path.glob("checkpoint-*"):
        suffix = p.name[len("checkpoint-"):]
        if suffix.isdigit() and is_complete_checkpoint(p):
            steps.append((int(suffix), p))
    return max(steps)[1] if steps else None
