"""Mistral, Mixtral, Llama and Qwen2 on packed token batches, attention mode chosen per call.

The four share one decoder layer; what differs comes from the config: MoE (Mixtral), q/k/v(/o)
and MLP biases (Llama's attention_bias/mlp_bias, Qwen2's q/k/v biases), RoPE scaling (Llama 3's
llama3, linear, dynamic), tied embeddings, and the causal window per layer (Mistral: every
layer; Qwen2: the layers its layer_types mark; Llama: none).

Shape legend (suffixes on tensor names, as in torchtitan):
    T  packed tokens of all sequences, back to back     B  sequences (batch rows)
    S  tokens per row (cache path)                      D  hidden size (model dim)
    Hq query heads, Hk key/value heads, K head dim      F  MLP / expert hidden size
    E  experts                                          V  vocabulary

Two ways through the model:

* ``forward(tokens_T, positions_T, cu_seqlens, causal=...)``: packed sequences, no padding, each
  attends only within itself (``grit_kernels.attention`` with ``cu_seqlens``). Used for
  embedding (bidirectional, no sliding window, as GritLM was trained with sdpa), for a
  generation prefill (causal with the config's sliding window) and for building KV caches.
* ``forward_cached(tokens_BS, positions_BS, cache)``: rows of S new tokens appended to a
  ``KVCache`` whose rows hold different lengths (``grit_kernels.attention_with_kvcache``).

Weights are held fused where that saves GEMM launches: ``wqkv`` = [q; k; v] rows and
``w13`` = [gate; up] rows (HF's separate tensors are concatenated at load time).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import grit_kernels

from .config import MistralConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF does: in bf16 the
        # order of the rounding steps is visible in the logits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, seq_len: int | None = None,
                  max_positions: int | None = None) -> torch.Tensor:
    """(head_dim / 2,) fp32 RoPE frequencies, computed with the same fp32 operations as
    transformers' ROPE_INIT_FUNCTIONS (so the tables are bit-identical).

    ``scaling``: None, or {"rope_type": "linear" | "llama3" | "dynamic", ...}. ``dynamic``
    depends on the sequence length ``seq_len`` (NTK scaling past ``max_positions``)."""
    # On the CPU explicitly: the model is built under torch.device("meta") by the loader.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "dynamic":
        factor = scaling["factor"]
        seq = torch.maximum(torch.tensor(seq_len if seq_len is not None else max_positions, device="cpu"),
                            torch.tensor(max_positions, device="cpu"))
        base = theta * ((factor * seq / max_positions) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """RoPE tables (fp32), grown on demand and kept per device. Positions index the table, so
    a cache computed at positions 0..L-1 keeps them when it is later reused (gritlm's rule).

    Dynamic NTK scaling follows transformers' state machine: a call whose positions reach
    past the longest length seen so far recomputes the frequencies for that length, and one
    back within the original length restores them (keys already cached keep the rotation
    they were computed with, as in transformers)."""

    def __init__(self, cfg):
        self.head_dim, self.theta, self.max_positions = cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings
        self.scaling = cfg.rope_scaling
        self.dynamic = (self.scaling or {}).get("rope_type") == "dynamic"
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, max_positions=self.max_positions)
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = self.max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _update_dynamic(self, seq_len: int) -> None:
        if seq_len > self.max_seq_len_cached:  # growth
            self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, seq_len, self.max_positions)
            self.max_seq_len_cached = seq_len
            self._tables.clear()
        if seq_len < self.max_positions and self.max_seq_len_cached > self.max_positions:  # reset
            self.inv_freq = self.original_inv_freq
            self.max_seq_len_cached = self.max_positions
            self._tables.clear()

    def _table(self, n: int, device: torch.device):
        cos, sin = self._tables.get(device, (None, None))
        if cos is None or cos.shape[0] < n:
            # Grow geometrically; start at up to 4096 positions (a table of all 131072 positions
            # of Mixtral's config would be 64 MB at head_dim 128).
            n = max(n, min(self.max_positions, 4096), 2 * cos.shape[0] if cos is not None else 0)
            # Same fp32 arithmetic as HF's rotary embedding, so the tables are bit-identical.
            # Only the first half is kept: HF's cos/sin repeat it for the second half.
            freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq.to(device)[None, :]
            cos, sin = freqs.cos(), freqs.sin()
            self._tables[device] = (cos, sin)
        return cos, sin

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype, bound: int | None = None):
        """cos, sin of shape positions.shape + (1, K/2) in ``dtype`` (broadcast over heads).

        ``bound`` > every position spares reading ``positions.max()`` (a host sync on GPU);
        dynamic scaling reads the exact maximum, since its frequencies depend on it."""
        if bound is None or self.dynamic:
            bound = int(positions.max()) + 1 if positions.numel() else 1
        if self.dynamic:
            self._update_dynamic(bound)
        cos, sin = self._table(bound, positions.device)
        return cos[positions].to(dtype).unsqueeze(-2), sin[positions].to(dtype).unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, K) rotated by cos/sin (..., 1, K/2), HF Mistral's half-split convention:
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (what x*cos + rotate_half(x)*sin computes)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Per-layer key/value buffers for generation, with a length per row.

    k[l], v[l]: (B, S_max, Hk, K). ``seqlens`` (B,) int32: tokens held by each row; row b's
    next token is written at ``seqlens[b]``. Positions past ``seqlens[b]`` hold garbage that
    is never read (attention_with_kvcache reads at most ``seqlens[b] + S_new`` keys).
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, device, dtype):
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


class Attention(nn.Module):
    def __init__(self, cfg: MistralConfig, layer: int = 0):
        super().__init__()
        self.n_q, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        n_qkv = (self.n_q + 2 * self.n_kv) * self.head_dim
        self.wqkv = nn.Parameter(torch.empty(n_qkv, cfg.hidden_size))
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, self.n_q * self.head_dim))
        # Llama (attention_bias) and Qwen2 add biases; None when the config has none.
        self.bqkv = nn.Parameter(torch.empty(n_qkv)) if cfg.qkv_bias else None
        self.bo = nn.Parameter(torch.empty(cfg.hidden_size)) if cfg.o_bias else None
        self.causal_window = cfg.layer_window(layer)

    def _qkv(self, x: torch.Tensor, cos, sin):
        """x (..., D) -> q (..., Hq, K), k and v (..., Hk, K), RoPE applied to q and k."""
        qkv = F.linear(x, self.wqkv, self.bqkv).unflatten(-1, (self.n_q + 2 * self.n_kv, self.head_dim))
        # One rotary pass over the q and k heads together (half the elementwise launches).
        qk = apply_rotary(qkv[..., :self.n_q + self.n_kv, :], cos, sin)
        return qk[..., :self.n_q, :], qk[..., self.n_q:, :], qkv[..., self.n_q + self.n_kv:, :]

    def forward(self, x_TD, cos, sin, cu_seqlens, max_seqlen: int, causal: bool, kv_out: list | None):
        q, k, v = self._qkv(x_TD, cos, sin)
        if kv_out is not None:
            kv_out.append((k, v))
        # Bidirectional passes ignore the sliding window (GritLM embeds with sdpa, which never
        # saw Mistral's window); causal passes use the config's window.
        window = self.causal_window if causal else (-1, -1)
        o = grit_kernels.attention(
            q, k, v, causal=causal, window=window, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        )
        return F.linear(o.flatten(-2), self.wo, self.bo)

    def forward_cached(self, x_BSD, cos, sin, k_cache, v_cache, seqlens):
        q, k, v = self._qkv(x_BSD, cos, sin)
        o = grit_kernels.attention_with_kvcache(
            q, k_cache, v_cache, seqlens, k=k.contiguous(), v=v.contiguous(), causal=True, window=self.causal_window,
        )
        return F.linear(o.flatten(-2), self.wo, self.bo)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 (gate) and w3 (up) fused into one GEMM."""

    def __init__(self, cfg: MistralConfig):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * cfg.intermediate_size, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size))
        # Llama's mlp_bias; None otherwise.
        self.b13 = nn.Parameter(torch.empty(2 * cfg.intermediate_size)) if cfg.mlp_has_bias else None
        self.b2 = nn.Parameter(torch.empty(cfg.hidden_size)) if cfg.mlp_has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.w13, self.b13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2, self.b2)


