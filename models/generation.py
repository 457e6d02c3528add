"""Autoregressive generation with Hugging Face ``generate`` semantics, and reusable KV prefixes.

``generate`` returns the prompt followed by the new tokens (B, S + N), like HF: rows that
stopped at EOS early are filled with the pad token. Prompts of different lengths may be
given padded on either side with ``attention_mask``; only the real tokens are run (packed),
at positions 0..L-1 as HF computes them from the mask.

``KVPrefix`` is one sequence's keys and values for every layer, without padding: what
``GritModel.encode(..., get_cache=True)`` returns per text and what RAG caching reuses.
Following gritlm, a prefix keeps the RoPE positions it was computed at, and generation after
one or more concatenated prefixes continues at position = total prefix length.
"""

from __future__ import annotations

import dataclasses

import torch

from .mistral import Transformer, packed_positions


@dataclasses.dataclass
class KVPrefix:
    """k[l], v[l]: (L, Hkv, Dh) for each layer l: the cache of one sequence of L tokens."""

    k: list
    v: list

    @property
    def length(self) -> int:
        return self.k[0].shape[0]

    def __len__(self) -> int:
        return self.length

    def to(self, *args, **kwargs) -> "KVPrefix":
        return KVPrefix([t.to(*args, **kwargs) for t in self.k], [t.to(*args, **kwargs) for t in self.v])

    @staticmethod
    def cat(prefixes) -> "KVPrefix":
        """Concatenate caches in order (Doc-Query: [doc, query]; Query-Doc: [query, doc]).
        Each part keeps its own positions; none is recomputed given the others (as in gritlm)."""
        prefixes = list(prefixes)
        if not prefixes or not all(isinstance(p, KVPrefix) for p in prefixes):
            raise TypeError("prefixes: expected a non-empty list of KVPrefix")
        if len(prefixes) == 1:
            return prefixes[0]
        n = len(prefixes[0].k)
        return KVPrefix([torch.cat([p.k[i] for p in prefixes]) for i in range(n)],
                        [torch.cat([p.v[i] for p in prefixes]) for i in range(n)])

    @staticmethod
    def from_hf(past_key_values) -> list["KVPrefix"]:
        """Per-row prefixes from an HF cache: a ``DynamicCache`` or the legacy tuple of
        (k, v) per layer of shape (B, Hkv, L, Dh) (what gritlm hands to ``generate``). Every row
        is taken to hold all L tokens, as gritlm's RAG code assumes."""
        if hasattr(past_key_values, "layers"):  # transformers >= 4.56 Cache objects
            pairs = [(layer.keys, layer.values) for layer in past_key_values.layers]
        elif hasattr(past_key_values, "key_cache"):
            pairs = list(zip(past_key_values.key_cache, past_key_values.value_cache))
        else:
            pairs = [tuple(layer[:2]) for layer in past_key_values]
        B = pairs[0][0].shape[0]
        return [KVPrefix([k[b].transpose(0, 1) for k, _ in pairs], [v[b].transpose(0, 1) for _, v in pairs])
                for b in range(B)]


def _as_prefix_list(past_key_values, batch: int, model: Transformer) -> list[KVPrefix | None]:
    """Normalise ``past_key_values`` to one KVPrefix (or None) per row."""
    if past_key_values is None:
        return [None] * batch
    if isinstance(past_key_values, KVPrefix):
        prefixes = [past_key_values] * batch
    elif isinstance(past_key_values, (list, tuple)) and past_key_values and all(
            p is None or isinstance(p, KVPrefix) for p in past_key_values):
        prefixes = list(past_key_values)
    else:
        try:
            prefixes = KVPrefix.from_hf(past_key_values)
        except Exception as e:
            raise TypeError("past_key_values: expected a KVPrefix, a list of KVPrefix (one per row), an HF "
                            f"Cache or a tuple of (k, v) per layer; got {type(past_key_values).__name__}") from e
        if len(prefixes) == 1 and batch > 1:
            prefixes = prefixes * batch
    if len(prefixes) != batch:
        raise ValueError(f"past_key_values: expected one prefix per row ({batch}), got {len(prefixes)}")
    cfg = model.config
    for p in prefixes:
        if p is None:
            continue
        if len(p.k) != cfg.num_hidden_layers or len(p.v) != cfg.num_hidden_layers:
            raise ValueError(f"past_key_values: expected {cfg.num_hidden_layers} layers, got {len(p.k)}")
        want = (cfg.num_key_value_heads, cfg.head_dim)
        if tuple(p.k[0].shape[1:]) != want:
            raise ValueError(f"past_key_values: expected per-layer keys (L, {want[0]}, {want[1]}), "
                             f"got {tuple(p.k[0].shape)}")
    return prefixes


