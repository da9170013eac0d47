"""Forward and training-step throughput of our GPT-OSS against transformers' GptOss on the same weights.

    python -m model.benchmark_model [--presets toy small] [--batch 8] [--block 256] [--json out.json]

Prints one table: tokens/s of a forward pass (no grad) and of a training step (forward + backward + AdamW) for
each preset, ours vs transformers (eager attention, fp32), and the ratio. Both run in this process, on the same
threads, on identical weights."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from .config import ModelConfig, format_count, parameter_counts
from .gptoss import Transformer


def _time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def measure(preset: str, batch: int, block: int, iters: int = 3) -> dict:
    from .gptoss_weights import to_transformers

    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, max_context=block)
    ours = Transformer(cfg)
    hf = to_transformers(ours)
    ids = torch.randint(0, cfg.vocab_size, (batch, block))
    ntok = batch * block
    row = {"preset": preset, "params": parameter_counts(cfg)["total"], "batch": batch, "block": block}

    def fwd(model, hf_style):
        with torch.no_grad():
            out = model(ids)
            return out.logits if hf_style else out

    def step_fn(model, hf_style):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            out = model(ids)
            logits = out.logits if hf_style else out
            F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    for name, model, hf_style in (("ours", ours.eval(), False), ("hf", hf.eval(), True)):
        row[f"{name}_forward_tok_s"] = ntok / _time(lambda m=model, h=hf_style: fwd(m, h), 1, iters)
        model.train()
        row[f"{name}_train_tok_s"] = ntok / _time(step_fn(model, hf_style), 1, iters)
    row["forward_ratio"] = row["ours_forward_tok_s"] / row["hf_forward_tok_s"]
    row["train_ratio"] = row["ours_train_tok_s"] / row["hf_train_tok_s"]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["toy", "small"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    rows = [measure(p, args.batch, args.block, args.iters) for p in args.presets]
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}, fp32, batch {args.batch} x {args.block}")
    print("| preset | params | forward ours | forward HF | ratio | train step ours | train step HF | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {format_count(r['params'])} | {r['ours_forward_tok_s']:,.0f} tok/s | "
              f"{r['hf_forward_tok_s']:,.0f} tok/s | {r['forward_ratio']:.2f}x | {r['ours_train_tok_s']:,.0f} tok/s | "
              f"{r['hf_train_tok_s']:,.0f} tok/s | {r['train_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
