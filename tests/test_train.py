"""Trainer tests: config/presets/flags, optimisation pieces, overfitting, resume, stop, atomic checkpoints, DDP,
and one real toy-preset run on TinyStories whose validation loss must clearly fall.

Mechanics use a tiny corpus (stories from ../shared TinyStories) with a 400-piece tokenizer and tiny models, so
the file stays CI-friendly on 2 shared cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model import train as T
from model.config import ModelConfig
from model.gptoss import build_model
from tests.conftest import SHARED_DATA

SHARED = SHARED_DATA
REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "head_dim": 16, "num_experts": 4, "experts_per_token": 2, "intermediate_size": 32,
              "sliding_window": 16}


def _stories(path: Path, start: int, n: int) -> list[str]:
    text = path.read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    return docs[start:start + n]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is ~10x faster than oversubscribed threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tinydata")
    docs = _stories(SHARED / "valid.txt", 0, 140)
    (d / "train.txt").write_text("\n<|endoftext|>\n".join(docs[:120]) + "\n<|endoftext|>\n")
    (d / "valid.txt").write_text("\n<|endoftext|>\n".join(docs[120:]) + "\n<|endoftext|>\n")
    return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_cfg(tiny_data: Path, cache_dir: Path, out: Path, **kw) -> T.TrainConfig:
    base = dict(preset="debug", model_size="toy", model_overrides=dict(TINY_MODEL), data=str(tiny_data),
                vocab_size=400, cache_dir=str(cache_dir), batch_size=4, block_size=32, max_iters=8,
                lr=3e-3, min_lr=3e-4, warmup_iters=2, eval_interval=4, eval_batches=2, log_interval=1,
                sample_interval=0, out=str(out), device="cpu", dtype="float32", seed=7)
    base.update(kw)
    return T.TrainConfig(**base)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_cli(args: list[str], timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "STORYFORGE_DATA_DIR": str(SHARED), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "model.train", "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


# ---- configuration ------------------------------------------------------------------------------------------
def test_presets_are_real_distinct_configs_and_round_trip():
    seen = set()
    for name, cfg in T.TRAIN_PRESETS.items():
        assert cfg.preset == name
        assert T.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        seen.add((cfg.model_size, cfg.max_iters, cfg.batch_size, cfg.block_size, cfg.eval_interval, cfg.lr))
    assert len(seen) == len(T.TRAIN_PRESETS)
    assert T.TRAIN_PRESETS["debug"].max_iters < T.TRAIN_PRESETS["fast"].max_iters \
        < T.TRAIN_PRESETS["standard"].max_iters < T.TRAIN_PRESETS["production"].max_iters
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        T.TrainConfig.from_dict({"bogus": 1})


def test_flags_override_only_when_given_in_both_spellings():
    parse = T.build_parser().parse_args
    cfg = T.config_from_args(parse(["--preset", "standard", "--max-iters", "77", "--batch_size", "3",
                                    "--grad-accum", "2", "--eval_interval", "9", "--no-compile", "--lr", "0.01"]))
    std = T.TRAIN_PRESETS["standard"]
    assert (cfg.max_iters, cfg.batch_size, cfg.grad_accum, cfg.eval_interval, cfg.lr) == (77, 3, 2, 9, 0.01)
    assert cfg.block_size == std.block_size and cfg.model_size == std.model_size
    assert cfg.min_lr == pytest.approx(0.01 * std.min_lr / std.lr)  # the floor follows --lr
    assert cfg.compile is False and std.compile is False
    assert T.config_from_args(parse(["--preset", "production"])).compile is True
    # every nano-gpt-oss flag and its dashed twin
    a = parse(["--model_size", "small", "--max_iters", "5", "--batch_size", "2", "--block_size", "16",
               "--lr", "1e-4", "--use_tensorboard"])
    b = parse(["--model-size", "small", "--max-iters", "5", "--batch-size", "2", "--block-size", "16",
               "--lr", "1e-4", "--use-tensorboard"])
    assert vars(a) == vars(b)
    c = T.config_from_args(a)
    assert (c.model_size, c.max_iters, c.batch_size, c.block_size, c.lr, c.use_tensorboard) == \
        ("small", 5, 2, 16, 1e-4, True)
    # architecture.md's `--preset toy` means the toy model with the default training preset
    assert T.config_from_args(parse(["--preset", "toy"])).model_size == "toy"
    other = T.config_from_args(parse(["--arch", "gpt2", "--vocab-size", "512", "--dtype", "bfloat16",
                                      "--seed", "3", "--data", "x.txt", "--out", "r", "--compile",
                                      "--model-overrides", '{"num_hidden_layers": 1}']))
    assert (other.arch, other.vocab_size, other.dtype, other.seed, other.data, other.out, other.compile) == \
        ("gpt2", 512, "bfloat16", 3, "x.txt", "r", True)
    assert other.model_config(512).num_hidden_layers == 1 and other.model_config(512).arch == "gpt2"


def test_model_config_follows_size_arch_vocab_and_block():
    cfg = T.TrainConfig(model_size="small", block_size=96)
    m = cfg.model_config(777)
    assert (m.arch, m.vocab_size, m.max_context, m.hidden_size) == ("gptoss", 777, 96, 256)
    g = T.TrainConfig(model_size="small", arch="gpt2", block_size=96).model_config(777)
    assert g.arch == "gpt2" and g.max_context == 96 and g.hidden_size == 256
    assert T.TrainConfig(aux_loss_coef=0.05).model_config(300).aux_loss_coef == 0.05


def test_lr_schedule_warmup_cosine_floor():
    cfg = T.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [T.lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))  # linear warmup up
    assert all(b <= a + 1e-15 for a, b in zip(lrs[10:110], lrs[11:111]))  # then never up
    assert lrs[60] == pytest.approx(0.55e-3)  # halfway through the cosine
    assert lrs[110] == pytest.approx(1e-4) and lrs[129] == pytest.approx(1e-4)  # the floor, no oscillation


def test_weight_decay_on_matrices_only():
    model = build_model(ModelConfig.preset("toy", vocab_size=300).replace(**TINY_MODEL))
    opt = T.make_optimizer(model, T.TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(names[id(p)].endswith("sinks") for p in no_decay["params"])
    assert any(names[id(p)].endswith("mlp1_weight") for p in decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())


def test_grad_accumulation_equals_big_batch():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("gpt2-toy", vocab_size=300).replace(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
        intermediate_size=48, max_context=32)
    a = build_model(cfg)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 300, (4, 17))
    # SGD: its update is linear in the gradient, so float noise is not amplified the way Adam's first step
    # (g / |g|) amplifies it for the near-zero gradients of unused vocabulary rows
    T.train_step(a, torch.optim.SGD(a.parameters(), lr=0.5), [(x[:, :-1], x[:, 1:])], grad_clip=0.5)
    T.train_step(b, torch.optim.SGD(b.parameters(), lr=0.5), [(x[:2, :-1], x[:2, 1:]), (x[2:, :-1], x[2:, 1:])],
                 grad_clip=0.5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=n)


def test_tiny_model_overfits_tiny_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("toy", vocab_size=64).replace(**TINY_MODEL, max_context=32))
    x = torch.randint(0, 64, (2, 33))
    opt = T.make_optimizer(model, T.TrainConfig(lr=1e-2, weight_decay=0.0))
    losses = [float(T.train_step(model, opt, [(x[:, :-1], x[:, 1:])], aux_coef=0.01)["loss"])
              for _ in range(60)]
    assert losses[0] > 3.5  # ~ln(64) at the start
    assert losses[-1] < 0.05, losses[-10:]


def test_expert_balance_summary():
    bal = T.expert_balance(torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0]]))
    assert bal["expert_balance"] == pytest.approx(50 / 20)
    assert bal["expert_fractions"] == [1.0, 0.0, 0.0, 0.0]
    assert T.expert_balance(torch.full((2, 4), 5))["expert_cv"] == 0.0


# ---- runs ---------------------------------------------------------------------------------------------------
def test_run_writes_everything_and_flags_reach_the_run(tiny_data, cache_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_data, cache_dir, out, block_size=24, grad_accum=2, batch_size=3, max_iters=6,
                   eval_interval=3, sample_interval=3, sample_tokens=10, use_tensorboard=True, lr=2e-3)
    assert T.Trainer(cfg).run() == "finished"
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["block_size"] == 24 and saved["train"]["grad_accum"] == 2
    assert saved["model"]["max_context"] == 24 and saved["model"]["vocab_size"] == 400
    assert saved["model"]["hidden_size"] == 32
    m = read_metrics(out)
    steps = [r for r in m if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["tokens"] == 6 * 3 * 24 * 2  # batch x block x accum per step
    assert steps[1]["lr"] == pytest.approx(T.lr_at(1, cfg))  # --lr reaches the optimizer
    for key in ("tokens_per_s", "grad_norm", "aux_loss", "expert_balance", "expert_fractions", "elapsed"):
        assert key in steps[-1]
    assert len(steps[-1]["expert_fractions"]) == 4
    assert [r["step"] for r in m if "val_loss" in r] == [0, 3, 6]  # --eval-interval
    assert all(0 < r["val_bpb"] < 20 for r in m if "val_bpb" in r)
    samples = [json.loads(s) for s in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3, 6] and samples[0]["text"].startswith("Once upon a time")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 6 and status["pid"] == os.getpid()
    assert "step 6/6" in (out / "train.log").read_text()
    from model.checkpoint import load_checkpoint

    model, tok, card = load_checkpoint(out / "final")
    assert model.config.max_context == 24 and tok.vocab_size == 400
    assert card["steps"] == 6 and card["final_val_loss"] == pytest.approx(m[-1]["val_loss"], abs=1e-4)
    assert card["params_total"] > card["params_active"] and card["tokens_seen"] == 6 * 144
    ckpt_w = T.find_resume_checkpoint(out) / T.WEIGHTS_FILE
    from model.checkpoint import open_tensors

    for k, v in open_tensors(ckpt_w).items():  # final/ holds the trained weights
        torch.testing.assert_close(model.state_dict()[k], v)


def test_seed_and_dtype_reach_the_run(tiny_data, cache_dir, tmp_path):
    def losses(**kw):
        got = []
        tr = T.Trainer(tiny_cfg(tiny_data, cache_dir, tmp_path / f"r{len(list(tmp_path.iterdir()))}",
                                max_iters=3, eval_interval=100, **kw),
                       on_step=lambda t, s, info: got.append((info["loss"], t.autocast_dtype)))
        tr.run()
        return got

    a, b, c = losses(seed=1), losses(seed=1), losses(seed=2)
    assert [x for x, _ in a] == [x for x, _ in b] and [x for x, _ in a] != [x for x, _ in c]
    bf = losses(seed=1, dtype="bfloat16")
    assert bf[0][1] == torch.bfloat16 and a[0][1] is None
    assert bf[0][0] == pytest.approx(a[0][0], abs=0.05) and bf[0][0] != a[0][0]


def test_compile_flag_reaches_torch_compile(tiny_data, cache_dir, tmp_path, monkeypatch):
    calls = []

    def fake_compile(model, *a, **k):
        calls.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    T.Trainer(tiny_cfg(tiny_data, cache_dir, tmp_path / "c", max_iters=1, compile=True)).run()
    assert calls == ["Transformer"]


def test_resume_reproduces_uninterrupted_losses(tiny_data, cache_dir, tmp_path):
    def rec(store):
        return lambda t, s, info: store.append((s, info["loss"]))

    full: list = []
    T.Trainer(tiny_cfg(tiny_data, cache_dir, tmp_path / "full", eval_interval=100), on_step=rec(full)).run()

    part: list = []
    out = tmp_path / "part"

    def stop_at_5(t, s, info):
        part.append((s, info["loss"]))
        if s == 5:
            (out / "STOP").write_text("")

    assert T.Trainer(tiny_cfg(tiny_data, cache_dir, out, eval_interval=100), on_step=stop_at_5).run() == "stopped"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 5 and "--resume" in status["message"]
    assert not (out / "STOP").exists() and not (out / "final").exists()
    with pytest.raises(SystemExit, match="--resume"):  # a new run refuses to clobber it
        T.Trainer(tiny_cfg(tiny_data, cache_dir, out)).run()
    rest: list = []
    cfg = T.config_from_args(T.build_parser().parse_args(["--resume", "--out", str(out)]))
    assert cfg == tiny_cfg(tiny_data, cache_dir, out, eval_interval=100)
    assert T.Trainer(cfg, resume=True, on_step=rec(rest)).run() == "finished"
    assert [s for s, _ in part + rest] == list(range(1, 9))
    for (s, a), (_, b) in zip(full, part + rest):
        assert a == pytest.approx(b, abs=1e-5), s
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 9))  # metrics continue, no duplicates


def test_resume_without_checkpoint_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": T.TrainConfig(out=str(tmp_path)).to_dict()}))
    with pytest.raises(SystemExit, match="without --resume"):
        tr = T.Trainer(T.TrainConfig(out=str(tmp_path), data=str(tmp_path / "none.txt")), resume=True)
        tr._load_resume_checkpoint()
    with pytest.raises(SystemExit, match="--out"):
        T.config_from_args(T.build_parser().parse_args(["--resume"]))


def test_checkpoint_save_is_atomic(tiny_data, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "a"
    tr = T.Trainer(tiny_cfg(tiny_data, cache_dir, out, max_iters=2, eval_interval=100))
    assert tr.run() == "finished"
    good = T.find_resume_checkpoint(out)
    step_before = torch.load(good / T.STATE_FILE, weights_only=True)["step"]
    tr.step = 99

    def dying_save(*a, **k):  # killed in the middle of writing the state
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save_resume_checkpoint()
    monkeypatch.undo()
    ck = T.find_resume_checkpoint(out)
    assert ck == out / "ckpt" and torch.load(ck / T.STATE_FILE, weights_only=True)["step"] == step_before
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    # killed between the two renames: only ckpt.old is complete, and it is used
    os.replace(out / "ckpt", out / "ckpt.old")
    assert T.find_resume_checkpoint(out) == out / "ckpt.old"


def test_cli_sigint_stops_gracefully_and_failure_is_recorded(tiny_data, cache_dir, tmp_path, capsys):
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "model.train", "--no-progress", "--preset", "debug", "--data", str(tiny_data),
           "--vocab-size", "400", "--cache-dir", str(cache_dir), "--out", str(out), "--max-iters", "100000",
           "--block-size", "16", "--batch-size", "2", "--device", "cpu",
           "--model-overrides", json.dumps(TINY_MODEL)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text():
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and "SIGINT" in status["message"]
    assert T.find_resume_checkpoint(out) is not None
    assert "tok/s" in output and "ETA" in output  # log lines on stdout too (stdout is not train.log)
    assert T.main(["--preset", "debug", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "bad"),
                   "--no-progress"]) == 2
    assert "Data not found" in capsys.readouterr().err
    st = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert st["state"] == "failed" and "missing.txt" in st["message"]


# ---- distributed ----------------------------------------------------------------------------------------------
def _gloo_worker(rank: int, world: int, init_file: str, body, *args) -> None:
    """Run `body(rank, world, *args)` in a gloo process group, ended the way the trainer ends its own."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
    finally:
        T.end_process_group()


