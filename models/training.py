"""GRIT training: one model, two objectives, one optimiser step.

    loss = loss_emb + loss_gen (+ router load-balancing loss for Mixtral)

* ``loss_emb``: in-batch InfoNCE (``grit_kernels.contrastive_loss``, temperature 0.02) between
  bidirectional mean-pooled embeddings of queries and of their documents, documents laid out
  per query as ``[positive, hard negative, ...]`` (``train_group_size`` rows, default 2).
  Instruction tokens are attended to but left out of the mean. Under torch.distributed the
  negatives of every rank are used (``gather=True``). It runs through ``grit_kernels.GradCache``
  when ``emb_chunk_size`` is set, so the embedding batch can be far larger than what fits.
* ``loss_gen``: next-token cross-entropy of causal passes over chat-formatted text,
  ``<s><|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>`` (turns joined by ``\\n``), with
  only the assistant turns (and their ``</s>``) as targets. Aggregation as gritlm's
  ``NextTokenLoss``: "mixed" = token mean of each chunk, "token" = token sum / sequences; both
  times ``loss_gen_factor``, averaged over chunks and ranks.

Gradient scaling across ranks: DDP and FSDP average gradients over ranks. With cross-device
negatives every rank computes the same global ``loss_emb`` but back-propagates only into its
own embeddings, so the average is 1 / world_size of the true gradient; the embedding loss is
scaled by world_size before its backward so that N ranks train exactly like one process holding
the whole batch (tests/test_training.py checks this). gritlm does not rescale, so under it the
embedding gradient shrinks with the number of GPUs.

Layout: sequences are packed back to back (``cu_seqlens``), never padded. Each decoder layer
is called as a module (so FSDP2's ``fully_shard`` per layer works) and optionally wrapped in
``torch.utils.checkpoint`` (per-layer gradient checkpointing).

Data: ``load_embedding_data`` / ``load_generative_data`` read GritLM's JSONL formats and
report malformed lines by number. The batch of step ``s`` is a pure function of (seed, s), so
resuming needs only the step and every rank knows the global batch; rank r takes the r-th
slice of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import grit_kernels

from .checkpoint import load_checkpoint
from .config import MistralConfig
from .mistral import packed_positions

IGNORE = -100

# gritlm/training/run.py's format (BASE_BOS is the tokenizer's BOS token).
USER_BOS = "<|user|>\n"
USER_EOS = ""
EMBED_BOS = "\n<|embed|>\n"
ASSISTANT_BOS = "\n<|assistant|>\n"
TURN_SEP = "\n"

SAMPLE_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_EMBEDDING = SAMPLE_DIR / "embedding.jsonl"
SAMPLE_GENERATIVE = SAMPLE_DIR / "generative.jsonl"

from .options import LOSS_GEN_TYPES  # noqa: E402  (shared with the CLI)


class DataError(ValueError):
    """A training file is malformed; the message names the file and line."""


# =========================================================================================
# data: reading
# =========================================================================================


@dataclasses.dataclass
class EmbeddingExample:
    query: tuple[str, str]               # (instruction, text)
    pos: list[tuple[str, str]]
    neg: list[tuple[str, str]]


def _read_jsonl(path, kind: str) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind}: no such file {path}")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: the {kind} is empty (no JSON lines)")
    return rows


def _pair(value, where: str) -> tuple[str, str]:
    """[instruction, text] (or a bare text, GritLM's format without instruction)."""
    if isinstance(value, str):
        value = ["", value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, str) for v in value)):
        raise DataError(f"{where}: expected [instruction, text] (two strings), got {json.dumps(value)[:80]}")
    if not value[1].strip():
        raise DataError(f"{where}: the text is empty")
    return value[0], value[1]


def load_embedding_data(path) -> list[EmbeddingExample]:
    """GritLM's embedding JSONL: ``{"query": [instr, text], "pos": [[instr, text], ...],
    "neg": [[instr, text], ...]}`` per line."""
    out = []
    for lineno, obj in _read_jsonl(path, "embedding data"):
        where = f"{path}:{lineno}"
        for key in ("query", "pos", "neg"):
            if key not in obj:
                raise DataError(f"{where}: missing field {key!r} (an embedding line needs query, pos and neg)")
        q = _pair(obj["query"], f"{where}: field 'query'")
        docs = {}
        for key in ("pos", "neg"):
            v = obj[key]
            if not isinstance(v, list):
                raise DataError(f"{where}: field {key!r}: expected a list of [instruction, text], "
                                f"got {type(v).__name__}")
            docs[key] = [_pair(x, f"{where}: field {key!r}[{i}]") for i, x in enumerate(v)]
        if not docs["pos"]:
            raise DataError(f"{where}: field 'pos' is empty (each query needs a positive)")
        out.append(EmbeddingExample(q, docs["pos"], docs["neg"]))
    return out


