"""Model configurations read from a Hugging Face ``config.json``: Mistral, Mixtral, Llama, Qwen2.

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
import math
import numbers
import warnings
from pathlib import Path

import torch

from ._json import read_json_object

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
    # RoPE scaling as {"rope_type": "linear" | "dynamic" | "llama3", ...its parameters}, from
    # rope_scaling (transformers 4) or rope_parameters (5); None = plain RoPE.
    rope_scaling: dict | None = None
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
        check_rope_scaling(self.rope_scaling, "rope_scaling")
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

    def layer_window(self, layer: int) -> tuple[int, int]:
        """The causal window of layer ``layer`` (Qwen2 windows only some layers)."""
        return self.causal_window

    # Biases: Llama's attention_bias puts one on q, k, v and o; Qwen2 has q, k, v biases.
    @property
    def qkv_bias(self) -> bool:
        return False

    @property
    def o_bias(self) -> bool:
        return False

    @property
    def mlp_has_bias(self) -> bool:
        return False

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
        target = {"mistral": MistralConfig, "mixtral": MixtralConfig, "llama": LlamaConfig,
                  "qwen2": Qwen2Config}.get(model_type)
        if target is None:
            raise ValueError(f"config.json: model_type {model_type!r} is not supported; "
                             "expected 'mistral', 'mixtral', 'llama' or 'qwen2'")
        if cls is not MistralConfig and target is not cls:
            raise ValueError(f"config.json: model_type {model_type!r} does not match {cls.__name__}")
        d = dict(d)
        # transformers 5 nests rope settings in rope_parameters; 4.x wrote rope_theta and
        # rope_scaling. Both become rope_theta + a rope_scaling dict (None for default RoPE).
        rope = d.pop("rope_parameters", None)
        scaling = d.pop("rope_scaling", None)
        for name, value in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"config.json {name}: expected an object or null, got {value!r}")
        scaling, rope = dict(scaling or {}), dict(rope or {})
        if "type" in scaling:  # transformers 4's older spelling of rope_type
            legacy = scaling.pop("type")
            scaling.setdefault("rope_type", legacy)
        merged = {**scaling, **rope}
        # A plain "default" (what transformers 5 writes when nothing is scaled) does not
        # override a scaling given the older way.
        kinds = [k for k in (rope.get("rope_type"), scaling.get("rope_type")) if k not in (None, "default")]
        merged["rope_type"] = kinds[0] if kinds else "default"
        if "rope_theta" in merged:
            d.setdefault("rope_theta", merged.pop("rope_theta"))
        field = "rope_parameters" if rope.get("rope_type", "default") != "default" or not scaling else "rope_scaling"
        d["rope_scaling"] = check_rope_scaling(merged, field)
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
        d = read_json_object(file, expected="a JSON object (the model's config)")
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


# rope_type -> its required parameters (all numbers); transformers' names.
_ROPE_TYPES = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Parameters transformers writes that do not change these rope types' arithmetic here.
_ROPE_OPTIONAL = {"original_max_position_embeddings", "partial_rotary_factor"}


def check_rope_scaling(value, field: str) -> dict | None:
    """A normalised RoPE-scaling dict, or None for default RoPE; anything we do not compute
    exactly as transformers does is an error naming the field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected an object or null, got {value!r}")
    value = dict(value)
    rope_type = value.get("rope_type", "default")
    if value.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{field}.partial_rotary_factor: only 1.0 is supported, got {value['partial_rotary_factor']!r}")
    if rope_type == "default":
        extra = set(value) - {"rope_type"} - _ROPE_OPTIONAL
        if extra:
            raise ValueError(f"{field}: default RoPE takes no parameters, got {sorted(extra)}")
        return None
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"{field}.rope_type: {rope_type!r} is not supported (default, "
                         f"{', '.join(sorted(_ROPE_TYPES))})")
    need = _ROPE_TYPES[rope_type]
    for key in need:
        v = value.get(key)
        if key == "original_max_position_embeddings" and rope_type != "llama3":
            continue
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"{field}.{key}: expected a positive number for rope_type {rope_type!r}, got {v!r}")
    extra = set(value) - {"rope_type"} - set(need) - _ROPE_OPTIONAL
    if extra:
        raise ValueError(f"{field}: unsupported fields {sorted(extra)} for rope_type {rope_type!r}")
    if rope_type == "llama3" and not value["high_freq_factor"] > value["low_freq_factor"]:
        raise ValueError(f"{field}.high_freq_factor: must exceed low_freq_factor, got {value['high_freq_factor']} "
                         f"<= {value['low_freq_factor']}")
    return value


@dataclasses.dataclass
class LlamaConfig(MistralConfig):
    """Llama 2/3 (and 3.x): Mistral's layer with transformers' Llama defaults, optional q/k/v/o
    and MLP biases, RoPE scaling (llama3, linear, dynamic), no sliding window."""

    intermediate_size: int = 11008
    num_key_value_heads: int | None = None  # default: num_attention_heads (MHA)
    max_position_embeddings: int = 2048
    sliding_window: None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    model_type = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__()

    def validate(self) -> None:
        if self.sliding_window is not None:
            raise ValueError(f"sliding_window: Llama has none, got {self.sliding_window!r}")
        super().validate()
        for name in ("attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_has_bias(self) -> bool:
        return self.mlp_bias


_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass
class Qwen2Config(MistralConfig):
    """Qwen2: biases on q, k and v (none on o), transformers' Qwen2 defaults, and a sliding
    window on the layers ``layer_types`` marks (by default, with ``use_sliding_window``, the
    layers from ``max_window_layers`` on)."""

    vocab_size: int = 151936
    intermediate_size: int = 22016
    num_key_value_heads: int = 32
    max_position_embeddings: int = 32768
    sliding_window: int | None = 4096
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: list | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    model_type = "qwen2"

    def __post_init__(self):
        if not isinstance(self.use_sliding_window, bool):
            raise ValueError(f"use_sliding_window: expected true or false, got {self.use_sliding_window!r}")
        if not _is_int(self.max_window_layers) or self.max_window_layers < 0:
            raise ValueError(f"max_window_layers: expected a non-negative integer, got {self.max_window_layers!r}")
        if not self.use_sliding_window:  # transformers: no window at all then
            self.sliding_window = None
        super().__post_init__()
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(n)]
        if (not isinstance(self.layer_types, list) or len(self.layer_types) != n
                or any(t not in _LAYER_TYPES for t in self.layer_types)):
            raise ValueError(f"layer_types: expected {n} entries (num_hidden_layers) from {_LAYER_TYPES}, "
                             f"got {self.layer_types!r}")

    def layer_window(self, layer: int) -> tuple[int, int]:
        if self.layer_types[layer] == "sliding_attention" and self.sliding_window is not None:
            return (self.sliding_window - 1, 0)
        return (-1, -1)

    @property
    def causal_window(self) -> tuple[int, int]:
        """Only per layer for Qwen2: see ``layer_window``."""
        raise AttributeError("Qwen2Config: the window is per layer, use layer_window(i)")

    @property
    def qkv_bias(self) -> bool:
        return True
