"""Training-step throughput: `python -m model.benchmark_train`.

Tokens/s of one full optimizer step (forward, loss + MoE aux loss, backward, clip, AdamW) for each combination
of model size (toy, small), architecture (GPT-OSS vs the GPT-2 of equal total parameters), precision (fp32 vs
bf16 autocast over fp32 weights) and torch.compile on/off, on random token batches (data loading excluded).
Timed after warmup steps (compile warms up there), synchronising the device around the timed loop.

    python -m model.benchmark_train --sizes toy,small --batch-size 16 --block-size 128 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def bench_one(size: str, arch: str, dtype: str, compile_: bool, batch_size: int, block_size: int, steps: int,
              warmup: int, device: str, vocab_size: int = 4096) -> dict[str, Any]:
    import torch

    from .gptoss import build_model
    from .train import TrainConfig, make_optimizer, train_step

    cfg = TrainConfig(model_size=size, arch=arch, block_size=block_size, batch_size=batch_size, lr=1e-3)
    mcfg = cfg.model_config(vocab_size)
    torch.manual_seed(0)
    model = build_model(mcfg).to(device)
    opt = make_optimizer(model, cfg)
    fwd = torch.compile(model) if compile_ else model
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    g = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randint(0, vocab_size, (batch_size, block_size + 1), generator=g).to(device)
        return [(x[:, :-1], x[:, 1:])]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        res = train_step(fwd, opt, batch(), aux_coef=mcfg.aux_loss_coef, autocast_dtype=autocast)
        float(res["loss"])
    sync()
    warm_s = time.perf_counter() - t0
    batches = [batch() for _ in range(steps)]
    sync()
    t0 = time.perf_counter()
    for b in batches:
        res = train_step(fwd, opt, b, aux_coef=mcfg.aux_loss_coef, autocast_dtype=autocast)
        float(res["loss"])  # the trainer reads the loss every step; so does the benchmark
    sync()
    dt = time.perf_counter() - t0
    counts = model.num_parameters()
    return {"size": size, "arch": arch, "dtype": dtype, "compile": compile_,
            "params_total_M": counts["total"] / 1e6, "params_active_M": counts["active"] / 1e6,
            "tokens_per_s": steps * batch_size * block_size / dt, "ms_per_step": 1000 * dt / steps,
            "warmup_s": warm_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.benchmark_train", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="toy,small")
    p.add_argument("--archs", default="gptoss,gpt2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compile", default="off,on", help="off, on, or off,on")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16)
    p.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    hw = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"# train-step throughput on {hw}, torch {torch.__version__}, batch {args.batch_size} x block "
          f"{args.block_size}, {args.steps} timed steps after {args.warmup} warmup\n")
    print("| size | arch | params total/active | dtype | compile | tokens/s | ms/step | warmup s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for arch in args.archs.split(","):
            for dtype in args.dtypes.split(","):
                for comp in args.compile.split(","):
                    try:
                        r = bench_one(size, arch, dtype, comp == "on", args.batch_size, args.block_size,
                                      args.steps, args.warmup, device)
                    except Exception as e:  # e.g. no compiler for torch.compile: report and go on
                        print(f"| {size} | {arch} | | {dtype} | {comp} | failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:80]} | | |", flush=True)
                        continue
                    print(f"| {size} | {arch} | {r['params_total_M']:.2f}M/{r['params_active_M']:.2f}M | {dtype} "
                          f"| {comp} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['warmup_s']:.1f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
