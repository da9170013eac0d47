"""Context-aware model: a learned memory carried across chunks of a story (issue 9).

The seed's version crashed in backward (in-place buffer update) and, fixed, was a no-op (reset before every
training sequence, carried only at inference). Here: the gradient of a later chunk's loss reaches the earlier
chunk through the memory, a reset stream equals a fresh call, several optimiser steps run without autograd
errors, generation carries the memory across windows exactly as training chunks do, and checkpoints keep it."""

from __future__ import annotations

import json

import pytest
import torch

from model import train as T
from model.checkpoint import load_model, save_checkpoint
from model.config import ModelConfig
from model.extras import ContextBatch, ContextCache, ExtrasLoss, chunk_losses
from model.gptoss import build_model

TINY = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, num_experts=2, experts_per_token=1, intermediate_size=32, sliding_window=8, max_context=12)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY, "context_slots": 2, **kw}))


def test_gradient_flows_across_a_chunk_boundary():
    """Loss of chunk 2 only; chunk 1 uses ids 0..19, chunk 2 ids 20..39: embedding rows of chunk 1's ids get a
    gradient only through the memory."""
    m = tiny().train()
    x1 = torch.randint(0, 20, (2, 12))
    x2 = torch.randint(20, 40, (2, 12))
    _, state = m.context_chunk(x1)
    h2, _ = m.context_chunk(x2, state, reset=torch.tensor([False, False]))
    m.unembed(h2).logsumexp(-1).mean().backward()
    g = m.embedding.weight.grad
    assert g[x1.unique()].abs().sum() > 0
    assert m.context.write.grad.abs().sum() > 0 and m.context.proj.weight.grad.abs().sum() > 0
    # with the memory reset, chunk 1 cannot influence chunk 2
    m.zero_grad()
    _, state = m.context_chunk(x1)
    h2, _ = m.context_chunk(x2, state, reset=torch.tensor([True, True]))
    m.unembed(h2).logsumexp(-1).mean().backward()
    assert m.embedding.weight.grad[x1.unique()].abs().sum() == 0


def test_reset_gives_the_learned_init_and_carry_changes_the_output():
    m = tiny().eval()
    x1, x2 = torch.randint(0, 40, (2, 12)), torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        _, state = m.context_chunk(x1)
        h, _ = m.context_chunk(x2, state, reset=torch.tensor([True, False]))
        fresh, _ = m.context_chunk(x2)
    torch.testing.assert_close(h[0], fresh[0], rtol=0, atol=0)  # reset stream == a fresh document
    assert (h[1] - fresh[1]).abs().max() > 1e-4  # the carried memory is used
    with torch.no_grad():
        torch.testing.assert_close(m(x2), m.unembed(fresh))  # plain forward = a fresh document


def test_several_training_steps_without_autograd_errors_and_memory_detached():
    m = tiny().train()
    loss_fn = ExtrasLoss(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        xs = torch.randint(0, 40, (2, 3, 12), generator=g)
        reset = torch.zeros(2, 3, dtype=torch.bool)
        reset[0, 1] = step % 2 == 0  # stream 1 starts a new document now and then
        out = loss_fn(m, ContextBatch(xs, torch.roll(xs, -1, -1), reset))
        opt.zero_grad()
        (out["objective"] + 0.01 * out["aux"]).backward()
        opt.step()
        assert out["chunks"] == 2 and not loss_fn.state.requires_grad and loss_fn.state.shape == (3, 2, 32)
    assert torch.isfinite(out["loss"].detach())


def test_generation_carries_the_memory_across_windows_like_training():
    """Token-by-token decoding with the cache rolls to a fresh window every max_context tokens and gives the
    logits of the chunked forward with the memory carried (what training computes)."""
    m = tiny().eval()
    ids = torch.randint(0, 40, (1, 40))
    with torch.no_grad():
        ref = m(ids)  # chunks of 12 with the memory carried
        cache = m.new_cache(1)
        assert isinstance(cache, ContextCache)
        steps = []
        for i in range(40):
            steps.append(m(ids[:, i:i + 1], cache))
            assert cache.length < m.config.max_context  # a generator never has to trim
        got = torch.cat(steps, 1)
        cache2 = m.new_cache(1)
        got2 = torch.cat([m(ids[:, :7], cache2), m(ids[:, 7:], cache2)], 1)
    assert cache.windows == 3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, ref, rtol=1e-5, atol=1e-5)
    # and it differs from resetting the memory at every window (the memory matters at inference too)
    with torch.no_grad():
        reset_each = torch.cat([m(ids[:, i:i + 12]) for i in range(0, 40, 12)], 1)
    assert (reset_each[:, 12:] - ref[:, 12:]).abs().max() > 1e-4


