"""Model configuration: one dataclass for both architectures, size presets, parameter counts.

The GPT-OSS fields mirror OpenAI's `original/config.json` (spec section 2.4) so the real checkpoints map onto
them one to one; the nano presets keep gpt-oss's RoPE/YaRN settings and shrink everything else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ARCHS = ("gptoss", "gpt2")


@dataclass
class ModelConfig:
    arch: str = "gptoss"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    # Mixture of experts (gptoss); for gpt2 `intermediate_size` is the dense MLP width.
    num_experts: int = 4
    experts_per_token: int = 2
    intermediate_size: int = 128
    swiglu_limit: float = 7.0
    # Attention
    sliding_window: int = 128  # keys seen by a query on even layers, itself included; 0 = no window
    # RoPE with YaRN (gpt-oss values)
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    initial_context_length: int = 4096
    # The longest sequence this model is used with (training block size; cache length limit).
    max_context: int = 512
    rms_norm_eps: float = 1e-5
    # Training-only knobs kept with the model so a checkpoint says how it was built.
    init_std: float = 0.02
    aux_loss_coef: float = 0.01
    tie_word_embeddings: bool = False  # gpt2 ties; gptoss never does
    # Extras (model/extras.py); 0 = off, so older configs and checkpoints load unchanged.
    mtp_heads: int = 0  # extra heads predicting tokens t+2 .. t+1+mtp_heads beside the next-token head
    mtp_loss_weight: float = 0.3  # training weight of each extra head's cross-entropy
    context_slots: int = 0  # learned memory vectors carried from one chunk of a story to the next (gptoss)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (name, notes)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: expected one of {ARCHS}")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.arch == "gptoss" and self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token cannot exceed num_experts")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotary embedding)")
        if self.mtp_heads < 0 or self.context_slots < 0:
            raise ValueError("mtp_heads and context_slots must be >= 0")
        if self.context_slots and self.arch != "gptoss":
            raise ValueError("context memory (context_slots > 0) needs arch 'gptoss' (rotary positions)")

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> ModelConfig:
        """Parse JSON text, or read it from a path."""
        if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
            return cls.from_dict(json.loads(text_or_path))
        return cls.from_dict(json.loads(Path(text_or_path).read_text()))

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.arch == "gptoss"

    def layer_window(self, layer: int) -> int:
        """Sliding window of a layer: gpt-oss windows the even layers (0, 2, ...); 0 means full attention."""
        if self.arch != "gptoss" or not self.sliding_window:
            return 0
        return self.sliding_window if layer % 2 == 0 else 0

    def replace(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size: toy, small, medium, large (nano GPT-OSS), gpt-oss-20b, gpt-oss-120b.

        `gpt2-<size>` gives the GPT-2 baseline with the same total parameter count as the GPT-OSS preset,
        `gpt2-<size>-active` the one matched on active parameters per token.
        """
        if name.startswith("gpt2-"):
            base, _, match = name[5:].partition("-")
            vocab = overrides.pop("vocab_size", None)
            cfg = cls.preset(base, **({"vocab_size": vocab} if vocab else {}))
            return gpt2_matched(cfg, match=match or "total").replace(**overrides)
        if name not in PRESETS:
            raise ValueError(f"unknown model size {name!r}: choose one of {sorted(PRESETS)} or gpt2-<size>")
        cfg = replace(PRESETS[name], extra={**PRESETS[name].extra, "preset": name})
        return cfg.replace(**overrides) if overrides else cfg


def _nano(**kw: Any) -> ModelConfig:
    base = dict(arch="gptoss", vocab_size=4096, sliding_window=128, max_context=512)
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, ModelConfig] = {
    # ~2M total: trains in minutes on 2 CPU cores.
    "toy": _nano(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, num_experts=4, experts_per_token=2, intermediate_size=128, max_context=256,
                 sliding_window=64),
    # ~12M total, ~5M active: the shipped default's size.
    "small": _nano(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=32, num_experts=8, experts_per_token=2, intermediate_size=256),
    # ~50M total
    "medium": _nano(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=64, num_experts=8, experts_per_token=2, intermediate_size=384, max_context=1024),
    # ~200M total
    "large": _nano(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                   head_dim=64, num_experts=8, experts_per_token=2, intermediate_size=768, max_context=1024,
                   vocab_size=8192),
    # The published models (spec section 1.1).
    "gpt-oss-20b": ModelConfig(
        arch="gptoss", vocab_size=201088, hidden_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_experts=32, experts_per_token=4, intermediate_size=2880,
        sliding_window=128, max_context=131072),
    "gpt-oss-120b": ModelConfig(
        arch="gptoss", vocab_size=201088, hidden_size=2880, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_experts=128, experts_per_token=4, intermediate_size=2880,
        sliding_window=128, max_context=131072),
}


