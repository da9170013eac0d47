"""Decode speed: our KV-cached generation against recomputing the whole sequence each step (the seeds' way)
and against transformers' `GptOssForCausalLM.generate()` on the same weights, in one run.

    python -m model.benchmark_decode [--preset small] [--json out.json] [--exact-recompute]

Setup (the issue's): random-init model of the preset, batch 1, a 32-token prompt, 256 new tokens, greedy, no
stop token. Reported:

* cached decode tokens/s (tokens after the first / time after the first) and time to first token (prefill +
  first sample), through `Generator.stream_tokens`, i.e. with all per-token Python overhead included;
* full recompute: one forward over the whole sequence per new token. Timed at several context lengths and
  integrated over the 32 -> 288 run (`--exact-recompute` runs all 256 steps instead), and at 512 tokens of
  context against cached decoding at 448..511;
* transformers `generate(do_sample=False)` (eager attention, its DynamicCache), same weights converted to its
  layout (`gptoss_weights.to_transformers`), with its greedy tokens checked against ours.

Random weights use a larger init scale than training's so greedy tokens are decided by clear margins (the
check compares two float32 implementations); speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .config import ModelConfig

PROMPT_TOKENS = 32
NEW_TOKENS = 256
LONG_CONTEXT = 512


def build_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' GptOssForCausalLM holding our model's weights (fp32, eager attention), via the converter in
    `model/gptoss_weights.py` (fused qkv split into q/k/v, experts transposed to HF's [E, in, out], ...)."""
    from .gptoss_weights import to_transformers

    hf = to_transformers(model).float().eval()
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None  # no stop token: always 256 new tokens, as ours
    return hf