def test_save_load_identical_logits(tmp_path):
    m = tiny(mtp_heads=1).eval()
    save_checkpoint(m, tmp_path / "ck")
    m2 = load_model(tmp_path / "ck")
    ids = torch.randint(0, 40, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(m(ids), m2(ids), rtol=0, atol=0)
    assert {n for n, _ in m2.named_parameters() if n.startswith("context.")} == {
        "context.init", "context.write", "context.proj.weight", "context.proj.bias"}


def test_chunk_losses_carry_vs_reset():
    m = tiny().eval()
    docs = [torch.randint(0, 40, (30,)).tolist() for _ in range(3)]
    carried = chunk_losses(m, docs, 12, carry=True, max_chunks=3)
    reset = chunk_losses(m, docs, 12, carry=False, max_chunks=3)
    assert carried[0] == reset[0]  # the first chunk has no past either way
    assert carried[1][1] == 36 and carried[1][0] != reset[1][0]


def test_gpt2_context_memory_is_refused():
    with pytest.raises(ValueError, match="gptoss"):
        ModelConfig(arch="gpt2", context_slots=2)
    with pytest.raises(ValueError, match="gptoss"):
        T.TrainConfig(arch="gpt2", context_memory=2)


def test_trainer_runs_document_ordered_and_resumes(tmp_path, story_tokenizer):
    args = T.build_parser().parse_args(["--context-memory", "2", "--context-bptt", "3", "--out", str(tmp_path)])
    cfg = T.config_from_args(args)
    assert cfg.context_memory == 2 and cfg.context_bptt == 3 and cfg.model_config(50).context_slots == 2
    from tests.conftest import TINY_STORY_TEXT

    data = tmp_path / "d"
    data.mkdir()
    docs = TINY_STORY_TEXT.strip().split("\n")
    (data / "train.txt").write_text("\n<|endoftext|>\n".join(docs[:30]) + "\n")
    (data / "valid.txt").write_text("\n<|endoftext|>\n".join(docs[30:]) + "\n")
    story_tokenizer.save(tmp_path / "tok")
    over = {k: v for k, v in TINY.items() if k not in ("vocab_size", "max_context")}
    out = tmp_path / "run"

    def run_cfg(max_iters):
        return T.TrainConfig(preset="debug", model_size="toy", model_overrides=over, data=str(data),
                             tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path / "c"), batch_size=3,
                             block_size=16, max_iters=max_iters, warmup_iters=1, eval_interval=2, eval_batches=1,
                             log_interval=1, sample_interval=2, sample_tokens=40, out=str(out), device="cpu",
                             dtype="float32", context_memory=2, context_bptt=2)

    trainer = T.Trainer(run_cfg(2))
    assert trainer.run() == "finished"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in recs if "loss" in r] == [3 * 16 * 2, 2 * 3 * 16 * 2]  # two chunks per step
    saved_iter = trainer.doc_iter.state_dict()
    resumed = T.Trainer(run_cfg(3), resume=True)
    assert resumed.run() == "finished"
    assert resumed.step == 3
    state = torch.load(out / "ckpt" / T.STATE_FILE, weights_only=True)
    assert "doc_iter" in state and state["context_state"].shape == (3, 2, 32)
    assert saved_iter["streams"] != json.loads(state["doc_iter"])["streams"]  # it moved on from where it stopped
    model = load_model(out / "final")
    assert model.config.context_slots == 2
