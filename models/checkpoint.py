"""Load Hugging Face safetensors checkpoints (single file or sharded) into ``Transformer``
(Mistral, Mixtral, Llama, Qwen2).

The model is built on the meta device and its parameters are assigned from the tensors read
through ``safetensors.safe_open`` (memory-mapped) on the target device, cast to the target
dtype: no full-size random init, no fp32 copy of a bf16 checkpoint.

Tensor names accepted (``model.`` prefix optional: embedding-only checkpoints lack it), as
models/weight_map.py maps them to ours:
    embed_tokens.weight, norm.weight, lm_head.weight (absent when tied)
    layers.N.{input_layernorm,post_attention_layernorm}.weight
    layers.N.self_attn.{q,k,v,o}_proj.weight
    Llama (attention_bias) / Qwen2: layers.N.self_attn.{q,k,v}_proj.bias (+ o_proj.bias for Llama)
    Mistral, Llama, Qwen2: layers.N.mlp.{gate,up,down}_proj.weight (+ .bias with Llama's mlp_bias)
    Mixtral: layers.N.block_sparse_moe.gate.weight, layers.N.block_sparse_moe.experts.E.w{1,2,3}.weight
             (hub layout) or layers.N.mlp.gate.weight, layers.N.mlp.experts.{gate_up_proj,down_proj}
             (transformers 5's fused layout)
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import weight_map
from ._json import read_json_object
from .config import MistralConfig, parse_dtype
from .mistral import Transformer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Saved by old transformers versions; recomputed here, never needed.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config."""


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of the checkpoint folder ``path`` (index json first, then a single file)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model_name_or_path: {path} is not a folder (expected a local checkpoint folder)")
    index = path / INDEX_FILE
    if index.is_file():
        content = read_json_object(index, error=CheckpointError, expected="a JSON object with a 'weight_map'")
        weight_map = content.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object (tensor name -> shard file)")
        bad = {k: v for k, v in weight_map.items() if not isinstance(v, str) or not v or "/" in v or "\\" in v}
        if bad:
            name, value = next(iter(bad.items()))
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {value!r}; expected the file name of a shard "
                                  f"in {path}")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {other}: only safetensors are supported)" if other else ""
    raise FileNotFoundError(f"model_name_or_path: no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def param_shapes(cfg: MistralConfig, with_lm_head: bool = True) -> dict:
    """Our parameter name -> shape for ``cfg`` (a model built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg, with_lm_head=with_lm_head)
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def expected_shapes(cfg: MistralConfig, *, fused_experts: bool = False, with_lm_head: bool = True) -> dict:
    """HF tensor name (without ``model.``) -> shape, for a checkpoint of this config."""
    return weight_map.expected_shapes(cfg, param_shapes(cfg, with_lm_head), fused_experts=fused_experts,
                                      with_lm_head=with_lm_head)


# safetensors' dtype names of the weights we accept (cast to the target dtype on load).
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _open(file: Path, device: str):
    """``safe_open`` whose failures (truncated, empty or non-safetensors files) name the file."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _shape_fields(name: str, cfg: MistralConfig) -> str:
    """Which config.json fields give the expected shape of tensor ``name``, with their values,
    and which of them config.json left out (so transformers' default was used)."""
    dims = {
        "embed_tokens.weight": ("vocab_size", "hidden_size"), "lm_head.weight": ("vocab_size", "hidden_size"),
        "q_proj.weight": ("num_attention_heads * head_dim", "hidden_size"),
        "k_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
        "v_proj.weight": ("num_key_value_heads * head_dim", "hidden_size"),
        "o_proj.weight": ("hidden_size", "num_attention_heads * head_dim"),
        "gate_proj.weight": ("intermediate_size", "hidden_size"), "up_proj.weight": ("intermediate_size", "hidden_size"),
        "down_proj.weight": ("hidden_size", "intermediate_size"),
        "w1.weight": ("intermediate_size", "hidden_size"), "w3.weight": ("intermediate_size", "hidden_size"),
        "w2.weight": ("hidden_size", "intermediate_size"),
        "gate.weight": ("num_local_experts", "hidden_size"),
        "gate_up_proj": ("num_local_experts", "2 * intermediate_size", "hidden_size"),
        "experts.down_proj": ("num_local_experts", "hidden_size", "intermediate_size"),
        "norm.weight": ("hidden_size",), "layernorm.weight": ("hidden_size",),
        "q_proj.bias": ("num_attention_heads * head_dim",), "k_proj.bias": ("num_key_value_heads * head_dim",),
        "v_proj.bias": ("num_key_value_heads * head_dim",), "o_proj.bias": ("hidden_size",),
        "gate_proj.bias": ("intermediate_size",), "up_proj.bias": ("intermediate_size",),
        "down_proj.bias": ("hidden_size",),
    }
    spec = next((v for k, v in dims.items() if name.endswith(k)), None)
    if spec is None:
        return "see config.json"
    fields = sorted({w for d in spec for w in d.split() if w.isidentifier()})
    values = ", ".join(f"{f}={getattr(cfg, f)}" for f in fields)
    text = f"({', '.join(spec)}) with {values}"
    missing = [f for f in fields if f in cfg.defaulted]
    if missing:
        text += f"; not in config.json, so transformers' default was used: {', '.join(missing)}"
    return text


def _strip(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def module_of(name: str) -> str:
    """The placed module (models/placement.py) a parameter of ours belongs to."""
    if name in ("embed", "lm_head"):
        return name
    if name.startswith("norm"):
        return "norm"
    return ".".join(name.split(".")[:2])  # layers.i


def load_checkpoint(path, *, device="cpu", torch_dtype="auto", config: MistralConfig | None = None,
                    with_lm_head: bool = True, strict_config: bool = True, device_map: dict | None = None) -> Transformer:
    """Read the HF checkpoint folder ``path`` into a ``Transformer`` on ``device``.

    torch_dtype: "auto" (the config's ``torch_dtype``, float32 if it names none), a torch
    dtype or its name. ``with_lm_head=False`` skips the output head (embedding-only use).
    ``device_map``: {"embed" | "layers.i" | "norm" | "lm_head": device} (``placement.plan``)
    puts each module's tensors on its own device instead.
    Raises CheckpointError listing missing, unexpected and mis-shaped tensors.
    """
    cfg = config if config is not None else MistralConfig.from_pretrained(path, strict=strict_config)
    if torch_dtype == "auto" or torch_dtype is None:
        dtype = cfg.torch_dtype or torch.float32
    else:
        dtype = parse_dtype(torch_dtype, "torch_dtype")
    device = torch.device(device)
    files = checkpoint_files(path)

    # 1. Names, shapes and dtypes from the headers only (nothing read yet).
    where, shapes = {}, {}
    for f in files:
        with _open(f, "cpu") as sf:
            for name in sf.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if _strip(name) in shapes:
                    other = where.get(name) or where.get("model." + _strip(name)) or where.get(_strip(name))
                    raise CheckpointError(f"{f}: tensor {name!r} is also in {other}; each tensor must be stored once")
                dtype_name = sf.get_slice(name).get_dtype()
                if dtype_name not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{f}: tensor {name!r} is stored as {dtype_name}; expected floating-point "
                                          f"weights ({', '.join(sorted(_FLOAT_DTYPES))})")
                where[name] = f
                shapes[_strip(name)] = tuple(sf.get_slice(name).get_shape())
    fused = any(".mlp.experts." in n for n in shapes)
    expected = expected_shapes(cfg, fused_experts=fused, with_lm_head=with_lm_head)
    optional = {"lm_head.weight"}  # present in tied or embedding-only use: read nothing
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - optional)
    misshaped = sorted(f"{n}: {shapes[n]} in the checkpoint, {expected[n]} expected from config.json "
                       f"({_shape_fields(n, cfg)})"
                       for n in set(expected) & set(shapes) if shapes[n] != expected[n])
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {path} does not match its config ({type(cfg).__name__}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))

    # 2. Read tensors straight onto the device, cast, and fuse into our layout.
    full_name = {_strip(n): n for n in where}
    read_on = "cpu" if device.type == "cpu" or device_map is not None else str(device)
    handles = {f: _open(f, read_on) for f in files}

    def get(name: str) -> torch.Tensor:
        n = full_name[name]
        try:
            return handles[where[n]].get_tensor(n).to(dtype)
        except Exception as e:  # a header that promises more bytes than the file holds
            raise CheckpointError(f"{where[n]}: cannot read tensor {n!r}: {e}") from None

    sd = {}
    for entry in weight_map.entries(cfg, fused_experts=fused, with_lm_head=with_lm_head):
        tensors = entry.to_ours([get(n) for n in entry.hf])
        if device_map is not None:
            tensors = [t.to(device_map[module_of(n)]) for n, t in zip(entry.ours, tensors)]
        sd.update(zip(entry.ours, tensors))
    handles.clear()

    with torch.device("meta"):
        model = Transformer(cfg, with_lm_head=with_lm_head)
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval().requires_grad_(False)
