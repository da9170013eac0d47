"""CPU benchmark of gpt-oss-20b inference with packed MXFP4 experts, on a random checkpoint of the exact layout.

    python -m model.benchmark_gptoss --dir /tmp/gptoss20b-random [--budgets 0 2 6] [--tokens 16] [--json out.json]
    python -m model.benchmark_gptoss --small            # 4-layer variant, a quick check

Writes (once) a random checkpoint with gpt-oss-20b's published tensor names, shapes and dtypes in the original
layout (MXFP4 experts; ~13 GB; never inside the repository), then for every expert-cache budget starts a fresh
Python process (so peak RSS belongs to one configuration) that loads it, prefills a prompt and decodes greedily.
Reports load time, peak RSS, prefill and decode tokens/s, expert-cache hit rate, and decode speed as a fraction
of the memory-bandwidth bound (bytes a decoded token must read / bandwidth).

Random weights route uniformly at random, so the LRU cache sees no locality: its hit rates here are the
pessimistic case (real text routes with strong locality). With the native MXFP4 kernel, decode steps read the
packed bytes directly and do not use the cache at all; `--torch-baseline` adds a run of the pure-torch path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COMPLETE_MARKER = ".benchmark-complete"
DEFAULT_BANDWIDTH_GBS = 18.0  # measured STREAM-like read bandwidth of the 2-core benchmark machine (issue 5)
GiB = 1 << 30

ROUTING_NOTE = ("random weights route uniformly at random (no locality): expert-cache hit rates are the "
                "pessimistic case")


def gpt_oss_20b_config(layers: int | None = None) -> dict[str, Any]:
    """gpt-oss-20b's original/config.json (optionally with fewer layers for --small)."""
    return {
        "num_hidden_layers": layers or 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
        "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
        "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
        "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0,
    }


def bytes_per_decoded_token(cfg: dict[str, Any]) -> int:
    """Bytes one decode step must read: attention and router weights (bf16), the K routed experts' packed
    bytes and biases, the unembedding (bf16), per layer norms; the embedding row is negligible."""
    D, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hkv, hd, E, K = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                         cfg["num_experts"], cfg["experts_per_token"])
    qkv = (hq + 2 * hkv) * hd
    attn = 2 * (qkv * D + qkv + D * hq * hd + D + hq + D)
    router = 2 * (E * D + E + D)
    expert_weights = 3 * D * I  # mlp1 (2I x D) + mlp2 (D x I)
    expert = expert_weights // 2 + expert_weights // 32 + 2 * (2 * I + D)  # FP4 codes + scales + bf16 biases
    return L * (attn + router + K * expert) + 2 * cfg["vocab_size"] * D