def load_generative_data(path) -> list[list[str]]:
    """GritLM's generative JSONL: ``{"text": [user, assistant, user, assistant, ...]}`` per line."""
    out = []
    for lineno, obj in _read_jsonl(path, "generative data"):
        where = f"{path}:{lineno}"
        if "text" not in obj:
            raise DataError(f"{where}: missing field 'text' "
                            "(a generative line is {\"text\": [user, assistant, ...]})")
        t = obj["text"]
        if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
            raise DataError(f"{where}: field 'text': expected a non-empty list of strings, got {json.dumps(t)[:80]}")
        if len(t) % 2:
            raise DataError(f"{where}: field 'text': expected user/assistant pairs (an even number of turns), "
                            f"got {len(t)}")
        out.append(list(t))
    return out


# =========================================================================================
# data: tokenising
# =========================================================================================


class TextEncoder:
    """Tokenises GritLM's training formats with the checkpoint's ``tokenizer.json``.

    Like gritlm's collator, the special tokens are written into the text (BOS, ``</s>``) and
    the text is tokenised without adding any. The generative labels come from the tokens'
    character offsets: a token is a target iff it starts inside an assistant turn (its text +
    EOS). gritlm instead counts each turn's tokens by tokenising it alone, which drifts by
    the separator's tokens from the second turn on.
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok

        from .tokenizer import Tokenizer

        path = Path(path)
        wrapper = Tokenizer(path)  # token names and ids as the inference side reads them
        self.bos, self.eos = wrapper.bos_token or "", wrapper.eos_token or ""
        self.eos_id = wrapper.eos_token_id
        file = path / "tokenizer.json" if path.is_dir() else path
        self._tok = _Tok.from_file(str(file))
        self.vocab_size = wrapper.vocab_size

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def prefix(self, instruction: str) -> str:
        """gritlm's embedding prompt before the text (BOS included)."""
        instr = instruction.strip("\t\n :")
        return self.bos + USER_BOS + instr + USER_EOS + EMBED_BOS if instr else self.bos + EMBED_BOS.lstrip()

    def prefix_len(self, instruction: str) -> int:
        """Tokens of ``prefix(instruction)``: the leading tokens left out of the mean. Cached:
        datasets repeat a handful of instructions."""
        cache = self.__dict__.setdefault("_prefix_cache", {})
        n = cache.get(instruction)
        if n is None:
            n = cache[instruction] = len(self.ids([self.prefix(instruction)])[0])
        return n

    def embedding(self, pairs: Sequence[tuple[str, str]], max_len: int):
        """[(instruction, text)] -> ids (truncated to ``max_len``) and skip (instruction tokens).
        Texts are cut at 10 characters per token first, as gritlm does, so that a huge text
        costs no tokenising time."""
        full = self.ids([self.prefix(i) + t[:10 * max_len] for i, t in pairs])
        return [x[:max_len] for x in full], [self.prefix_len(i) for i, _ in pairs]

    def first_prompt_lens(self, users: list[str]) -> list[int]:
        """Tokens before the first assistant token, per example (gritlm's generative filter)."""
        return [len(x) for x in self.ids([self.bos + USER_BOS + u + USER_EOS + ASSISTANT_BOS for u in users])]

    def generative(self, turns: list[str], max_len: int):
        """ids and labels (IGNORE outside assistant turns), both truncated to ``max_len``."""
        text, spans = self.bos, []
        for i in range(0, len(turns), 2):
            if i:
                text += TURN_SEP
            text += USER_BOS + turns[i] + USER_EOS + ASSISTANT_BOS
            start = len(text)
            text += turns[i + 1].strip() + self.eos
            spans.append((start, len(text)))
        enc = self._tok.encode(text, add_special_tokens=False)
        labels = []
        for tid, (a, _b) in zip(enc.ids, enc.offsets):
            inside = any(s <= a < e for s, e in spans)
            labels.append(tid if inside else IGNORE)
        return enc.ids[:max_len], labels[:max_len]


