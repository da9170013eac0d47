"""Model extras (issue 9): multi-token prediction heads and a context memory carried across chunks of a story.

Both are switched on by the config (`ModelConfig.mtp_heads`, `ModelConfig.context_slots`); `build_model(cfg)`
builds the classes here when either is set, so checkpoints carry the extra parameters and load strictly.

Multi-token prediction (MTP)
    Head k (k = 2 .. 1 + mtp_heads) maps the final hidden state at position t to a hidden state that the
    *shared* unembedding turns into logits for token t+k. The next-token path (`forward`) is untouched, so
    generation always uses the trained next-token head. Alignment, with x the inputs and y the next-token
    targets (y[t] = token t+1): head k at position t predicts token t+k = y[t+k-1], so its loss pairs
    logits_k[:, :T-(k-1)] with y[:, k-1:] (see `mtp_losses`; tests/test_mtp.py proves it on a synthetic
    sequence). Parameter names: `mtp.{i}.*` for head k = i + 2.

Context memory (gptoss only)
    M learned vectors ("read slots") are prepended to each chunk of T tokens and M learned "write slots"
    appended after it: positions [0, M) memory, [M, M+T) tokens, [M+T, M+T+M) write slots, one causal
    sequence, so every token sees the memory and the write slots see the whole chunk. The next chunk's memory
    is `init + proj(hidden at the write slots)`; at a document boundary a stream's memory is reset to the
    learned `init` with torch.where (no in-place update of anything autograd needs). Training carries the
    memory through `context_bptt` consecutive chunks with the graph kept (truncated BPTT), then detaches.
    Generation: a `ContextCache` holds one window; when it has T tokens the model runs the write slots,
    keeps the new memory and starts a fresh window, inside `forward`, so any generator that feeds tokens
    through `model(ids, cache)` carries the memory across windows (cache.length counts window tokens).
    Parameter names: `context.init`, `context.write`, `context.proj.weight/.bias`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .gpt2 import GPT2
from .gptoss import Transformer
from .layers import ModelCache, RMSNorm

IGNORE_INDEX = -100


# ==== modules ==================================================================================================
class MTPHead(nn.Module):
    """h -> out_norm(h + W2 silu(W1 norm(h))): a residual MLP on the final hidden state, read by the shared
    unembedding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.fc = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.out_norm = RMSNorm(dim, eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_norm(h + self.proj(F.silu(self.fc(self.norm(h)))))


class ContextMemory(nn.Module):
    """The learned initial memory, the write-slot embeddings, and the projection that makes the next memory."""

    def __init__(self, slots: int, dim: int):
        super().__init__()
        self.slots = slots
        self.init = nn.Parameter(torch.zeros(slots, dim))
        self.write = nn.Parameter(torch.zeros(slots, dim))
        self.proj = nn.Linear(dim, dim, bias=True)

    def initial(self, batch: int) -> torch.Tensor:
        return self.init.unsqueeze(0).expand(batch, -1, -1)

    def next_state(self, write_hidden: torch.Tensor) -> torch.Tensor:
        """Memory for the next chunk from the final hidden states at the write slots [B, M, D]."""
        return self.init.to(write_hidden.dtype) + self.proj(write_hidden)


@dataclass
class ContextCache(ModelCache):
    """KV cache of one window plus the memory. `length` counts the window's tokens (not the memory slots), so a
    generator's `cache.length >= max_context` check never fires: the model rolls to a fresh window itself."""

    state: torch.Tensor | None = None  # [B, M, D] memory of the current window (None: learned init)
    pos: int = 0  # next absolute position inside the window (memory slots included)
    primed: bool = False  # memory slots already in the KV cache
    windows: int = 0  # windows completed (memory updates made)


# ==== the shared behaviour of both architectures ================================================================
class ExtrasMixin:
    """Adds MTP heads and/or context memory to `Transformer` or `GPT2` (mixed in before them)."""

    config: ModelConfig
    mtp: nn.ModuleList | None
    context: ContextMemory | None

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)  # the base model, initialised exactly as a plain one (same RNG use)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.mtp = nn.ModuleList(MTPHead(D, eps) for _ in range(cfg.mtp_heads)) if cfg.mtp_heads else None
        self.context = ContextMemory(cfg.context_slots, D) if cfg.context_slots else None
        self.reset_extra_parameters()

    @torch.no_grad()
    def reset_extra_parameters(self) -> None:
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.extra_named_parameters():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.startswith("mtp.") and name.endswith(".proj.weight"):  # residual output: scaled like blocks
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    def extra_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        out = []
        for prefix, mod in (("mtp", self.mtp), ("context", self.context)):
            if mod is not None:
                out += [(f"{prefix}.{n}", p) for n, p in mod.named_parameters()]
        return out

    def num_parameters(self) -> dict[str, int]:
        """Base counts plus the extras: MTP heads count in the total (they do not run for next-token inference),
        the context memory in total and active."""
        counts = dict(super().num_parameters())
        mtp = sum(p.numel() for n, p in self.extra_named_parameters() if n.startswith("mtp"))
        ctx = sum(p.numel() for n, p in self.extra_named_parameters() if n.startswith("context"))
        counts["total"] += mtp + ctx
        counts["active"] += ctx
        counts["mtp"], counts["context"] = mtp, ctx
        return counts

    # ---- shared pieces --------------------------------------------------------------------------------------
    def mtp_hidden(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Hidden states of each extra head ([B, T, D] each); element i is for offset k = i + 2."""
        if self.mtp is None:
            raise ValueError("this model has no multi-token prediction heads (config mtp_heads = 0)")
        return [head(h) for head in self.mtp]

    def mtp_logits(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each extra head from final hidden states h [B, T, D]: element i predicts token t + i + 2."""
        return [self.unembed(z) for z in self.mtp_hidden(h)]

    # ---- forward ------------------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        if self.context is None:
            return super().hidden_states(input_ids, cache)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if cache is None:  # a fresh document: chunks of max_context tokens with the memory carried between them
            W = self.config.max_context
            outs, state = [], None
            for i in range(0, input_ids.shape[1], W):
                h, state = self.context_chunk(input_ids[:, i:i + W], state)
                outs.append(h)
            return torch.cat(outs, 1)
        if not isinstance(cache, ContextCache):
            raise TypeError("a context-memory model needs the cache from its own new_cache()")
        return self._cached_hidden(input_ids, cache)

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None, *,
                state: torch.Tensor | None = None, reset: torch.Tensor | None = None,
                return_hidden: bool = False) -> Any:
        """`model(ids, cache) -> logits` (the plain contract). Training entry points (through DDP's forward):
        `return_hidden=True` returns `(hidden [B, T, D], next_state or None)`; for a context model `state` is the
        carried memory and `reset` [B] bool marks streams starting a new document."""
        if return_hidden:
            if self.context is not None:
                return self.context_chunk(input_ids, state, reset)
            return super().hidden_states(input_ids, cache), None
        return self.unembed(self.hidden_states(input_ids, cache))

    # ---- context memory ----------------------------------------------------------------------------------
    def _run_blocks(self, x: torch.Tensor, positions: torch.Tensor, layers: list | None) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            x = blk(x, self.rope, positions, layers[i] if layers is not None else None)
        return self.norm(x)

    def context_chunk(self, input_ids: torch.Tensor, state: torch.Tensor | None = None,
                      reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk [B, T] with memory `state` [B, M, D] (None: the learned init). Streams with reset[b] True
        start from the init instead of `state` (a new document). Returns (token hidden states [B, T, D], memory
        for the next chunk [B, M, D]); gradients flow through both."""
        ctx = self.context
        B, T = input_ids.shape
        M = ctx.slots
        init = ctx.initial(B)
        if state is None:
            mem = init
        else:
            mem = state if reset is None else torch.where(reset.view(B, 1, 1).to(state.device), init.to(state.dtype),
                                                          state)
        tok = self.embedding(input_ids)
        x = torch.cat([mem.to(tok.dtype), tok, ctx.write.to(tok.dtype).unsqueeze(0).expand(B, -1, -1)], 1)
        positions = torch.arange(T + 2 * M, device=input_ids.device)
        h = self._run_blocks(x, positions, None)
        return h[:, M:M + T], ctx.next_state(h[:, M + T:])

    def new_cache(self, batch_size: int = 1, device=None, dtype=None) -> ModelCache:
        base = super().new_cache(batch_size, device, dtype)
        if self.context is None:
            return base
        return ContextCache(base.layers)

    def _cached_hidden(self, input_ids: torch.Tensor, cache: ContextCache) -> torch.Tensor:
        """Feed tokens window by window: memory slots first, at most max_context tokens, then the write slots
        make the next memory and a fresh window starts (exactly the training-time chunking)."""
        ctx, W = self.context, self.config.max_context
        B, T = input_ids.shape
        outs = []
        i = 0
        while i < T:
            if not cache.primed:
                mem = cache.state if cache.state is not None else ctx.initial(B)
                self._cache_feed(mem.to(self.embedding.weight.dtype), cache)
                cache.primed = True
            n = min(T - i, W - cache.length)
            outs.append(self._cache_feed(self.embedding(input_ids[:, i:i + n]), cache))
            cache.length += n
            i += n
            if cache.length >= W:
                self._roll(cache)
        return torch.cat(outs, 1)

    def _cache_feed(self, x: torch.Tensor, cache: ContextCache) -> torch.Tensor:
        positions = torch.arange(cache.pos, cache.pos + x.shape[1], device=x.device)
        h = self._run_blocks(x, positions, cache.layers)
        cache.pos += x.shape[1]
        return h

    def _roll(self, cache: ContextCache) -> None:
        """The window is full: run the write slots over it, keep the new memory, start an empty window."""
        ctx = self.context
        B = cache.layers[0].k.shape[0]
        w = ctx.write.to(self.embedding.weight.dtype).unsqueeze(0).expand(B, -1, -1)
        cache.state = ctx.next_state(self._cache_feed(w, cache))
        ref = cache.layers[0].k
        cache.layers[:] = super().new_cache(B, ref.device, ref.dtype).layers
        cache.length, cache.pos, cache.primed = 0, 0, False
        cache.windows += 1


class ExtrasTransformer(ExtrasMixin, Transformer):
    """GPT-OSS transformer with MTP heads and/or context memory."""


class ExtrasGPT2(ExtrasMixin, GPT2):
    """GPT-2 baseline with MTP heads (context memory needs rotary positions: gptoss only)."""


def build_extras_model(cfg: ModelConfig) -> nn.Module:
    """The model for a config with mtp_heads or context_slots set (called by `build_model`)."""
    return ExtrasTransformer(cfg) if cfg.arch == "gptoss" else ExtrasGPT2(cfg)


def has_extras(model: nn.Module) -> bool:
    return isinstance(model, ExtrasMixin)


# ==== losses ===================================================================================================
def mtp_losses(model: ExtrasMixin, hidden: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of each extra head. hidden [B, T, D] at inputs x[t]; y [B, T] next-token targets
    (y[t] = token t+1, IGNORE_INDEX where padded). Head k at position t predicts token t+k = y[t+k-1]."""
    out = []
    T = hidden.shape[1]
    for i, z in enumerate(model.mtp_hidden(hidden)):
        k = i + 2
        if T - (k - 1) <= 0:
            out.append(hidden.new_zeros(()).float())
            continue
        logits = model.unembed(z[:, :T - (k - 1)])
        target = y[:, k - 1:]
        if (target != IGNORE_INDEX).any():
            out.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=IGNORE_INDEX))
        else:
            out.append(logits.sum().float() * 0.0)  # keeps every head in the graph (DDP) with no signal
    return out