def _ddp_combined_batch(rank: int, world: int, x: torch.Tensor, out_file: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("toy", vocab_size=64).replace(**TINY_MODEL, max_context=32))
    ddp = DDP(model)
    opt = T.make_optimizer(model, T.TrainConfig(lr=1e-2))
    half = x.shape[0] // world
    xs = x[rank * half:(rank + 1) * half]
    T.train_step(ddp, opt, [(xs[:, :-1], xs[:, 1:])], aux_coef=0.0, grad_clip=1.0)
    if rank == 0:
        torch.save(model.state_dict(), out_file)


def test_ddp_two_gloo_processes_match_one_process_on_combined_batch(tmp_path):
    import torch.multiprocessing as mp

    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(5))
    out_file = str(tmp_path / "ddp.pt")
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), _ddp_combined_batch, x, out_file), nprocs=2,
             join=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("toy", vocab_size=64).replace(**TINY_MODEL, max_context=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    T.train_step(model, T.make_optimizer(model, T.TrainConfig(lr=1e-2)), [(x[:, :-1], x[:, 1:])],
                 aux_coef=0.0, grad_clip=1.0)
    ddp_state = torch.load(out_file, weights_only=True)
    moved = 0
    for k, v in model.state_dict().items():
        # AdamW's first step moves every weight by ~lr (1e-2) whatever its gradient's size; for the few
        # gradients near Adam's eps the float noise of averaging shows up at ~1e-6, so compare at 1e-5 (0.1%
        # of the step); every other weight agrees to ~1e-7.
        torch.testing.assert_close(ddp_state[k], v, atol=1e-5, rtol=1e-5)
        moved += int(not torch.equal(v, before[k]))
    assert moved > 10  # the step really changed the weights


def _ddp_idle_expert(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("toy", vocab_size=64).replace(**TINY_MODEL, max_context=32))
    with torch.no_grad():
        for blk in model.block:  # expert 0 is never routed to: its weights get no gradient
            blk.mlp.gate.bias[0] = -1e4
    ddp = T.wrap_ddp(model, torch.device("cpu"))
    opt = T.make_optimizer(model, T.TrainConfig(lr=1e-2))
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(rank))
    for _ in range(3):  # DDP reports parameters left without gradient at the following step
        T.train_step(ddp, opt, [(x[:, :-1], x[:, 1:])], aux_coef=0.0, grad_clip=1.0)


