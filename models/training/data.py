"""Training data: GritLM's JSONL formats read and checked, tokenised into its prompt
formats, and batched (the batch of step s is a pure function of (seed, s))."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint


from ..prompts import TURN_SEP, chat_turn, instruction_format

IGNORE = -100  # label of tokens that are no target

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_EMBEDDING = SAMPLE_DIR / "embedding.jsonl"
SAMPLE_GENERATIVE = SAMPLE_DIR / "generative.jsonl"


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

        from ..tokenizer import load_tokenizer

        path = Path(path)
        hf = load_tokenizer(path)  # token names and ids as the inference side reads them
        self.bos, self.eos = hf.bos_token or "", hf.eos_token or ""
        self.eos_id = hf.eos_token_id
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"training needs the fast tokenizer file (character offsets): no {file}")
        self._tok = _Tok.from_file(str(file))
        self.vocab_size = len(hf)

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def prefix(self, instruction: str) -> str:
        """gritlm's embedding prompt before the text (BOS included)."""
        instr = instruction.strip("\t\n :")
        return self.bos + instruction_format(instr)

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
        return [len(x) for x in self.ids([self.bos + chat_turn(u) for u in users])]

    def generative(self, turns: list[str], max_len: int):
        """ids and labels (IGNORE outside assistant turns), both truncated to ``max_len``."""
        text, spans = self.bos, []
        for i in range(0, len(turns), 2):
            if i:
                text += TURN_SEP
            text += chat_turn(turns[i])
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
