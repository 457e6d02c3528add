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
import functools

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

    def __getitem__(self, index):
        raise TypeError(
            "KVPrefix: encode(..., get_cache=True) returns one KVPrefix per text (k[l], v[l] of shape (L, Hkv, Dh) "
            "for each layer, no padding), not gritlm's per-layer (key, value) tuples of the padded batch. Pass the "
            "list (or one element) to generate(past_key_values=...) as it is, or use KVPrefix.to_legacy(caches) "
            "for gritlm's layout.")

    @staticmethod
    def to_legacy(prefixes) -> tuple:
        """gritlm's ``get_cache`` layout: per layer (key, value), each (B, Hkv, L_max, Dh), the
        texts right-padded with zeros to the longest (gritlm pads on the right)."""
        prefixes = list(prefixes)
        L = max(p.length for p in prefixes)
        out = []
        for layer in range(len(prefixes[0].k)):
            pair = []
            for part in ("k", "v"):
                first = getattr(prefixes[0], part)[layer]
                t = first.new_zeros((len(prefixes), L, *first.shape[1:]))
                for b, p in enumerate(prefixes):
                    t[b, :p.length] = getattr(p, part)[layer]
                pair.append(t.transpose(1, 2))
            out.append(tuple(pair))
        return tuple(out)

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
    mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:].bool().cpu()  # one host copy
    rows = []
    for b, (ids, m) in enumerate(zip(input_ids, mask)):
        n, first = int(m.sum()), int(m.int().argmax())
        if not bool(m[first:first + n].all()):
            raise ValueError(f"attention_mask: row {b} has holes; expected left or right padding only")
        rows.append(ids[first:first + n])
    return rows


# GenerationConfig fields GritModel cannot honour: asking for one is an error, never ignored.
_UNSUPPORTED = {
    "penalty_alpha": None, "guidance_scale": 1.0, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "constraints": None, "force_words_ids": None, "prompt_lookup_num_tokens": None, "dola_layers": None,
    "output_attentions": False, "output_hidden_states": False, "watermarking_config": None,
    "assistant_early_exit": None, "low_memory": None, "top_h": None,
}
_UNSUPPORTED_KWARGS = ("assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask",
                       "synced_gpus", "custom_generate", "inputs_embeds", "decoder_input_ids")


def default_generation_config(model: Transformer, path=None):
    """The checkpoint's ``generation_config.json`` (as transformers reads it), else one built
    from config.json's token ids, as ``GenerationConfig.from_model_config`` does."""
    from transformers import GenerationConfig

    if path is not None:
        try:
            return GenerationConfig.from_pretrained(str(path))
        except OSError:  # no generation_config.json
            pass
    cfg = model.config
    eos = cfg.eos_token_ids
    return GenerationConfig(bos_token_id=getattr(cfg, "bos_token_id", None),
                            eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
                            pad_token_id=getattr(cfg, "pad_token_id", None))