class ContextBatch(NamedTuple):
    """`unroll` consecutive document-ordered chunks: x, y [U, B, T], reset [U, B]."""

    x: torch.Tensor
    y: torch.Tensor
    reset: torch.Tensor


def next_context_batch(doc_iter, unroll: int) -> ContextBatch:
    """Stack `unroll` consecutive DocumentBatches of a looping `model.data.DocumentChunkIterator`."""
    parts = [next(doc_iter) for _ in range(unroll)]
    return ContextBatch(torch.stack([p.x for p in parts]), torch.stack([p.y for p in parts]),
                        torch.stack([p.reset for p in parts]))


class ExtrasLoss:
    """Loss function for `model.train.train_step(loss_fn=...)` with MTP heads and/or context memory.

    Called as `loss_fn(model, batch)` with `model` possibly DDP-wrapped; returns a dict: `loss` (next-token
    cross-entropy, what the trainer logs and compares), `objective` (what is back-propagated, without the MoE
    aux loss), `aux` (MoE aux loss of the forward(s)), `mtp` (list of per-head losses, detached floats).
    For a context model `batch` is a ContextBatch and the memory carried between calls lives here
    (`self.state`, detached at each call's end: truncated BPTT over `unroll` chunks)."""

    def __init__(self, raw_model: ExtrasMixin, mtp_weight: float | None = None):
        self.raw = raw_model
        self.mtp_weight = float(raw_model.config.mtp_loss_weight if mtp_weight is None else mtp_weight)
        self.state: torch.Tensor | None = None

    def _terms(self, hidden: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.raw.unembed(hidden)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        extra = mtp_losses(self.raw, hidden, y) if self.raw.mtp is not None else []
        return loss, extra

    def __call__(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        raw = self.raw
        if raw.context is None:
            x, y = batch
            hidden, _ = model(x, return_hidden=True)
            loss, extra = self._terms(hidden, y)
            aux = raw.aux_loss
            n = 1
        else:
            xs, ys, resets = batch
            state = self.state
            if state is not None and state.shape[0] != xs.shape[1]:
                state = None
            losses, extras, auxes = [], [], []
            for u in range(xs.shape[0]):
                hidden, state = model(xs[u], state=state, reset=resets[u], return_hidden=True)
                lu, eu = self._terms(hidden, ys[u])
                losses.append(lu)
                extras.append(eu)
                auxes.append(raw.aux_loss)
            self.state = state.detach()
            n = len(losses)
            loss = torch.stack(losses).mean()
            extra = [torch.stack([e[i] for e in extras]).mean() for i in range(len(extras[0]))]
            aux = torch.stack(auxes).mean()
        objective = loss + self.mtp_weight * sum(extra) if extra else loss
        return {"loss": loss, "objective": objective, "aux": aux, "mtp": [float(e.detach()) for e in extra],
                "chunks": n}


# ==== evaluation of the context memory ============================================================================
@torch.no_grad()
def chunk_losses(model: nn.Module, docs: list[list[int]], block: int, carry: bool,
                 max_chunks: int = 4) -> list[tuple[float, int]]:
    """Summed next-token loss and token count per chunk index (0 = first `block` tokens of a story) over
    `docs` (each a token list, longer than `block`). With a context model, `carry` keeps the memory from chunk
    to chunk (False: reset to the init at every chunk). A plain model sees each chunk on its own."""
    sums = [[0.0, 0] for _ in range(max_chunks)]
    is_ctx = has_extras(model) and model.context is not None
    device = next(model.parameters()).device
    for doc in docs:
        state = None
        for c in range(max_chunks):
            seg = doc[c * block:(c + 1) * block + 1]
            if len(seg) < 2:
                break
            x = torch.tensor([seg[:-1]], device=device)
            y = torch.tensor([seg[1:]], device=device)
            if is_ctx:
                h, nxt = model.context_chunk(x, state if carry else None)
                state = nxt
                logits = model.unembed(h)
            else:
                logits = model(x)
            sums[c][0] += float(F.cross_entropy(logits.float()[0], y[0], reduction="sum"))
            sums[c][1] += y.shape[1]
    return [(s, n) for s, n in sums]
