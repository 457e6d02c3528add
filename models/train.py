"""GRIT training entry point.

    python -m grit_models.train --model PATH [--embedding-data E.jsonl] [--generative-data G.jsonl] \\
        --output-dir OUT [--max-steps N] [--batch-size 8] [--gen-batch-size 8] ...
    torchrun --nproc-per-node 8 -m grit_models.train --model PATH ... --strategy fsdp

Without data arguments it trains on the small sample bundled with the package
(grit_models/data/*.jsonl). AdamW, linear warm-up then linear decay; bf16 autocast on GPU;
a progress bar with both losses; checkpoints every ``--save-steps`` (HF safetensors that
``load_checkpoint``/``GritModel`` read, plus optimiser/scheduler/RNG state);
``--resume OUT`` (or a checkpoint folder) continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

from .prompts import LOSS_GEN_TYPES, MODES
from .prompts import TRAIN_POOLING_METHODS as POOLING_METHODS

# torch and the trainer are imported inside train(): `--help` and a bad option answer at once.


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, including those given without a help text, and none
    where the help text already says what the default means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m grit_models.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_Help)
    p.add_argument("--model", required=True, help="local HF checkpoint folder (Mistral or Mixtral)")
    p.add_argument("--embedding-data", default=None, help="embedding JSONL (default: the bundled sample)")
    p.add_argument("--generative-data", default=None, help="generative JSONL (default: the bundled sample)")
    p.add_argument("--mode", choices=MODES, default="unified", help="which losses to train")
    p.add_argument("--output-dir", required=True, help="checkpoints, log.jsonl and args.json go here")
    p.add_argument("--max-steps", type=int, default=100, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=8, help="global embedding batch (queries) per step")
    p.add_argument("--gen-batch-size", type=int, default=8, help="global generative batch (sequences) per step")
    p.add_argument("--emb-chunk-size", type=int, default=None,
                   help="GradCache chunk per GPU (rows per forward); default: no GradCache")
    p.add_argument("--gen-chunk-size", type=int, default=None,
                   help="generative sequences per forward per GPU (default: the whole local batch)")
    p.add_argument("--train-group-size", type=int, default=2, help="1 positive + (G-1) hard negatives per query")
    p.add_argument("--query-max-len", type=int, default=256, help="tokens per query")
    p.add_argument("--passage-max-len", type=int, default=2048, help="tokens per passage")
    p.add_argument("--generative-max-len", type=int, default=2048, help="tokens per generative sequence")
    p.add_argument("--temperature", type=float, default=0.02, help="contrastive loss temperature")
    p.add_argument("--no-normalized", dest="normalized", action="store_false",
                   help="do not L2-normalise embeddings in the loss")
    p.add_argument("--pooling-method", choices=POOLING_METHODS, default="mean", help="embedding pooling")
    p.add_argument("--no-negatives-cross-device", dest="negatives_cross_device", action="store_false",
                   help="score queries against their own rank's documents only")
    p.add_argument("--loss-gen-type", choices=LOSS_GEN_TYPES, default="mixed",
                   help="gritlm's generative loss averaging")
    p.add_argument("--loss-gen-factor", type=float, default=1.0, help="weight of the generative loss")
    p.add_argument("--router-aux-loss-coef", type=float, default=None,
                   help="Mixtral's router loss weight (default: config.json's)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW eps")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 disables it")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: --warmup-ratio of --max-steps)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up share of --max-steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    p.add_argument("--strategy", choices=("auto", "none", "ddp", "fsdp"), default="auto",
                   help="auto: ddp under torchrun (WORLD_SIZE > 1), else none; default: auto")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast (default: auto, on for GPUs)")
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps, 0: only at the end")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the saved weights (default: the fp32 master weights; another dtype "
                        "makes resuming inexact)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--resume", default=None, help="an output dir (its newest complete checkpoint) or a checkpoint folder")
    p.add_argument("--seed", type=int, default=42, help="data order and initial RNG state")
    p.add_argument("--log-file", default=None, help="JSON lines of per-step losses (default: OUT/log.jsonl)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (a one-line summary is still printed at the end)")
    return p


def _check_args(a) -> None:
    """Every numeric option, before anything is read or loaded (NaN fails every comparison,
    so each check is written as what must hold)."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("max_steps", "batch_size", "gen_batch_size", "train_group_size", "query_max_len",
                 "passage_max_len", "generative_max_len"):
        if getattr(a, name) < 1:
            raise SystemExit(f"{flag(name)}: expected a positive integer, got {getattr(a, name)}")
    for name in ("emb_chunk_size", "gen_chunk_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SystemExit(f"{flag(name)}: expected a positive integer, got {getattr(a, name)}")
    for name in ("save_steps", "warmup_steps"):
        if getattr(a, name) is not None and getattr(a, name) < 0:
            raise SystemExit(f"{flag(name)}: expected >= 0, got {getattr(a, name)}")
    positive = ("temperature", "lr", "adam_eps", "max_shard_size_gb")
    non_negative = ("loss_gen_factor", "weight_decay", "max_grad_norm", "router_aux_loss_coef")
    for name in positive + non_negative:
        v = getattr(a, name)
        if v is None:
            continue
        ok = math.isfinite(v) and (v > 0 if name in positive else v >= 0)
        if not ok:
            want = "a finite number > 0" if name in positive else "a finite number >= 0"
            raise SystemExit(f"{flag(name)}: expected {want}, got {v}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(a, name) < 1:
            raise SystemExit(f"{flag(name)}: expected a value in [0, 1), got {getattr(a, name)}")
    if not 0 <= a.warmup_ratio <= 1:
        raise SystemExit(f"--warmup-ratio: expected a value in [0, 1], got {a.warmup_ratio}")


def _setup_distributed():
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (world > 1 or under_torchrun) and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return device


def train(argv=None) -> dict:
    """Run training; returns {"history": [per-step dict], "output_dir": ...}."""
    a = build_parser().parse_args(argv)
    _check_args(a)
    import torch

    from . import training as T

    device = _setup_distributed()
    rank, world = T._dist()
    strategy = a.strategy if a.strategy != "auto" else ("ddp" if world > 1 else "none")
    if strategy != "none" and world == 1 and not torch.distributed.is_initialized():
        raise SystemExit(f"--strategy {strategy}: needs torch.distributed (run under torchrun)")
    use_bf16 = a.bf16 == "on" or (a.bf16 == "auto" and device.type == "cuda")

    out_dir = Path(a.output_dir)
    resume = None
    if a.resume:
        resume = T.resolve_resume(a.resume)
        if resume is None:
            raise SystemExit(f"--resume: {a.resume} holds no complete checkpoint (a checkpoint folder, or an "
                             "output folder with checkpoint-N folders, was expected)")

    # Data (read and checked before the model, so that bad input fails fast).
    emb_path = a.embedding_data or (T.SAMPLE_EMBEDDING if a.generative_data is None else None)
    gen_path = a.generative_data or (T.SAMPLE_GENERATIVE if a.embedding_data is None else None)
    want_emb, want_gen = a.mode in ("unified", "embedding"), a.mode in ("unified", "generative")
    if want_emb and emb_path is None:
        raise SystemExit(f"--embedding-data: required in mode {a.mode!r}")
    if want_gen and gen_path is None:
        raise SystemExit(f"--generative-data: required in mode {a.mode!r}")
    emb = T.load_embedding_data(emb_path) if want_emb else None
    gen = T.load_generative_data(gen_path) if want_gen else None
    data_cfg = T.DataConfig(batch_size=a.batch_size, gen_batch_size=a.gen_batch_size,
                            train_group_size=a.train_group_size, query_max_len=a.query_max_len,
                            passage_max_len=a.passage_max_len, generative_max_len=a.generative_max_len, seed=a.seed)
    data = T.GritData(T.TextEncoder(a.model), data_cfg, emb, gen)
    for name, total in (("batch-size", a.batch_size), ("gen-batch-size", a.gen_batch_size)):
        if total % world:
            raise SystemExit(f"--{name}: {total} is not divisible by the world size {world}")

    torch.manual_seed(a.seed)
    source = Path(a.model)
    model_kwargs = dict(pooling_method=a.pooling_method, gradient_checkpointing=a.gradient_checkpointing,
                        loss_gen_type=a.loss_gen_type, loss_gen_factor=a.loss_gen_factor,
                        router_aux_loss_coef=a.router_aux_loss_coef)
    if strategy == "fsdp":
        module = T.load_sharded(resume if resume else source, device, **model_kwargs)
    else:
        train_model = T.GritTrainModel(T.load_model(resume if resume else source, device), **model_kwargs)
        module = T.wrap(train_model, strategy, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=a.lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps,
                                  weight_decay=a.weight_decay)
    warmup = a.warmup_steps if a.warmup_steps is not None else int(round(a.warmup_ratio * a.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, T.warmup_linear(warmup, a.max_steps))
    start = 0
    if resume:
        state = T.load_training_state(resume, module, optimizer, scheduler)
        start = state["step"]
        if rank == 0:
            print(f"resuming from {resume} (step {start})", file=sys.stderr)
    step_fn = T.GritStep(module, T.StepConfig(
        temperature=a.temperature, normalized=a.normalized, negatives_cross_device=a.negatives_cross_device,
        emb_chunk_size=a.emb_chunk_size, gen_chunk_size=a.gen_chunk_size,
        autocast_dtype=torch.bfloat16 if use_bf16 else None))

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(a), indent=2, default=str))
    log_path = Path(a.log_file) if a.log_file else out_dir / "log.jsonl"
    if rank == 0 and log_path.is_file():
        _drop_logged_steps_after(log_path, start)  # a resume repeats those steps: log them once
    bar = None
    if a.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=a.max_steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    history = []
    t_start = time.perf_counter()
    module.train()
    for step in range(start, a.max_steps):
        t0 = time.perf_counter()
        batch = data.local_batch(step, rank, world, device)
        optimizer.zero_grad(set_to_none=True)
        losses = step_fn(batch)
        if a.max_grad_norm > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(module.parameters(), a.max_grad_norm)
            losses["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        optimizer.step()
        scheduler.step()
        if world > 1 and "loss_gen" in losses:  # report the mean over ranks
            t = torch.tensor([losses["loss_gen"]], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            losses["loss_gen"] = float(t) / world
            losses["loss"] = losses.get("loss_emb", 0.0) + losses["loss_gen"]
        losses.update(step=step + 1, lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - t0)
        history.append(losses)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(losses) + "\n")
        if bar is not None:
            bar.set_postfix({k: f"{losses[k]:.4f}" for k in ("loss_emb", "loss_gen") if k in losses})
            bar.update(1)
        if (a.save_steps and (step + 1) % a.save_steps == 0) or step + 1 == a.max_steps:
            T.save_training_state(out_dir / f"checkpoint-{step + 1}", module, optimizer, scheduler, step + 1,
                                  source if not resume else resume,
                                  dtype=getattr(torch, a.save_dtype) if a.save_dtype else None,
                                  max_shard_bytes=int(a.max_shard_size_gb * 2**30))
    if bar is not None:
        bar.close()
    saved = out_dir / f"checkpoint-{a.max_steps}"
    if rank == 0:
        last = history[-1] if history else {}
        losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss_emb", "loss_gen") if k in last)
        ran = f"steps {start + 1}-{a.max_steps}" if history else f"no step (already at step {start})"
        print(f"trained {ran} in {time.perf_counter() - t_start:.1f} s" + (f"; last step: {losses}" if losses else "")
              + f"; checkpoint: {saved if history else resume}; log: {log_path}", file=sys.stderr)
    return {"history": history, "output_dir": str(out_dir), "checkpoint": str(saved if history else resume)}


def _drop_logged_steps_after(log_path: Path, step: int) -> None:
    """Keep the log's lines of steps <= ``step`` (all but what this run will log again)."""
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            entry_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a kill
        if isinstance(entry_step, int) and entry_step <= step:
            kept.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, log_path)


def main(argv=None) -> int:
    try:
        train(argv)
    except Exception as e:
        T = sys.modules.get(f"{__package__}.training")
        if isinstance(e, FileNotFoundError) or (T is not None and isinstance(e, T.DataError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
