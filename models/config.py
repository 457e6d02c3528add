"""Model configurations read from a Hugging Face ``config.json`` (Mistral and Mixtral).

Only what changes the arithmetic is kept. Fields are sorted into three kinds:

* used: mapped onto the dataclass below;
* harmless: bookkeeping that does not change inference (``architectures``, ``use_cache``, ...);
* constrained: supported with their default value only (``hidden_act`` must be ``silu``, no
  ``rope_scaling``, no attention bias, no quantization): another value is an error, because
  silently running a different model is worse than refusing.

Anything else is unknown and, with ``strict=True`` (the default), an error listing the fields:
a new field may change the model in ways this implementation does not follow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from pathlib import Path

import torch

# Fields that PretrainedConfig and training tools write and that do not affect inference.
_HARMLESS = {
    "_name_or_path", "architectures", "transformers_version", "model_type", "use_cache", "initializer_range",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "pruned_heads", "tie_encoder_decoder", "add_cross_attention",
    "torchscript", "tf_legacy_loss", "use_bfloat16", "finetuning_task", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "cross_attention_hidden_size",
    "is_decoder", "output_router_logits", "router_jitter_noise", "attention_dropout", "auto_map",
    "_attn_implementation_autoset", "pad_token_id", "max_length", "min_length", "do_sample", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "bad_words_ids", "num_return_sequences",
    "early_stopping", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "diversity_penalty", "num_beam_groups", "typical_p", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}

# Fields supported only with these values (None = absent or null).
_CONSTRAINED = {
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "attention_bias": (None, False),
    "mlp_bias": (None, False),
    "quantization_config": (None,),
    "pretraining_tp": (None, 1),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16}


def parse_dtype(value, name: str = "torch_dtype") -> torch.dtype | None:
    """``torch.dtype`` from a dtype or a string ("bfloat16", "torch.float16", ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: expected float32, float16 or bfloat16, got {value}")
        return value
    if isinstance(value, str):
        key = value.removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"{name}: expected 'auto', a torch dtype or one of {sorted(_DTYPES)}, got {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclasses.dataclass
class MistralConfig:
    """Mistral (dense) hyper-parameters, named as in Hugging Face's config.json."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None            # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = 4096      # causal passes only; None = unbounded
    max_position_embeddings: int = 4096 * 32
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    torch_dtype: torch.dtype | None = None  # the dtype the checkpoint was saved in
    # Fields config.json did not give, so their transformers default above was used: named
    # in shape errors, where a missing hidden_size is the likely cause.
    defaulted: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    model_type = "mistral"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    @property
    def is_moe(self) -> bool:
        return False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} must divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        sw = self.sliding_window
        if sw is not None and (not _is_int(sw) or sw < 1):
            raise ValueError(f"sliding_window: expected a positive integer or null, got {sw!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a positive finite number, got {v!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings: expected true or false, got {self.tie_word_embeddings!r}")
        if self.bos_token_id is not None and (not _is_int(self.bos_token_id) or self.bos_token_id < 0):
            raise ValueError(f"bos_token_id: expected a non-negative integer or null, got {self.bos_token_id!r}")
        eos = self.eos_token_id
        eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(_is_int(e) and e >= 0 for e in eos_list):
            raise ValueError(f"eos_token_id: expected a non-negative integer, a list of them or null, got {eos!r}")

    @property
    def causal_window(self) -> tuple[int, int]:
        """flash-attn ``window`` of causal passes. HF masks key j for query i unless
        ``i - j < sliding_window``, i.e. ``sliding_window - 1`` keys to the left plus itself."""
        return (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, d: dict, *, strict: bool = True) -> "MistralConfig":
        """Config from the content of an HF config.json (see the module docstring for the rules)."""
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict (config.json content), got {type(d).__name__}")
        model_type = d.get("model_type")
        target = {"mistral": MistralConfig, "mixtral": MixtralConfig}.get(model_type)
        if target is None:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported; "
                             "expected 'mistral' or 'mixtral'")
        if cls is not MistralConfig and target is not cls:
            raise ValueError(f"config.json: model_type {model_type!r} does not match {cls.__name__}")
        d = dict(d)
        # transformers 5 nests rope settings in rope_parameters; 4.x wrote rope_theta (+ rope_scaling).
        rope = d.pop("rope_parameters", None)
        if rope is not None:
            rope = dict(rope)
            rope_type = rope.pop("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"rope_parameters.rope_type: only 'default' RoPE is supported, got {rope_type!r}")
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope.pop("rope_theta"))
            if rope:
                raise ValueError(f"rope_parameters: unsupported fields {sorted(rope)}")
        dtype = d.pop("torch_dtype", None) or d.pop("dtype", None)
        d.pop("dtype", None)
        kwargs = dict(torch_dtype=parse_dtype(dtype, "config.json torch_dtype"))
        fields = {f.name for f in dataclasses.fields(target)} - {"torch_dtype", "defaulted"}
        unknown = []
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in _CONSTRAINED:
                if value not in _CONSTRAINED[key]:
                    allowed = " or ".join(repr(v) for v in _CONSTRAINED[key])
                    raise ValueError(f"config.json: {key}={value!r} is not supported (only {allowed})")
            elif key not in _HARMLESS:
                unknown.append(key)
        if unknown:
            msg = (f"config.json: unknown fields {sorted(unknown)} for model_type {model_type!r}; "
                   "they may change the model in ways grit_models does not implement")
            if strict:
                raise ValueError(msg + " (pass strict=False to ignore them)")
            warnings.warn(msg, stacklevel=2)
        kwargs["defaulted"] = frozenset(fields - set(kwargs))
        return target(**kwargs)

    @classmethod
    def from_pretrained(cls, path, *, strict: bool = True) -> "MistralConfig":
        """Config from ``path/config.json`` (or a path to the json file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"model_name_or_path: no config.json at {file} (a local checkpoint folder "
                                    "is expected; grit_models does not download from a hub)")
        try:
            d = json.loads(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e}); expected a JSON config") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, strict=strict)


@dataclasses.dataclass
class MixtralConfig(MistralConfig):
    """Mixtral: Mistral with a sparse mixture of SwiGLU experts in place of the MLP."""

    sliding_window: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001

    model_type = "mixtral"

    @property
    def is_moe(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.num_local_experts) or self.num_local_experts < 1:
            raise ValueError(f"num_local_experts: expected a positive integer, got {self.num_local_experts!r}")
        if not _is_int(self.num_experts_per_tok) or not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok: expected 1..num_local_experts ({self.num_local_experts}), "
                             f"got {self.num_experts_per_tok!r}")