def _dir_bytes(path: Path) -> int:
    """Bytes actually written (allocated blocks: the writer pre-sizes its file, so st_size says nothing)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def ensure_checkpoint(directory: Path, cfg: dict[str, Any], seed: int = 0) -> Path:
    """Write the random checkpoint unless a complete one is there; prints progress. Returns the directory."""
    from .hub import write_random_gpt_oss_checkpoint

    directory = directory.resolve()
    if directory == REPO or REPO in directory.parents:
        raise SystemExit(f"refusing to write a ~13 GB checkpoint inside the repository ({directory}); "
                         "pass --dir somewhere else, e.g. /tmp/gptoss20b-random")
    marker = directory / COMPLETE_MARKER
    if marker.exists() and json.loads(marker.read_text()).get("config") == cfg:
        return directory
    total = bytes_per_checkpoint(cfg)
    import shutil

    free = shutil.disk_usage(directory.parent if not directory.exists() else directory).free
    if free < total * 1.05:
        raise SystemExit(f"not enough disk space for the random checkpoint: needs {total / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free at {directory}")
    print(f"writing a random checkpoint ({total / 1e9:.1f} GB, experts as random MXFP4 codes) to {directory} ...",
          flush=True)
    done = threading.Event()

    def progress() -> None:
        while not done.wait(10):
            if directory.exists():
                print(f"  ... {_dir_bytes(directory) / 1e9:.1f} / {total / 1e9:.1f} GB", flush=True)

    t0 = time.perf_counter()
    reporter = threading.Thread(target=progress, daemon=True)
    reporter.start()
    try:
        write_random_gpt_oss_checkpoint(directory, cfg, "original", seed=seed, experts="random")
    finally:
        done.set()
    marker.write_text(json.dumps({"config": cfg, "seconds": time.perf_counter() - t0}))
    print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    return directory


def bytes_per_checkpoint(cfg: dict[str, Any]) -> int:
    import math

    from .hub import DTYPE_SIZES, expected_tensors

    return sum(math.prod(s.shape) * DTYPE_SIZES[s.dtype] for s in expected_tensors(cfg, "original").values())


# ---- one configuration, in its own process ---------------------------------------------------------------------
def run_worker(directory: Path, budget_gb: float, prompt_tokens: int, decode_tokens: int, seed: int = 0) -> dict:
    import resource

    import psutil
    import torch

    from .gptoss_weights import load_gpt_oss
    from .kernels import mxfp4_kernel

    torch.manual_seed(seed)
    kernel = mxfp4_kernel()
    t0 = time.perf_counter()
    model = load_gpt_oss(directory, "original", experts="packed", expert_cache_bytes=int(budget_gb * GiB))
    load_s = time.perf_counter() - t0
    rss_after_load = psutil.Process().memory_info().rss
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), generator=g)
    cache = model.expert_cache
    with torch.inference_mode():
        kv = model.new_cache(1)
        t0 = time.perf_counter()
        logits = model(prompt, kv)
        prefill_s = time.perf_counter() - t0
        prefill_stats = dict(cache.stats())
        times = []
        for _ in range(decode_tokens):
            nxt = logits[:, -1].float().argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            logits = model(nxt, kv)
            times.append(time.perf_counter() - t0)
    stats = cache.stats()
    dec_hits = stats["hits"] - prefill_stats["hits"]
    dec_misses = stats["misses"] - prefill_stats["misses"]
    dec_kernel = stats["kernel_calls"] - prefill_stats["kernel_calls"]
    steady = times[1:] if len(times) > 2 else times  # the first step also pays page faults of new experts
    return {
        "budget_gb": budget_gb, "kernel": kernel is not None, "threads": torch.get_num_threads(),
        "load_s": load_s, "rss_after_load_gib": rss_after_load / GiB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "prompt_tokens": prompt_tokens, "prefill_s": prefill_s, "prefill_tok_s": prompt_tokens / prefill_s,
        "decode_tokens": decode_tokens, "decode_tok_s": len(steady) / sum(steady),
        "decode_tok_s_all": decode_tokens / sum(times),
        "decode_cache_hit_rate": dec_hits / max(1, dec_hits + dec_misses + dec_kernel),
        "prefill_cache_hit_rate": prefill_stats["hits"] / max(1, prefill_stats["hits"] + prefill_stats["misses"]),
        "cache": stats,
    }


def _run_config(args: argparse.Namespace, budget: float, kernel: bool, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "model.benchmark_gptoss", "--worker", "--dir", str(args.dir), "--budget",
           str(budget), "--tokens", str(tokens), "--prompt-tokens", str(args.prompt_tokens)]
    env = dict(os.environ, STORYFORGE_MXFP4_KERNEL="1" if kernel else "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
    if proc.returncode != 0:
        return {"budget_gb": budget, "kernel": kernel, "error": (proc.stderr or proc.stdout).strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict], bound_tok_s: float) -> str:
    head = ("| path | cache budget GiB | load s | peak RSS GiB | prefill tok/s | decode tok/s | of bound | "
            "decode cache hits | prefill cache hits |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        path = "MXFP4 kernel" if r.get("kernel") else "pure torch"
        if "error" in r:
            lines.append(f"| {path} | {r['budget_gb']:g} | error: {r['error'].splitlines()[-1][:80]} |||||||")
            continue
        lines.append(
            f"| {path} | {r['budget_gb']:g} | {r['load_s']:.1f} | {r['peak_rss_gib']:.1f} | "
            f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {100 * r['decode_tok_s'] / bound_tok_s:.0f}% | "
            f"{100 * r['decode_cache_hit_rate']:.0f}% | {100 * r['prefill_cache_hit_rate']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.benchmark_gptoss", description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=None, help="checkpoint directory (default /tmp/gptoss20b-random, "
                   "or /tmp/gptoss20b-random-small with --small)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0, 2, 6], help="expert cache budgets in GiB")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per configuration")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--small", action="store_true", help="4 layers instead of 24 (a quick check)")
    p.add_argument("--torch-baseline", action="store_true",
                   help="also run the pure-torch expert path (kernel disabled) at the first budget, 4 tokens")
    p.add_argument("--bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dir is None:
        args.dir = Path("/tmp/gptoss20b-random-small" if args.small else "/tmp/gptoss20b-random")
    if args.worker:
        print(json.dumps(run_worker(args.dir, args.budget, args.prompt_tokens, args.tokens)))
        return

    cfg = gpt_oss_20b_config(4 if args.small else None)
    ensure_checkpoint(args.dir, cfg)
    per_token = bytes_per_decoded_token(cfg)
    bound = args.bandwidth_gbs * 1e9 / per_token
    print(f"bandwidth bound: {per_token / 1e9:.2f} GB read per decoded token at {args.bandwidth_gbs:g} GB/s "
          f"= {bound:.1f} tokens/s", flush=True)
    rows = []
    runs = [(budget, True, args.tokens) for budget in args.budgets]
    if args.torch_baseline:
        runs.append((args.budgets[0], False, min(args.tokens, 4)))
    for budget, kernel, tokens in runs:
        print(f"running: {'kernel' if kernel else 'pure torch'}, cache budget {budget:g} GiB ...", flush=True)
        rows.append(_run_config(args, budget, kernel, tokens))
        print("  " + json.dumps(rows[-1]), flush=True)  # each result as soon as it exists
    layers = cfg["num_hidden_layers"]
    print(f"\ngpt-oss-20b{' (4 layers)' if args.small else ''}, {layers} layers, random weights, "
          f"prompt {args.prompt_tokens} tokens, {args.tokens} decoded tokens, {os.cpu_count()} CPUs; {ROUTING_NOTE}.")
    print(markdown_table(rows, bound))
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "bytes_per_decoded_token": per_token,
                                         "bandwidth_gbs": args.bandwidth_gbs, "bound_tok_s": bound,
                                         "note": ROUTING_NOTE, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