class MoE(nn.Module):
    """Mixtral's sparse MoE: router -> top-k (renormalised) -> SwiGLU experts, via grit_kernels."""

    def __init__(self, cfg):
        super().__init__()
        E, Fh, D = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Parameter(torch.empty(E, D))
        self.w1 = nn.Parameter(torch.empty(E, Fh, D))
        self.w2 = nn.Parameter(torch.empty(E, D, Fh))
        self.w3 = nn.Parameter(torch.empty(E, Fh, D))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., D) -> (out (..., D), router logits (N, E)), N = x.numel() / D tokens.

        The logits are returned so that Mixtral's load-balancing loss (``moe_aux_loss``) can
        be computed from this pass instead of re-running the router."""
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        logits_NE = F.linear(x_ND, self.gate)
        weights_Nk, experts_Nk = grit_kernels.moe_route(logits_NE, top_k=self.top_k)
        w1, w2, w3 = self.w1, self.w2, self.w3
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # The grit_kernels ops are not autocast ops: cast their inputs as autocast would a
            # matmul (training keeps fp32 master weights and an fp32 residual stream).
            dt = torch.get_autocast_dtype(dev)
            x_ND, w1, w2, w3, weights_Nk = (t.to(dt) for t in (x_ND, w1, w2, w3, weights_Nk))
        out = grit_kernels.moe_experts(x_ND, w1, w2, w3, weights_Nk, experts_Nk)
        return out.reshape(shape), logits_NE


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)). The only place the
    residual wiring is written: the model's passes and training's per-layer calls (FSDP2
    shards, checkpointing) all go through ``forward``."""

    def __init__(self, cfg: MistralConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int = 0, causal: bool = True, kv_out: list | None = None, *,
                kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """Returns (x, router logits (N, E) for Mixtral, else None), x of the input's shape.

        Packed (``kv_cache`` None): x (T, D), cos/sin (T, 1, K/2), ``cu_seqlens`` (B + 1,)
        int32, ``max_seqlen``, ``causal`` and ``kv_out`` as in ``Transformer.forward``.
        Cached: x (B, S, D), cos/sin (B, S, 1, K/2), ``kv_cache`` = (k, v, seqlens) with k, v
        (B, S_max, Hk, K) this layer's cache buffers and seqlens (B,) int32 the tokens each row
        holds (causal, config window; cu_seqlens, max_seqlen, causal and kv_out are unused).
        """
        h = self.attn_norm(x)
        if kv_cache is None:
            h = self.attn(h, cos, sin, cu_seqlens, max_seqlen, causal, kv_out)
        else:
            h = self.attn.forward_cached(h, cos, sin, *kv_cache)
        x = x + h
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            h, router_logits_NE = self.mlp(h)
        else:
            h, router_logits_NE = self.mlp(h), None
        return x + h, router_logits_NE


class Transformer(nn.Module):
    """Mistral / Mixtral decoder. ``lm_head`` is None for embedding-only use."""

    def __init__(self, cfg: MistralConfig, *, with_lm_head: bool = True):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A tied head shares the embedding tensor (set by the loader), so it is no parameter here.
        self.lm_head = (nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
                        if with_lm_head and not cfg.tie_word_embeddings else None)
        self.has_lm_head = with_lm_head
        self.rotary = Rotary(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(self, tokens_T: torch.Tensor, positions_T: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, *, causal: bool, kv_out: list | None = None,
                position_bound: int | None = None) -> torch.Tensor:
        """Packed forward.

        tokens_T, positions_T: (T,) int64; cu_seqlens: (B + 1,) int32 offsets of the sequences;
        max_seqlen: the longest one. ``kv_out``: when a list, each layer's RoPE'd (k, v) (T, Hk, K)
        are appended to it (to build KV caches). ``position_bound``: an int > every position
        (spares a host sync to find it).
        Returns the final-normed hidden states (T, D).
        """
        x = F.embedding(tokens_T, self.embed)
        cos, sin = self.rotary(positions_T, x.dtype, position_bound)
        for layer in self.layers:
            x, _ = layer(x, cos, sin, cu_seqlens, max_seqlen, causal, kv_out)
        return self.norm(x)

    def forward_cached(self, tokens_BS: torch.Tensor, positions_BS: torch.Tensor, cache: KVCache,
                       position_bound: int | None = None) -> torch.Tensor:
        """Appends S new tokens per row to ``cache`` (causal, config window) and advances
        ``cache.seqlens`` by S. tokens_BS, positions_BS (B, S) int64. Returns hidden (B, S, D)."""
        x = F.embedding(tokens_BS, self.embed)
        cos, sin = self.rotary(positions_BS, x.dtype, position_bound)
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x, _ = layer(x, cos, sin, kv_cache=(k_cache, v_cache, cache.seqlens))
        cache.seqlens += tokens_BS.shape[1]
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) in the model dtype."""
        if not self.has_lm_head:
            raise RuntimeError("this model was loaded without its lm_head (mode='embedding'); "
                               "load it with mode='unified' or 'generative' to generate")
        return F.linear(hidden, self.embed if self.lm_head is None else self.lm_head)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim,
                       device=self.device, dtype=self.dtype)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 position of each packed token within its own sequence (0, 1, ..., L-1)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts
