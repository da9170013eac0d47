"""Building blocks of the GPT-OSS transformer (spec: ../shared/docs/gpt-oss-spec.md, sections 1.3-1.6).

Shapes in comments: B batch, T new tokens, S keys attended, D hidden size, Hq/Hkv query/key-value heads,
hd head dim, E experts, K experts per token, I expert width.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale, computed in fp32 and cast back (gain only, no +1 offset)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale.float()
        return y.to(x.dtype)


# ---- rotary embedding with YaRN ---------------------------------------------------------------------------
def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the concentration factor c of gpt-oss's YaRN (spec 1.5), in fp64 then fp32.

    With rope_scaling_factor <= 1 this is plain RoPE (c = 1)."""
    d, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor
    freq = theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # f_i = theta^(2i/d)
    if s <= 1.0:
        return (1.0 / freq).float(), 1.0
    c = 0.1 * math.log(s) + 1.0
    L0 = cfg.initial_context_length
    low = (d / 2) * math.log(L0 / (cfg.rope_ntk_beta * 2 * math.pi)) / math.log(theta)
    high = (d / 2) * math.log(L0 / (cfg.rope_ntk_alpha * 2 * math.pi)) / math.log(theta)
    if not 0 < low < high < d / 2 - 1:
        raise ValueError(f"YaRN ramp out of range (low={low:.3f}, high={high:.3f}) for head_dim={d}")
    i = torch.arange(d // 2, dtype=torch.float64)
    r = ((i - low) / (high - low)).clamp(0, 1)
    inv_freq = (1 - r) / freq + r / (s * freq)
    return inv_freq.float(), c


class RotaryEmbedding(nn.Module):
    """Half-split (NeoX) rotation. cos/sin (scaled by YaRN's c) are precomputed for the model's whole context, so
    the forward pass only indexes them: no host sync, nothing grown while several threads generate."""

    SLACK = 256  # positions beyond max_context, for memory slots of the context-aware variant

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.inv_freq, self.concentration = yarn_inv_freq(cfg)  # fp32, kept off the module's dtype casts
        cos, sin = self._build(min(cfg.max_context, 1 << 17) + self.SLACK, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._lock = threading.Lock()

    def _build(self, n: int, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, device=device)  # resolves None and an enclosing torch.device(...) context
        if probe.is_meta:  # a model built on "meta" gets real tables when its weights are loaded
            return (torch.empty(n, self.inv_freq.numel(), device="meta", dtype=dtype),) * 2
        pos = torch.arange(n, dtype=torch.float32, device=probe.device)
        ang = pos[:, None] * self.inv_freq.to(probe.device)[None, :]  # [P, hd/2], fp32
        return (ang.cos() * self.concentration).to(dtype), (ang.sin() * self.concentration).to(dtype)

    def ensure(self, n: int) -> None:
        """Make the tables cover positions [0, n) (a Python int: callers know their lengths, no device sync)."""
        if n > self.cos.shape[0]:
            with self._lock:
                if n > self.cos.shape[0]:
                    self.cos, self.sin = self._build(max(n, 2 * self.cos.shape[0]), self.cos.device,
                                                     self.cos.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, hd], positions [T] (int) -> rotated x, same dtype."""
        cos = self.cos[positions].to(x.dtype)  # [T, hd/2]
        sin = self.sin[positions].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---- KV cache ----------------------------------------------------------------------------------------------
class LayerKVCache:
    """Keys/values of one layer for one generation call.

    Full-attention layers grow with the context. Sliding-window layers keep a ring buffer of the last `window`
    positions, so their memory is bounded however long the story gets. Each slot remembers its absolute position,
    which is all the attention mask needs (softmax does not care about slot order)."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256):
        self.window = window
        cap = window if window else capacity
        self.k = torch.zeros(batch, n_kv, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((cap,), -1, dtype=torch.long, device=device)  # -1 = empty slot
        self.filled = 0  # slots holding real keys (full layers: a prefix)

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        pad = new - cap
        self.k = F.pad(self.k, (0, 0, 0, pad))
        self.v = F.pad(self.v, (0, 0, 0, pad))
        self.pos = torch.cat([self.pos, self.pos.new_full((pad,), -1)])

    def attend_and_store(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Given the new keys/values [B, Hkv, T, hd] at `positions` [T], return (keys, values, key_positions) to
        attend over (old cached ones plus the new ones) and store the new ones."""
        T = k.shape[2]
        if self.window:
            if self.filled == self.window:  # a full ring: every slot holds a key, no gather needed
                k_all = torch.cat([self.k, k], dim=2)
                v_all = torch.cat([self.v, v], dim=2)
                p_all = torch.cat([self.pos, positions])
            elif self.filled:
                valid = self.pos >= 0
                k_all = torch.cat([self.k[:, :, valid], k], dim=2)
                v_all = torch.cat([self.v[:, :, valid], v], dim=2)
                p_all = torch.cat([self.pos[valid], positions])
            else:
                k_all, v_all, p_all = k, v, positions
            # keep the newest `window` positions in the ring: slot = position % window
            keep = min(T, self.window)
            slots = positions[-keep:] % self.window
            self.k[:, :, slots] = k[:, :, -keep:]
            self.v[:, :, slots] = v[:, :, -keep:]
            self.pos[slots] = positions[-keep:]
            self.filled = int((self.pos >= 0).sum())
            return k_all, v_all, p_all
        start = self.filled
        self._grow(start + T)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        self.pos[start:start + T] = positions
        self.filled = start + T
        return self.k[:, :, :self.filled], self.v[:, :, :self.filled], self.pos[:self.filled]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class ModelCache:
    """Per-call generation state: one LayerKVCache per layer and the number of tokens seen so far."""

    layers: list[LayerKVCache]
    length: int = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


# ---- attention ---------------------------------------------------------------------------------------------
_MASKS: dict[tuple, torch.Tensor] = {}


def _training_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [T, 1+T] for a fresh sequence: the sink column then causal (and windowed) keys. Cached, so
    the training loop never rebuilds it."""
    # A mask made under inference_mode is an inference tensor, which autograd may refuse to save: key on it.
    key = (T, window, str(device), torch.is_inference_mode_enabled())
    m = _MASKS.get(key)
    if m is None:
        pos = torch.arange(T, device=device)
        m = _positions_mask(pos, pos, window)
        if len(_MASKS) > 32:
            _MASKS.clear()
        _MASKS[key] = m
    return m


def starts_at_zero(positions: torch.Tensor) -> bool:
    """Whether a cache-less forward may use the fixed causal mask of arange(T). Read on the CPU only: on a GPU
    reading positions[0] is a host sync in every layer, and the general positions mask gives the same result."""
    return positions.device.type == "cpu" and int(positions[0]) == 0


def _positions_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    sink = torch.ones(q_pos.shape[0], 1, dtype=torch.bool, device=q_pos.device)
    return torch.cat([sink, allowed], dim=1)


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """softmax over [sink, keys] with the sink's probability dropped (spec 1.4), through SDPA.

    The sink is a virtual first key. Queries get one extra coordinate holding their head's sink logit / scale, real
    keys hold 0 there and the virtual key holds 1 (and is 0 elsewhere), so its score is exactly the sink logit while
    real scores are unchanged; its value is zero. Because the virtual key is the same for every head, grouped-query
    attention runs without repeating keys. q [B,Hq,T,hd], k/v [B,Hkv,S,hd], sinks [Hq], mask bool [T, 1+S].
    Returns [B, Hq, T, hd]."""
    hd = q.shape[-1]
    scale = 1.0 / math.sqrt(hd)
    if q.shape[2] <= _FEW_QUERIES:
        return _sink_attention_few(q, k, v, sinks, mask, scale)
    pad = 8  # keep the augmented head dim a multiple of 8 for the fused kernel
    qa = F.pad(q, (0, pad))
    qa[..., hd] = (sinks.to(q.dtype) / scale)[:, None]
    ka = F.pad(k, (0, pad, 1, 0))  # zero row in front = the virtual key
    ka[:, :, 0, hd] = 1.0
    va = F.pad(v, (0, pad, 1, 0))  # same head dim as q/k, or SDPA leaves its fused kernel (2.5x slower on CPU)
    gqa = q.shape[1] != k.shape[1]
    if gqa and _repeat_kv_for_masked_gqa(q.device):
        g = q.shape[1] // k.shape[1]
        ka, va, gqa = ka.repeat_interleave(g, dim=1), va.repeat_interleave(g, dim=1), False
    out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[..., :hd]


def _repeat_kv_for_masked_gqa(device: torch.device) -> bool:
    """On CUDA, SDPA's fused kernels do not take a mask together with enable_gqa (flash takes no mask, and the
    memory-efficient kernel gained GQA only recently), so it would fall back to the math kernel, which materialises
    every [T, S] score matrix. Repeating the key/value heads keeps the memory-efficient kernel. On CPU the fused
    kernel takes both, measured faster than repeating."""
    return device.type == "cuda"


_FEW_QUERIES = 4  # decode steps: two small matmuls beat the fused kernel's fixed cost per call


def _sink_attention_few(q, k, v, sinks, mask, scale):
    """The same math written out for a handful of queries (decoding), grouped-query without repeating keys."""
    B, Hq, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scores = (q.reshape(B, Hkv, g * T, hd) @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, g*T, S]
    scores = scores.view(B, Hkv, g, T, S).masked_fill(~mask[:, 1:], float("-inf"))
    sink = sinks.float().view(1, Hkv, g, 1, 1).expand(B, Hkv, g, T, 1)
    probs = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
    out = probs.to(v.dtype).reshape(B, Hkv, g * T, S) @ v  # [B, Hkv, g*T, hd]
    return out.view(B, Hq, T, hd)


class AttentionBlock(nn.Module):
    """Pre-norm attention with fused QKV, GQA, learned sinks, RoPE/YaRN and an optional sliding window."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = cfg.layer_window(layer_idx)
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.out = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.norm(x)
        qkv = self.qkv(h)
        q_len, kv_len = self.n_heads * self.hd, self.n_kv * self.hd
        q = qkv[..., :q_len].view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = qkv[..., q_len:q_len + kv_len].view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = qkv[..., q_len + kv_len:].view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, positions), rope(k, positions)
        if cache is None:
            mask = _training_mask(T, self.window, x.device) if starts_at_zero(positions) else \
                _positions_mask(positions, positions, self.window)
        else:
            k, v, k_pos = cache.attend_and_store(k, v, positions)
            mask = _positions_mask(positions, k_pos, self.window)
        y = sink_attention(q, k, v, self.sinks, mask)  # [B, Hq, T, hd]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return x + self.out(y)


# ---- mixture of experts --------------------------------------------------------------------------------------
def swiglu(h: torch.Tensor, limit: float, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU on interleaved rows: gate = h[..., 0::2], linear = h[..., 1::2]."""
    gate, lin = h[..., 0::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


class Experts(nn.Module):
    """E experts' weights in the original layout (out x in), each applied only to the tokens routed to it.

    `grouped(x, counts)` is the MoE's path: tokens sorted by expert, each expert on exactly its rows.
    `forward(x [n, C, D], expert_ids)` is the call `PackedExperts` shares: row block i of x goes through expert
    expert_ids[i] (all E in order when None)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.limit = cfg.swiglu_limit
        self.mlp1_weight = nn.Parameter(torch.empty(E, 2 * I, D))
        self.mlp1_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.mlp2_weight = nn.Parameter(torch.empty(E, D, I))
        self.mlp2_bias = nn.Parameter(torch.zeros(E, D))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = range(x.shape[0]) if expert_ids is None else expert_ids.tolist()
        return torch.stack([self._one(x[i], e) for i, e in enumerate(ids)])  # views of the weights, no copies

    def grouped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, D] sorted by expert, counts[e] rows for expert e -> [N, D]: each expert on exactly its rows
        (no padding); the counts come from one host sync for the whole layer."""
        out = [self._one(chunk, e) for e, chunk in enumerate(x.split(counts)) if chunk.shape[0]]
        return torch.cat(out) if out else x.new_zeros(0, x.shape[-1])

    def _one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        h = F.linear(x, self.mlp1_weight[e].to(x.dtype), self.mlp1_bias[e].to(x.dtype))
        return F.linear(swiglu(h, self.limit), self.mlp2_weight[e].to(x.dtype), self.mlp2_bias[e].to(x.dtype))


@dataclass
class RoutingStats:
    aux_loss: torch.Tensor  # Switch load-balancing loss of this layer
    counts: torch.Tensor  # [E] tokens routed to each expert


class MLPBlock(nn.Module):
    """Pre-norm MoE: router top-k over raw logits, softmax over the k selected, weighted sum of experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.k = cfg.num_experts, cfg.experts_per_token
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=True)
        self.experts = Experts(cfg)
        self.stats: RoutingStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        t = self.norm(x).reshape(B * T, D)
        logits = self.gate(t)  # [N, E]
        top_vals, top_idx = torch.topk(logits, self.k, dim=-1, sorted=True)  # [N, K]
        weights = torch.softmax(top_vals.float(), dim=-1)  # [N, K]
        y = self._dispatch(t, top_idx, weights)
        # load-balancing loss and expert counts are for training; inference skips their cost
        self.stats = self._routing_stats(logits, top_idx) if self.training else None
        return x + y.view(B, T, D).to(x.dtype)

    def _dispatch(self, t: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Group the N*K (token, expert) assignments by expert into a padded [U, C, D] batch (U experts in use, C
        the largest group), run them in two batched matmuls, and gather each token's K outputs back for the
        weighted sum. One host sync (the group sizes); no loop over experts."""
        N, D = t.shape
        E, K = self.num_experts, self.k
        flat_e = top_idx.reshape(-1)  # [N*K], assignment a = token a // K
        if N * K <= E:  # decode of a token or two: run only the selected experts, no padding
            out = self.experts(t.repeat_interleave(K, 0).unsqueeze(1), flat_e).squeeze(1)  # [N*K, D]
        else:
            order = torch.argsort(flat_e, stable=True)
            counts = torch.bincount(flat_e, minlength=E)  # [E]
            if hasattr(self.experts, "grouped"):  # exact-size groups, results put back in assignment order
                out_sorted = self.experts.grouped(t.index_select(0, order // K), counts.tolist())
                out = torch.empty_like(out_sorted).index_copy_(0, order, out_sorted)
                return (out.view(N, K, D) * weights.to(out.dtype).unsqueeze(-1)).sum(1)
            C = int(counts.max())
            used = torch.nonzero(counts).squeeze(1)  # experts with at least one token
            U = used.numel()
            # slot of each expert in the compact batch (idle experts cost nothing; packed ones are never decoded)
            slot_of = torch.arange(E, device=t.device) if U == E else torch.cumsum(counts > 0, 0) - 1
            starts = torch.cumsum(counts, 0) - counts
            sorted_e = flat_e[order]
            row_sorted = slot_of[sorted_e] * C + torch.arange(N * K, device=t.device) - starts[sorted_e]
            row = torch.empty_like(row_sorted).index_copy_(0, order, row_sorted)  # buffer row of assignment a
            buf = t.new_zeros(U * C, D).index_copy(0, row, t.repeat_interleave(K, 0))
            out = self.experts(buf.view(U, C, D), None if U == E else used).reshape(U * C, D).index_select(0, row)
        w = weights.to(out.dtype).unsqueeze(-1)  # [N, K, 1]
        return (out.view(N, K, D) * w).sum(1)

    def _routing_stats(self, logits: torch.Tensor, top_idx: torch.Tensor) -> RoutingStats:
        """Switch Transformer load-balancing loss: E * sum_e f_e * P_e, f_e the fraction of assignments routed to
        e, P_e the mean router probability of e (softmax over all experts). 1.0 when perfectly balanced."""
        E = self.num_experts
        counts = torch.bincount(top_idx.reshape(-1), minlength=E)
        if not self.training and not torch.is_grad_enabled():
            return RoutingStats(logits.new_zeros(()), counts)
        probs = torch.softmax(logits.float(), dim=-1).mean(0)  # [E]
        frac = counts.float() / max(1, top_idx.numel())
        return RoutingStats(E * (frac * probs).sum(), counts)