# ---- parameter counting (analytic, so 20B/120B can be reported without building them) ----------------------
def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters, active parameters per token, and embedding parameters, computed from the config.

    'active' counts every weight a single token's forward pass touches: attention, router, the selected experts,
    norms, the unembedding, and the input embedding table counted whole; 'active_excl_embedding' leaves the input
    table out (the convention of the gpt-oss model card: 3.6B for 20b, 5.1B for 120b).
    """
    D, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    if cfg.arch == "gpt2":
        attn = D * 3 * D + 3 * D + D * D + D
        mlp = D * cfg.intermediate_size + cfg.intermediate_size + cfg.intermediate_size * D + D
        norms = 4 * D
        per_layer = attn + mlp + norms
        emb = V * D + cfg.max_context * D
        head = 0 if cfg.tie_word_embeddings else V * D
        total = L * per_layer + emb + head + 2 * D
        return {"total": total, "active": total, "active_excl_embedding": total - emb, "embedding": emb + head}
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attn = D * (q + 2 * kv) + (q + 2 * kv) + q * D + D + cfg.num_attention_heads + D  # + sinks + norm
    I, E = cfg.intermediate_size, cfg.num_experts
    expert = D * 2 * I + 2 * I + I * D + D
    router = E * D + E
    mlp_total = router + E * expert + D
    mlp_active = router + cfg.experts_per_token * expert + D
    emb = 2 * V * D  # untied embedding + unembedding
    total = L * (attn + mlp_total) + emb + D
    active = L * (attn + mlp_active) + emb + D
    # The model card's "3.6B active" for gpt-oss-20b leaves out the input embedding table (a token reads one row).
    return {"total": total, "active": active, "active_excl_embedding": active - V * D, "embedding": emb}


def gpt2_matched(cfg: ModelConfig, match: str = "total") -> ModelConfig:
    """The GPT-2 config with the same width, depth, heads, vocabulary and context as `cfg`, whose dense MLP width
    makes its parameter count equal the GPT-OSS model's total (match="total") or active-per-token ("active")."""
    if match not in ("total", "active"):
        raise ValueError("match must be 'total' or 'active'")
    target = parameter_counts(cfg)[match]
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    g = ModelConfig(arch="gpt2", vocab_size=cfg.vocab_size, hidden_size=D, num_hidden_layers=L,
                    num_attention_heads=max(1, D // 64) if D >= 256 else max(1, D // 32),
                    num_key_value_heads=max(1, D // 64) if D >= 256 else max(1, D // 32),
                    head_dim=64 if D >= 256 else 32, num_experts=1, experts_per_token=1, intermediate_size=4 * D,
                    sliding_window=0, max_context=cfg.max_context, tie_word_embeddings=True,
                    extra={"matched_to": cfg.extra.get("preset", "custom"), "match": match})
    fixed = parameter_counts(g.replace(intermediate_size=0))["total"]
    per_unit = L * (2 * D + 1)  # each unit of MLP width adds D (in) + D (out) weights and one bias
    width = max(1, math.floor((target - fixed) / per_unit + 0.5))
    return g.replace(intermediate_size=width)


def format_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def parameter_report(cfg: ModelConfig) -> str:
    c = parameter_counts(cfg)
    return (f"{cfg.arch} {cfg.extra.get('preset', '')}: total {format_count(c['total'])}, "
            f"active/token {format_count(c['active'])} ({format_count(c['active_excl_embedding'])} without the input "
            f"embedding), embedding {format_count(c['embedding'])}").strip()