def _config(model, generation_config, defaults, kwargs):
    """transformers' rule: a copy of ``generation_config`` (or the model's defaults) updated
    with the keyword arguments; an argument that is no GenerationConfig field is an error."""
    import copy

    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config: expected a transformers.GenerationConfig, got "
                        f"{type(generation_config).__name__}")
    defaults = defaults if defaults is not None else default_generation_config(model)
    # transformers' priority: keyword arguments > generation_config > the checkpoint's defaults
    # > transformers' global defaults (GenerationMixin._prepare_generation_config).
    cfg = copy.deepcopy(generation_config if generation_config is not None else GenerationConfig())
    try:
        cfg.update(**defaults.to_dict(), defaults_only=True, allow_custom_entries=True)
        cfg.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    except (TypeError, AttributeError):  # transformers 4: a GenerationConfig carries its defaults
        if generation_config is None:
            cfg = copy.deepcopy(defaults)
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by grit_models' generate")
    kwargs = {k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_KWARGS}
    unused = cfg.update(**kwargs)
    if unused:
        raise TypeError(f"generate: unexpected keyword argument(s) {sorted(unused)} (not GenerationConfig fields)")
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(cfg, name, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"{name}: {value!r} is not supported by grit_models' generate (greedy, sampling "
                             "and beam search are)")
    if getattr(cfg, "cache_implementation", None) not in (None, "dynamic", "static"):
        raise ValueError(f"cache_implementation: {cfg.cache_implementation!r} is not supported (grit_models "
                         "keeps its own KV cache; 'static' also decodes through a CUDA graph on a GPU, or "
                         "compiled with a compile_config elsewhere)")
    cfg.validate()
    # Values transformers would accept silently but that cannot mean anything.
    if cfg.max_new_tokens is not None and (not isinstance(cfg.max_new_tokens, int) or cfg.max_new_tokens < 0):
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {cfg.max_new_tokens!r}")
    if cfg.min_new_tokens is not None and (not isinstance(cfg.min_new_tokens, int) or cfg.min_new_tokens < 0):
        raise ValueError(f"min_new_tokens: expected an integer >= 0, got {cfg.min_new_tokens!r}")
    if cfg.do_sample:
        if cfg.temperature is not None and not cfg.temperature > 0:
            raise ValueError(f"temperature: expected > 0 when do_sample=True, got {cfg.temperature!r}")
        if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
            raise ValueError(f"top_p: expected 0 < top_p <= 1, got {cfg.top_p!r}")
        if cfg.top_k is not None and (not isinstance(cfg.top_k, int) or cfg.top_k < 0):
            raise ValueError(f"top_k: expected a non-negative integer, got {cfg.top_k!r}")
    if not isinstance(cfg.num_beams, int) or cfg.num_beams < 1:
        raise ValueError(f"num_beams: expected an integer >= 1, got {cfg.num_beams!r}")
    return cfg