# ---- the model under test ----------------------------------------------------------------------------------------
def random_model(preset: str, seed: int = 0) -> torch.nn.Module:
    """A random-init model of `preset`, weights spread enough that greedy choices have clear margins."""
    from .gptoss import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset)
    model = build_model(cfg.replace(init_std=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, 0.5)
    return model


@torch.inference_mode()
def recompute_step_time(model: torch.nn.Module, context: int, reps: int = 2) -> float:
    """Seconds for one new token the seeds' way: a forward over all `context` tokens, no cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    model(ids)  # warm-up at this length
    t = time.perf_counter()
    for _ in range(reps):
        model(ids)[:, -1].argmax(-1)
    return (time.perf_counter() - t) / reps


@torch.inference_mode()
def recompute_greedy(model: torch.nn.Module, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy tokens the seeds' way (whole sequence each step)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def cached_run(gen: Any, prompt: Sequence[int], n: int) -> Any:
    from .sampling import SamplingParams

    stream = gen.stream_tokens(list(prompt), SamplingParams(temperature=0.0, max_new_tokens=n), stop_ids=())
    for _ in stream:
        pass
    return stream.result


def hf_generate(hf: torch.nn.Module, prompt: Sequence[int], n: int) -> tuple[list[int], float]:
    ids = torch.tensor([list(prompt)])
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, temperature=None, top_k=None, top_p=None, num_beams=1)
    return out[0, len(prompt):].tolist(), time.perf_counter() - t


def run(preset: str = "small", exact_recompute: bool = False, skip_hf: bool = False,
        repeats: int = 3) -> dict[str, Any]:
    from .generation import Generator

    model = random_model(preset)
    cfg = model.config
    gen = Generator(model, tokenizer=None)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
    res: dict[str, Any] = {
        "preset": preset, "params": model.num_parameters(), "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS, "batch": 1, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
    }

    # Ours, KV cache, and transformers: warm-up, then timed runs taken in turns (so a busy machine slows both
    # alike); the best run of each counts.
    hf = None if skip_hf else build_hf_model(model)
    cached_run(gen, prompt, 16)
    if hf is not None:
        hf_generate(hf, prompt, 8)
    runs, hf_runs, hf_first = [], [], []
    for _ in range(repeats):
        runs.append(cached_run(gen, prompt, NEW_TOKENS))
        if hf is not None:
            hf_first.append(hf_generate(hf, prompt, 1)[1])
            hf_runs.append(hf_generate(hf, prompt, NEW_TOKENS))
    best = max(runs, key=lambda r: r.tokens_per_s)
    ours_tokens = best.token_ids
    res["cached"] = {"tokens_per_s": best.tokens_per_s, "ttft_s": min(r.time_to_first_token_s for r in runs),
                     "elapsed_s": best.elapsed_s, "runs_tokens_per_s": [r.tokens_per_s for r in runs]}
    if hf is not None:
        t1 = min(hf_first)
        hf_tokens, tn = min(hf_runs, key=lambda r: r[1])
        agree = next((i for i, (a, b) in enumerate(zip(hf_tokens, ours_tokens)) if a != b), len(ours_tokens))
        res["hf"] = {"tokens_per_s": (NEW_TOKENS - 1) / (tn - t1), "ttft_s": t1, "elapsed_s": tn,
                     "greedy_tokens_equal_ours": agree, "transformers": _transformers_version(),
                     "runs_elapsed_s": [r[1] for r in hf_runs]}

    # Seeds' way: recompute the whole sequence per token.
    check = recompute_greedy(model, prompt, 8)
    res["recompute_matches_cached_first_8"] = check == ours_tokens[:8]
    end = PROMPT_TOKENS + NEW_TOKENS
    if exact_recompute:
        t = time.perf_counter()
        recompute_greedy(model, prompt, NEW_TOKENS)
        total = time.perf_counter() - t
        how = "measured, all steps"
    else:
        points = [PROMPT_TOKENS, 96, 160, 224, end]
        times = [recompute_step_time(model, L) for L in points]
        # per-step time is piecewise linear in the context: integrate over the run's contexts 32 .. 287
        total = 0.0
        for L in range(PROMPT_TOKENS, end):
            j = max(i for i in range(len(points) - 1) if points[i] <= L)
            f = (L - points[j]) / (points[j + 1] - points[j])
            total += times[j] + f * (times[j + 1] - times[j])
        how = f"timed at contexts {points}, integrated"
    res["recompute"] = {"tokens_per_s": NEW_TOKENS / total, "how": how}

    # At 512 tokens of context: recompute over 511 tokens vs cached decode at contexts 448..511.
    long_prompt = torch.randint(0, cfg.vocab_size, (LONG_CONTEXT - 64,), generator=g).tolist()
    cached_run(gen, long_prompt, 4)
    long_cached = cached_run(gen, long_prompt, 63)
    res["at_512"] = {"cached_tokens_per_s": long_cached.tokens_per_s,
                     "recompute_tokens_per_s": 1.0 / recompute_step_time(model, LONG_CONTEXT - 1, reps=3)}

    return res


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def format_table(r: dict[str, Any]) -> str:
    c, rc, l5 = r["cached"], r["recompute"], r["at_512"]
    lines = [
        f"decode benchmark: preset {r['preset']} ({r['params']['total'] / 1e6:.1f}M total, "
        f"{r['params']['active'] / 1e6:.1f}M active), prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, "
        f"batch 1, greedy, torch {r['torch']}, {r['threads']} threads",
        "",
        "| method | decode tok/s | time to first token | ours (KV cache) is faster by |",
        "|---|---|---|---|",
        f"| ours, KV cache (Generator.stream_tokens) | {c['tokens_per_s']:.1f} | {c['ttft_s'] * 1000:.1f} ms | - |",
        f"| full recompute each step, context 32->288 | {rc['tokens_per_s']:.1f} | - | "
        f"{c['tokens_per_s'] / rc['tokens_per_s']:.1f}x |",
        f"| ours, KV cache, context 448->511 | {l5['cached_tokens_per_s']:.1f} | - | - |",
        f"| full recompute each step, context 511 | {l5['recompute_tokens_per_s']:.2f} | - | "
        f"{l5['cached_tokens_per_s'] / l5['recompute_tokens_per_s']:.1f}x (at 512 tokens of context) |",
    ]
    if "hf" in r:
        h = r["hf"]
        lines.append(f"| transformers {h['transformers']} generate() (eager, DynamicCache) | {h['tokens_per_s']:.1f} | "
                     f"{h['ttft_s'] * 1000:.1f} ms | {c['tokens_per_s'] / h['tokens_per_s']:.2f}x |")
    lines.append("")
    lines.append(f"recompute: {rc['how']}; its first 8 greedy tokens equal the cached ones: "
                 f"{r['recompute_matches_cached_first_8']}")
    if "hf" in r:
        lines.append(f"sanity: transformers' greedy tokens equal ours for the first "
                     f"{r['hf']['greedy_tokens_equal_ours']} of {r['new_tokens']}")
        lines.append(f"ours / transformers decode speed ratio: {c['tokens_per_s'] / r['hf']['tokens_per_s']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.benchmark_decode", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--exact-recompute", action="store_true", help="run all 256 recompute steps (slow)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers comparison")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each generator (best counts)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1; 0 = torch's default). Batch-1 decode at these sizes "
                        "is latency-bound, and on a busy shared machine two OpenMP threads can be many times "
                        "slower than one")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    r = run(args.preset, exact_recompute=args.exact_recompute, skip_hf=args.skip_hf, repeats=args.repeats)
    r["benchmark_wall_s"] = time.perf_counter() - t
    print(format_table(r))
    print(f"(benchmark took {r['benchmark_wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
