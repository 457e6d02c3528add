"""Mistral, Mixtral, Llama and Qwen2 on packed token batches, attention mode chosen per call.

The four share one decoder layer; what differs comes from the config: MoE (Mixtral), q/k/v(/o)
and MLP biases (Llama's attention_bias/mlp_bias, Qwen2's q/k/v biases), RoPE scaling (Llama 3's
llama3, linear, dynamic), tied embeddings, and the causal window per layer (Mistral: every
layer; Qwen2: the layers its layer_types mark; Llama: none).

Shapes (the package's one legend, grit_kernels/__init__.py; suffixes on tensor names as in
torchtitan): T packed tokens of all sequences, B sequences (rows), S tokens per row (cache
path), L_max cache capacity, D hidden size, Hq query heads, Hkv key/value heads, Dh head
dim, F MLP / expert hidden size, E experts, K experts per token, V vocabulary.

One pass through the model, ``Transformer.forward`` (gpt-fast's shape):

* packed (``cu_seqlens``): sequences back to back, no padding, each attending only within
  itself (``grit_kernels.attention``). Used for embedding (bidirectional, no sliding window,
  as GritLM was trained with sdpa), for a generation prefill (causal with the config's
  sliding window, optionally writing a ``KVCache``) and for building reusable prefixes.
* cached (``cache``): rows of S new tokens appended to a ``KVCache`` whose rows hold
  different lengths (``grit_kernels.attention_with_kvcache``). The cache is the only writer
  of its buffers.

Weights are held fused where that saves GEMM launches: ``wqkv`` = [q; k; v] rows and
``w13`` = [gate; up] rows (HF's separate tensors are concatenated at load time).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import grit_kernels
from grit_kernels.ops.attention_kvcache import lengths_fit

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


class Rotary(nn.Module):
    """RoPE tables as non-persistent fp32 buffers (``inv_freq`` (Dh/2,), ``cos``/``sin``
    (P, Dh/2)), grown on demand. Positions index the table, so a cache computed at positions
    0..L-1 keeps them when it is later reused (gritlm's rule).

    The buffers follow the module across ``.to(device)`` / ``to_empty`` but stay fp32 and
    are recomputed from the config, never cast or left uninitialised (``_apply``): a bf16
    ``model.to(dtype)`` must not round the frequencies, and HF keeps them in fp32 too.

    Dynamic NTK scaling follows transformers' state machine: a call whose positions reach
    past the longest length seen so far recomputes the frequencies for that length, and one
    back within the original length restores them (keys already cached keep the rotation
    they were computed with, as in transformers)."""

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.theta, self.max_positions = cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings
        self.scaling = cfg.rope_scaling
        self.dynamic = (self.scaling or {}).get("rope_type") == "dynamic"
        self.max_seq_len_cached = self.max_positions
        self._reset(torch.device("cpu"))

    def _reset(self, device, seq_len: int | None = None) -> None:
        """Frequencies for ``seq_len`` (dynamic scaling; default the original length) on
        ``device``, and empty tables."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling, seq_len, max_positions=self.max_positions)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        empty = torch.empty(0, self.head_dim // 2, device=device)
        self.register_buffer("cos", empty, persistent=False)
        self.register_buffer("sin", empty.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._reset(self.inv_freq.device, self.max_seq_len_cached if self.dynamic else None)
        return self

    def _update_dynamic(self, seq_len: int, device) -> None:
        if seq_len > self.max_seq_len_cached:  # growth
            self.max_seq_len_cached = seq_len
            self._reset(device, seq_len)
        if seq_len < self.max_positions and self.max_seq_len_cached > self.max_positions:  # reset
            self.max_seq_len_cached = self.max_positions
            self._reset(device)

    def _table(self, n: int, device: torch.device):
        if self.inv_freq.device != device:  # built on the CPU under the loader's meta device
            self._reset(device, self.max_seq_len_cached if self.dynamic else None)
        if self.cos.shape[0] < n:
            # Grow geometrically; start at up to 4096 positions (a table of all 131072 positions
            # of Mixtral's config would be 64 MB at head_dim 128).
            n = max(n, min(self.max_positions, 4096), 2 * self.cos.shape[0])
            # Same fp32 arithmetic as HF's rotary embedding, so the tables are bit-identical.
            # Only the first half is kept: HF's cos/sin repeat it for the second half.
            freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq[None, :]
            self.cos, self.sin = freqs.cos(), freqs.sin()
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, bound: int | None = None):
        """cos, sin of shape positions.shape + (1, Dh/2) in ``dtype`` (broadcast over heads).

        ``bound`` > every position spares reading ``positions.max()`` (a host sync on GPU);
        dynamic scaling reads the exact maximum, since its frequencies depend on it."""
        if bound is None or self.dynamic:
            bound = int(positions.max()) + 1 if positions.numel() else 1
        if self.dynamic:
            self._update_dynamic(bound, positions.device)
        cos, sin = self._table(bound, positions.device)
        return cos[positions].to(dtype).unsqueeze(-2), sin[positions].to(dtype).unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, Dh) rotated by cos/sin (..., 1, Dh/2), HF Mistral's half-split convention:
    [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (what x*cos + rotate_half(x)*sin computes)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache(nn.Module):
    """Per-layer key/value buffers for generation with a length per row: the only writer of
    cache state (gpt-fast's shape). Its methods are everything that changes it.

    Buffers: ``k{i}``, ``v{i}`` (B, L_max, Hkv, Dh) for layer i, each on its layer's device
    (``devices``; a model placed over several GPUs keeps each layer's cache with it), and
    ``seqlens`` (B,) int32, the tokens held by each row: row b's next token goes to slot
    ``seqlens[b]`` (mirrored on every other device the layers use). Slots past
    ``seqlens[b]`` hold garbage that is never read (attention_with_kvcache reads at most
    ``seqlens[b] + S_new`` keys).

    It also keeps, on the host, an upper bound of ``seqlens`` whenever its writer knows one
    (every change but a length tensor from the device): ``attend`` then vouches for the
    lengths (``ops.attention_kvcache.lengths_fit``), so a decode step reads nothing back.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, device, dtype, devices=None):
        super().__init__()
        devices = list(devices) if devices is not None else [torch.device(device)] * n_layers
        self.n_layers = n_layers
        shape = (batch, max_len, n_kv_heads, head_dim)
        for i, dev in enumerate(devices):
            self.register_buffer(f"k{i}", torch.empty(shape, device=dev, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.empty(shape, device=dev, dtype=dtype), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch, dtype=torch.int32, device=devices[0]), persistent=False)
        self._mirrors = {d: torch.zeros(batch, dtype=torch.int32, device=d)
                         for d in dict.fromkeys(devices) if d != self.seqlens.device}
        self._bound: int | None = 0  # max(seqlens) <= _bound, None: not known on the host

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) buffers, (B, L_max, Hkv, Dh) each."""
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @property
    def max_len(self) -> int:
        return self.k0.shape[1]

    @property
    def batch(self) -> int:
        return self.k0.shape[0]

    def _lengths_on(self, device) -> torch.Tensor:
        return self.seqlens if device == self.seqlens.device else self._mirrors[device]

    def _sync_mirrors(self) -> None:
        for t in self._mirrors.values():
            t.copy_(self.seqlens, non_blocking=True)

    def attend(self, layer: int, q_BSHD, k_BSHD, v_BSHD, window: tuple[int, int]) -> torch.Tensor:
        """Append the rows' new k/v (B, S, Hkv, Dh) after their ``seqlens`` in this layer's
        buffers and attend causally over everything each row holds -> (B, S, Hq, Dh)."""
        kc, vc = self.layer(layer)
        lengths = self._lengths_on(kc.device)
        # Compiled code leaves the host bound alone: a guard on its value would recompile the
        # step for every token (and the op checks nothing while traced anyway).
        if not torch.compiler.is_compiling() and self._bound is not None \
                and self._bound + q_BSHD.shape[1] <= self.max_len:
            lengths_fit(lengths, self.max_len, q_BSHD.shape[1])
        return grit_kernels.attention_with_kvcache(q_BSHD, kc, vc, lengths,
                                                   k=k_BSHD.contiguous(), v=v_BSHD.contiguous(), causal=True,
                                                   window=window)

    def advance(self, n: int) -> None:
        """Every row now holds n more tokens (after a cached pass of n tokens per row)."""
        self.seqlens += n
        for t in self._mirrors.values():
            t += n
        if torch.compiler.is_compiling():
            self._bound = None  # not tracked by compiled steps (see attend): unknown from here on
        elif self._bound is not None:
            self._bound += n

    def set_lengths(self, lengths) -> None:
        """Tokens held by each row: a (B,) tensor or list of ints."""
        lengths = torch.as_tensor(lengths, dtype=torch.int32)
        self.seqlens.copy_(lengths)
        self._sync_mirrors()
        if lengths.device.type != "cpu":
            self._bound = None  # from a device: reading them would be the sync this avoids
        else:
            self._bound = int(lengths.max()) if lengths.numel() else 0

    def write_packed(self, layer: int, rows_T, positions_T, k_THD, v_THD) -> None:
        """Scatter packed tokens' k/v into this layer: token t goes to row rows_T[t], slot
        positions_T[t] (one indexed write per tensor, no host sync)."""
        kc, vc = self.layer(layer)
        rows_T, positions_T = rows_T.to(kc.device), positions_T.to(kc.device)
        kc[rows_T, positions_T] = k_THD
        vc[rows_T, positions_T] = v_THD

    def lengths_from_packed(self, rows_T, positions_T, bound: int | None = None) -> None:
        """seqlens[b] = 1 + the last slot written to row b by ``write_packed`` (on device);
        ``bound``: an int >= every new length, when the caller knows one."""
        dev = self.seqlens.device
        self.seqlens.zero_().scatter_reduce_(0, rows_T.to(dev), (positions_T.to(dev) + 1).to(torch.int32),
                                             reduce="amax")
        self._sync_mirrors()
        self._bound = bound

    def load_prefixes(self, prefixes) -> None:
        """Row b starts from ``prefixes[b]`` (a KVPrefix, or None for an empty row)."""
        lengths = []
        for b, p in enumerate(prefixes):
            n = 0 if p is None else p.length
            for layer in range(self.n_layers):
                kc, vc = self.layer(layer)
                if n:
                    kc[b, :n] = p.k[layer].to(device=kc.device, dtype=kc.dtype)
                    vc[b, :n] = p.v[layer].to(device=vc.device, dtype=vc.dtype)
            lengths.append(n)
        self.set_lengths(lengths)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b becomes what row rows[b] was (beam search keeps its surviving beams)."""
        for layer in range(self.n_layers):
            for t in self.layer(layer):
                t.copy_(t[rows.to(t.device)])
        self.seqlens.copy_(self.seqlens[rows.to(self.seqlens.device)])
        self._sync_mirrors()


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
        """x (..., D) -> q (..., Hq, Dh), k and v (..., Hkv, Dh), RoPE applied to q and k."""
        qkv = F.linear(x, self.wqkv, self.bqkv).unflatten(-1, (self.n_q + 2 * self.n_kv, self.head_dim))
        # One rotary pass over the q and k heads together (half the elementwise launches).
        qk = apply_rotary(qkv[..., :self.n_q + self.n_kv, :], cos, sin)
        return qk[..., :self.n_q, :], qk[..., self.n_q:, :], qkv[..., self.n_q + self.n_kv:, :]

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int | None, causal: bool, cache: KVCache | None,
                index: int):
        """Packed: x (T, D) -> (T, D); cached (``cache`` given, x (B, S, D)): the rows' new
        tokens appended to layer ``index`` of the cache. Also returns this pass's RoPE'd
        (k, v) (T or B, S, Hkv, Dh), from which callers build reusable prefixes."""
        q, k, v = self._qkv(x, cos, sin)
        if cache is not None and cu_seqlens is None:
            o = cache.attend(index, q, k, v, self.causal_window)
        else:
            # Bidirectional passes ignore the sliding window (GritLM embeds with sdpa, which
            # never saw Mistral's window); causal passes use the config's window.
            window = self.causal_window if causal else (-1, -1)
            o = grit_kernels.attention(
                q, k, v, causal=causal, window=window, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
            )
        return F.linear(o.flatten(-2), self.wo, self.bo), (k, v)


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
                max_seqlen: int | None = None, causal: bool = True, cache: KVCache | None = None, index: int = 0):
        """Returns (x, router logits (N, E) for Mixtral else None, this layer's (k, v)).

        Packed: x (T, D), cos/sin (T, 1, Dh/2), ``cu_seqlens`` (B + 1,) int32, ``max_seqlen``,
        ``causal``. Cached (``cache`` given, ``cu_seqlens`` None): x (B, S, D), cos/sin
        (B, S, 1, Dh/2), causal with the config's window, appended to layer ``index``.
        """
        h, kv = self.attn(self.attn_norm(x), cos, sin, cu_seqlens, max_seqlen, causal, cache, index)
        x = x + h
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            h, router_logits_NE = self.mlp(h)
        else:
            h, router_logits_NE = self.mlp(h), None
        return x + h, router_logits_NE, kv


class ModelOutput(NamedTuple):
    """``Transformer.forward``'s result. hidden: final-normed (T, D) or (B, S, D);
    router_logits: per-layer (N, E) (Mixtral; empty otherwise); kv: per-layer RoPE'd (k, v)
    when asked for (``return_kv``), else None."""

    hidden: torch.Tensor
    router_logits: list
    kv: list | None


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

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, causal: bool = True, cache: KVCache | None = None,
                cache_rows: torch.Tensor | None = None, return_kv: bool = False,
                position_bound: int | None = None, layer_call=None) -> ModelOutput:
        """The model's one pass: embed -> rotary -> layers -> norm.

        Packed (``cu_seqlens`` (B + 1,) int32 given): tokens, positions (T,) int64, sequences
        back to back, each attending within itself (``causal`` or bidirectional);
        ``max_seqlen`` the longest (spares a read of cu_seqlens). With ``cache`` and
        ``cache_rows`` (T,) as well, every layer's k/v are written to the cache at (row,
        position) and its lengths set from them (a packed prefill).
        Cached (``cache`` given, no ``cu_seqlens``): tokens, positions (B, S): S new tokens per
        row appended after what each row holds; the cache's lengths advance by S.

        ``position_bound``: an int > every position (spares a host sync to find it).
        ``layer_call(layer, *args)``: how each layer is called (training wraps it in
        activation checkpointing); layers are always called as modules (FSDP2's hooks).
        """
        x = F.embedding(tokens, self.embed)
        # Under autocast the projections give bf16 q, k, v while fp32 master weights keep the
        # residual stream in fp32: RoPE tables in the residual's dtype would promote q and k
        # back to fp32 next to a bf16 v, which the attention op rejects.
        dev = x.device.type
        rope_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cos, sin = self.rotary(positions, rope_dtype, position_bound)
        cached = cache is not None and cu_seqlens is None
        router, kvs = [], [] if return_kv else None
        for i, layer in enumerate(self.layers):
            dev = layer.attn_norm.weight.device
            if x.device != dev:  # a model placed over several devices: move at the layer boundary
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
                cu_seqlens = cu_seqlens.to(dev) if cu_seqlens is not None else None
            args = (x, cos, sin, cu_seqlens, max_seqlen, causal, cache if cached else None, i)
            x, r, (k, v) = layer_call(layer, *args) if layer_call is not None else layer(*args)
            if r is not None:
                router.append(r)
            if kvs is not None:
                kvs.append((k, v))
            if cache is not None and not cached:
                cache.write_packed(i, cache_rows, positions, k, v)
        if cached:
            cache.advance(tokens.shape[1])
        elif cache is not None:
            cache.lengths_from_packed(cache_rows, positions, bound=position_bound)
        return ModelOutput(self.norm(x.to(self.norm.weight.device)), router, kvs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) in the model dtype."""
        if not self.has_lm_head:
            raise RuntimeError("this model was loaded without its lm_head (mode='embedding'); "
                               "load it with mode='unified' or 'generative' to generate")
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden.to(head.device), head)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim,
                       device=self.device, dtype=self.dtype,
                       devices=[layer.attn_norm.weight.device for layer in self.layers])


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 position of each packed token within its own sequence (0, 1, ..., L-1)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts
