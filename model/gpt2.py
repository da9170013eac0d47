"""GPT-2 baseline: learned absolute positions, LayerNorm, GELU MLP, multi-head attention, tied embeddings.

Same interface as `Transformer` (forward(input_ids, cache) -> logits, new_cache, aux_loss, checkpoints), so the
trainer, generator and app treat both alike. Parameter names follow GPT-2's own (wte, wpe, h.i.attn.c_attn, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .gptoss import CausalLM
from .layers import LayerKVCache, ModelCache, _positions_mask, starts_at_zero


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.hd = cfg.num_attention_heads, cfg.head_dim
        D = cfg.hidden_size
        self.c_attn = nn.Linear(D, 3 * self.n_heads * self.hd)
        self.c_proj = nn.Linear(self.n_heads * self.hd, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)  # 3x [B,H,T,hd]
        if cache is None and starts_at_zero(positions):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_pos = positions
            if cache is not None:
                k, v, k_pos = cache.attend_and_store(k, v, positions)
            mask = _positions_mask(positions, k_pos, 0)[:, 1:]  # no sink column
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.ln_1 = nn.LayerNorm(D, eps=cfg.rms_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(D, eps=cfg.rms_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(D, cfg.intermediate_size))
        self.mlp.add_module("gelu", nn.GELU(approximate="tanh"))
        self.mlp.add_module("c_proj", nn.Linear(cfg.intermediate_size, D))

    def forward(self, x, positions, cache=None):
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gpt2":
            raise ValueError(f"GPT2 builds arch 'gpt2', got {cfg.arch!r}")
        if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
            raise ValueError("GPT-2 needs num_attention_heads * head_dim == hidden_size")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_context, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.startswith("ln") or ".ln_" in name:
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int = 1, device=None, dtype=None) -> ModelCache:
        cfg, ref = self.config, self.wte.weight
        return ModelCache([LayerKVCache(batch_size, cfg.num_attention_heads, cfg.head_dim, 0, dtype or ref.dtype,
                                        device or ref.device) for _ in range(cfg.num_hidden_layers)])

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        positions = self._positions(T, cache, input_ids.device)
        if int(positions[-1]) >= self.config.max_context:
            raise ValueError(f"GPT-2 has learned positions up to {self.config.max_context}; got position "
                             f"{int(positions[-1])}. Trim the context (the generator does this for you).")
        x = self.wte(input_ids) + self.wpe(positions)[None]
        for i, blk in enumerate(self.h):
            x = blk(x, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.wte.weight.new_zeros(())

    @property
    def expert_counts(self) -> None:
        return None
