"""Train a GPT-OSS-style (or GPT-2 baseline) story model: `python -m model.train`.

    python -m model.train --preset fast --model_size toy --out runs/toy1
    python -m model.train --resume --out runs/toy1            # continue an interrupted/stopped run
    torchrun --nproc_per_node 2 -m model.train --preset fast --out runs/ddp   # DistributedDataParallel

Run directory (only rank 0 writes):

    config.json     effective TrainConfig ("train") and ModelConfig ("model")
    status.json     state running/finished/stopped/failed, step, max_iters, pid, times, message (atomic)
    metrics.jsonl   one JSON object per log interval / eval (append-only, flushed)
    samples.jsonl   a sample story at intervals
    train.log       the log lines (also on stdout unless stdout *is* train.log)
    ckpt/           resume state: model.safetensors + state.pt (optimizer, scheduler, step, data and RNG state)
    final/          our checkpoint format (config, weights, tokenizer, card.json): load_checkpoint() reads it
    tb/             TensorBoard events (--use_tensorboard)

Optimisation: AdamW on fp32 master weights (weight decay on matrices only), linear warmup then cosine decay to
`min_lr`, gradient clipping, optional bf16 autocast, the MoE load-balancing loss times `aux_loss_coef`, gradient
accumulation. A STOP file in the run directory, SIGINT or SIGTERM saves a checkpoint and exits 0 ("stopped").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16")
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
COMPLETE_FILE = "COMPLETE"
SAMPLE_PROMPT = "Once upon a time"


# ==== configuration ============================================================================================
@dataclass
class TrainConfig:
    """Everything a run needs besides the model's own shape (which comes from `model_size` + `arch`).

    Saved as the "train" section of <out>/config.json; `from_dict(to_dict())` round-trips."""

    preset: str = "fast"
    # model
    model_size: str = "toy"  # toy | small | medium | large (ModelConfig presets)
    arch: str = "gptoss"  # gptoss | gpt2 (GPT-2 with the same total parameter count)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (tests, experiments)
    aux_loss_coef: float | None = None  # None: the model config's (0.01)
    # extras (model/extras.py, issue 9)
    mtp_heads: int = 0  # extra heads predicting t+2 .. t+1+mtp_heads (0: off)
    mtp_weight: float = 0.3  # loss weight of each extra head
    context_memory: int = 0  # memory slots carried across chunks of a story (0: off; gptoss only)
    context_bptt: int = 2  # consecutive chunks per training sequence with the gradient through the memory
    # data and tokenizer
    data: str = "tinystories"  # name, .txt/.jsonl file or folder (model.data.resolve_data_source)
    tokenizer: str = "sentencepiece"  # "sentencepiece" (trained on the data, cached) | tiktoken:NAME | a dir
    vocab_size: int = 4096  # for the trained sentencepiece tokenizer
    cache_dir: str | None = None  # token + tokenizer cache; None: $STORYFORGE_CACHE_DIR or ~/.cache/...
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per process
    block_size: int = 128  # tokens per sequence (also the model's max_context)
    grad_accum: int = 1
    max_iters: int = 600  # optimizer steps
    lr: float = 2e-3
    min_lr: float = 2e-4  # cosine floor
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still measured)
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_batches: int = 20  # validation budget: eval_batches * batch_size * block_size tokens of stories
    log_interval: int = 10
    sample_interval: int = 200  # 0 disables samples
    sample_tokens: int = 120
    ckpt_interval: int = 0  # 0: at every eval
    # runtime
    dtype: str = "auto"  # auto (bf16 autocast on a bf16-capable GPU, else fp32) | float32 | bfloat16
    compile: bool = False
    seed: int = 1337
    out: str = "runs/run"
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    use_tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("gptoss", "gpt2"):
            raise ValueError(f"arch must be gptoss or gpt2, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("batch_size", "block_size", "grad_accum", "max_iters", "log_interval", "eval_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr (got lr={self.lr}, min_lr={self.min_lr})")
        if self.warmup_iters < 0:
            raise ValueError("warmup_iters must be >= 0")
        if self.mtp_heads < 0 or self.context_memory < 0 or self.context_bptt < 1 or self.mtp_weight < 0:
            raise ValueError("need mtp_heads >= 0, mtp_weight >= 0, context_memory >= 0 and context_bptt >= 1")
        if self.context_memory and (self.arch == "gpt2" or self.model_size.startswith("gpt2")):
            raise ValueError("context memory needs the gptoss architecture (rotary positions)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> TrainConfig:
        if name not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {name!r}: choose one of {sorted(TRAIN_PRESETS)}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step in one process (times the world size under DDP)."""
        return self.batch_size * self.block_size * self.grad_accum * (self.context_bptt if self.context_memory else 1)

    def model_config(self, vocab_size: int):
        """The ModelConfig this run trains: the size preset at this vocabulary, max_context = block_size."""
        from .config import ModelConfig, gpt2_matched

        size = self.model_size
        arch = self.arch
        if size.startswith("gpt2-"):
            size, arch = size[5:], "gpt2"
        base = ModelConfig.preset(size, vocab_size=vocab_size, max_context=self.block_size)
        cfg = gpt2_matched(base) if arch == "gpt2" else base
        extra = {**cfg.extra, "preset": size}
        over = dict(self.model_overrides)
        extra.update(over.pop("extra", None) or {})  # labels given by the caller (e.g. {"match": "active"})
        if over:  # the preset's label no longer describes the model alone: say what was changed
            extra["overrides"] = sorted(over)
        if self.aux_loss_coef is not None:
            over["aux_loss_coef"] = self.aux_loss_coef
        if self.mtp_heads:
            over.update(mtp_heads=self.mtp_heads, mtp_loss_weight=self.mtp_weight)
        if self.context_memory:
            over["context_slots"] = self.context_memory
        return cfg.replace(extra=extra, **over)


