"""GritModel: a drop-in for ``gritlm.GritLM`` on the packed Mistral/Mixtral of this package.

Same constructor and ``encode`` signatures and defaults as gritlm.GritLM, same embeddings.
What differs is how the work is laid out:

* texts are sorted by length and packed back to back (``cu_seqlens``), so no compute is spent
  on padding, and results come back in input order;
* the instruction is attended to but left out of the mean through the pooling kernel's
  ``skip`` (gritlm zeroes those positions of the padding mask);
* ``get_cache=True`` returns one ``KVPrefix`` per text, holding no padding, for any number of
  batches (gritlm returns the padded HF cache of a single batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import grit_kernels

from . import generation as _generation
from .checkpoint import load_checkpoint
from .generation import KVPrefix
from .mistral import packed_positions
from .tokenizer import load_tokenizer, token_ids

from .prompts import ATTN_MODES, MODES, POOLING_METHODS
from .prompts import instruction_format as gritlm_instruction_format  # noqa: F401  (gritlm's name)


def pool(hidden_TD: torch.Tensor, cu_seqlens: torch.Tensor, skip_B: torch.Tensor, method: str, *,
         normalize: bool = False) -> torch.Tensor:
    """(B, D) embeddings of packed hidden states: GritLM's pooling, shared by GritModel.encode
    and training. ``skip_B`` (B,) int32: leading (instruction) tokens left out of the mean.

    "mean" / "weightedmean": fp32 (``grit_kernels.mean_pool``, L2-normalised in the kernel
    when ``normalize``); "cls": the first token; "lasttoken": the last one, in fp32 (gritlm's
    float mask product). ``normalize`` applies to the mean methods only."""
    if method in ("mean", "weightedmean"):
        return grit_kernels.mean_pool(hidden_TD, cu_seqlens=cu_seqlens, skip=skip_B, normalize=normalize,
                                      weighted=method == "weightedmean")
    if method == "cls":
        return hidden_TD[cu_seqlens[:-1].long()]
    if method == "lasttoken":
        return hidden_TD[cu_seqlens[1:].long() - 1].float()
    raise ValueError(f"pooling_method: expected one of {POOLING_METHODS}, got {method!r}")


class GritModel(torch.nn.Module):
    def __init__(
        self,
        model_name_or_path: str = None,
        mode: str = "unified",  # 'unified', 'embedding' (no lm_head) or 'generative'
        pooling_method: str = "mean",  # 'cls', 'lasttoken', 'mean', 'weightedmean'
        normalized: bool = True,
        projection: int = None,
        is_inference: bool = True,
        embed_eos: str = "",
        attn: str = "bbcc",
        device: str | torch.device | None = None,
        torch_dtype="auto",
        **kwargs,
    ) -> None:
        super().__init__()
        if model_name_or_path is None:
            raise ValueError("model_name_or_path: a checkpoint folder or a Hugging Face hub id is required")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if pooling_method not in POOLING_METHODS:
            raise ValueError(f"pooling_method: expected one of {POOLING_METHODS}, got {pooling_method!r}")
        if attn is not None and attn not in ATTN_MODES:
            raise ValueError(f"attn: expected one of {ATTN_MODES} (mixed attention is not supported), got {attn!r}")
        dtype_kw = kwargs.pop("dtype", None)
        if dtype_kw is not None:
            torch_dtype = dtype_kw
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        device_map, max_memory = kwargs.pop("device_map", None), kwargs.pop("max_memory", None)
        if max_memory is not None and device_map is None:
            raise ValueError("max_memory: only means something with device_map ('auto', 'balanced', 'sequential')")
        _check_loading_kwargs(kwargs)
        model_name_or_path = resolve_checkpoint(model_name_or_path, **hub)
        placement = None
        if device_map is not None:  # whole layers on devices (models/placement.py), as device_map does
            from .config import MistralConfig, parse_dtype
            from .placement import plan

            cfg = MistralConfig.from_pretrained(model_name_or_path)
            dtype = cfg.torch_dtype or torch.float32 if torch_dtype in ("auto", None) else parse_dtype(
                torch_dtype, "torch_dtype")
            placement = plan(cfg, device_map, max_memory, dtype, with_lm_head=mode != "embedding")
            dev = placement["embed"]
        else:
            dev = _resolve_device(device)
        self.device = DeviceName(dev)
        self.model = load_checkpoint(model_name_or_path, device=dev, torch_dtype=torch_dtype,
                                     with_lm_head=mode != "embedding", device_map=placement)
        self.device_map = placement
        self.config = self.model.config
        self.generation_config = _generation.default_generation_config(self.model, model_name_or_path)
        self.tokenizer = load_tokenizer(model_name_or_path) if is_inference else None
        self.projection = torch.nn.Linear(
            self.config.hidden_size, int(projection), dtype=self.model.dtype, device=self.device,
        ) if projection is not None else None
        self.mode, self.normalized, self.pooling_method = mode, normalized, pooling_method
        self.embed_eos, self.attn = embed_eos, attn
        self.num_gpus = 1
        if embed_eos and (self.tokenizer is None or embed_eos not in self.tokenizer.get_vocab()):
            raise ValueError(f"embed_eos: token {embed_eos!r} is not in the vocabulary")

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------ encoding

    def encode_queries(self, queries, **kwargs):
        """Used for encoding the queries of retrieval or reranking tasks."""
        return self.encode(queries, **kwargs)

    def encode_corpus(self, corpus, **kwargs):
        """Documents: strings or dicts with "text" (and "title", joined as "title text")."""
        if isinstance(corpus, dict):
            corpus = [corpus]
        if isinstance(corpus, list) and corpus and isinstance(corpus[0], dict):
            corpus = [doc["title"] + " " + doc["text"] if "title" in doc else doc["text"] for doc in corpus]
        return self.encode(corpus, **kwargs)

    @torch.no_grad()
    def encode(
        self,
        sentences,
        batch_size: int = 256,
        max_length: int = 512,
        instruction: str = "",
        embed_instruction: bool = False,
        get_cache: bool = False,
        convert_to_tensor: bool = False,
        recast: bool = False,
        add_special_tokens: bool = True,
        **kwargs,
    ):
        """Embeddings (N, D) of ``sentences`` (one (D,) row for a single string), as gritlm.

        Each text is ``instruction + text + embed_eos``, tokenised with BOS and truncated to
        ``max_length`` tokens. Mean pooling leaves the instruction's tokens out unless
        ``embed_instruction``. Returns a float32 numpy array, or a tensor with
        ``convert_to_tensor``; with ``get_cache`` also a list of one KVPrefix per text.
        """
        if self.tokenizer is None:
            raise RuntimeError("encode: the model was created with is_inference=False (no tokenizer)")
        input_was_string = isinstance(sentences, str)
        sentences = _texts(sentences)
        batch_size = _positive_int("batch_size", batch_size)
        max_length = None if max_length is None else _positive_int("max_length", max_length)
        if not isinstance(instruction, str):
            raise TypeError(f"instruction: expected a string, got {type(instruction).__name__}")

        tok = self.tokenizer
        ids = token_ids(tok, [instruction + s + self.embed_eos for s in sentences],
                        add_special_tokens=add_special_tokens, max_length=max_length)
        if any(len(x) == 0 for x in ids):
            raise ValueError("sentences: a text tokenised to zero tokens (empty text with add_special_tokens=False)")
        V = self.config.vocab_size
        for i, x in enumerate(ids):  # checked here: F.embedding would fail with a bare IndexError
            if max(x) >= V or min(x) < 0:
                raise ValueError(f"sentences[{i}]: the tokenizer gave token id {max(x) if max(x) >= V else min(x)}, "
                                 f"outside the model's vocabulary [0, {V}) (config.json vocab_size); the "
                                 "tokenizer does not belong to this checkpoint")
        skip = 0
        if instruction and not embed_instruction and "mean" in self.pooling_method:
            # gritlm: the instruction tokenised on its own, with BOS, counts the masked tokens.
            skip = len(token_ids(tok, [instruction], add_special_tokens=add_special_tokens, max_length=max_length)[0])
        bidirectional = self.attn is not None and self.attn[:2] == "bb"

        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        embeddings: list = [None] * len(ids)
        caches: list = [None] * len(ids)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="Batches", disable=len(sentences) < 256):
            idx = order[start:start + batch_size]
            emb, kv = self._encode_packed([ids[i] for i in idx], skip, bidirectional, get_cache, recast)
            for j, i in enumerate(idx):
                embeddings[i] = emb[j]
                if get_cache:
                    caches[i] = kv[j]
        out = torch.stack(embeddings)
        if not convert_to_tensor:
            out = out.cpu().to(torch.float32).numpy()
        if input_was_string:
            out = out[0]
        return (out, caches) if get_cache else out

    def _encode_packed(self, batch_ids, skip: int, bidirectional: bool, get_cache: bool, recast: bool):
        """One packed forward: (B, D) embeddings and, with get_cache, B KVPrefix."""
        dev = self.device
        lengths = [len(x) for x in batch_ids]
        tokens = torch.tensor([t for x in batch_ids for t in x], dtype=torch.long, device=dev)
        cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
        hidden, _, kv = self.model(tokens, packed_positions(cu, tokens.numel()), cu_seqlens=cu,
                                   max_seqlen=max(lengths), causal=not bidirectional, return_kv=get_cache,
                                   position_bound=max(lengths))
        method = self.pooling_method
        normalize_in_kernel = self.normalized and self.projection is None and not recast and method in (
            "mean", "weightedmean")
        # The last layer (and so hidden) may sit on another device than the embedding.
        skip_t = torch.full((len(lengths),), skip, dtype=torch.int32, device=hidden.device)
        emb = pool(hidden, cu.to(hidden.device), skip_t, method, normalize=normalize_in_kernel)
        if self.projection is not None:
            # Pooling is a weighted average with weights summing to 1, so projecting the pooled
            # vector equals gritlm's projection of every token, at 1/L of the cost.
            p = self.projection
            emb = F.linear(emb.to(torch.float32), p.weight.float(), p.bias.float())
            if method == "cls":
                emb = emb.to(hidden.dtype)
        if recast:
            emb = emb.to(hidden.dtype)
        if self.normalized and not normalize_in_kernel:
            emb = F.normalize(emb, dim=-1).to(emb.dtype)
        caches = None
        if get_cache:
            caches = [KVPrefix([k[a:b].clone() for k, _ in kv], [v[a:b].clone() for _, v in kv])
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return emb, caches

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """transformers' ``generate`` (see grit_models.generation.generate): prompt + new tokens,
        with the checkpoint's generation_config.json as defaults and this model's tokenizer for
        ``stop_strings``. ``input_ids`` may be what the tokenizer returned (a BatchEncoding)."""
        if self.mode == "embedding":
            raise RuntimeError("generate: mode='embedding' loads no lm_head; use mode='unified'")
        kwargs.setdefault("tokenizer", self.tokenizer)
        return _generation.generate(self.model, input_ids, attention_mask, defaults=self.generation_config, **kwargs)

    def rag(self, query, documents, *, cache=None, **kwargs):
        """Answer ``query`` with retrieved ``documents`` in one of gritlm's RAG modes
        (see grit_models.rag.rag_generate)."""
        from .rag import rag_generate

        return rag_generate(self, query, documents, cache=cache, **kwargs)


GritLM = GritModel


# gritlm passes its **kwargs to from_pretrained; these are what each one does here.
_HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "subfolder")
# Accepted, with the meaning they have for this model: attention is always this package's
# kernels (any attn_implementation gives the same result), loading is always low-memory
# (meta device, tensors read straight to their device), remote code is never needed.
_ACCEPTED_KWARGS = {"attn_implementation": ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention",
                                            None),
                    "trust_remote_code": (True, False, None), "low_cpu_mem_usage": (True, False, None),
                    "use_safetensors": (True, None)}
# Rejected by name: disk offload and quantisation are not implemented.
_REJECTED_KWARGS = {
    "offload_folder": "places every module on a GPU or the CPU (device_map); disk offload is not implemented",
    "load_in_4bit": "quantised weights are not supported", "load_in_8bit": "quantised weights are not supported",
    "quantization_config": "quantised weights are not supported",
}


def _check_loading_kwargs(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name in _ACCEPTED_KWARGS:
            if value not in _ACCEPTED_KWARGS[name]:
                raise ValueError(f"{name}: {value!r} is not supported (accepted: {_ACCEPTED_KWARGS[name]})")
        elif name in _REJECTED_KWARGS:
            if value not in (None, False):
                raise ValueError(f"{name}: GritModel {_REJECTED_KWARGS[name]}")
        else:
            raise TypeError(f"GritModel: unexpected keyword argument {name!r}")


# What a checkpoint download needs: config, tokenizer and safetensors weights (no .bin / .pt).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


def resolve_checkpoint(model_name_or_path, *, revision=None, cache_dir=None, token=None, local_files_only=None,
                       force_download=False, subfolder=None) -> str:
    """A local checkpoint folder as it is, or a hub id (``"GritLM/GritLM-7B"``) through
    ``huggingface_hub.snapshot_download`` (honouring ``HF_HUB_OFFLINE``, ``HF_HOME`` and the
    arguments), downloading only config, tokenizer and safetensors files. -> the folder."""
    from pathlib import Path

    path = Path(str(model_name_or_path))
    if path.is_dir():
        return str(path / subfolder) if subfolder else str(path)
    name = str(model_name_or_path)
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or path.suffix:
        raise FileNotFoundError(f"model_name_or_path: {name} is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = HUB_PATTERNS if not subfolder else [f"{subfolder}/{p}" for p in HUB_PATTERNS]
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=bool(local_files_only), force_download=force_download,
                                   allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"model_name_or_path: {name} is not in the Hugging Face cache and downloading is "
                                f"off (local_files_only / HF_HUB_OFFLINE) or failed: {e}") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"model_name_or_path: {name} could not be fetched from the hub: {e}") from None
    return str(Path(folder) / subfolder) if subfolder else folder


def _texts(sentences) -> list[str]:
    """Any sequence of strings (list, tuple, numpy array of str, pandas Series, a datasets
    column, a generator) as a list; a non-string element is an error naming its index."""
    if isinstance(sentences, str):
        return [sentences]
    if isinstance(sentences, (bytes, dict)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences: expected a string or a sequence of strings, got {type(sentences).__name__}")
    texts = list(sentences.tolist() if hasattr(sentences, "tolist") and not isinstance(sentences, list)
                 else sentences)
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}]: expected a string, got {type(s).__name__} ({s!r:.40})")
    if not texts:
        raise ValueError("sentences: expected at least one text, got an empty sequence")
    return [str(s) for s in texts]


def _positive_int(name: str, value) -> int:
    """An int >= 1 (numpy integers included; bools and floats are not counts)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