def test_ddp_trains_an_moe_whose_expert_got_no_tokens(tmp_path):
    """Guards the experts' layout: were they separate parameters, an idle expert would break DDP's reduction."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), _ddp_idle_expert), nprocs=2, join=True)


# ---- the real thing -----------------------------------------------------------------------------------------
def test_toy_preset_on_tinystories_val_loss_clearly_falls(tmp_path):
    out = tmp_path / "toy"
    r = run_cli(["--preset", "fast", "--model_size", "toy", "--data", "tinystories", "--out", str(out),
                 "--max-iters", "80", "--batch-size", "8", "--block-size", "64", "--eval-interval", "40",
                 "--eval-batches", "4", "--lr", "3e-3", "--warmup-iters", "10", "--sample-interval", "0",
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache")], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    val = [(m["step"], m["val_loss"]) for m in read_metrics(out) if "val_loss" in m]
    assert [s for s, _ in val] == [0, 40, 80]
    assert val[0][1] > 8.0  # ~ln(4096) untrained
    assert val[1][1] < val[0][1] - 1.5 and val[2][1] < val[1][1] - 0.1 and val[2][1] < val[0][1] - 3.0, val
    card = json.loads((out / "final" / "card.json").read_text())
    assert card["size"] == "toy" and card["final_val_loss"] == pytest.approx(val[-1][1], abs=1e-4)


def test_model_overrides_are_recorded_in_the_model_label():
    """A preset's label must not claim more than it knows once shapes were overridden (e.g. the study's GPT-2s)."""
    from model.train import TrainConfig

    cfg = TrainConfig(model_size="toy", arch="gpt2",
                      model_overrides={"hidden_size": 64, "extra": {"match": "active"}}).model_config(4096)
    assert cfg.hidden_size == 64
    assert cfg.extra["match"] == "active" and cfg.extra["overrides"] == ["hidden_size"]
    plain = TrainConfig(model_size="toy").model_config(4096)
    assert "overrides" not in plain.extra


def test_resume_with_new_lr_and_length_follows_the_new_schedule(tiny_data, cache_dir, tmp_path):
    """--resume --lr X --max_iters N continues on the schedule of X and N (the restored scheduler kept the old peak)."""
    out = tmp_path / "run"
    assert T.Trainer(tiny_cfg(tiny_data, cache_dir, out, max_iters=4, eval_interval=100)).run() == "finished"
    lrs: list = []
    cfg = T.config_from_args(T.build_parser().parse_args(
        ["--resume", "--out", str(out), "--max_iters", "8", "--lr", "1e-3"]))
    assert cfg.lr == 1e-3 and cfg.max_iters == 8
    tr = T.Trainer(cfg, resume=True, on_step=lambda t, s, info: lrs.append((s, info["lr"])))
    assert tr.run() == "finished"
    assert [s for s, _ in lrs] == [5, 6, 7, 8]
    for s, lr in lrs:  # the lr used at step s is the new schedule's, with peak 1e-3
        assert lr == pytest.approx(T.lr_at(s - 1, cfg), rel=1e-6), s
    assert max(lr for _, lr in lrs) <= 1e-3