def _logits_processor(cfg, prompt_len: int, eos, device, user, prefix_allowed_tokens_fn):
    """transformers' processors for ``cfg``, in ``GenerationMixin._get_logits_processor``'s order
    (user processors after the built-in ones, before the sampling warpers)."""
    from transformers import generation as G

    eos_t = torch.tensor(eos, device=device) if eos else None
    procs = G.LogitsProcessorList()
    if cfg.sequence_bias is not None:
        procs.append(G.SequenceBiasLogitsProcessor(sequence_bias=cfg.sequence_bias))
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        procs.append(G.RepetitionPenaltyLogitsProcessor(penalty=cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size is not None and cfg.no_repeat_ngram_size > 0:
        procs.append(G.NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.bad_words_ids is not None:
        procs.append(G.NoBadWordsLogitsProcessor(cfg.bad_words_ids, eos_t))
    if cfg.min_length is not None and eos_t is not None and cfg.min_length > 0:
        procs.append(G.MinLengthLogitsProcessor(cfg.min_length, eos_t, device=device))
    if cfg.min_new_tokens is not None and eos_t is not None and cfg.min_new_tokens > 0:
        procs.append(G.MinNewTokensLengthLogitsProcessor(prompt_len, cfg.min_new_tokens, eos_t, device=device))
    if prefix_allowed_tokens_fn is not None:
        procs.append(G.PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn,
                                                        max(cfg.num_beams, cfg.num_return_sequences)))
    if cfg.forced_bos_token_id is not None:
        procs.append(G.ForcedBOSTokenLogitsProcessor(cfg.forced_bos_token_id))
    if cfg.forced_eos_token_id is not None:
        procs.append(G.ForcedEOSTokenLogitsProcessor(cfg.max_length, cfg.forced_eos_token_id, device=device))
    if cfg.remove_invalid_values is True:
        procs.append(G.InfNanRemoveLogitsProcessor())
    if cfg.exponential_decay_length_penalty is not None:
        procs.append(G.ExponentialDecayLengthPenalty(cfg.exponential_decay_length_penalty, eos_t, prompt_len))
    if cfg.suppress_tokens is not None:
        procs.append(G.SuppressTokensLogitsProcessor(cfg.suppress_tokens, device=device))
    if cfg.begin_suppress_tokens is not None:
        procs.append(G.SuppressTokensAtBeginLogitsProcessor(cfg.begin_suppress_tokens, prompt_len, device=device))
    for p in user or []:
        clash = [q for q in procs if type(q) is type(p)]
        if clash:
            raise ValueError(f"logits_processor: a {type(p).__name__} is already built from the generation config; "
                             "set it there or pass it here, not both")
        procs.append(p)
    if cfg.do_sample:
        keep = 1 if cfg.num_beams <= 1 else len(eos) + 1 if eos else 2
        if cfg.temperature is not None and cfg.temperature != 1.0:
            procs.append(G.TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k is not None and cfg.top_k != 0:
            procs.append(G.TopKLogitsWarper(top_k=cfg.top_k, min_tokens_to_keep=keep))
        if cfg.top_p is not None and cfg.top_p < 1.0:
            procs.append(G.TopPLogitsWarper(top_p=cfg.top_p, min_tokens_to_keep=keep))
        if cfg.min_p is not None:
            procs.append(G.MinPLogitsWarper(min_p=cfg.min_p, min_tokens_to_keep=keep))
        if cfg.typical_p is not None and cfg.typical_p < 1.0:
            procs.append(G.TypicalLogitsWarper(mass=cfg.typical_p, min_tokens_to_keep=keep))
        if cfg.epsilon_cutoff is not None and 0.0 < cfg.epsilon_cutoff < 1.0:
            procs.append(G.EpsilonLogitsWarper(epsilon=cfg.epsilon_cutoff, min_tokens_to_keep=keep))
        if cfg.eta_cutoff is not None and 0.0 < cfg.eta_cutoff < 1.0:
            procs.append(G.EtaLogitsWarper(epsilon=cfg.eta_cutoff, min_tokens_to_keep=keep, device=device))
    if cfg.renormalize_logits is True:
        procs.append(G.LogitNormalization())
    return _called_as_one(procs)


def _called_as_one(procs):
    """``procs`` as one ``(ids, scores) -> scores`` call: what LogitsProcessorList.__call__
    does without extra kwargs (generate passes none), with its check that no processor needs
    more arguments done once here, before decoding, instead of by inspect.signature on
    every processor at every step (~0.1 ms a step on a CPU)."""
    import inspect

    for p in procs:
        params = list(inspect.signature(p.__call__).parameters)
        if len(params) > 2:
            raise ValueError(f"Make sure that all the required parameters: {params} for {p.__class__} are passed "
                             "to the logits processor.")

    def apply(ids, scores):
        for p in procs:
            scores = p(ids, scores)
        return scores
    return apply


def _stopping_criteria(cfg, eos, device, user, tokenizer):
    from transformers import generation as G

    crit = G.StoppingCriteriaList()
    if cfg.max_length is not None:
        crit.append(G.MaxLengthCriteria(max_length=cfg.max_length))
    if cfg.max_time is not None:
        crit.append(G.MaxTimeCriteria(max_time=cfg.max_time))
    if cfg.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings: needs the tokenizer (pass tokenizer=...; GritModel.generate passes its own)")
        crit.append(G.StopStringCriteria(stop_strings=cfg.stop_strings, tokenizer=tokenizer))
    if eos:
        crit.append(G.EosTokenCriteria(eos_token_id=torch.tensor(eos, device=device)))
    for c in user or []:
        if any(type(q) is type(c) for q in crit):
            raise ValueError(f"stopping_criteria: a {type(c).__name__} is already built from the generation config")
        crit.append(c)
    return crit


def _split_inputs(input_ids, attention_mask):
    """A BatchEncoding / dict (what ``tokenizer(...)`` and ``apply_chat_template(..., return_tensors=
    "pt")`` return) gives its input_ids and attention_mask."""
    if isinstance(input_ids, dict) or hasattr(input_ids, "data") and hasattr(input_ids, "keys"):
        enc = input_ids
        if "input_ids" not in enc:
            raise ValueError("input_ids: a mapping without an 'input_ids' entry")
        input_ids = enc["input_ids"]
        if attention_mask is None:
            attention_mask = enc.get("attention_mask")
    return input_ids, attention_mask


@torch.no_grad()
def generate(model: Transformer, input_ids=None, attention_mask=None, generation_config=None, logits_processor=None,
             stopping_criteria=None, prefix_allowed_tokens_fn=None, streamer=None, past_key_values=None,
             generator: torch.Generator | None = None, tokenizer=None, defaults=None, **kwargs):
    """transformers' ``generate`` for a causal LM, on this package's model and cache.

    input_ids: (B, S) int64 prompts (a 1-D tensor or a list of lists is taken as B rows; a
    BatchEncoding is unpacked); attention_mask: (B, S) or (B, P + S), 1 on real tokens (left
    or right padding). ``generation_config`` / keyword overrides / ``defaults`` (the
    checkpoint's generation_config.json) mean what they mean in transformers: greedy,
    sampling (temperature, top_k, top_p, min_p, typical_p, epsilon/eta cutoffs), beam search
    (num_beams, length_penalty, early_stopping, num_return_sequences), repetition_penalty,
    no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens, max_length /
    max_new_tokens, several EOS ids, stop_strings (with ``tokenizer``), user
    ``logits_processor`` / ``stopping_criteria``, ``streamer``, and ``return_dict_in_generate``
    with ``output_scores`` / ``output_logits``. The processing is transformers' own
    LogitsProcessor / StoppingCriteria classes. Anything it cannot honour raises.
    past_key_values: KVPrefix (all rows), a list with one KVPrefix or None per row, an HF
    cache or gritlm's tuple of per-layer (k, v); the prompt continues after it.
    ``generator``: a torch.Generator for sampling (an extension; transformers uses the global RNG).

    Returns (B * num_return_sequences, S + N) int64, the prompts followed by the new tokens
    (finished rows padded with pad_token_id), or a transformers Generate*Output.
    """
    if not model.has_lm_head:
        raise RuntimeError("generate: the model was loaded without its lm_head (mode='embedding')")
    kwargs.pop("use_cache", None)  # a cache is always used; the output is the same
    input_ids, attention_mask = _split_inputs(input_ids, attention_mask)
    input_ids = _check_input_ids(model, input_ids)
    device = model.device
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
    cfg = _config(model, generation_config, defaults, kwargs)
    B, S = input_ids.shape
    # transformers' _prepare_generated_length: max_new_tokens wins; a max_length nobody passed
    # means that many *new* tokens (capped at max_position_embeddings).
    if cfg.max_new_tokens is not None:
        cfg.max_length = cfg.max_new_tokens + S
    elif kwargs.get("max_length") is None and cfg.max_length is not None:
        cfg.max_length = min(cfg.max_length + S, model.config.max_position_embeddings)
    if cfg.min_new_tokens is not None:
        cfg.min_length = cfg.min_new_tokens + S
    eos = [] if cfg.eos_token_id is None else ([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int)
                                                  else list(cfg.eos_token_id))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None and cfg.pad_token_id is None:
        cfg.pad_token_id = pad  # as transformers does (with a warning there)
    rows = _rows_from_mask(input_ids, attention_mask)
    if any(r.numel() == 0 for r in rows):
        raise ValueError("input_ids: every row needs at least one real token (attention_mask all zero?)")
    prefixes = _as_prefix_list(past_key_values, B, model)
    if cfg.max_length <= S:
        raise ValueError(f"max_length: {cfg.max_length} leaves no room after the {S}-token prompt; "
                         "set max_new_tokens")
    # Rows: prompts repeated num_beams times (beam search) or num_return_sequences times (sampling).
    beams = cfg.num_beams or 1
    expand = beams if beams > 1 else (cfg.num_return_sequences or 1)
    if beams == 1 and expand > 1 and not cfg.do_sample:
        raise ValueError(f"num_return_sequences: {expand} needs do_sample=True or num_beams >= {expand}")
    if beams > 1 and cfg.num_return_sequences > beams:
        raise ValueError(f"num_return_sequences: {cfg.num_return_sequences} exceeds num_beams = {beams}")
    if expand > 1:
        input_ids = input_ids.repeat_interleave(expand, dim=0)
    procs = _logits_processor(cfg, S, eos, device, logits_processor, prefix_allowed_tokens_fn)
    crit = _stopping_criteria(cfg, eos, device, stopping_criteria, tokenizer)
    # 'static' keeps one cache on the model and decodes through a CUDA graph on a GPU, or
    # through torch.compile elsewhere when the config asks for compilation (transformers'
    # compile_config; its disable_compile wins). A model split over several devices keeps
    # 'static' eager (its layers copy the cache lengths across devices).
    static = getattr(cfg, "cache_implementation", None) == "static" \
        and len({layer.attn_norm.weight.device for layer in model.layers}) == 1
    graph = static and model.device.type == "cuda"
    compiled = static and not graph and _compile_requested(cfg)
    cache, last = _prefill(model, rows, prefixes, cfg.max_length - S, pad if pad is not None else 0, expand,
                           static=graph or compiled)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    if graph:
        step = _graph_step(model, cache)
    else:
        step = functools.partial(_compiled_step(cfg.compile_config) if compiled else _step, model, cache)
    if beams > 1:
        out = _beam_search(step, model, cache, last, input_ids, cfg, procs, crit, eos, pad, B, beams, generator)
    else:
        out = _sample(step, model, last, input_ids, cfg, procs, crit, eos, pad, streamer, generator)
    if streamer is not None:
        streamer.end()
    return out


def _check_input_ids(model, input_ids) -> torch.Tensor:
    if input_ids is None:
        raise ValueError("input_ids: required (B, S) prompt token ids")
    if isinstance(input_ids, (str, bytes)) or (isinstance(input_ids, (list, tuple)) and input_ids
                                                and isinstance(input_ids[0], str)):
        raise TypeError("input_ids: expected token ids (a (B, S) tensor or lists of ints), got text; "
                        "tokenize it first, e.g. model.tokenizer(prompts, return_tensors='pt')")
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
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids: expected at least one row")
    V = model.config.vocab_size
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
        raise ValueError(f"input_ids: token ids must lie in [0, {V}), "
                         f"got [{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.to(device=model.device, dtype=torch.long)


def _prefill(model, rows, prefixes, max_new: int, pad: int, repeat: int = 1, static: bool = False):
    """The prompts through the model into a new cache -> (cache, last hidden (R, D)), each
    prompt in ``repeat`` consecutive rows (beams, or sequences to return): R = len(rows) * repeat.
    Each prompt is run once and its cache row copied (``KVCache.reorder``)."""
    device = model.device
    plens = [0 if p is None else p.length for p in prefixes]
    if any(plens) and repeat > 1:  # the cached pass runs every cache row: expand the inputs
        rows = [r for r in rows for _ in range(repeat)]
        prefixes = [p for p in prefixes for _ in range(repeat)]
        plens = [p for p in plens for _ in range(repeat)]
        repeat = 1
    R = len(rows)
    lens = [r.numel() for r in rows]
    need = max(plens) + max(lens) + max_new
    cache = _static_cache(model, R * repeat, need) if static else model.new_cache(R * repeat, need)
    if any(plens):
        # Each row starts from its prefix; the prompts, padded to the longest one, go through
        # the cached pass: padded queries write keys past the row's length, which the next
        # step overwrites before anything reads them.
        cache.load_prefixes(prefixes)
        S = max(lens)
        tokens = torch.full((R, S), pad, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            tokens[b, :lens[b]] = r
        positions = torch.tensor(plens, device=device)[:, None] + torch.arange(S, device=device)
        hidden = model(tokens, positions, cache=cache, position_bound=cache.max_len).hidden
        last = hidden[torch.arange(R, device=hidden.device), torch.tensor(lens, device=hidden.device) - 1]
        cache.set_lengths([p + n for p, n in zip(plens, lens)])
        return cache, last
    # Packed causal prefill: no compute on padding; every layer's keys/values go straight to
    # their cache rows (packed token t -> row row_of[t], slot positions[t]).
    tokens = torch.cat(rows)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    positions = packed_positions(cu, tokens.numel())
    # Prompt b fills cache row b * repeat, the first of its group.
    row_of = torch.repeat_interleave(torch.arange(R, device=device) * repeat, torch.tensor(lens, device=device))
    hidden = model(tokens, positions, cu_seqlens=cu, max_seqlen=max(lens), causal=True, cache=cache,
                   cache_rows=row_of, position_bound=max(lens)).hidden
    last = hidden[cu[1:].long().to(hidden.device) - 1]
    if repeat > 1:
        cache.reorder(torch.arange(R * repeat, device=device) // repeat * repeat)
        last = last.repeat_interleave(repeat, dim=0)
    return cache, last


def _step(model, cache, tokens_R):
    """One decode step: the rows' new tokens (R,) through the cache -> last hidden (R, D)."""
    return model(tokens_R[:, None], cache.seqlens.long()[:, None], cache=cache, position_bound=cache.max_len).hidden[:, 0]


def _compile_requested(cfg) -> bool:
    """transformers' opt-in to a compiled forward: a ``compile_config`` and no ``disable_compile``."""
    return getattr(cfg, "compile_config", None) is not None and not getattr(cfg, "disable_compile", False)


def _compiled_step(compile_config):
    """``_step`` under torch.compile with a transformers CompileConfig's settings (gpt-fast's
    compiled decode on a CPU: one call of fused kernels per token instead of a few hundred
    eager ops). One compiled function per setting: dynamo's guards keep one graph per model
    and static cache, which the model holds on to (``_static_cache``), so later tokens and
    later calls of the same shape reuse it."""
    cc = compile_config
    options = tuple(sorted(cc.options.items())) if getattr(cc, "options", None) else None
    return _compiled(cc.fullgraph, cc.dynamic, cc.backend, cc.mode, options)


@functools.lru_cache(maxsize=None)
def _compiled(fullgraph, dynamic, backend, mode, options):
    return torch.compile(_step, fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode,
                         options=dict(options) if options else None)


# cache_implementation='static' keeps one cache and its captured decode step on the model, as
# gpt-fast does: capturing costs a few steps, so later calls of the same batch size and a
# capacity in the same 256-token bucket reuse both (the prefill rewrites the buffers in place).
_STATIC_BUCKET = 256


def _static_cache(model, batch: int, need: int):
    cap = -(-need // _STATIC_BUCKET) * _STATIC_BUCKET
    held = getattr(model, "_static_decode", None)
    if held is None or held[0].batch != batch or held[0].max_len != cap:
        held = (model.new_cache(batch, cap), None)
        model._static_decode = held  # one at a time: a new shape frees the old cache and graph
    return held[0]


def _graph_step(model, cache):
    held_cache, step = model._static_decode
    if step is None or held_cache is not cache:
        step = GraphStep(model, cache)
        model._static_decode = (cache, step)
    return step


class GraphStep:
    """gpt-fast's decode on a GPU: ``_step`` captured once as a CUDA graph over the cache's
    own buffers (static shapes: R rows, one token each), then replayed per token, so a step
    costs one graph launch instead of a few hundred kernel launches from Python.

    Capture needs what the step launches compiled and tuned beforehand: two warm-up steps
    run on a side stream first. They write k/v at each row's next slot (the slot the first
    real step overwrites before anything reads it) and advance the lengths, which are then
    put back. Inside the graph the lengths advance on the device; ``__call__`` advances the
    cache's host bound to match. The returned hidden (R, D) is the graph's output buffer:
    read it before the next call. For a model on one device (``generate`` checks).
    """

    def __init__(self, model, cache, warmup: int = 2):
        dev = cache.seqlens.device
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=dev)
        lengths, bound = cache.seqlens.clone(), cache._bound
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                _step(model, cache, self.tokens)
                cache.seqlens.copy_(lengths)
                cache._bound = bound
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.hidden = _step(model, cache, self.tokens)  # recorded, not run: lengths unchanged
        cache._bound = bound  # capture ran the host side of advance(1)

    def __call__(self, tokens_R):
        self.tokens.copy_(tokens_R)
        self.graph.replay()
        if self.cache._bound is not None:
            self.cache._bound += 1
        return self.hidden


def _sample(step, model, last, seqs, cfg, procs, crit, eos, pad, streamer, generator):
    """transformers' ``_sample``: greedy, or multinomial over the processed scores."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores, raw = (), ()
    unfinished = torch.ones(seqs.shape[0], dtype=torch.long, device=seqs.device)
    while True:
        logits = model.logits(last).float().to(seqs.device)  # the head may sit on another device
        next_scores = procs(seqs, logits)
        if want_scores:
            scores += (next_scores,)
        if want_logits:
            raw += (logits,)
        if cfg.do_sample:
            nxt = torch.multinomial(torch.softmax(next_scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            nxt = next_scores.argmax(dim=-1)
        if eos:
            nxt = nxt * unfinished + pad * (1 - unfinished)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        unfinished = unfinished & ~crit(seqs, scores)
        if int(unfinished.max()) == 0:
            break
        last = step(nxt)
    if cfg.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=seqs, scores=scores if want_scores else None,
                                         logits=raw if want_logits else None)
    return seqs


def _gather(t, idx):
    """t (B, K, ...) indexed along dim 1 by idx (B, K')."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def _beam_search(step, model, cache, last, input_ids, cfg, procs, crit, eos, pad, B, nb, generator):
    """transformers' (>= 4.50) vectorised beam search, on this package's cache: each step
    keeps the best ``max(2, 1 + n_eos) * num_beams`` continuations, moves those that stop
    into the finished set (scored with the length penalty), and reorders the cache rows to
    the surviving beams (``KVCache.reorder``)."""
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

    device = input_ids.device
    max_length, prompt_len = cfg.max_length, input_ids.shape[1]
    cur = prompt_len
    keep = max(2, 1 + len(eos)) * nb
    top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(device)
    fill = (pad if pad else eos[0]) if eos else -1
    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :cur] = input_ids.view(B, nb, cur)
    sequences = running.clone()
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((B, nb), -1e9, device=device)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    open_heuristic = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_idx = torch.full((B, nb, max_length - cur), -1, dtype=torch.int32, device=device)
    beam_idx_out = running_idx.clone()
    want_scores = cfg.return_dict_in_generate and cfg.output_scores
    want_logits = cfg.return_dict_in_generate and cfg.output_logits
    scores, raw = (), ()
    lp, early = cfg.length_penalty, cfg.early_stopping
    while True:
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logits = model.logits(last).float().to(device)
        log_probs = procs(flat, torch.log_softmax(logits, dim=-1))
        if want_scores:
            scores += (log_probs.clone(),)
        if want_logits:
            raw += (logits.clone(),)
        V = log_probs.shape[-1]
        acc = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if cfg.do_sample:
            top_i = torch.multinomial(torch.softmax(acc, dim=-1), keep, generator=generator)
            top_lp = acc.gather(1, top_i)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            top_i = top_i.gather(1, order)
        else:
            top_lp, top_i = torch.topk(acc, k=keep)
        src_beam = top_i // V
        top_idx = _gather(running_idx, src_beam)
        top_seq = _gather(running, src_beam)
        top_seq[:, :, cur] = top_i % V
        top_idx[:, :, cur - prompt_len] = (src_beam + torch.arange(B, device=device)[:, None] * nb).to(torch.int32)
        stops = crit(top_seq[:, :, :cur + 1].reshape(B * keep, cur + 1), scores).view(B, keep)
        # survivors: the best nb continuations that did not stop
        alive = top_lp + stops.float() * -1e9
        nxt = torch.topk(alive, k=nb)[1]
        running, running_scores, running_idx = _gather(top_seq, nxt), _gather(alive, nxt), _gather(top_idx, nxt)
        # finished: those that stopped among the top nb, with the length penalty
        just = stops & top_mask[None, :]
        fin_lp = top_lp / ((cur + 1 - prompt_len) ** lp)
        full = finished.all(dim=-1, keepdim=True) & (early is True)
        fin_lp = fin_lp + full.float() * -1e9 + (~open_heuristic).float() * -1e9 + (~just).float() * -1e9
        m_seq = torch.cat([sequences, top_seq], dim=1)
        m_scores = torch.cat([beam_scores, fin_lp], dim=1)
        m_idx = torch.cat([beam_idx_out, top_idx], dim=1)
        m_fin = torch.cat([finished, just], dim=1)
        best = torch.topk(m_scores, k=nb)[1]
        sequences, beam_scores, beam_idx_out, finished = (_gather(m_seq, best), _gather(m_scores, best),
                                                         _gather(m_idx, best), _gather(m_fin, best))
        cache.reorder(running_idx[:, :, cur - prompt_len].reshape(-1).long())
        cur += 1
        hypothetical = (max_length - prompt_len) if (early == "never" and lp > 0.0) else (cur - prompt_len)
        best_running = running_scores[:, :1] / (hypothetical ** lp)
        worst_done = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], -1e9)
        open_heuristic = open_heuristic & (best_running > worst_done).any(dim=-1, keepdim=True)
        improvable = bool(open_heuristic.any())
        open_beam = not (bool(finished.all()) and early is True)
        continues = not bool(stops.all())
        if not (improvable and open_beam and continues):
            break
        last = step(running[:, :, cur - 1].reshape(-1))
    nrs = cfg.num_return_sequences
    sequences = sequences[:, :nrs].reshape(B * nrs, -1)
    seq_scores = beam_scores[:, :nrs].reshape(B * nrs)
    beam_indices = beam_idx_out[:, :nrs].reshape(B * nrs, -1)
    generated = int((beam_indices + 1).bool().sum(dim=1).max())
    sequences = sequences[:, :prompt_len + generated]
    if cfg.return_dict_in_generate:
        return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=seq_scores if want_scores else None,
                                             scores=scores if want_scores else None,
                                             logits=raw if want_logits else None,
                                             beam_indices=beam_indices[:, :generated])
    return sequences