class DeviceName(str):
    """The model's device as gritlm gives it: a string (``model.device == "cpu"`` holds, and
    ``tensor.to(model.device)`` works), with ``torch.device``'s ``type`` and ``index``.
    "cuda" and "cuda:0" compare equal when the default CUDA device is 0."""

    def __new__(cls, device: torch.device):
        obj = super().__new__(cls, str(device))
        obj.torch = device
        return obj

    @property
    def type(self) -> str:
        return self.torch.type

    @property
    def index(self):
        return self.torch.index

    def _same(self, other) -> bool:
        try:
            o = torch.device(other) if isinstance(other, str) else other
        except (RuntimeError, TypeError):
            return False
        if not isinstance(o, torch.device) or o.type != self.torch.type:
            return False
        default = torch.cuda.current_device() if o.type == "cuda" and torch.cuda.is_available() else 0
        return (o.index if o.index is not None else default) == (
            self.torch.index if self.torch.index is not None else default)

    def __eq__(self, other) -> bool:
        return self._same(other)

    def __ne__(self, other) -> bool:
        return not self._same(other)

    __hash__ = str.__hash__


def _resolve_device(device) -> torch.device:
    """gritlm's rule for None (CUDA when available, else CPU); a named device must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but no CUDA device is available "
                             "(torch.cuda.is_available() is False); pass device='cpu' or None")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but only {torch.cuda.device_count()} CUDA devices are visible")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device: {device!r} is not supported (expected 'cpu', 'cuda' or 'cuda:N')")
    return dev