TRAIN_PRESETS: dict[str, TrainConfig] = {
    # seconds: the pipeline end to end (a smoke test, not a model)
    "debug": TrainConfig(preset="debug", model_size="toy", batch_size=4, block_size=64, max_iters=20,
                         lr=1e-3, min_lr=1e-4, warmup_iters=4, eval_interval=10, eval_batches=2,
                         log_interval=1, sample_interval=10, sample_tokens=40),
    # minutes on a laptop CPU: a toy model that already writes story-like text
    "fast": TrainConfig(preset="fast", model_size="toy", batch_size=16, block_size=128, max_iters=600,
                        lr=2e-3, min_lr=2e-4, warmup_iters=50, eval_interval=100, eval_batches=20,
                        log_interval=10, sample_interval=200),
    # an hour-scale GPU run of the shipped size
    "standard": TrainConfig(preset="standard", model_size="small", batch_size=32, block_size=256,
                            max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=200, eval_interval=250,
                            eval_batches=40, log_interval=25, sample_interval=500),
    # the long run: bigger model, longer context, accumulation to 128 sequences per step, compiled
    "production": TrainConfig(preset="production", model_size="medium", batch_size=32, block_size=512,
                              grad_accum=4, max_iters=30000, lr=6e-4, min_lr=6e-5, warmup_iters=1000,
                              weight_decay=0.1, eval_interval=1000, eval_batches=100, log_interval=50,
                              sample_interval=2000, ckpt_interval=1000, compile=True),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over `warmup_iters` steps, then
    cosine decay reaching `min_lr` at `max_iters` (and staying there)."""
    if cfg.warmup_iters and step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, max(0.0, (step - cfg.warmup_iters) / span))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


# ==== pieces the trainer and tests share ==========================================================================
def make_optimizer(model, cfg: TrainConfig, fused: bool | None = None):
    """AdamW over the fp32 parameters, weight decay on matrices (dim >= 2: linear, embedding, expert weights)
    only; biases, norm gains and attention sinks are not decayed."""
    import torch

    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw: dict[str, Any] = {}
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    if fused:
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def make_scheduler(optimizer, cfg: TrainConfig):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)


def wrap_ddp(model, device):
    """DistributedDataParallel around `model`. No `find_unused_parameters`: an MoE expert that gets no tokens on a
    rank is a slice of its layer's single expert tensor, which still receives a (zero) gradient there."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def end_process_group() -> None:
    """Destroy the default process group, after freeing what still refers to it. A DDP reducer sits in
    reference cycles, so it outlives the training loop until a collection; destroyed under it, gloo aborted the
    process at exit ("terminate called without an active exception") in about a third of test runs."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def unwrap(model):
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def train_step(model, optimizer, micro_batches, *, aux_coef: float = 0.0, grad_clip: float = 1.0,
               autocast_dtype=None, scheduler=None, loss_fn=None) -> dict[str, Any]:
    """One optimizer step over `micro_batches` [(x, y), ...] (gradient accumulation: the objective of each
    micro-batch is divided by their number). `model` may be DDP-wrapped and/or compiled; under DDP gradients
    are all-reduced (averaged) once, on the last micro-batch.

    Returns loss (mean cross-entropy of the micro-batches, this process), aux_loss, grad_norm (before
    clipping), expert_counts ([L, E] summed over micro-batches, or None).

    `loss_fn(model, batch) -> {"loss", "objective", "aux", "mtp"}` replaces the plain next-token loss (the
    extras of model/extras.py: MTP heads, context memory); "mtp" (per-head losses) is then averaged in too."""
    import torch
    import torch.nn.functional as F

    raw = unwrap(model)
    n = len(micro_batches)
    is_ddp = hasattr(model, "no_sync")
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    aux_sum = torch.zeros_like(loss_sum)
    counts = None
    mtp_sum = None
    for i, batch in enumerate(micro_batches):
        x = batch[0]
        sync_ctx = model.no_sync() if (is_ddp and i < n - 1) else contextlib.nullcontext()
        with sync_ctx:
            with (torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                  else contextlib.nullcontext()):
                if loss_fn is not None:
                    out = loss_fn(model, batch)
                    loss, aux, base = out["loss"], out["aux"], out["objective"]
                    mtp_sum = out["mtp"] if mtp_sum is None else [a + b for a, b in zip(mtp_sum, out["mtp"])]
                else:
                    y = batch[1]
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
                    aux, base = raw.aux_loss, loss
            objective = base + aux_coef * aux if aux_coef else base
            (objective / n).backward()
        loss_sum += loss.detach()
        aux_sum += aux.detach().float()
        ec = raw.expert_counts
        if ec is not None:
            counts = ec.detach().clone() if counts is None else counts + ec.detach()
    params = [p for p in raw.parameters() if p.grad is not None]
    if grad_clip and grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / n, "aux_loss": aux_sum / n, "grad_norm": grad_norm, "expert_counts": counts,
            "mtp_losses": [v / n for v in mtp_sum] if mtp_sum else None}


def expert_balance(counts) -> dict[str, Any]:
    """Load-balance summary of expert_counts [L, E]: max/mean and coefficient of variation of the per-expert
    totals over all layers (1.0 and 0.0 when perfectly balanced), and the last layer's per-expert fractions."""
    c = counts.double()
    tot = c.sum(0)
    mean = tot.mean().clamp_min(1e-12)
    last = c[-1] / c[-1].sum().clamp_min(1e-12)
    return {"expert_balance": float(tot.max() / mean), "expert_cv": round(float(tot.std(unbiased=False) / mean), 5),
            "expert_fractions": [round(float(v), 5) for v in last]}


@contextlib.contextmanager
def _atomic_dir(target: Path):
    """Yield a temp dir next to `target`; on success it replaces `target` (the old one kept as `.old` until the
    new one is in place, so a kill at any moment leaves at least one complete checkpoint)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is for other processes (the app) to read
    try:
        yield tmp
        (tmp / COMPLETE_FILE).write_text("ok\n")
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete resume checkpoint of a run: ckpt/, or ckpt.old/ if a save was killed between renames."""
    for name in ("ckpt", "ckpt.old"):
        p = Path(run_dir) / name
        if (p / COMPLETE_FILE).exists() and (p / STATE_FILE).exists() and (p / WEIGHTS_FILE).exists():
            return p
    return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# ==== tokenizer and data =======================================================================================
def resolve_tokenizer(cfg: TrainConfig, train_source: Path, log: Callable[[str], None] = print):
    """The run's tokenizer. "sentencepiece" trains one (vocab_size pieces) on the training data the first time
    and caches it in the cache dir under a key of (source files, sizes, mtimes, vocab size)."""
    from . import data
    from .tokenizer import load_tokenizer, train_sentencepiece

    if cfg.tokenizer not in ("sentencepiece", "sp"):
        return load_tokenizer(cfg.tokenizer)
    files = data._source_files(train_source)
    ident = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] +
                       [cfg.vocab_size])
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else data.default_cache_dir()
    tok_dir = cache / f"tokenizer-sp{cfg.vocab_size}-{key}"
    if not (tok_dir / "tokenizer.model").exists():
        log(f"training a {cfg.vocab_size}-piece SentencePiece tokenizer on {train_source} -> {tok_dir}")
        t0 = time.time()
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cache))
        try:
            train_sentencepiece(files, tmp, vocab_size=cfg.vocab_size)
            try:
                os.replace(tmp, tok_dir)
            except OSError:
                if not (tok_dir / "tokenizer.model").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"tokenizer trained in {time.time() - t0:.1f}s")
    return load_tokenizer(tok_dir)


