"""GPT-OSS vs GPT-2 at equal size, measured: `python -m model.benchmark_compare`.

The claim under test: GPT-OSS's architecture (MoE, GQA, RoPE/YaRN, sliding windows, sinks) beats GPT-2's at the
same parameter count. For every size, three models are trained with the same tokenizer, data, token budget,
learning-rate schedule and seeds:

    gptoss       the GPT-OSS preset (MoE)
    gpt2         GPT-2 whose dense MLP width makes its total parameters equal GPT-OSS's total
    gpt2-active  GPT-2 matched instead on GPT-OSS's active parameters per token

Each training runs as its own `python -m model.train` subprocess (one thread, one at a time), so its peak resident
memory is that process's own (os.wait4). Each finished model is then probed by another subprocess that loads
final/, decodes 128 tokens greedily at batch 1 (decode tokens/s, peak inference memory) and scores test.txt
(loss, bits per byte). The script writes docs/results.md (setup, table, conclusion, caveats, the command) and the
loss curves (docs/results/loss_curves.html with plotly, loss_curves.svg written by hand: no extra dependencies).

    python -m model.benchmark_compare                       # the study (about 45 minutes on 1 CPU thread)
    python -m model.benchmark_compare --quick --data DIR --out /tmp/cmp --results /tmp/cmp/results.md

Runs whose final/ checkpoint exists are not trained again, and their measurements are kept (<run>/bench.json),
so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARCH_LABELS = ("gptoss", "gpt2", "gpt2-active")
ARCH_TITLES = {"gptoss": "GPT-OSS (MoE)", "gpt2": "GPT-2, equal total", "gpt2-active": "GPT-2, equal active"}
# Model sizes of the study: a ModelConfig preset plus shape overrides.
SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "toy": ("toy", {}),
    "micro": ("toy", {"hidden_size": 64, "head_dim": 16}),
}
# The ModelConfig fields a cell fixes explicitly (the trainer's own GPT-2 matching knows only the presets and
# total-parameter matching, so every shape field is handed over as --model_overrides).
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "num_experts", "experts_per_token", "intermediate_size", "sliding_window", "tie_word_embeddings")
PROMPT = ""  # decode from BOS alone: BOS + 127 of the 128 new tokens are fed, filling a 128-token context


@dataclass(frozen=True)
class Settings:
    """One study's knobs (the same for every cell)."""

    sizes: tuple[str, ...] = ("toy", "micro")
    seeds: tuple[int, ...] = (1, 2)
    max_iters: int = 300
    batch_size: int = 16
    block_size: int = 128
    lr: float = 2e-3
    warmup_iters: int = 30
    eval_interval: int = 50
    eval_batches: int = 10
    vocab_size: int = 4096
    data: str = "tinystories"
    cache_dir: str | None = None
    decode_tokens: int = 128
    decode_repeats: int = 5
    test_docs: int | None = None

    @property
    def tokens_per_run(self) -> int:
        return self.max_iters * self.batch_size * self.block_size


def cell_model_config(size: str, arch: str, vocab_size: int, block_size: int):
    """The exact ModelConfig a cell trains: the GPT-OSS size, or the GPT-2 matched on total/active parameters."""
    from .config import ModelConfig, gpt2_matched

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose from {sorted(SIZES)}")
    if arch not in ARCH_LABELS:
        raise ValueError(f"unknown arch {arch!r}: choose from {ARCH_LABELS}")
    preset, over = SIZES[size]
    base = ModelConfig.preset(preset, vocab_size=vocab_size, max_context=block_size, **over)
    if arch == "gptoss":
        return base
    return gpt2_matched(base, match="active" if arch == "gpt2-active" else "total")


