"""Evaluation: windows, the bits-per-byte formula by hand, padding invisibility, GPT-2 long stories, low loss on
overfit text, and the CLI (table and --json) on a saved checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import evaluate as E
from model.config import ModelConfig
from model.gptoss import build_model
from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "num_experts": 4, "experts_per_token": 2, "intermediate_size": 32, "sliding_window": 8}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS 256, EOS 257 (a tokenizer whose bytes-per-token is exactly 1)."""

    name = "bytes"
    vocab_size = 258
    bos_id, eos_id = 256, 257
    stop_ids = frozenset({257})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class PairTokenizer(ByteTokenizer):
    """Two bytes per token (id = b0 * 256 + b1, odd tail byte alone): a coarser tokenizer of the same text."""

    name = "pairs"
    vocab_size = 65536 + 2
    bos_id, eos_id = 65536, 65537

    def encode(self, text: str) -> list[int]:
        b = text.encode("utf-8")
        return [b[i] * 256 + b[i + 1] if i + 1 < len(b) else b[i] for i in range(0, len(b), 2)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(arch: str = "gptoss", vocab: int = 258, ctx: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = ModelConfig.preset("gpt2-toy", vocab_size=vocab).replace(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, max_context=ctx)
    else:
        cfg = ModelConfig.preset("toy", vocab_size=vocab).replace(**TINY, max_context=ctx)
    return build_model(cfg).eval()


def test_windows_score_every_token_once_within_context():
    ids = list(range(23))
    for ctx, stride in [(8, None), (8, 3), (8, 7), (5, 1), (30, None), (23, None)]:
        wins = E.make_windows(ids, ctx, stride)
        assert all(len(w.ids) <= ctx for w in wins)
        scored = []
        for w in wins:
            targets = w.ids[1:]
            scored += targets[len(targets) - w.n_scored:]
            if w is not wins[0]:
                assert len(w.ids) - w.n_scored >= ctx - (stride or ctx // 2)  # context kept for scored tokens
        assert scored == ids[1:], (ctx, stride)
    assert E.make_windows([1], 8) == []
    with pytest.raises(ValueError):
        E.make_windows(ids, 8, stride=8)


def test_bits_per_byte_by_hand_on_one_story():
    model, tok = tiny_model(), ByteTokenizer()
    text = "Tom saw a dog. It was big!"
    res = E.evaluate_text(model, tok, [text])
    ids = torch.tensor([[256, *text.encode(), 257]])
    with torch.no_grad():
        nats = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
    n_bytes = len(text.encode())
    assert res["tokens"] == n_bytes + 1 and res["bytes"] == n_bytes and res["documents"] == 1
    assert res["nats"] == pytest.approx(nats, rel=1e-5)
    assert res["loss"] == pytest.approx(nats / (n_bytes + 1), rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_bpb_counts_bytes_not_tokens():
    """A model that is uniform over its vocabulary: loss = ln V per token; bpb = tokens * log2 V / bytes, so
    two tokenizers of the same text get the same byte count and bpb follows from the nats alone."""
    text = "Lily and Ben play in the park. \u00e9t\u00e9 \u2603"  # multi-byte characters count as their bytes
    n_bytes = len(text.encode("utf-8"))
    for tok in (ByteTokenizer(), PairTokenizer()):
        model = tiny_model(vocab=tok.vocab_size)
        with torch.no_grad():
            model.unembedding.weight.zero_()
        res = E.evaluate_text(model, tok, [text])
        n_tok = len(tok.encode(text)) + 1
        assert res["bytes"] == n_bytes and res["tokens"] == n_tok
        assert res["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
        assert res["bits_per_byte"] == pytest.approx(n_tok * math.log2(tok.vocab_size) / n_bytes, rel=1e-5)


def test_padding_and_batching_are_invisible():
    model, tok = tiny_model(), ByteTokenizer()
    docs = ["A cat.", "Once upon a time there was a small red hen who liked to bake bread.", "Hi", "Sun and rain."]
    together = E.evaluate_text(model, tok, docs, batch_size=3)
    alone = [E.evaluate_text(model, tok, [d], batch_size=1) for d in docs]
    assert together["nats"] == pytest.approx(sum(r["nats"] for r in alone), rel=1e-5)
    assert together["tokens"] == sum(r["tokens"] for r in alone)
    assert together["bytes"] == sum(r["bytes"] for r in alone)


def test_long_story_in_windows_gpt2_and_gptoss():
    text = "The little bird sang a song every morning. " * 6  # 264 bytes: longer than the 32-token context
    for arch in ("gpt2", "gptoss"):
        model = tiny_model(arch, ctx=32)
        res = E.evaluate_text(model, ByteTokenizer(), [text])  # GPT-2 would raise past position 31
        assert res["tokens"] == len(text.strip()) + 1 and res["windows"] > 1
        full = E.evaluate_text(model, ByteTokenizer(), [text], max_context=400)
        if arch == "gpt2":  # clamped to its learned positions
            assert full["windows"] == res["windows"] and full["nats"] == pytest.approx(res["nats"])
        else:  # rotary positions: one window over the whole story
            assert full["windows"] == 1 and res["loss"] == pytest.approx(full["loss"], rel=0.2)


def test_overfit_text_scores_low():
    from model import train as T

    tok = ByteTokenizer()
    story = "Once upon a time, a frog sat on a log and sang."
    other = "Mia found a shiny key under the old oak tree."
    model = tiny_model(ctx=64).train()
    ids = torch.tensor([[256, *story.encode(), 257]])
    opt = T.make_optimizer(model, T.TrainConfig(lr=1e-2, weight_decay=0.0))
    for _ in range(80):
        T.train_step(model, opt, [(ids[:, :-1], ids[:, 1:])], aux_coef=0.01)
    seen, unseen = E.evaluate_text(model, tok, [story]), E.evaluate_text(model, tok, [other])
    assert seen["loss"] < 0.1 and seen["bits_per_byte"] < 0.15
    assert unseen["loss"] > 1.0


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    from model.checkpoint import save_checkpoint
    from model.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("evalckpt")
    docs = [s.strip() for s in (SHARED / "valid.txt").read_text().split("<|endoftext|>") if s.strip()]
    (d / "train.txt").write_text("\n<|endoftext|>\n".join(docs[:150]))
    (d / "test.txt").write_text("\n<|endoftext|>\n".join(docs[150:156]) + "\n<|endoftext|>\n")
    tok = train_sentencepiece(d / "train.txt", d / "tok", vocab_size=400)
    model = tiny_model(vocab=tok.vocab_size, ctx=48)
    save_checkpoint(model, d / "ckpt", tokenizer=tok, card={"arch": "gptoss"})
    return d / "ckpt", d / "test.txt"


def test_cli_json_and_table(saved_checkpoint, capsys):
    ckpt, data = saved_checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "model.evaluate", "--model", str(ckpt), "--data", str(data), "--device", "cpu"]
    r = subprocess.run(cmd + ["--json", "--max-docs", "4"], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("loss", "bits_per_byte", "tokens", "bytes"):
        assert key in out
    assert out["documents"] == 4 and out["max_context"] == 48
    from model.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(ckpt)
    docs = [s.strip() for s in data.read_text().split("<|endoftext|>") if s.strip()][:4]
    ref = E.evaluate_text(model, tok, docs)
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5) and out["bytes"] == ref["bytes"]
    assert out["loss"] == pytest.approx(math.log(tok.vocab_size), abs=0.5)  # untrained: near uniform
    assert E.main([*cmd[3:], "--batch-size", "2"]) == 0  # the table, in-process (one interpreter start is enough)
    table = capsys.readouterr().out
    assert "bits/byte" in table and re.search(r"^documents\s+6$", table, re.M)
    assert E.main([*cmd[3:5], "--data", str(data.parent / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err
