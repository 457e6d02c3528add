"""The one table between Hugging Face checkpoint names and ours (gpt-fast's ``weight_map``):
it drives both loading (``checkpoint.load_checkpoint``) and saving (``training.export``).

Our parameters fuse what HF stores apart, to save GEMM launches: ``attn.wqkv`` = [q; k; v]
weight rows, ``mlp.w13`` = [gate; up], Mixtral's experts stacked (E, ...). Each ``Entry``
says how our tensors and HF's correspond:

    ours (one), hf (several), dim 0   ours = cat(hf, dim=0), split back by ``sizes``
    ours (one), hf (E experts), stack ours = stack(hf)
    ours (several), hf (one), dim 1   hf = cat(ours, dim=1) (transformers 5's fused experts)
    ours (one), hf (one)              the same tensor

HF names are given without the ``model.`` prefix (``lm_head.weight`` has none in HF either;
embedding-only checkpoints have none at all): ``hf_name`` adds it back.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    how: str = "same"                 # "same" | "cat" | "stack"
    dim: int = 0                      # the dim of "cat"
    sizes: tuple[int, ...] = ()       # sizes along dim (ours = one cat of several HF tensors)

    def to_ours(self, hf_tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """HF tensors (in ``self.hf`` order) -> ours (in ``self.ours`` order)."""
        if self.how == "stack":
            return [torch.stack(hf_tensors)]
        if len(self.ours) > 1:  # one HF tensor holds several of ours side by side
            return [t.contiguous() for t in hf_tensors[0].chunk(len(self.ours), dim=self.dim)]
        if len(self.hf) > 1:
            return [torch.cat(hf_tensors, dim=self.dim)]
        return hf_tensors

    def to_hf(self, ours: list[torch.Tensor]) -> list[torch.Tensor]:
        """Ours (in ``self.ours`` order) -> HF tensors (in ``self.hf`` order), contiguous."""
        if self.how == "stack":
            return [t.contiguous() for t in ours[0].unbind(0)]
        if len(self.ours) > 1:
            return [torch.cat(ours, dim=self.dim).contiguous()]
        if len(self.hf) > 1:
            return [t.contiguous() for t in ours[0].split(list(self.sizes), dim=self.dim)]
        return [ours[0].contiguous()]


def entries(cfg, *, fused_experts: bool = False, with_lm_head: bool = True) -> list[Entry]:
    """Every tensor of a checkpoint of ``cfg``. ``fused_experts``: Mixtral in transformers 5's
    layout (``mlp.experts.gate_up_proj``) instead of the hub's per-expert tensors."""
    Dh, Hq, Hkv, Fh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    out = [Entry(("embed",), ("embed_tokens.weight",)), Entry(("norm.weight",), ("norm.weight",))]
    if with_lm_head and not cfg.tie_word_embeddings:
        out.append(Entry(("lm_head",), ("lm_head.weight",)))
    qkv = (Hq * Dh, Hkv * Dh, Hkv * Dh)
    for i in range(cfg.num_hidden_layers):
        o, p = f"layers.{i}.", f"layers.{i}."
        out += [
            Entry((o + "attn_norm.weight",), (p + "input_layernorm.weight",)),
            Entry((o + "mlp_norm.weight",), (p + "post_attention_layernorm.weight",)),
            Entry((o + "attn.wqkv",), tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), "cat", 0, qkv),
            Entry((o + "attn.wo",), (p + "self_attn.o_proj.weight",)),
        ]
        if cfg.qkv_bias:
            out.append(Entry((o + "attn.bqkv",), tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"), "cat", 0, qkv))
        if cfg.o_bias:
            out.append(Entry((o + "attn.bo",), (p + "self_attn.o_proj.bias",)))
        if not cfg.is_moe:
            out += [Entry((o + "mlp.w13",), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "cat", 0, (Fh, Fh)),
                    Entry((o + "mlp.w2",), (p + "mlp.down_proj.weight",))]
            if cfg.mlp_has_bias:
                out += [Entry((o + "mlp.b13",), (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"), "cat", 0, (Fh, Fh)),
                        Entry((o + "mlp.b2",), (p + "mlp.down_proj.bias",))]
        elif fused_experts:
            out += [Entry((o + "mlp.gate",), (p + "mlp.gate.weight",)),
                    Entry((o + "mlp.w1", o + "mlp.w3"), (p + "mlp.experts.gate_up_proj",), "cat", 1),
                    Entry((o + "mlp.w2",), (p + "mlp.experts.down_proj",))]
        else:
            q = p + "block_sparse_moe."
            out.append(Entry((o + "mlp.gate",), (q + "gate.weight",)))
            for w in ("w1", "w2", "w3"):
                experts = tuple(f"{q}experts.{e}.{w}.weight" for e in range(cfg.num_local_experts))
                out.append(Entry((o + f"mlp.{w}",), experts, "stack"))
    return out


def hf_name(name: str) -> str:
    """The full HF name of a table name (``model.`` prefix but for the output head)."""
    return name if name == "lm_head.weight" else "model." + name


def expected_shapes(cfg, param_shapes: dict, **kwargs) -> dict:
    """HF tensor name (without ``model.``) -> shape, from our parameters' shapes
    (``param_shapes``: our name -> shape) through the table."""
    out = {}
    for e in entries(cfg, **kwargs):
        ours = [torch.empty(param_shapes[n], device="meta") for n in e.ours]
        for name, t in zip(e.hf, e.to_hf(ours)):
            out[name] = tuple(t.shape)
    return out