def train_command(size: str, arch: str, seed: int, s: Settings, run_dir: Path) -> list[str]:
    """The `python -m model.train` command line of one cell."""
    cfg = cell_model_config(size, arch, s.vocab_size, s.block_size)
    overrides = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    cmd = [sys.executable, "-m", "model.train", "--preset", "fast", "--model_size", SIZES[size][0],
           "--arch", "gptoss" if arch == "gptoss" else "gpt2", "--model_overrides", json.dumps(overrides),
           "--data", s.data, "--vocab_size", str(s.vocab_size), "--max_iters", str(s.max_iters),
           "--batch_size", str(s.batch_size), "--block_size", str(s.block_size), "--lr", str(s.lr),
           "--warmup_iters", str(s.warmup_iters), "--eval_interval", str(s.eval_interval),
           "--eval_batches", str(s.eval_batches), "--log_interval", str(max(1, min(10, s.max_iters // 5))),
           "--sample_interval", "0", "--seed", str(seed), "--device", "cpu", "--dtype", "float32",
           "--out", str(run_dir), "--no-progress"]
    if s.cache_dir:
        cmd += ["--cache_dir", s.cache_dir]
    return cmd


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_measured(cmd: list[str], log_path: Path, timeout: float | None = None) -> tuple[int, int, float]:
    """Run `cmd` (output to `log_path`); return (exit code, the child's own peak RSS in bytes, wall seconds).

    os.wait4 gives the rusage of exactly this child, unlike RUSAGE_CHILDREN (the max over all children)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss) * 1024, time.time() - t0


# ---- the inference probe (runs in its own process) -------------------------------------------------------
def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(final: Path, test_path: Path, decode_tokens: int, repeats: int, test_docs: int | None) -> dict[str, Any]:
    """Load a checkpoint, decode greedily at batch 1 (best tokens/s of `repeats`, peak RSS), then score the test
    file."""
    import resource

    import torch

    torch.set_num_threads(1)
    from .evaluate import evaluate_text, read_documents
    from .generation import Generator
    from .sampling import SamplingParams

    rss_imports = _rss_now()
    gen = Generator.from_checkpoint(final, device="cpu")
    params = SamplingParams(temperature=0.0, max_new_tokens=decode_tokens, seed=0)
    gen.generate(PROMPT, params, stop_ids=())  # warm-up
    speeds, n_tokens = [], 0
    for _ in range(repeats):
        res = gen.generate(PROMPT, params, stop_ids=())
        speeds.append(res.tokens_per_s)
        n_tokens = len(res.token_ids)
    peak_infer = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    t0 = time.time()
    docs = read_documents(str(test_path), test_docs)
    ev = evaluate_text(gen.model, gen.tokenizer, docs, batch_size=8)
    # The best of the repeats: other processes on a shared machine only ever slow a repeat down.
    return {"decode_tok_s": max(speeds), "decode_tok_s_all": speeds, "decode_tokens": n_tokens,
            "rss_after_imports": rss_imports, "peak_rss_infer": peak_infer,
            "test_loss": ev["loss"], "test_bpb": ev["bits_per_byte"], "test_tokens": ev["tokens"],
            "test_docs": ev["documents"], "test_bytes": ev["bytes"], "test_eval_s": round(time.time() - t0, 2)}


# ---- one cell ---------------------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def train_tokens_per_s(metrics: list[dict[str, Any]]) -> float | None:
    """Median training tokens/s over the log intervals after the first (the first includes start-up costs)."""
    vals = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    vals = vals[1:] if len(vals) > 2 else vals
    return statistics.median(vals) if vals else None


def check_run_settings(run_dir: Path, size: str, arch: str, seed: int, s: Settings) -> None:
    """A finished run is reused only if it was trained with this study's settings and model."""
    saved = json.loads((run_dir / "config.json").read_text())
    train, model = saved["train"], saved["model"]
    want = {"max_iters": s.max_iters, "batch_size": s.batch_size, "block_size": s.block_size, "lr": s.lr,
            "warmup_iters": s.warmup_iters, "seed": seed, "vocab_size": s.vocab_size}
    cfg = cell_model_config(size, arch, s.vocab_size, s.block_size)
    diff = {k: (train.get(k), v) for k, v in want.items() if train.get(k) != v}
    diff.update({k: (model.get(k), getattr(cfg, k)) for k in SHAPE_FIELDS if model.get(k) != getattr(cfg, k)})
    if diff:
        what = ", ".join(f"{k}: {a} there, {b} now" for k, (a, b) in diff.items())
        raise SystemExit(f"error: {run_dir} was trained with other settings ({what}); pass another --out, or "
                         "delete that run to train it again.")


def run_cell(size: str, arch: str, seed: int, s: Settings, out: Path, test_path: Path,
             log=print) -> dict[str, Any]:
    """Train (unless final/ exists) and measure one (size, arch, seed); returns its record (also <run>/bench.json)."""
    run_dir = out / f"{size}-{arch}-s{seed}"
    bench_path = run_dir / "bench.json"
    rec: dict[str, Any] = json.loads(bench_path.read_text()) if bench_path.exists() else {}
    final = run_dir / "final"
    if (final / "model.safetensors").exists():
        check_run_settings(run_dir, size, arch, seed, s)
    else:
        if run_dir.exists():  # an interrupted run of ours: start it over so its timings are whole
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cmd = train_command(size, arch, seed, s, run_dir)
        log(f"[{size} {arch} seed {seed}] training: {shlex.join(cmd[1:])}")
        code, peak, wall = run_measured(cmd, run_dir.parent / f"{run_dir.name}.train.out")
        if code != 0 or not (final / "model.safetensors").exists():
            tail = (run_dir.parent / f"{run_dir.name}.train.out").read_text()[-2000:]
            raise RuntimeError(f"training {run_dir} failed (exit {code}):\n{tail}")
        rec = {"peak_rss_train": peak, "train_wall_s": round(wall, 1)}
        bench_path.write_text(json.dumps(rec, indent=2) + "\n")
    probe_key = [s.decode_tokens, s.decode_repeats, s.test_docs, str(test_path)]
    if "test_bpb" not in rec or rec.get("probe_key") != probe_key:  # measured with other settings: again
        cmd = [sys.executable, "-m", "model.benchmark_compare", "--probe", str(final), "--test-file", str(test_path),
               "--decode-tokens", str(s.decode_tokens), "--decode-repeats", str(s.decode_repeats)]
        if s.test_docs:
            cmd += ["--test-docs", str(s.test_docs)]
        probe_out = run_dir.parent / f"{run_dir.name}.probe.out"
        code, _peak, _wall = run_measured(cmd, probe_out)
        lines = probe_out.read_text().strip().splitlines()
        if code != 0 or not lines:
            raise RuntimeError(f"probing {final} failed (exit {code}):\n{probe_out.read_text()[-2000:]}")
        rec.update(json.loads(lines[-1]), probe_key=probe_key)
        bench_path.write_text(json.dumps(rec, indent=2) + "\n")
    card = json.loads((final / "card.json").read_text())
    metrics = read_metrics(run_dir)
    rec.update(size=size, arch=arch, seed=seed, run=str(run_dir), params_total=card["params_total"],
               params_active=card["params_active"], tokens_seen=card["tokens_seen"], tokenizer=card["tokenizer"],
               hardware=card["hardware"], train_wall_card_s=card["wall_time_s"],
               ckpt_bytes=(final / "model.safetensors").stat().st_size,
               train_tok_s=train_tokens_per_s(metrics), final_val_loss=card.get("final_val_loss"),
               final_val_bpb=card.get("final_val_bpb"),
               curve=[{"step": m["step"], "tokens": m["tokens"], "loss": m.get("loss"), "val_loss": m.get("val_loss")}
                      for m in metrics])
    log(f"[{size} {arch} seed {seed}] test bpb {rec['test_bpb']:.4f} loss {rec['test_loss']:.4f}, "
        f"train {rec['train_tok_s'] or 0:,.0f} tok/s, decode {rec['decode_tok_s']:,.0f} tok/s")
    return rec


# ---- aggregation and the report --------------------------------------------------------------------------
def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds the range is all there is to say about the spread."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (max(vals) - min(vals)) / 2


def _fmt(values: list[float], digits: int, scale: float = 1.0) -> str:
    m, h = mean_spread([v / scale for v in values if v is not None])
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {h:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def group(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        cells.setdefault((r["size"], r["arch"]), []).append(r)
    return cells


def results_table(records: list[dict[str, Any]]) -> str:
    """The markdown table: one row per (size, arch), mean ± half-range over seeds."""
    head = ("| size | model | seeds | params total | params active | test loss (nats/token) | test bits/byte | "
            "final val loss | checkpoint MB | peak RSS train MB | peak RSS inference MB | train tok/s | "
            "decode tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    mb = 1024 * 1024
    for (size, arch), rs in group(records).items():
        lines.append(
            f"| {size} | {ARCH_TITLES[arch]} | {len(rs)} | {rs[0]['params_total'] / 1e6:.3f}M | "
            f"{rs[0]['params_active'] / 1e6:.3f}M | {_fmt([r['test_loss'] for r in rs], 4)} | "
            f"{_fmt([r['test_bpb'] for r in rs], 4)} | {_fmt([r['final_val_loss'] for r in rs], 4)} | "
            f"{_fmt([r['ckpt_bytes'] for r in rs], 2, mb)} | {_fmt([r.get('peak_rss_train') for r in rs], 0, mb)} | "
            f"{_fmt([r['peak_rss_infer'] for r in rs], 0, mb)} | {_fmt([r['train_tok_s'] for r in rs], 0)} | "
            f"{_fmt([r['decode_tok_s'] for r in rs], 0)} |")
    return "\n".join(lines)


def gpt2_match_note(records: list[dict[str, Any]]) -> list[str]:
    """How much the GPT-2's size mattered: its equal-total vs equal-active versions on test bits/byte."""
    out = []
    cells = group(records)
    for size in dict.fromkeys(r["size"] for r in records):
        tot, act = cells.get((size, "gpt2")), cells.get((size, "gpt2-active"))
        if not tot or not act:
            continue
        (mt, ht), (ma, ha) = mean_spread([r["test_bpb"] for r in tot]), mean_spread([r["test_bpb"] for r in act])
        inside = abs(mt - ma) <= ht + ha
        out.append(f"- **{size}, the two GPT-2 sizes**: equal total {mt:.4f} vs equal active {ma:.4f} bits/byte "
                   f"(difference {abs(mt - ma):.4f}, {'within' if inside else 'outside'} the seed spread): "
                   + ("at this budget the extra MLP width of the larger GPT-2 buys "
                      + ("nothing measurable: more parameters do not close the gap to GPT-OSS."
                         if inside else f"{'a lower' if mt < ma else 'a higher'} loss.")))
    return out


def per_run_table(records: list[dict[str, Any]]) -> str:
    """Every run on its own row, so the seed spread behind each mean can be seen."""
    lines = ["| size | model | seed | test bits/byte | test loss | final val loss | train tok/s | decode tok/s | "
             "train wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['size']} | {ARCH_TITLES[r['arch']]} | {r['seed']} | {r['test_bpb']:.4f} | "
                     f"{r['test_loss']:.4f} | {r['final_val_loss']:.4f} | {r['train_tok_s'] or 0:,.0f} | "
                     f"{r['decode_tok_s']:,.0f} | {r.get('train_wall_s', r.get('train_wall_card_s', 0)):.0f} |")
    return "\n".join(lines)


def headline(records: list[dict[str, Any]]) -> str:
    """One sentence: at each size, which model has the lowest mean test bits/byte."""
    parts = []
    for size in dict.fromkeys(r["size"] for r in records):
        means = {arch: statistics.fmean([r["test_bpb"] for r in rs])
                 for (sz, arch), rs in group(records).items() if sz == size}
        best = min(means, key=means.get)
        parts.append(f"at **{size}** the best test bits/byte is {ARCH_TITLES[best]}'s ({means[best]:.4f})")
    text = "Lowest mean test bits/byte: " + "; ".join(parts) + "."
    # Where GPT-2 is ahead of GPT-OSS (both of its matched versions, at every size), whatever the metric.
    higher_better = {"test_bpb": False, "train_tok_s": True, "decode_tok_s": True, "peak_rss_train": False,
                     "peak_rss_infer": False}
    names = {"test_bpb": "test bits/byte", "train_tok_s": "training tokens/s", "decode_tok_s": "decode tokens/s",
             "peak_rss_train": "peak training memory", "peak_rss_infer": "peak inference memory"}
    cells = group(records)
    ahead = []
    for key, up in higher_better.items():
        verdicts = []
        for (size, arch), rs in cells.items():
            oss = cells.get((size, "gptoss"))
            if arch == "gptoss" or not oss:
                continue
            vals_g = [r.get(key) for r in rs if r.get(key) is not None]
            vals_o = [r.get(key) for r in oss if r.get(key) is not None]
            if vals_g and vals_o:
                mg, mo = statistics.fmean(vals_g), statistics.fmean(vals_o)
                verdicts.append(mg > mo if up else mg < mo)
        if verdicts and all(verdicts):
            ahead.append(names[key])
    if ahead:
        text += (" GPT-2 (both matched versions, every size) is ahead on: " + ", ".join(ahead) + ".")
    return text


def conclusions(records: list[dict[str, Any]]) -> list[str]:
    """One paragraph per size and baseline: who wins on test bits/byte, by how much, against the seed spread."""
    out: list[str] = []
    cells = group(records)
    for size in dict.fromkeys(r["size"] for r in records):
        oss = cells.get((size, "gptoss"))
        if not oss:
            continue
        mo, ho = mean_spread([r["test_bpb"] for r in oss])
        for arch in ("gpt2", "gpt2-active"):
            g = cells.get((size, arch))
            if not g:
                continue
            mg, hg = mean_spread([r["test_bpb"] for r in g])
            diff = mg - mo
            winner = "GPT-OSS" if diff > 0 else "GPT-2" if diff < 0 else "neither"
            n = min(len(oss), len(g))
            if n < 2:
                verdict = "one seed per model, so the seed spread is unknown"
            elif abs(diff) > ho + hg:
                verdict = (f"larger than the seed spread (the seeds' ranges, ±{ho:.4f} and ±{hg:.4f}, do not "
                           f"overlap)")
            else:
                verdict = f"within the seed spread (±{ho:.4f} and ±{hg:.4f}): not a measurable difference"
            tps_o = statistics.fmean([r["train_tok_s"] for r in oss if r["train_tok_s"]] or [float("nan")])
            tps_g = statistics.fmean([r["train_tok_s"] for r in g if r["train_tok_s"]] or [float("nan")])
            dec_o = statistics.fmean([r["decode_tok_s"] for r in oss])
            dec_g = statistics.fmean([r["decode_tok_s"] for r in g])
            out.append(
                f"- **{size}, GPT-OSS vs {ARCH_TITLES[arch]}**: {winner} wins on test bits/byte "
                f"({mo:.4f} vs {mg:.4f}, difference {abs(diff):.4f} bits/byte = {100 * abs(diff) / max(mg, mo):.1f}%), "
                f"{verdict}. Training speed {tps_o:,.0f} vs {tps_g:,.0f} tokens/s "
                f"(GPT-OSS {tps_o / tps_g:.2f}x); decoding {dec_o:,.0f} vs {dec_g:,.0f} tokens/s "
                f"(GPT-OSS {dec_o / dec_g:.2f}x).")
    return out


# ---- plots ------------------------------------------------------------------------------------------------
COLORS = {"gptoss": "#d62728", "gpt2": "#1f77b4", "gpt2-active": "#2ca02c"}
DASHES = ["solid", "dash", "dot", "dashdot"]


def write_plotly(records: list[dict[str, Any]], path: Path) -> None:
    """Validation (top) and training (bottom) loss against tokens seen, one column per size."""
    from plotly.subplots import make_subplots

    sizes = list(dict.fromkeys(r["size"] for r in records))
    fig = make_subplots(rows=2, cols=len(sizes), shared_xaxes=True,
                        subplot_titles=[f"{s}: validation loss" for s in sizes] + [f"{s}: training loss"
                                                                                   for s in sizes])
    seeds = sorted({r["seed"] for r in records})
    for r in records:
        col = sizes.index(r["size"]) + 1
        dash = DASHES[seeds.index(r["seed"]) % len(DASHES)]
        name = f"{ARCH_TITLES[r['arch']]} seed {r['seed']}"
        for row, key in ((1, "val_loss"), (2, "loss")):
            pts = [p for p in r["curve"] if p.get(key) is not None]
            fig.add_scatter(x=[p["tokens"] for p in pts], y=[p[key] for p in pts], mode="lines+markers"
                            if row == 1 else "lines", name=name, legendgroup=name, showlegend=(row == 1 and col == 1)
                            or (row == 1 and r["size"] == sizes[0]),
                            line={"color": COLORS[r["arch"]], "dash": dash}, row=row, col=col)
    fig.update_xaxes(title_text="training tokens", row=2)
    fig.update_yaxes(title_text="loss (nats/token)", col=1)
    fig.update_layout(title="GPT-OSS vs GPT-2 at equal parameters: loss curves", height=800,
                      width=max(700, 550 * len(sizes)))
    path.write_text(fig.to_html(include_plotlyjs="cdn", full_html=True))


def write_svg(records: list[dict[str, Any]], path: Path) -> None:
    """Validation loss vs tokens, one panel per size, as a dependency-free SVG (renders on GitHub)."""
    sizes = list(dict.fromkeys(r["size"] for r in records))
    W, H, pad_l, pad_r, pad_t, pad_b = 460, 320, 60, 15, 35, 45
    seeds = sorted({r["seed"] for r in records})
    dash_of = {s: ["", "6,4", "2,3", "8,3,2,3"][i % 4] for i, s in enumerate(seeds)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(sizes)}" height="{H + 30}" '
             f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for i, size in enumerate(sizes):
        rs = [r for r in records if r["size"] == size]
        pts_all = [(p["tokens"], p["val_loss"]) for r in rs for p in r["curve"] if p.get("val_loss") is not None]
        pts_all = [p for p in pts_all if p[0] > 0] or pts_all  # the untrained step-0 value squeezes the rest
        if not pts_all:
            continue
        x0, x1 = min(p[0] for p in pts_all), max(p[0] for p in pts_all)
        y0, y1 = min(p[1] for p in pts_all), max(p[1] for p in pts_all)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
        ox = i * W

        def sx(x: float, ox=ox, x0=x0, x1=x1) -> float:
            return ox + pad_l + (x - x0) / (x1 - x0) * (W - pad_l - pad_r)

        def sy(y: float, y0=y0, y1=y1) -> float:
            return pad_t + (1 - (y - y0) / (y1 - y0)) * (H - pad_t - pad_b)

        parts.append(f'<text x="{ox + W / 2}" y="18" text-anchor="middle" font-size="13">{size}: validation loss '
                     f'vs training tokens</text>')
        parts.append(f'<rect x="{ox + pad_l}" y="{pad_t}" width="{W - pad_l - pad_r}" height="{H - pad_t - pad_b}" '
                     f'fill="none" stroke="#888"/>')
        for k in range(5):
            yv, xv = y0 + (y1 - y0) * k / 4, x0 + (x1 - x0) * k / 4
            parts.append(f'<text x="{ox + pad_l - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
            parts.append(f'<text x="{sx(xv):.1f}" y="{H - pad_b + 14}" text-anchor="middle">{xv / 1e3:.0f}k</text>')
        parts.append(f'<text x="{ox + (W + pad_l) / 2}" y="{H - 8}" text-anchor="middle">tokens</text>')
        parts.append(f'<text x="{ox + 14}" y="{(H - pad_b + pad_t) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {ox + 14} {(H - pad_b + pad_t) / 2})">validation loss (nats/token)</text>')
        for r in rs:
            pts = [(p["tokens"], p["val_loss"]) for p in r["curve"] if p.get("val_loss") is not None and
                   (p["tokens"] > 0 or len(pts_all) == 1)]
            if not pts:
                continue
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            dash = f' stroke-dasharray="{dash_of[r["seed"]]}"' if dash_of[r["seed"]] else ""
            parts.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[r["arch"]]}" stroke-width="1.6"{dash}/>')
    y = H + 15
    x = 10
    for arch in ARCH_LABELS:
        parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 25}" y2="{y}" stroke="{COLORS[arch]}" stroke-width="2"/>'
                     f'<text x="{x + 30}" y="{y + 4}">{ARCH_TITLES[arch]}</text>')
        x += 170
    for s in seeds:
        dash = f' stroke-dasharray="{dash_of[s]}"' if dash_of[s] else ""
        parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 25}" y2="{y}" stroke="#333" stroke-width="1.6"{dash}/>'
                     f'<text x="{x + 30}" y="{y + 4}">seed {s}</text>')
        x += 80
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.0f} MB"


def write_report(records: list[dict[str, Any]], s: Settings, results: Path, plots_dir: Path, command: str,
                 meta: dict[str, Any]) -> None:
    """docs/results.md: setup, table, conclusion, caveats, the command; plots next to it."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    write_plotly(records, plots_dir / "loss_curves.html")
    write_svg(records, plots_dir / "loss_curves.svg")
    rel = os.path.relpath(plots_dir, results.parent)
    r0 = records[0]
    sizes_desc = []
    for size in s.sizes:
        from .config import parameter_counts

        c = cell_model_config(size, "gptoss", s.vocab_size, s.block_size)
        g = cell_model_config(size, "gpt2", s.vocab_size, s.block_size)
        ga = cell_model_config(size, "gpt2-active", s.vocab_size, s.block_size)
        pc = parameter_counts(c)
        sizes_desc.append(
            f"  - **{size}**: GPT-OSS hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} "
            f"query / {c.num_key_value_heads} KV heads of {c.head_dim}, {c.num_experts} experts (top "
            f"{c.experts_per_token}) of width {c.intermediate_size}, sliding window {c.sliding_window} on even "
            f"layers, untied embeddings: {pc['total']:,} total / {pc['active']:,} active parameters. GPT-2: same "
            f"width, depth and vocabulary, {g.num_attention_heads} heads of {g.head_dim}, learned positions, tied "
            f"embeddings, dense MLP width {g.intermediate_size} (equal total) or {ga.intermediate_size} (equal "
            f"active).")
    lines = [
        "# GPT-OSS vs GPT-2 at equal parameter count",
        "",
        f"Written by `python -m model.benchmark_compare` on {meta['date']}. Do not edit by hand: re-run the command "
        "at the end.",
        "",
        "The claim tested: *GPT-OSS's architecture beats GPT-2's at equal size.* Every number below is measured; "
        "where GPT-2 wins, it says so.",
        "",
        "## Setup",
        "",
        f"- Hardware: {meta['hardware']}; torch {meta['torch']}, Python {meta['python']}. Every training and every "
        "probe ran alone in its own process with **one thread** (`OMP_NUM_THREADS=1`), one after another, on a "
        f"machine shared with other work (load average {meta['load_start']} at the start, {meta['load_end']} at the "
        "end), so speeds are noisy; losses are not affected.",
        f"- Data: TinyStories (`{s.data}`): train on `{meta['train_file']}` ({meta['train_bytes']:,} bytes), "
        f"validation during training on the first ~{s.eval_batches * s.batch_size * s.block_size:,} tokens of "
        f"`valid.txt`, final numbers on `{meta['test_file']}` ({r0['test_docs']} stories, {r0['test_bytes']:,} "
        f"bytes, {r0['test_tokens']:,} scored tokens), each story scored from its own start in windows of at most "
        f"{s.block_size} tokens (`model.evaluate`).",
        f"- Tokenizer: the trainer's default, one {s.vocab_size}-piece SentencePiece model trained on train.txt and "
        f"shared by every run (`{r0['tokenizer']}`).",
        f"- Budget: {s.max_iters} steps x {s.batch_size} sequences x {s.block_size} tokens = "
        f"{s.tokens_per_run:,} training tokens per run; AdamW, peak lr {s.lr:g} after {s.warmup_iters} warmup "
        f"steps, cosine to {s.lr / 10:g}, weight decay 0.1, clip 1.0, MoE balance loss 0.01, fp32 — identical "
        f"for every model (not tuned per architecture). Seeds {', '.join(map(str, s.seeds))} (a seed fixes "
        "initialization and data order, so the models of one seed see the same batches).",
        "- Models (GPT-2 matched with `model.config.gpt2_matched`):",
        *sizes_desc,
        "- Measurements: test loss / bits per byte on test.txt; checkpoint size = `final/model.safetensors`; peak "
        "RSS of the training process (os.wait4 rusage) and of an inference process that loads the checkpoint "
        f"and decodes; training tokens/s = median over the trainer's log intervals (evaluation excluded); decode "
        f"tokens/s = greedy, batch 1, {s.decode_tokens} tokens from BOS, the best of {s.decode_repeats} after a "
        f"warm-up (other processes on the machine only ever slow a repeat down)."
        + (f" For scale, a Python process that has only imported torch and the model code holds "
           f"{_mb(meta['rss_baseline'])}: most of every RSS figure is the runtime, not the model."
           if meta["rss_baseline"] else ""),
        "",
        "## Results",
        "",
        f"Mean ± half the range over {len(s.seeds)} seed(s).",
        "",
        results_table(records),
        "",
        f"Loss curves: [{rel}/loss_curves.html]({rel}/loss_curves.html) (interactive, plotly; validation and "
        f"training loss) and below (validation loss, step 0 left out).",
        "",
        f"![validation loss curves]({rel}/loss_curves.svg)",
        "",
        "## Conclusion",
        "",
        headline(records),
        "",
        *conclusions(records),
        *gpt2_match_note(records),
        "",
        "### Every run",
        "",
        per_run_table(records),
        "",
        "## Caveats",
        "",
        f"- A tiny budget: {s.tokens_per_run:,} tokens per run is far from convergence; a ranking after a few "
        "hundred steps need not hold after tens of thousands.",
        "- The study compares whole architectures. It does not say which GPT-OSS ingredient (rotary positions, "
        "untied output matrix, SwiGLU experts, RMSNorm, attention sinks, GQA, sliding windows) makes the "
        "difference.",
        "- CPU only, one thread, fp32, a shared machine: throughput and memory numbers are relative, and speeds "
        "move by tens of percent with the machine's load. On a GPU the MoE's routing overhead and the batched "
        "expert matmuls trade off differently.",
        f"- {len(s.seeds)} seed(s) per cell: 'outside the seed spread' means the ranges did not overlap, not a "
        "statistical test.",
        "- One learning-rate schedule for every model; each architecture might prefer a different one.",
        "- The equal-total GPT-2 spends the parameters GPT-OSS puts in its untied output matrix on a much wider MLP "
        "(GPT-2 ties input and output embeddings); at these sizes the embeddings are half of all parameters.",
        "",
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Run directories: `{meta['out']}` (each with metrics.jsonl, train.log, final/, bench.json). "
        "Finished runs are skipped, so an interrupted study resumes.",
        "",
    ]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(lines))


# ---- CLI --------------------------------------------------------------------------------------------------
def _baseline_rss() -> int:
    """Peak RSS of a process that only imports torch and the model code (what every figure starts from)."""
    code = "import torch; torch.set_num_threads(1); import model.train, model.generation, model.evaluate"
    r = subprocess.run([sys.executable, "-c", code + "; import resource; "
                        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                       cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    return int(r.stdout.strip().splitlines()[-1]) * 1024 if r.returncode == 0 else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.benchmark_compare",
                                description="Train GPT-OSS and parameter-matched GPT-2 models under one budget, "
                                            "measure them, and write docs/results.md with loss-curve plots.")
    p.add_argument("--sizes", default="toy,micro", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--archs", default=",".join(ARCH_LABELS), help=f"comma-separated, from {ARCH_LABELS}")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 1,2; --quick: 1)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="optimizer steps per run (default 300; warmup is a tenth)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per sequence = context (default 128)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--eval-interval", type=int, default=None, help="steps between validations (default 50)")
    p.add_argument("--data", default="tinystories",
                   help="'tinystories' ($STORYFORGE_DATA_DIR) or a folder with train.txt/valid.txt/test.txt")
    p.add_argument("--test-file", default=None, help="final evaluation text (default: the data's test split)")
    p.add_argument("--test-docs", type=int, default=None, help="score only the first N test stories")
    p.add_argument("--vocab-size", type=int, default=None, help="SentencePiece vocabulary (default 4096)")
    p.add_argument("--cache-dir", default=None, help="tokenizer/token cache (default $STORYFORGE_CACHE_DIR)")
    p.add_argument("--out", default="runs/compare", help="run directories")
    p.add_argument("--results", default="docs/results.md", help="the markdown report; plots go to <its dir>/results/")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5 steps of 4 x 32 tokens, one seed, a 400-piece tokenizer, 16 decode tokens")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: the inference measurement
    p.add_argument("--decode-tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-repeats", type=int, default=None, help=argparse.SUPPRESS)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = (Settings(seeds=(1,), max_iters=5, batch_size=4, block_size=32, warmup_iters=2, eval_interval=3,
                     eval_batches=2, vocab_size=400, decode_tokens=16, decode_repeats=1, test_docs=10)
            if args.quick else Settings())
    kw: dict[str, Any] = {"sizes": tuple(x for x in args.sizes.split(",") if x), "data": args.data,
                          "cache_dir": args.cache_dir}
    if args.seeds:
        kw["seeds"] = tuple(int(x) for x in args.seeds.split(",") if x)
    for name in ("max_iters", "batch_size", "block_size", "lr", "eval_interval", "vocab_size", "test_docs",
                 "decode_tokens", "decode_repeats"):
        if getattr(args, name, None) is not None:
            kw[name] = getattr(args, name)
    if "max_iters" in kw and not args.quick:
        kw["warmup_iters"] = max(1, kw["max_iters"] // 10)
    import dataclasses

    s = dataclasses.replace(base, **kw)
    bad = [x for x in s.sizes if x not in SIZES]
    if bad or not s.sizes:
        raise SystemExit(f"error: unknown --sizes {bad}; choose from {sorted(SIZES)}")
    if s.block_size < s.decode_tokens:  # from BOS, n tokens need n positions (the last is never fed back)
        s = dataclasses.replace(s, decode_tokens=s.block_size)
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:
        res = probe(Path(args.probe), Path(args.test_file), args.decode_tokens or 128, args.decode_repeats or 3,
                    args.test_docs)
        print(json.dumps(res))
        return 0
    from .data import DataError, resolve_data_source

    s = settings_from_args(args)
    archs = [a for a in args.archs.split(",") if a]
    if any(a not in ARCH_LABELS for a in archs):
        raise SystemExit(f"error: --archs must be from {ARCH_LABELS}")
    try:
        test_path = Path(args.test_file) if args.test_file else resolve_data_source(s.data, "test")
        train_path = resolve_data_source(s.data, "train")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not out.is_absolute():
        out = REPO / out
    results = Path(args.results)
    if not results.is_absolute():
        results = REPO / results
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_start": _load(),
                            "python": platform.python_version(), "train_file": train_path.name,
                            "train_bytes": train_path.stat().st_size if train_path.is_file() else 0,
                            "test_file": test_path.name, "out": os.path.relpath(out, REPO)}
    t0 = time.time()
    records = []
    n = len(s.sizes) * len(archs) * len(s.seeds)
    for seed in s.seeds:  # seed outermost: a study cut short still has every cell once
        for size in s.sizes:
            for arch in archs:
                records.append(run_cell(size, arch, seed, s, out, test_path))
                print(f"  {len(records)}/{n} done, {time.time() - t0:.0f}s elapsed", flush=True)
    import torch

    records.sort(key=lambda r: (s.sizes.index(r["size"]), ARCH_LABELS.index(r["arch"]), r["seed"]))
    meta.update(load_end=_load(), torch=torch.__version__, hardware=_hardware(),
                rss_baseline=0 if args.quick else _baseline_rss())
    command = "python -m model.benchmark_compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    env_prefix = "OMP_NUM_THREADS=1 "
    if s.data == "tinystories":
        env_prefix += f"STORYFORGE_DATA_DIR={os.environ.get('STORYFORGE_DATA_DIR', '<folder>')} "
    write_report(records, s, results, results.parent / "results", env_prefix + command.strip(), meta)
    print(f"wrote {results} and {results.parent / 'results'}/loss_curves.{{html,svg}} in {time.time() - t0:.0f}s")
    return 0


def _hardware() -> str:
    """CPU model and core count (from /proc/cpuinfo where there is one)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
