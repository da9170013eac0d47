"""Self-speculative decoding with the multi-token prediction heads (issue 9).

Each round: the token chosen from the next-token head (`pending`) and up to K drafts from the extra heads (head
k drafts the token k places ahead) are fed in one forward with the KV cache. Row j of that forward is the model's
own next-token distribution after `pending, d_1 .. d_j`, so the drafts are verified against it and the longest
agreeing prefix is kept; the cache entries of rejected drafts are rolled back.

- Greedy (temperature 0): a draft is accepted when it equals the argmax of its row, so the output is token for
  token what plain greedy decoding gives (tests/test_mtp.py checks this, past the sliding window too).
- Sampling: the speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023): accept draft d with
  probability min(1, p(d)/q(d)), p the target row's distribution and q the head's (both after the same
  SamplingParams processing); on rejection draw from normalise(max(0, p - q)) and end the round; if every draft
  is accepted, draw the next token from the last row. Each emitted token is then distributed exactly as p.

Rollback: full-attention layers keep a prefix, so truncating is resetting `filled`; sliding-window layers are ring
buffers, so the slots a verify step overwrites are saved before it and restored for rejected positions.

CLI: `python -m model.speculative --model runs/x/final --prompt "Once upon a time" [--temperature 0] [--compare]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams, make_generator, process_logits, resolve_seed, sample_next

TRIM_FRACTION = 0.75  # like model.generation: on a full context keep this share of the most recent tokens


# ==== KV-cache rollback ============================================================================================
@dataclass
class _LayerSnapshot:
    filled: int
    slots: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None


@dataclass
class CacheSnapshot:
    length: int
    layers: list[_LayerSnapshot] = field(default_factory=list)


def snapshot_cache(cache: Any, n_new: int) -> CacheSnapshot:
    """What `rollback_cache` needs to undo the next forward of `n_new` tokens: the lengths, and for ring-buffer
    layers the slots those positions will overwrite (n_new must not exceed any window)."""
    snap = CacheSnapshot(cache.length)
    positions = torch.arange(cache.length, cache.length + n_new, device=cache.layers[0].pos.device)
    for layer in cache.layers:
        if layer.window:
            if n_new > layer.window:
                raise ValueError(f"cannot roll back {n_new} tokens in a sliding window of {layer.window}: "
                                 "draft fewer tokens")
            slots = positions % layer.window
            snap.layers.append(_LayerSnapshot(layer.filled, slots, layer.k[:, :, slots].clone(),
                                              layer.v[:, :, slots].clone(), layer.pos[slots].clone()))
        else:
            snap.layers.append(_LayerSnapshot(layer.filled))
    return snap


def rollback_cache(cache: Any, snap: CacheSnapshot, keep: int) -> None:
    """Keep the first `keep` of the tokens fed since `snap` and forget the rest, as if they were never fed."""
    for layer, s in zip(cache.layers, snap.layers):
        if layer.window:
            rej = s.slots[keep:]
            layer.k[:, :, rej] = s.k[:, :, keep:]
            layer.v[:, :, rej] = s.v[:, :, keep:]
            layer.pos[rej] = s.pos[keep:]
            layer.filled = int((layer.pos >= 0).sum())
        else:
            layer.filled = s.filled + keep
            layer.pos[layer.filled:] = -1
    cache.length = snap.length + keep


# ==== the acceptance rule ==========================================================================================
def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int],
                  generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling over one round. p [n+1, V]: target distributions of the verify rows (row j follows
    the j-th draft's predecessor); q [n, V]: the distributions the drafts were drawn from; drafts: n ids.

    Returns (number of drafts accepted, the next token): the residual draw at the first rejection, or a draw
    from p[n] when all n are accepted. Every token emitted this way is distributed exactly as its p row."""
    n = len(drafts)
    p64, q64 = p.double().cpu(), q.double().cpu()
    for j, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        pd, qd = float(p64[j, d]), float(q64[j, d])
        if qd > 0 and u * qd < pd:  # accept with probability min(1, p/q)
            continue
        resid = (p64[j] - q64[j]).clamp_min(0)
        if float(resid.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0; p itself is right
            resid = p64[j]
        return j, int(torch.multinomial(resid / resid.sum(), 1, generator=generator))
    return n, int(torch.multinomial(p64[n] / p64[n].sum(), 1, generator=generator))


# ==== decoding =====================================================================================================
@dataclass
class DecodeResult:
    tokens: list[int]
    stop_reason: str  # eos | max_tokens
    elapsed_s: float
    rounds: int = 0  # verify forwards (speculative) or decode forwards (plain)
    drafted: int = 0
    accepted: int = 0
    trims: int = 0  # times the context was full and re-started from its most recent part

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _check_model(model: Any) -> None:
    cfg = model.config
    if not getattr(cfg, "mtp_heads", 0):
        raise ValueError("self-speculative decoding needs a model trained with multi-token prediction heads "
                         "(python -m model.train --mtp-heads K); this model has none")
    if getattr(cfg, "context_slots", 0):
        raise ValueError("speculative decoding does not support the context-memory model (its windows roll); "
                         "use plain generation")


@torch.inference_mode()
def plain_generate(model: Any, prompt_ids: Sequence[int], params: SamplingParams,
                   stop_ids: Iterable[int] = (), generator: torch.Generator | None = None) -> DecodeResult:
    """Reference decoder: one token per forward with the KV cache (the same trimming policy as the speculative
    one, so greedy outputs are comparable however long the story)."""
    W = int(model.config.max_context)
    keep = max(1, int(W * TRIM_FRACTION))
    stops = set(stop_ids)
    dev = next(model.parameters()).device
    ids = list(prompt_ids)
    out: list[int] = []
    t0 = time.perf_counter()
    trims = 0
    cache = model.new_cache(1)
    feed = ids if len(ids) < W else ids[-keep:]
    logits = model.last_logits(torch.tensor([feed], device=dev), cache)
    rounds, reason = 1, "max_tokens"
    while len(out) < params.max_new_tokens:
        tok = int(sample_next(logits, torch.tensor([ids], device=dev), params, generator)[0])
        if tok in stops:
            reason = "eos"
            break
        out.append(tok)
        ids.append(tok)
        if len(out) == params.max_new_tokens:
            break
        if cache.length >= W:
            cache = model.new_cache(1)
            trims += 1
            logits = model.last_logits(torch.tensor([ids[-keep:]], device=dev), cache)
        else:
            logits = model.last_logits(torch.tensor([[tok]], device=dev), cache)
        rounds += 1
    return DecodeResult(out, reason, time.perf_counter() - t0, rounds=rounds, trims=trims)


@torch.inference_mode()
def speculative_generate(model: Any, prompt_ids: Sequence[int], params: SamplingParams,
                         stop_ids: Iterable[int] = (), generator: torch.Generator | None = None,
                         num_draft: int | None = None) -> DecodeResult:
    """Self-speculative decoding of one sequence (batch 1) with the model's MTP heads drafting `num_draft`
    tokens per round (default: all heads). Greedy params give exactly plain greedy's tokens."""
    _check_model(model)
    params.validate()
    cfg = model.config
    K = cfg.mtp_heads if num_draft is None else max(0, min(int(num_draft), cfg.mtp_heads))
    windows = [layer_w for layer_w in (cfg.layer_window(i) for i in range(cfg.num_hidden_layers)) if layer_w]
    if windows:
        K = min(K, min(windows) - 1)
    W = int(cfg.max_context)
    keep = max(1, int(W * TRIM_FRACTION))
    stops = set(stop_ids)
    greedy = params.greedy
    dev = next(model.parameters()).device
    ids = list(prompt_ids)
    out: list[int] = []
    res = DecodeResult(out, "max_tokens", 0.0)
    t0 = time.perf_counter()

    def ctx(extra: Sequence[int] = ()) -> torch.Tensor:
        return torch.tensor([ids + list(extra)], device=dev)

    def choose(logits_row: torch.Tensor, extra: Sequence[int] = ()) -> int:
        return int(sample_next(logits_row.unsqueeze(0), ctx(extra), params, generator)[0])

    def draft(h_last: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """Drafts from the heads at the last fed position (after `pending`, which is in `ids` already)."""
        if K == 0:
            return [], None
        head_logits = torch.cat(model.mtp_logits(h_last)[:K], 0)  # [K, V]
        if greedy:
            return [int(t) for t in sample_next(head_logits, ctx(), params, None)], None
        q = torch.softmax(process_logits(head_logits, ctx(), params), -1)
        return [int(t) for t in torch.multinomial(q, 1, generator=generator).view(-1)], q

    def prefill(seq: list[int]) -> tuple[Any, torch.Tensor]:
        c = model.new_cache(1)
        return c, model.hidden_states(torch.tensor([seq], device=dev), c)[:, -1:]

    cache, h_last = prefill(ids if len(ids) < W else ids[-keep:])
    res.rounds = 1
    pending = choose(model.unembed(h_last)[:, -1][0])
    while True:
        if pending in stops:
            res.stop_reason = "eos"
            break
        out.append(pending)
        ids.append(pending)
        if len(out) >= params.max_new_tokens:
            break
        room = W - cache.length
        if room <= 0:  # the context is full: continue from its most recent part (as plain_generate does)
            res.trims += 1
            cache, h_last = prefill(ids[-keep:])
            res.rounds += 1
            pending = choose(model.unembed(h_last)[:, -1][0])
            continue
        # drafts come from the hidden state of the position *before* pending (h_last), offsets 2..K+1
        drafts, q = draft(h_last[:, -1])
        n = min(len(drafts), room - 1, params.max_new_tokens - len(out) - 1)  # + the token after them
        drafts = drafts[:n]
        feed = [pending] + drafts
        snap = snapshot_cache(cache, len(feed))
        h = model.hidden_states(torch.tensor([feed], device=dev), cache)  # [1, 1+n, D]
        rows = model.unembed(h)[0]  # row j: next-token logits after feed[j]
        res.rounds += 1
        res.drafted += n
        if greedy:
            acc = 0
            while acc < n and choose(rows[acc], drafts[:acc]) == drafts[acc]:
                acc += 1
            nxt = choose(rows[acc], drafts[:acc])
        else:
            p = torch.stack([torch.softmax(process_logits(rows[j].unsqueeze(0), ctx(drafts[:j]), params), -1)[0]
                             for j in range(n + 1)])
            acc, nxt = accept_drafts(p, q[:n] if n else p[:0], drafts, generator)
        rollback_cache(cache, snap, 1 + acc)
        res.accepted += acc
        stopped = False
        for d in drafts[:acc]:
            if d in stops:
                res.stop_reason, stopped = "eos", True
                break
            out.append(d)
            ids.append(d)
        if stopped:
            break
        h_last = h[:, acc:acc + 1]
        pending = nxt
    res.elapsed_s = time.perf_counter() - t0
    return res


# ==== CLI ==========================================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.speculative",
                                description="Generate with self-speculative decoding (a model trained with "
                                            "--mtp-heads K) and report the acceptance rate and speed.")
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. runs/NAME/final)")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (identical to plain greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--draft", type=int, default=None, help="drafts per round (default: all heads)")
    p.add_argument("--compare", action="store_true", help="also run plain decoding and print the speed-up")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        model, tok, _ = load_checkpoint(args.model, device=args.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed).validate()
    seed = resolve_seed(params)
    start = [tok.bos_id] if tok.bos_id is not None else []
    prompt = start + tok.encode(args.prompt)
    try:
        spec = speculative_generate(model, prompt, params, tok.stop_ids, make_generator(seed), args.draft)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tok.decode(tok.encode(args.prompt) + spec.tokens))
    print(f"\n[speculative] {len(spec.tokens)} tokens in {spec.elapsed_s:.2f}s ({spec.tokens_per_s:.1f} tok/s), "
          f"{spec.rounds} forwards, acceptance {spec.acceptance_rate:.1%} ({spec.accepted}/{spec.drafted}), "
          f"seed {seed}", file=sys.stderr)
    if args.compare:
        plain = plain_generate(model, prompt, params, tok.stop_ids, make_generator(seed))
        same = "identical output" if plain.tokens == spec.tokens else "different sample (expected when sampling)"
        print(f"[plain] {len(plain.tokens)} tokens in {plain.elapsed_s:.2f}s ({plain.tokens_per_s:.1f} tok/s); "
              f"speed-up {spec.tokens_per_s / max(plain.tokens_per_s, 1e-9):.2f}x; {same}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