@dataclasses.dataclass
class DataConfig:
    batch_size: int = 8              # global embedding batch (queries) per step
    gen_batch_size: int = 8          # global generative batch (sequences) per step
    train_group_size: int = 2        # documents per query: 1 positive + (G - 1) hard negatives
    query_max_len: int = 256
    passage_max_len: int = 2048
    generative_max_len: int = 2048
    seed: int = 42


class GritData:
    """Deterministic batches: step s's global batch depends only on (seed, s).

    Each dataset is read in epochs, each epoch a seeded permutation; positives and hard
    negatives are drawn per (seed, position in the stream), like gritlm's ``random.choice`` /
    ``random.sample`` (negatives repeated when an example has fewer than needed). Examples
    are tokenised when their batch is built, each rank its own slice only. At construction,
    examples gritlm's run.py filters out are dropped with a warning: an instruction that
    fills query_max_len / passage_max_len, a first user turn that fills generative_max_len.
    """

    def __init__(self, encoder: TextEncoder, cfg: DataConfig, embedding: list[EmbeddingExample] | None,
                 generative: list[list[str]] | None):
        self.cfg, self.encoder = cfg, encoder
        for name in ("batch_size", "gen_batch_size", "train_group_size", "query_max_len", "passage_max_len",
                     "generative_max_len"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        self.emb = self._filter_embedding(embedding) if embedding is not None else None
        self.gen = self._filter_generative(generative) if generative is not None else None
        self._perms: dict = {}

    # ---------------------------------------------------------------- filtering

    def _filter_embedding(self, examples):
        if not examples:
            raise DataError("embedding data: the dataset is empty")
        G = self.cfg.train_group_size
        if G > 1:
            empty = [i for i, e in enumerate(examples) if not e.neg]
            if empty:
                raise DataError(f"embedding data: example {empty[0]} has no 'neg' but train_group_size={G} "
                                "needs hard negatives (pass train_group_size=1 to train without)")
        n = self.encoder.prefix_len
        qmax, pmax = self.cfg.query_max_len, self.cfg.passage_max_len
        out = [e for e in examples
               if n(e.query[0]) < qmax and all(n(d[0]) < pmax for d in e.pos + e.neg)]
        if len(out) < len(examples):
            warnings.warn(f"embedding data: dropped {len(examples) - len(out)} of {len(examples)} examples whose "
                          "instruction fills query_max_len/passage_max_len (nothing left to embed)", stacklevel=3)
        if not out:
            raise DataError("embedding data: no example left after dropping those with too long instructions")
        return out

    def _filter_generative(self, examples):
        if not examples:
            raise DataError("generative data: the dataset is empty")
        lens = self.encoder.first_prompt_lens([t[0][:10 * self.cfg.generative_max_len] for t in examples])
        out = [t for t, n in zip(examples, lens) if n < self.cfg.generative_max_len]
        if len(out) < len(examples):
            warnings.warn(f"generative data: dropped {len(examples) - len(out)} of {len(examples)} examples whose "
                          "first user turn fills generative_max_len", stacklevel=3)
        if not out:
            raise DataError("generative data: no example left with an assistant token within generative_max_len")
        return out

    # ---------------------------------------------------------------- sampling

    def _stream(self, n: int, start: int, count: int, salt: int) -> list[int]:
        """Dataset indices at stream positions start..start+count-1 (epochs of permutations)."""
        out = []
        for k in range(start, start + count):
            key = (salt, k // n)
            if key not in self._perms:
                if len(self._perms) > 4:
                    self._perms.clear()
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + salt * 7919 + k // n)
                self._perms[key] = torch.randperm(n, generator=g).tolist()
            out.append(self._perms[key][k % n])
        return out

    def global_batch(self, step: int) -> dict:
        """The texts of step ``step``'s whole batch (all ranks): "query" [(instruction, text)],
        "passage" [(instruction, text)] in per-query groups [pos, neg, ...], "generative" [turns]."""
        out = {}
        if self.emb is not None:
            B, G = self.cfg.batch_size, self.cfg.train_group_size
            start = step * B
            queries, docs = [], []
            for k, idx in zip(range(start, start + B), self._stream(len(self.emb), start, B, salt=1)):
                e = self.emb[idx]
                rng = random.Random(self.cfg.seed * 1_000_003 + k)
                group = [rng.choice(e.pos)]
                if G > 1:
                    pool = e.neg * math.ceil((G - 1) / len(e.neg)) if len(e.neg) < G - 1 else e.neg
                    group += rng.sample(pool, G - 1)
                queries.append(e.query)
                docs.extend(group)
            out["query"], out["passage"] = queries, docs
        if self.gen is not None:
            B = self.cfg.gen_batch_size
            out["generative"] = [self.gen[i] for i in self._stream(len(self.gen), step * B, B, salt=2)]
        return out

    def _embedding_items(self, pairs, max_len: int):
        ids, skip = self.encoder.embedding(pairs, max_len)
        for x, s, (instr, text) in zip(ids, skip, pairs):
            if s >= len(x):
                raise DataError(f"embedding data: nothing left to embed in {text[:60]!r} after the instruction "
                                f"{instr[:60]!r} ({s} tokens, max length {max_len})")
        return list(zip(ids, skip))

    def local_batch(self, step: int, rank: int = 0, world_size: int = 1, device="cpu") -> dict:
        """This rank's slice of the global batch, tokenised: "query"/"passage" as
        ``embedding_tensors``, "generative" as [(ids, targets)]."""
        g = self.global_batch(step)
        out = {}
        if "query" in g:
            b = _shard_size(self.cfg.batch_size, world_size, "batch_size")
            G = self.cfg.train_group_size
            q = self._embedding_items(g["query"][rank * b:(rank + 1) * b], self.cfg.query_max_len)
            d = self._embedding_items(g["passage"][rank * b * G:(rank + 1) * b * G], self.cfg.passage_max_len)
            out["query"], out["passage"] = embedding_tensors(q, device), embedding_tensors(d, device)
        if "generative" in g:
            b = _shard_size(self.cfg.gen_batch_size, world_size, "gen_batch_size")
            items = []
            for turns in g["generative"][rank * b:(rank + 1) * b]:
                ids, labels = self.encoder.generative(turns, self.cfg.generative_max_len)
                items.append((ids, labels[1:] + [IGNORE]))
            out["generative"] = items
        return out


def _shard_size(total: int, world: int, name: str) -> int:
    if total % world:
        raise ValueError(f"{name}: the global batch {total} must be divisible by the world size {world}")
    return total // world


def embedding_tensors(items: list[tuple[list[int], int]], device="cpu") -> dict:
    """[(ids, skip)] -> {"input_ids": (B, S) right-padded, "lengths": (B,), "skip": (B,)}:
    the mapping GradCache splits by rows (the encoder packs each chunk)."""
    S = max(len(ids) for ids, _ in items)
    input_ids = torch.zeros(len(items), S, dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": input_ids.to(device),
        "lengths": torch.tensor([len(ids) for ids, _ in items], dtype=torch.long, device=device),
        "skip": torch.tensor([s for _, s in items], dtype=torch.int32, device=device),
    }


def generative_tensors(items: list[tuple[list[int], list[int]]], device="cpu") -> dict:
    """[(ids, targets)] packed: tokens (T,), targets (T,) (next token or IGNORE), cu_seqlens."""
    lengths = [len(ids) for ids, _ in items]
    tokens = torch.tensor([t for ids, _ in items for t in ids], dtype=torch.long, device=device)
    targets = torch.tensor([t for _, tg in items for t in tg], dtype=torch.long, device=device)
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    return {"tokens": tokens, "targets": targets, "cu_seqlens": cu, "max_seqlen": max(lengths),
            "n_seqs": len(items)}


# =========================================================================================
# model
# =========================================================================================


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
        m = self.model
        x = F.embedding(tokens_T, m.embed)
        # Under autocast the projections give bf16 q, k, v while the fp32 master weights keep
        # the residual stream in fp32: RoPE tables in the residual's dtype would promote q and
        # k back to fp32 next to a bf16 v, which the attention op rejects.
        dev = x.device.type
        rope_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cos, sin = m.rotary(packed_positions(cu_seqlens, tokens_T.numel()), rope_dtype)
        router = []
        for layer in m.layers:
            # Called as ``layer(...)``, not ``layer.forward(...)``: FSDP2's per-layer
            # all-gather / reshard hooks run on the module call.
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, r = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cu_seqlens, max_seqlen, causal,
                                                         use_reentrant=False)
            else:
                x, r = layer(x, cos, sin, cu_seqlens, max_seqlen, causal)
            if r is not None:
                router.append(r)
        return m.norm(x), router

    def encode(self, batch: dict) -> torch.Tensor:
        """{"input_ids" (B, S), "lengths" (B,), "skip" (B,)} -> (B, D) fp32 mean-pooled
        embeddings of a bidirectional pass, instruction tokens left out (not normalised)."""
        ids, lengths = batch["input_ids"], batch["lengths"]
        S = int(lengths.max())
        mask = torch.arange(S, device=ids.device)[None, :] < lengths[:, None]
        tokens = ids[:, :S][mask]
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        hidden, _ = self.hidden(tokens, cu, S, causal=False)
        return grit_kernels.mean_pool(hidden, cu_seqlens=cu, skip=batch["skip"].to(torch.int32),
                                      weighted=self.pooling_method == "weightedmean")

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


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


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


# =========================================================================================
# checkpoints
# =========================================================================================


def hf_state_dict(sd: dict, cfg: MistralConfig) -> dict:
    """Our parameter names (``Transformer.state_dict()``) -> HF Mistral/Mixtral/Llama/Qwen2 tensor names,
    un-fusing wqkv and w13: the inverse of ``load_checkpoint``'s mapping."""
    out = {}
    K, Hq, Hk = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    for name, t in sd.items():
        t = t.detach().contiguous()
        if name == "embed":
            out["model.embed_tokens.weight"] = t
        elif name == "lm_head":
            out["lm_head.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            p = f"model.layers.{i}."
            if rest == "attn_norm.weight":
                out[p + "input_layernorm.weight"] = t
            elif rest == "mlp_norm.weight":
                out[p + "post_attention_layernorm.weight"] = t
            elif rest in ("attn.wqkv", "attn.bqkv"):  # fused [q; k; v] weight rows or biases
                kind = "weight" if rest == "attn.wqkv" else "bias"
                for x, part in zip("qkv", t.split([Hq * K, Hk * K, Hk * K])):
                    out[p + f"self_attn.{x}_proj.{kind}"] = part.contiguous()
            elif rest in ("attn.wo", "attn.bo"):
                out[p + f"self_attn.o_proj.{'weight' if rest == 'attn.wo' else 'bias'}"] = t
            elif rest in ("mlp.w13", "mlp.b13"):  # fused [gate; up]
                kind = "weight" if rest == "mlp.w13" else "bias"
                gate, up = t.chunk(2)
                out[p + f"mlp.gate_proj.{kind}"], out[p + f"mlp.up_proj.{kind}"] = gate.contiguous(), up.contiguous()
            elif rest == "mlp.b2":
                out[p + "mlp.down_proj.bias"] = t
            elif rest == "mlp.w2" and t.dim() == 2:
                out[p + "mlp.down_proj.weight"] = t
            elif rest == "mlp.gate":
                out[p + "block_sparse_moe.gate.weight"] = t
            elif rest in ("mlp.w1", "mlp.w2", "mlp.w3"):
                w = rest.split(".")[1]
                for e in range(t.shape[0]):
                    out[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = t[e].contiguous()
            else:
                raise KeyError(f"hf_state_dict: no HF name for parameter {name!r}")
        else:
            raise KeyError(f"hf_state_dict: no HF name for parameter {name!r}")
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


def load_model(path, device, *, dtype=torch.float32) -> nn.Module:
    """``load_checkpoint`` for training: fp32 master weights, requires_grad on."""
    model = load_checkpoint(path, device=device, torch_dtype=dtype)
    return model.train().requires_grad_(True)


def load_sharded(path, device, **train_kwargs) -> GritTrainModel:
    """FSDP2 without a full copy per rank: every rank builds the model on the meta device and
    shards it (``wrap(..., "fsdp")``); rank 0 reads the checkpoint on the CPU and its
    tensors are broadcast one by one into the shards. Returns the sharded GritTrainModel."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .mistral import Transformer

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


def retrieval_accuracy(module: GritTrainModel, q: dict, d: dict) -> float:
    """Share of queries whose most similar document (cosine) among ``d`` is their own
    (queries and documents paired row by row)."""
    with torch.no_grad():
        qe = F.normalize(module.encode(q), dim=-1)
        de = F.normalize(module.encode(d), dim=-1)
    return float(((qe @ de.T).argmax(dim=1) == torch.arange(qe.shape[0], device=qe.device)).float().mean())
