"""Measure the extras of issue 9 on TinyStories and print the tables: `python -m model.benchmark_extras`.

1. Multi-token prediction: next-token validation loss of a model trained with K extra heads vs the plain model
   (same data, same steps; the heads' extra compute is reported as measured time per step, and a plain model
   given the same wall time is included), then self-speculative vs plain decoding (acceptance rate, tokens/s,
   greedy outputs identical).
2. Context memory: loss per chunk index on validation stories longer than the block size, for the context model
   with the memory carried vs reset, against plain models of the same size and token budget (trained on random
   windows, as the default trainer does, and on the same document-ordered chunks).

Tiny budget by default (minutes on 2 CPU cores): results are indicative, not conclusive; see --steps etc.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = "/work/shared/data/tinystories"


def _corpus(data_dir: Path, work: Path, n_train: int) -> tuple[Path, Path]:
    """The first n_train training stories (a subset: the tokenizer and cache build in seconds)."""
    from .data import iter_documents

    work.mkdir(parents=True, exist_ok=True)
    sub = work / f"train-{n_train}.txt"
    if not sub.exists():
        docs = []
        for d in iter_documents(data_dir / "train.txt"):
            docs.append(d)
            if len(docs) >= n_train:
                break
        sub.write_text("\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n")
    return sub, data_dir / "valid.txt"


def _model_cfg(vocab: int, block: int, **extra: Any):
    from .config import ModelConfig

    return ModelConfig(vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=24, num_experts=4, experts_per_token=2, intermediate_size=96,
                       sliding_window=32, max_context=block, **extra)


def _train(cfg_model, batches_fn, steps: int, lr: float, seed: int, loss_fn_factory=None) -> tuple[Any, float]:
    """Train from a fixed seed; returns (model, seconds per step)."""
    import torch

    from . import train as T
    from .gptoss import build_model

    torch.manual_seed(seed)
    model = build_model(cfg_model)
    tc = T.TrainConfig(lr=lr, min_lr=lr / 10, warmup_iters=max(1, steps // 20), max_iters=steps)
    opt, sched = T.make_optimizer(model, tc), None
    sched = T.make_scheduler(opt, tc)
    loss_fn = loss_fn_factory(model) if loss_fn_factory else None
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        T.train_step(model, opt, batches_fn(), aux_coef=cfg_model.aux_loss_coef, grad_clip=1.0, scheduler=sched,
                     loss_fn=loss_fn)
    return model.eval(), (time.perf_counter() - t0) / steps


def _val_loss(model, val_tokens, block: int, n_batches: int) -> float:
    import torch
    import torch.nn.functional as F

    from .data import eval_batches

    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(val_tokens, 16, block, max_batches=n_batches):
            logits = model(x)
            tot += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                         reduction="sum"))
            n += y.numel()
    return tot / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.benchmark_extras", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="folder with train.txt and valid.txt")
    p.add_argument("--work", default="/tmp/storyforge-bench-extras", help="tokenizer/cache folder")
    p.add_argument("--stories", type=int, default=3000, help="training stories used")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="sequences of --block tokens per step")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mtp-heads", type=int, default=3)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--context-slots", type=int, default=4)
    p.add_argument("--eval-stories", type=int, default=200)
    p.add_argument("--decode-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for these tiny models on shared cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["mtp", "context"], default=None)
    args = p.parse_args(argv)

    import torch

    from . import data
    from .extras import ExtrasLoss, chunk_losses, next_context_batch
    from .sampling import SamplingParams, make_generator
    from .speculative import plain_generate, speculative_generate
    from .tokenizer import load_tokenizer, train_sentencepiece

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train_txt, valid_txt = _corpus(Path(args.data), work, args.stories)
    tok_dir = work / f"tok-{args.vocab}-{args.stories}"
    if not (tok_dir / "tokenizer.model").exists():
        train_sentencepiece(train_txt, tok_dir, vocab_size=args.vocab)
    tok = load_tokenizer(tok_dir)
    train_cache = data.TokenCache.open(data.build_token_cache(train_txt, tok, work / "cache", progress=False))
    val_docs = []
    for d in data.iter_documents(valid_txt):
        val_docs.append(([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(d) +
                        ([tok.eos_id] if tok.eos_id is not None else []))
        if len(val_docs) >= args.eval_stories:
            break
    val_flat = torch.tensor([t for d in val_docs for t in d])
    B, T, S = args.batch, args.block, args.steps
    gen = torch.Generator().manual_seed(args.seed)
    print(f"# data: {len(train_cache):,} training tokens ({train_cache.num_documents} stories), "
          f"{len(val_flat):,} validation tokens ({len(val_docs)} stories); vocab {tok.vocab_size}; "
          f"block {T}; batch {B}; {S} steps ({B * T * S:,} tokens); torch threads {args.threads}", flush=True)

    def random_batches():
        return [data.random_batches(train_cache, B, T, gen)]

    base = _model_cfg(tok.vocab_size, T)
    from .gptoss import build_model

    n_plain = build_model(base).num_parameters()
    print(f"# model: gptoss {n_plain['total'] / 1e6:.2f}M params ({n_plain['active'] / 1e6:.2f}M active)\n",
          flush=True)

    plain = None
    if args.only in (None, "mtp"):
        t0 = time.time()
        plain, t_plain = _train(base, random_batches, S, args.lr, args.seed)
        gen.manual_seed(args.seed)  # the same batches for the MTP run
        mcfg = base.replace(mtp_heads=args.mtp_heads, mtp_loss_weight=args.mtp_weight)
        mtp, t_mtp = _train(mcfg, random_batches, S, args.lr, args.seed,
                            lambda m: ExtrasLoss(m, args.mtp_weight))
        gen.manual_seed(args.seed)
        s_eq = max(S, round(S * t_mtp / t_plain))
        plain_eq, _ = _train(base, random_batches, s_eq, args.lr, args.seed) if s_eq > S else (plain, t_plain)
        vl = {name: _val_loss(m, val_flat, T, 40) for name, m in
              (("plain", plain), ("mtp", mtp), ("plain_eq", plain_eq))}
        with torch.no_grad():  # the extra heads' own validation loss
            from .extras import mtp_losses

            x, y = next(data.eval_batches(val_flat, 16, T, max_batches=1))
            head_losses = [float(v) for v in mtp_losses(mtp, mtp.hidden_states(x), y)]
        extra_params = mtp.num_parameters()["mtp"]
        print("## Multi-token prediction: next-token validation loss (same data order, same steps)\n")
        print("| model | steps | s/step (measured) | next-token val loss |")
        print("|---|---|---|---|")
        print(f"| plain | {S} | {t_plain:.3f} | {vl['plain']:.4f} |")
        print(f"| + {args.mtp_heads} MTP heads (weight {args.mtp_weight}, +{extra_params / 1e3:.0f}K params) | "
              f"{S} | {t_mtp:.3f} | {vl['mtp']:.4f} |")
        if s_eq > S:
            print(f"| plain, same wall time as MTP | {s_eq} | {t_plain:.3f} | {vl['plain_eq']:.4f} |")
        print(f"\nextra heads' validation loss (t+2, t+3, ...): {', '.join(f'{v:.3f}' for v in head_losses)}\n",
              flush=True)

        prompts = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog"]
        start = [tok.bos_id] if tok.bos_id is not None else []
        rows = []
        for label, params in (("greedy", SamplingParams(temperature=0.0, max_new_tokens=args.decode_tokens)),
                              ("T=0.8", SamplingParams(temperature=0.8, max_new_tokens=args.decode_tokens))):
            for K in range(1, args.mtp_heads + 1):
                tp, ts, acc, same, n_tok, n_fwd = [], [], [], 0, 0, 0
                for i, pr in enumerate(prompts):
                    ids = start + tok.encode(pr)
                    a = plain_generate(mtp, ids, params, (), make_generator(i))
                    b = speculative_generate(mtp, ids, params, (), make_generator(i), num_draft=K)
                    tp.append(a.tokens_per_s)
                    ts.append(b.tokens_per_s)
                    acc.append((b.accepted, b.drafted))
                    same += a.tokens == b.tokens
                    n_tok += len(b.tokens)
                    n_fwd += b.rounds
                rate = sum(a for a, _ in acc) / max(1, sum(d for _, d in acc))
                rows.append((label, K, rate, n_tok / n_fwd, statistics.mean(tp), statistics.mean(ts), same))
        print("## Self-speculative decoding with the MTP heads (batch 1, CPU, KV cache)\n")
        print("| decoding | drafts/round | acceptance | tokens/forward | plain tok/s | speculative tok/s | "
              "speed-up | identical to plain |")
        print("|---|---|---|---|---|---|---|---|")
        for label, K, rate, tpf, a, b, same in rows:
            ident = f"{same}/{len(prompts)}" if label == "greedy" else "n/a (sampled)"
            print(f"| {label} | {K} | {rate:.1%} | {tpf:.2f} | {a:.0f} | {b:.0f} | {b / a:.2f}x | {ident} |")
        print(f"\n({time.time() - t0:.0f}s)\n", flush=True)

    if args.only in (None, "context"):
        t0 = time.time()
        U = 2  # chunks per sequence with the gradient through the memory
        docs_gen = data.document_chunks(train_cache, B // U, T, seed=args.seed, loop=True)

        def doc_batches_ctx():
            return [next_context_batch(docs_gen, U)]

        ccfg = base.replace(context_slots=args.context_slots)
        ctx_model, t_ctx = _train(ccfg, doc_batches_ctx, S, args.lr, args.seed, lambda m: ExtrasLoss(m))
        docs_gen2 = data.document_chunks(train_cache, B // U, T, seed=args.seed, loop=True)

        def doc_batches_plain():
            cb = next_context_batch(docs_gen2, U)
            return [(cb.x.reshape(-1, T), cb.y.reshape(-1, T))]

        plain_doc, t_pd = _train(base, doc_batches_plain, S, args.lr, args.seed)
        if plain is not None:  # the MTP section's plain model: same seed, same random batches
            plain_rand, t_pr = plain, t_plain
        else:
            gen.manual_seed(args.seed)
            plain_rand, t_pr = _train(base, random_batches, S, args.lr, args.seed)
        long_docs = [d for d in val_docs if len(d) > T + 1]
        n_chunks = 4
        res = {
            "context model, memory carried": chunk_losses(ctx_model, long_docs, T, True, n_chunks),
            "context model, memory reset each chunk": chunk_losses(ctx_model, long_docs, T, False, n_chunks),
            "plain, document-ordered chunks": chunk_losses(plain_doc, long_docs, T, False, n_chunks),
            "plain, random windows (default trainer)": chunk_losses(plain_rand, long_docs, T, False, n_chunks),
        }
        print(f"## Context memory ({args.context_slots} slots): loss per chunk of {T} tokens on "
              f"{len(long_docs)} validation stories longer than the block\n")
        counts = [n for _, n in res["plain, random windows (default trainer)"]]
        hdr = " | ".join(f"chunk {c + 1} ({counts[c]} tok)" for c in range(n_chunks) if counts[c])
        print(f"| model | s/step | {hdr} | chunks 2+ |")
        print("|---|---|" + "---|" * (sum(1 for c in counts if c) + 1))
        for (name, r), ts in zip(res.items(), (t_ctx, t_ctx, t_pd, t_pr)):
            cells = " | ".join(f"{s / n:.4f}" for s, n in r if n)
            later = sum(s for s, _ in r[1:]) / max(1, sum(n for _, n in r[1:]))
            print(f"| {name} | {ts:.3f} | {cells} | {later:.4f} |")
        print(f"\nSame size (+{ctx_model.num_parameters()['context'] / 1e3:.1f}K memory params), same steps and "
              f"tokens per step ({B} x {T}); the context model runs {T + 2 * args.context_slots} positions per "
              f"chunk. ({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