def _rows_from_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The real tokens of each row (mask may be longer than input_ids: HF passes prefix + prompt)."""
    if attention_mask is None:
        return list(input_ids)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0] \
            or attention_mask.shape[1] < input_ids.shape[1]:
        raise ValueError(f"attention_mask: expected shape (B, S) = {tuple(input_ids.shape)} (or with the "
                         f"prefix length added to S), got {tuple(attention_mask.shape)}")
    mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:].bool()
    rows = []
    for b, (ids, m) in enumerate(zip(input_ids, mask)):
        n, first = int(m.sum()), int(m.int().argmax())
        if not bool(m[first:first + n].all()):
            raise ValueError(f"attention_mask: row {b} has holes; expected left or right padding only")
        rows.append(ids[first:first + n])
    return rows


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """HF's warpers in HF's order: temperature, top-k, top-p (nucleus). logits (B, V) fp32."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    past_key_values=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    input_ids: (B, S) int64 prompts (a 1-D tensor or a list of lists is taken as B rows);
    attention_mask: (B, S) or (B, P + S) with 1 on real tokens (left or right padding).
    Greedy unless ``do_sample`` (then temperature, top_k, top_p as HF's warpers). A row stops
    after its first EOS (any of ``eos_token_id``); generation ends when all rows stopped.
    past_key_values: KVPrefix (all rows), a list with one KVPrefix or None per row, or an HF
    cache; the prompt continues after it at position = prefix length.
    Returns (B, S + N) int64: ``input_ids`` followed by N <= max_new_tokens new tokens, rows
    that finished early padded with ``pad_token_id`` (EOS when None).
    """
    if not model.has_lm_head:
        raise RuntimeError("generate: the model was loaded without its lm_head (mode='embedding')")
    device = model.device
    if input_ids is None:
        raise ValueError("input_ids: required (B, S) prompt token ids")
    if isinstance(input_ids, (str, bytes)) or (isinstance(input_ids, (list, tuple)) and input_ids
                                                and isinstance(input_ids[0], str)):
        raise TypeError("input_ids: expected token ids (a (B, S) tensor or lists of ints), got text; "
                        "tokenize it first, e.g. model.tokenizer(prompts)")
    if not isinstance(input_ids, torch.Tensor):
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
            lengths = sorted({len(r) for r in input_ids})
            if len(lengths) > 1:
                raise ValueError(f"input_ids: rows of different lengths {lengths}; pad them to one length "
                                 "(left padding) and pass attention_mask with 0 on the padding")
        try:
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"input_ids: expected a (B, S) tensor or lists of ints ({e})") from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected an integer tensor (B, S), "
                         f"got {input_ids.dtype} {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
    B = input_ids.shape[0]
    if B == 0:
        raise ValueError("input_ids: expected at least one row")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens: expected an integer >= 0, got {min_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0 when do_sample=True, got {temperature!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k: expected a non-negative integer, got {top_k!r}")
    V = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
        raise ValueError(f"input_ids: token ids must lie in [0, {V}), "
                         f"got [{int(input_ids.min())}, {int(input_ids.max())}]")
    eos = model.config.eos_token_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    rows = _rows_from_mask(input_ids, attention_mask)
    prefixes = _as_prefix_list(past_key_values, B, model)
    plens = [0 if p is None else p.length for p in prefixes]
    lens = [r.numel() for r in rows]
    if any(n == 0 for n in lens):
        raise ValueError("input_ids: every row needs at least one real token (attention_mask all zero?)")
    if max_new_tokens == 0:
        return input_ids

    # Room for the padded prompt after the longest prefix (the cache path writes S tokens per row).
    cache = model.new_cache(B, max(plens) + max(lens) + max_new_tokens)
    if any(plens):
        # Each row starts from its prefix; the prompts, padded to the longest one, go through
        # the cached pass: padded queries write keys past the row's length, which the next
        # step overwrites before anything reads them.
        cache.load_prefixes(prefixes)
        S = max(lens)
        tokens = torch.full((B, S), pad, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            tokens[b, :lens[b]] = r
        positions = torch.tensor(plens, device=device)[:, None] + torch.arange(S, device=device)
        hidden = model(tokens, positions, cache=cache, position_bound=cache.max_len).hidden
        last = hidden[torch.arange(B, device=device), torch.tensor(lens, device=device) - 1]
        cache.set_lengths([p + n for p, n in zip(plens, lens)])
    else:
        # Packed causal prefill: no compute on padding; every layer's keys/values go straight
        # to their cache rows (packed token t -> row row_of[t], slot positions[t]).
        tokens = torch.cat(rows)
        cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
        positions = packed_positions(cu, tokens.numel())
        row_of = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(lens, device=device))
        hidden = model(tokens, positions, cu_seqlens=cu, max_seqlen=max(lens), causal=True, cache=cache,
                       cache_rows=row_of, position_bound=max(lens)).hidden
        last = hidden[cu[1:].long() - 1]

    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        logits = model.logits(last).float()
        if step < min_new_tokens and eos:
            logits[:, eos_t] = float("-inf")
        if do_sample:
            probs = _filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        if eos:
            done |= torch.isin(nxt, eos_t)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        positions = cache.seqlens.long()[:, None]
        last = model(nxt[:, None], positions, cache=cache, position_bound=cache.max_len).hidden[:, 0]
    return torch.cat([input_ids, torch.stack(out, 1)], dim=1)
