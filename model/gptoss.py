"""The GPT-OSS transformer: one implementation for the nano sizes and the real gpt-oss-20b/120b.

    x = embedding[ids]
    for each block: x = x + attn(norm(x)); x = x + moe(norm(x))
    logits = unembedding(norm(x))

Public API: `Transformer(cfg)`, `Transformer.from_checkpoint(path, device="cpu", dtype=None)`,
`model(input_ids [B, T], cache=None) -> logits [B, T, V]`, `build_model(cfg)`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, parameter_counts
from .layers import AttentionBlock, LayerKVCache, MLPBlock, ModelCache, RMSNorm, RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn = AttentionBlock(cfg, layer_idx)
        self.mlp = MLPBlock(cfg)

    def forward(self, x, rope, positions, cache=None):
        return self.mlp(self.attn(x, rope, positions, cache))


class CausalLM(nn.Module):
    """What both architectures share: caches, parameter counts, checkpoint loading, the forward contract."""

    config: ModelConfig

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> CausalLM:
        """Load our checkpoint directory, an HF-layout gpt-oss directory, or a download root with `original/`."""
        from .checkpoint import load_model

        return load_model(path, device=device, dtype=dtype)

    def num_parameters(self) -> dict[str, int]:
        return parameter_counts(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_cache(self, batch_size: int = 1, device=None, dtype=None) -> ModelCache:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Final normalised hidden states [B, T, D] (what the unembedding reads)."""
        raise NotImplementedError

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits [B, T, V] for every position (the cache, when given, is read and extended)."""
        return self.unembed(self.hidden_states(input_ids, cache))

    def last_logits(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Logits of the last position only, [B, V]: what generation needs. A prefill then skips the unembedding
        of every other prompt token (for gpt-oss, 201088 x 2880 multiply-adds and 0.8 MB of fp32 logits each)."""
        return self.unembed(self.hidden_states(input_ids, cache)[:, -1])

    def _positions(self, T: int, cache: ModelCache | None, device) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        rope = getattr(self, "rope", None)
        if rope is not None:
            rope.ensure(start + T)
        return torch.arange(start, start + T, device=device)


class Transformer(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "gptoss":
            raise ValueError(f"Transformer builds arch 'gptoss', got {cfg.arch!r}; use build_model()")
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.block = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.unembedding = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, std) for matrices, residual output projections scaled by 1/sqrt(2L), zero
        biases and sinks, unit norm gains. Every parameter is set here; nothing is left as torch.empty."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("norm.scale",)):
                p.fill_(1.0)
            elif name.endswith(("bias", "sinks")):
                p.zero_()
            elif name.endswith(("attn.out.weight", "mlp2_weight")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int = 1, device=None, dtype=None) -> ModelCache:
        cfg = self.config
        ref = self.embedding.weight
        layers = [LayerKVCache(batch_size, cfg.num_key_value_heads, cfg.head_dim, cfg.layer_window(i),
                               dtype or ref.dtype, device or ref.device) for i in range(cfg.num_hidden_layers)]
        return ModelCache(layers)

    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Final normalised hidden states [B, T, D] (what the unembedding reads)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        positions = self._positions(T, cache, input_ids.device)
        x = self.embedding(input_ids)
        for i, blk in enumerate(self.block):
            x = blk(x, self.rope, positions, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembedding(h)

    # ---- MoE bookkeeping for the trainer (forward's return value stays plain logits) ----------------------
    @property
    def aux_loss(self) -> torch.Tensor:
        stats = [b.mlp.stats for b in self.block if b.mlp.stats is not None]
        if not stats:
            return self.embedding.weight.new_zeros(())
        return torch.stack([s.aux_loss for s in stats]).sum()

    @property
    def expert_counts(self) -> torch.Tensor | None:
        stats = [b.mlp.stats for b in self.block]
        if any(s is None for s in stats):
            return None
        return torch.stack([s.counts for s in stats])  # [L, E]


def build_model(cfg: ModelConfig) -> CausalLM:
    """The model for a config: `Transformer` for arch 'gptoss', `GPT2` for 'gpt2' (with MTP heads / context
    memory from model/extras.py when the config asks for them)."""
    if getattr(cfg, "mtp_heads", 0) or getattr(cfg, "context_slots", 0):
        from .extras import build_extras_model

        return build_extras_model(cfg)
    if cfg.arch == "gptoss":
        return Transformer(cfg)
    from .gpt2 import GPT2

    return GPT2(cfg)