# ==== the trainer ==============================================================================================
class StopTraining(Exception):
    pass


class Trainer:
    """Owns one run: setup (distributed, data, model), the loop, evaluation, checkpoints, the run directory.

    `on_step(trainer, step, info)` is called after every optimizer step on every rank (tests use it to
    record losses or to drop a STOP file)."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False,
                 on_step: Callable[[Trainer, int, dict[str, Any]], None] | None = None,
                 progress_bar: bool | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.on_step = on_step
        self.out = Path(cfg.out)
        self.progress_bar = progress_bar
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # wall time of earlier segments of a resumed run
        self.stop_reason: str | None = None
        self.last_val: dict[str, Any] | None = None
        self.rank, self.world, self.local_rank = 0, 1, 0
        self._log_file = None
        self._metrics_file = None
        self._tb = None
        self._t_start = time.time()
        self._started_at = _now()

    # ---- small helpers ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if not self.is_main:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self._log_file is not None:
            self._log_file.write(line + "\n")
            self._log_file.flush()
        if not self._stdout_is_log:
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    _stdout_is_log = False
    _bar = None

    def _status(self, state: str, message: str = "") -> None:
        if not self.is_main:
            return
        _write_json_atomic(self.out / "status.json", {
            "state": state, "step": self.step, "max_iters": self.cfg.max_iters, "pid": os.getpid(),
            "started_at": self._started_at, "updated_at": _now(), "message": message,
            "tokens_seen": self.tokens_seen, "elapsed_s": round(self.elapsed(), 2), "world_size": self.world,
            "final": str(self.out / "final") if (self.out / "final").exists() else None,
            "last_val_loss": (self.last_val or {}).get("loss"),
        })

    def elapsed(self) -> float:
        return self.elapsed_before + (time.time() - self._t_start)

    def _metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
            if record.get("expert_fractions"):
                self._tb.add_scalars("expert_fraction_last_layer",
                                     {str(i): v for i, v in enumerate(record["expert_fractions"])},
                                     record["step"])
            self._tb.flush()

    # ---- setup --------------------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        import torch
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = self.cfg.device.startswith("cuda") or (self.cfg.device == "auto" and torch.cuda.is_available())
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if want_cuda else "gloo")
            if want_cuda:
                torch.cuda.set_device(self.local_rank)
        if want_cuda:
            self.device = torch.device(f"cuda:{self.local_rank}" if self.world > 1 or self.cfg.device == "auto"
                                       else self.cfg.device)
        else:
            self.device = torch.device(self.cfg.device if self.cfg.device != "auto" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # so the checks and allocations below are about the chosen GPU
        bf16_ok = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        if self.cfg.dtype == "bfloat16" or (self.cfg.dtype == "auto" and bf16_ok):
            self.autocast_dtype = torch.bfloat16
        else:
            self.autocast_dtype = None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    def _setup_run_dir(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume and find_resume_checkpoint(self.out) is not None:
            raise SystemExit(f"error: {self.out} already holds a run with a checkpoint. Continue it with "
                             f"`python -m model.train --resume --out {self.out}`, or choose another --out.")
        log_path = self.out / "train.log"
        try:
            st_out, st_log = os.fstat(sys.stdout.fileno()), log_path.stat() if log_path.exists() else None
            self._stdout_is_log = st_log is not None and (st_out.st_dev, st_out.st_ino) == (st_log.st_dev,
                                                                                            st_log.st_ino)
        except (OSError, ValueError, AttributeError):
            self._stdout_is_log = False
        self._log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed in _close)
        (self.out / "STOP").unlink(missing_ok=True)

    def _setup_data(self) -> None:
        from . import data
        from .evaluate import tokenize_documents

        cfg = self.cfg
        self.train_source = data.resolve_data_source(cfg.data, "train")
        try:
            self.valid_source = data.resolve_data_source(cfg.data, "valid")
        except data.DataError:
            self.valid_source = self.train_source
        if self.valid_source == self.train_source:
            self.log(f"warning: {cfg.data} has no validation split; validating on the start of the training data")
        if self.is_main:
            self.tokenizer = resolve_tokenizer(cfg, self.train_source, self.log)
            cache = data.build_token_cache(self.train_source, self.tokenizer, cfg.cache_dir,
                                           progress=sys.stderr.isatty())
        self._barrier()
        if not self.is_main:
            self.tokenizer = resolve_tokenizer(cfg, self.train_source, self.log)
            cache = data.build_token_cache(self.train_source, self.tokenizer, cfg.cache_dir, progress=False)
        self.train_cache = data.TokenCache.open(cache)
        budget = cfg.eval_batches * cfg.batch_size * cfg.block_size
        texts, n_tokens = [], 0
        for doc in data.iter_documents(self.valid_source):
            texts.append(doc)
            n_tokens += len(self.tokenizer.encode(doc)) + 2
            if n_tokens >= budget:
                break
        self.val_ids, self.val_bytes = tokenize_documents(self.tokenizer, texts)
        self.log(f"data: train {self.train_source} ({len(self.train_cache):,} tokens, "
                 f"{self.train_cache.num_documents:,} stories); validation {self.valid_source} "
                 f"({len(self.val_ids)} stories, ~{n_tokens:,} tokens); tokenizer {self.tokenizer.name} "
                 f"({self.tokenizer.vocab_size} ids)")

    def _setup_model(self) -> None:
        import torch

        from .gptoss import build_model

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.model_cfg = cfg.model_config(self.tokenizer.vocab_size)
        self.model = build_model(self.model_cfg).to(self.device)  # fp32 master weights
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1000 * self.rank)
        self.loss_fn = self.doc_iter = None
        if cfg.mtp_heads or cfg.context_memory:  # extras (model/extras.py): their own loss, document order
            from . import data
            from .extras import ExtrasLoss

            self.loss_fn = ExtrasLoss(self.model, cfg.mtp_weight)
            if cfg.context_memory:
                self.doc_iter = data.document_chunks(self.train_cache, cfg.batch_size, cfg.block_size,
                                                     seed=cfg.seed + 1000 * self.rank, loop=True, device=self.device)
        counts = self.model.num_parameters()
        self.log(f"model: {self.model_cfg.arch} {self.model_cfg.extra.get('preset', '')} "
                 f"{counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), "
                 f"context {self.model_cfg.max_context}, device {self.device}, "
                 f"autocast {self.autocast_dtype or 'off (fp32)'}, compile {cfg.compile}, world {self.world}")

    def _wrap_model(self):
        import torch

        fwd = self.model
        if self.world > 1:
            fwd = wrap_ddp(fwd, self.device)
        if self.cfg.compile:
            fwd = torch.compile(fwd)
        return fwd

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_resume_checkpoint(self) -> None:
        """ckpt/: weights (safetensors) + optimizer, scheduler, step, data-generator and RNG states (torch.save
        of tensors and plain containers only, loadable with weights_only=True). Atomic."""
        import torch

        gen_states = [self.data_gen.get_state()]
        if self.world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, self.data_gen.get_state())
            gen_states = gathered
        if not self.is_main:
            return
        from safetensors.torch import save_file

        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "data_generator": gen_states, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world_size": self.world, "train_config": json.dumps(self.cfg.to_dict()),
            "last_val": json.dumps(self.last_val),
        }
        if self.doc_iter is not None:  # context memory: where each stream is, and its carried memory
            state["doc_iter"] = json.dumps(self.doc_iter.state_dict())
            if self.loss_fn.state is not None:
                state["context_state"] = self.loss_fn.state.detach().to("cpu")
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        if self.model_cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        with _atomic_dir(self.out / "ckpt") as tmp:
            save_file(weights, str(tmp / WEIGHTS_FILE))
            torch.save(state, tmp / STATE_FILE)
            self.model_cfg.to_json(tmp / "config.json")
        self.log(f"checkpoint saved at step {self.step} -> {self.out / 'ckpt'}")

    def _load_resume_checkpoint(self) -> None:
        import torch

        from .checkpoint import _strict_load, open_tensors

        ckpt = find_resume_checkpoint(self.out)
        if ckpt is None:
            raise SystemExit(f"error: --resume: no complete checkpoint in {self.out}/ckpt. The run saves one every "
                             "ckpt_interval (default: every eval) steps and when stopped; if it never got that "
                             "far, start it again without --resume (or with another --out).")
        _strict_load(self.model, open_tensors(ckpt / WEIGHTS_FILE), str(ckpt / WEIGHTS_FILE))
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of the step and this run's config: a resume that changes --lr or --max_iters
        # follows the new values instead of the peak lr stored with the old scheduler.
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = lr_at(int(state["step"]), self.cfg)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.elapsed_before = float(state["elapsed"])
        gens = state["data_generator"]
        if int(state.get("world_size", 1)) == self.world:
            self.data_gen.set_state(gens[self.rank])
        else:
            self.log(f"warning: checkpoint was written with world size {state.get('world_size')}, now "
                     f"{self.world}: data order is re-seeded, so losses will not match an uninterrupted run")
            self.data_gen.manual_seed(self.cfg.seed + 1000 * self.rank + self.step)
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state["cuda_rng"]:
            saved = state["cuda_rng"]
            if len(saved) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(saved)
            else:  # a different number of GPUs now: restore what matches, by index
                self.log(f"note: checkpoint saved CUDA RNG states for {len(saved)} GPUs, "
                         f"{torch.cuda.device_count()} visible now; restoring the first ones")
                for i, rng in enumerate(saved[:torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(rng, i)
        self.last_val = json.loads(state.get("last_val") or "null")
        if self.doc_iter is not None and "doc_iter" in state:
            self.doc_iter.load_state_dict(json.loads(state["doc_iter"]))
            if state.get("context_state") is not None:
                self.loss_fn.state = state["context_state"].to(self.device)
        self.log(f"resumed from {ckpt} at step {self.step} ({self.tokens_seen:,} tokens seen)")
        if self.is_main:  # drop log lines written after that checkpoint by the interrupted segment
            for name in ("metrics.jsonl", "samples.jsonl"):
                p = self.out / name
                if p.exists():
                    keep = [ln for ln in p.read_text().splitlines()
                            if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
                    p.write_text("".join(ln + "\n" for ln in keep))

    def save_final(self) -> Path:
        """final/: our checkpoint format (config, weights, tokenizer, card.json) for the generator and app."""
        import torch

        from .checkpoint import save_checkpoint

        counts = self.model.num_parameters()
        hw = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
              else f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}")
        card = {
            "name": self.out.name, "arch": self.model_cfg.arch, "size": self.cfg.model_size,
            "params_total": counts["total"], "params_active": counts["active"],
            "tokenizer": self.tokenizer.name, "vocab_size": self.tokenizer.vocab_size,
            "data": str(self.cfg.data), "train_source": str(self.train_source), "steps": self.step,
            "tokens_seen": self.tokens_seen, "hardware": hw, "world_size": self.world,
            "torch": torch.__version__, "wall_time_s": round(self.elapsed(), 1),
            "final_val_loss": (self.last_val or {}).get("loss"),
            "final_val_bpb": (self.last_val or {}).get("bits_per_byte"),
            "train_config": self.cfg.to_dict(), "created": _now(),
        }
        path = save_checkpoint(self.model, self.out / "final", tokenizer=self.tokenizer, card=card)
        self.log(f"final checkpoint -> {path}")
        return path

    # ---- evaluation and samples ---------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        from .evaluate import evaluate_ids

        res = evaluate_ids(self.model, self.val_ids, self.val_bytes, max_context=self.cfg.block_size,
                           batch_size=self.cfg.batch_size, autocast_dtype=self.autocast_dtype)
        self.last_val = {"loss": res["loss"], "bits_per_byte": res["bits_per_byte"], "step": self.step}
        return res

    def sample(self, max_new_tokens: int | None = None, temperature: float = 0.8, top_k: int = 40) -> str:
        """A story from the prompt "Once upon a time", seeded by the step (never touches the global RNG)."""
        import torch

        model, tok = self.model, self.tokenizer
        n = max_new_tokens or self.cfg.sample_tokens
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        prompt = tok.encode(SAMPLE_PROMPT)
        ids = ([start] if start is not None else []) + prompt
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed + self.step)
        was_training = model.training
        model.eval()
        out: list[int] = []
        try:
            with torch.no_grad():
                cache = model.new_cache(1)
                logits = model(torch.tensor([ids], device=self.device), cache)[:, -1]
                for _ in range(n):
                    if cache.length >= self.model_cfg.max_context:
                        break
                    logits = logits.float() / temperature
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, -1).cpu()
                    nxt = int(torch.multinomial(probs, 1, generator=gen))
                    if nxt in tok.stop_ids or nxt == tok.eos_id:
                        break
                    out.append(nxt)
                    logits = model(torch.tensor([[nxt]], device=self.device), cache)[:, -1]
        finally:
            model.train(was_training)
        return tok.decode(prompt + out)  # decoded together: pieces joined as the tokenizer means them

    # ---- signals ------------------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._old_handlers = {}

        def handler(signum, frame):  # first signal: finish the step, save, exit 0; second: default
            self.stop_reason = signal.Signals(signum).name
            signal.signal(signum, self._old_handlers.get(signum, signal.SIG_DFL))

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.getsignal(sig)
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. a test runner thread): STOP file still works
                pass

    def _restore_signals(self) -> None:
        for sig, h in getattr(self, "_old_handlers", {}).items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, h)

    def _should_stop(self) -> bool:
        import torch

        local = self.stop_reason is not None
        if not local and self.is_main and (self.out / "STOP").exists():
            self.stop_reason = "STOP file"
            local = True
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if local else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and self.stop_reason is None:
                self.stop_reason = "stop requested on another rank"
            return bool(flag.item() > 0)
        return local

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self) -> str:
        """Train to max_iters (or until stopped). Returns the final state: "finished" or "stopped"; raises on
        failure after recording it in status.json."""
        self._setup_distributed()
        self._setup_run_dir()
        self._install_signals()
        try:
            self._status("running", "setting up")
            self._setup_data()
            self._setup_model()
            if self.resume:
                self._load_resume_checkpoint()
            if self.is_main:
                _write_json_atomic(self.out / "config.json", {"train": self.cfg.to_dict(),
                                                              "model": self.model_cfg.to_dict()})
                self._metrics_file = open(self.out / "metrics.jsonl", "a" if self.resume else "w")  # noqa: SIM115
                if self.cfg.use_tensorboard:
                    self._open_tensorboard()
            state = self._loop()
            return state
        except SystemExit:
            self._status("failed", str(sys.exc_info()[1]))
            raise
        except BaseException as e:
            msg = f"{type(e).__name__}: {e}"
            self.log(f"failed at step {self.step}: {msg}")
            self._status("failed", msg)
            raise
        finally:
            self._restore_signals()
            self._close()

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise SystemExit("error: --use_tensorboard needs the tensorboard package: "
                             "pip install tensorboard (it is in requirements-dev.txt)") from e
        self._tb = SummaryWriter(log_dir=str(self.out / "tb"))

    def _close(self) -> None:
        for f in (self._metrics_file, self._log_file):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        self._metrics_file = self._log_file = self._tb = self._bar = None

    def _loop(self) -> str:
        import torch

        cfg = self.cfg
        from . import data

        fwd = self._wrap_model()
        self.model.train()
        aux_coef = float(self.model_cfg.aux_loss_coef)
        tokens_per_step = cfg.tokens_per_step * self.world
        use_bar = self.progress_bar if self.progress_bar is not None else sys.stderr.isatty()
        if use_bar and self.is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                             file=sys.stderr)
        self._status("running", f"training from step {self.step}")
        self.log(f"training {cfg.max_iters} steps of {tokens_per_step:,} tokens "
                 f"(batch {cfg.batch_size} x block {cfg.block_size} x accum {cfg.grad_accum} x world {self.world})")
        acc_loss, acc_aux, acc_n, acc_counts = 0.0, 0.0, 0, None
        t_interval, tok_interval = time.time(), 0
        seg_start_step, seg_start_time = self.step, time.time()
        ckpt_every = cfg.ckpt_interval or cfg.eval_interval
        if self.step == 0 and self.is_main:  # the untrained baseline, so loss curves start where training does
            val = self.validate()
            self._metrics({"step": 0, "tokens": 0, "elapsed": round(self.elapsed(), 2),
                           "val_loss": round(val["loss"], 5), "val_bpb": round(val["bits_per_byte"], 5)})
            self.log(f"step 0: val loss {val['loss']:.4f}, val bits/byte {val['bits_per_byte']:.4f}")
            t_interval = time.time()
        while self.step < cfg.max_iters:
            if self._should_stop():
                return self._stop()
            if self.doc_iter is not None:  # context memory: consecutive chunks of the same stories
                from .extras import next_context_batch

                batches = [next_context_batch(self.doc_iter, cfg.context_bptt) for _ in range(cfg.grad_accum)]
            else:
                batches = [data.random_batches(self.train_cache, cfg.batch_size, cfg.block_size, self.data_gen,
                                               device=self.device) for _ in range(cfg.grad_accum)]
            lr = self.optimizer.param_groups[0]["lr"]
            res = train_step(fwd, self.optimizer, batches, aux_coef=aux_coef, grad_clip=cfg.grad_clip,
                             autocast_dtype=self.autocast_dtype, scheduler=self.scheduler, loss_fn=self.loss_fn)
            self.step += 1
            self.tokens_seen += tokens_per_step
            tok_interval += tokens_per_step
            loss = float(res["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr or check the data")
            acc_loss += loss
            acc_aux += float(res["aux_loss"])
            acc_n += 1
            if res["expert_counts"] is not None:
                c = res["expert_counts"]
                acc_counts = c if acc_counts is None else acc_counts + c
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
            if self.on_step is not None:
                self.on_step(self, self.step, {"loss": loss, "lr": lr, "grad_norm": float(res["grad_norm"])})
            last = self.step == cfg.max_iters
            record: dict[str, Any] | None = None
            if self.step % cfg.log_interval == 0 or last:
                dt = max(1e-9, time.time() - t_interval)
                tps = tok_interval / dt
                rate = (self.step - seg_start_step) / max(1e-9, time.time() - seg_start_time)
                eta = (cfg.max_iters - self.step) / max(rate, 1e-9)
                losses = torch.tensor([acc_loss / acc_n, acc_aux / acc_n], device=self.device)
                if self.world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(losses)
                    losses /= self.world
                    if acc_counts is not None:
                        dist.all_reduce(acc_counts)
                record = {"step": self.step, "tokens": self.tokens_seen, "loss": round(float(losses[0]), 5),
                          "lr": lr, "grad_norm": round(float(res["grad_norm"]), 5), "tokens_per_s": round(tps, 1),
                          "aux_loss": round(float(losses[1]), 5), "elapsed": round(self.elapsed(), 2),
                          "eta_s": round(eta, 1)}
                if acc_counts is not None:
                    record.update(expert_balance(acc_counts))
                if res.get("mtp_losses"):  # this step's loss of each extra head (t+2, t+3, ...)
                    record["mtp_losses"] = [round(float(v), 5) for v in res["mtp_losses"]]
                self.log(f"step {self.step}/{cfg.max_iters} loss {record['loss']:.4f} lr {lr:.2e} "
                         f"gnorm {record['grad_norm']:.3f} aux {record['aux_loss']:.3f} "
                         + (f"balance {record['expert_balance']:.2f} " if "expert_balance" in record else "")
                         + f"| {tps:,.0f} tok/s | elapsed {_fmt_duration(self.elapsed())} "
                         f"ETA {_fmt_duration(eta)}")
                acc_loss, acc_aux, acc_n, acc_counts = 0.0, 0.0, 0, None
                t_interval, tok_interval = time.time(), 0
            if self.is_main and (self.step % cfg.eval_interval == 0 or last):
                t_eval = time.time()
                val = self.validate()
                record = record or {"step": self.step, "tokens": self.tokens_seen,
                                    "elapsed": round(self.elapsed(), 2)}
                record.update(val_loss=round(val["loss"], 5), val_bpb=round(val["bits_per_byte"], 5))
                self.log(f"step {self.step}: val loss {val['loss']:.4f}, val bits/byte "
                         f"{val['bits_per_byte']:.4f} ({val['tokens']:,} tokens, {time.time() - t_eval:.1f}s)")
                t_interval += time.time() - t_eval  # evaluation time does not count against tokens/s
            if record is not None:
                self._metrics(record)
            if self.is_main and cfg.sample_interval and (self.step % cfg.sample_interval == 0 or last):
                text = self.sample()
                with open(self.out / "samples.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, "text": text}) + "\n")
                self.log(f"sample at step {self.step}: {text!r}")
            if self.step % ckpt_every == 0 and not last:
                self.save_resume_checkpoint()
                self._status("running", f"step {self.step}")
        self.save_resume_checkpoint()
        if self.is_main:
            self.save_final()
        self._status("finished", f"trained {self.step} steps; final val loss "
                                 f"{(self.last_val or {}).get('loss', float('nan')):.4f}")
        self.log(f"finished in {_fmt_duration(self.elapsed())}")
        return "finished"

    def _stop(self) -> str:
        reason = self.stop_reason or "stop requested"
        self.log(f"stopping at step {self.step} ({reason}): saving a checkpoint")
        self.save_resume_checkpoint()
        if self.is_main:
            (self.out / "STOP").unlink(missing_ok=True)
        self._status("stopped", f"stopped at step {self.step} by {reason}; continue with "
                                f"`python -m model.train --resume --out {self.out}`")
        return "stopped"


# ==== CLI =====================================================================================================
def _flag(p: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    """Add --a_b and --a-b spellings of one option (default None: only given flags override the preset)."""
    spellings = sorted({f"--{name}", f"--{name.replace('_', '-')}"}, key=lambda s: "-" in s[2:])
    p.add_argument(*spellings, dest=name, default=None, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a GPT-OSS-style (or GPT-2) story model. A preset sets every option; flags override "
                    "only what they name. The effective config is saved to <out>/config.json.")
    _flag(p, "preset", help=f"training preset: {', '.join(TRAIN_PRESETS)} (default fast); a model size "
                            "(toy, small, ...) is also accepted and means --model_size")
    _flag(p, "model_size", help="toy | small | medium | large")
    _flag(p, "arch", choices=["gptoss", "gpt2"], help="gpt2: the GPT-2 baseline with equal total parameters")
    _flag(p, "model_overrides", type=json.loads,
          help='JSON object of ModelConfig fields to change, e.g. \'{"num_hidden_layers": 2}\'')
    _flag(p, "data", help="'tinystories' ($STORYFORGE_DATA_DIR or the hub), a .txt/.jsonl file or a folder")
    _flag(p, "tokenizer", help="sentencepiece (trained on the data and cached) | tiktoken:gpt2 | a folder")
    _flag(p, "vocab_size", type=int, help="vocabulary of the trained SentencePiece tokenizer")
    _flag(p, "cache_dir", help="token/tokenizer cache (default $STORYFORGE_CACHE_DIR or ~/.cache/storyforge)")
    _flag(p, "max_iters", type=int, help="optimizer steps")
    _flag(p, "batch_size", type=int, help="sequences per micro-batch (per process)")
    _flag(p, "block_size", type=int, help="tokens per sequence (the model's context)")
    _flag(p, "grad_accum", type=int, help="micro-batches per optimizer step")
    _flag(p, "lr", type=float, help="peak learning rate")
    _flag(p, "min_lr", type=float, help="cosine decay floor (default: the preset's ratio to --lr)")
    _flag(p, "warmup_iters", type=int, help="linear warmup steps")
    _flag(p, "weight_decay", type=float)
    _flag(p, "grad_clip", type=float, help="max gradient norm (0: no clipping)")
    _flag(p, "aux_loss_coef", type=float, help="MoE load-balancing loss weight (default 0.01)")
    _flag(p, "mtp_heads", type=int, help="multi-token prediction: extra heads for tokens t+2 .. t+1+K (0: off)")
    _flag(p, "mtp_weight", type=float, help="loss weight of each extra MTP head (default 0.3)")
    _flag(p, "context_memory", type=int, help="context-aware model: memory slots carried across chunks of a "
                                              "story, trained on document-ordered batches (0: off)")
    _flag(p, "context_bptt", type=int, help="chunks per sequence with the gradient through the memory (default 2)")
    _flag(p, "dtype", choices=list(DTYPES), help="auto: bf16 autocast on a bf16 GPU, else fp32")
    _flag(p, "compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    _flag(p, "seed", type=int)
    _flag(p, "eval_interval", type=int, help="steps between validations (and checkpoints)")
    _flag(p, "eval_batches", type=int, help="validation budget in batches of batch_size x block_size tokens")
    _flag(p, "log_interval", type=int, help="steps between log lines / metrics records")
    _flag(p, "sample_interval", type=int, help="steps between sample stories (0: none)")
    _flag(p, "ckpt_interval", type=int, help="steps between resume checkpoints (0: at every eval)")
    _flag(p, "device", help="auto | cpu | cuda | cuda:N")
    _flag(p, "out", help="run directory (default runs/<preset>-<model_size>-<time>)")
    _flag(p, "use_tensorboard", action=argparse.BooleanOptionalAction, help="write TensorBoard events to <out>/tb")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no tqdm bar even on a terminal")
    return p


CLI_FIELDS = ("model_size", "arch", "model_overrides", "data", "tokenizer", "vocab_size", "cache_dir", "max_iters",
              "batch_size", "block_size", "grad_accum", "lr", "min_lr", "warmup_iters", "weight_decay", "grad_clip",
              "aux_loss_coef", "mtp_heads", "mtp_weight", "context_memory", "context_bptt", "dtype", "compile",
              "seed", "eval_interval", "eval_batches", "log_interval", "sample_interval", "ckpt_interval", "device",
              "out", "use_tensorboard")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset values, overridden by the flags actually given (or, with --resume, the saved run config)."""
    from .config import PRESETS as MODEL_PRESETS

    given = {k: getattr(args, k) for k in CLI_FIELDS if getattr(args, k, None) is not None}
    if args.resume:
        if not given.get("out"):
            raise SystemExit("error: --resume needs --out RUN_DIR (the run to continue)")
        cfg_path = Path(given["out"]) / "config.json"
        if not cfg_path.exists():
            raise SystemExit(f"error: --resume: {cfg_path} not found; is {given['out']} a run directory? "
                             "Start a new run without --resume.")
        saved = json.loads(cfg_path.read_text())["train"]
        return TrainConfig.from_dict({**saved, **given})
    preset = args.preset or "fast"
    if preset in MODEL_PRESETS and preset not in TRAIN_PRESETS:  # `--preset toy` (architecture.md's spelling)
        given.setdefault("model_size", preset)
        preset = "fast"
    base = TrainConfig.preset_config(preset)
    if "lr" in given and "min_lr" not in given:  # keep the preset's floor ratio (min_lr = lr / 10)
        given["min_lr"] = given["lr"] * base.min_lr / base.lr
    cfg = TrainConfig.preset_config(preset, **given)
    if not given.get("out"):
        cfg = dataclasses.replace(cfg, out=f"runs/{preset}-{cfg.model_size}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg, resume=args.resume, progress_bar=args.progress)
    from .data import DataError
    from .tokenizer import TokenizerError

    try:
        trainer.run()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    except (DataError, TokenizerError) as e:  # already recorded in status.json; no traceback for these
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        end_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
