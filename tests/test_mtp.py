"""Multi-token prediction heads and self-speculative decoding (issue 9).

The seed project trained head 0 on t+2 and generated with an untrained head. Here: head k is proven to predict
t+k on a synthetic sequence, the next-token path is the plain model's, greedy speculative decoding equals plain
greedy token for token (past the sliding window and through context trims), and the sampling acceptance rule
reproduces the target distribution."""

from __future__ import annotations

import json

import pytest
import torch

from model import train as T
from model.checkpoint import load_model, save_checkpoint
from model.config import ModelConfig
from model.extras import ExtrasLoss, mtp_losses
from model.gptoss import build_model
from model.sampling import SamplingParams, make_generator
from model.speculative import (
    accept_drafts,
    main,
    plain_generate,
    rollback_cache,
    snapshot_cache,
    speculative_generate,
)

TINY = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, num_experts=2, experts_per_token=1, intermediate_size=32, sliding_window=8, max_context=40)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(arch: str = "gptoss", seed: int = 0, **kw) -> torch.nn.Module:
    cfg = dict(TINY, arch=arch, **kw)
    if arch == "gpt2":
        cfg.update(num_key_value_heads=2, sliding_window=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**cfg)).eval()


def test_head_k_predicts_token_t_plus_k():
    """Sequence with x[t+1] = f(x[t]) for a fixed permutation f of 16 ids: after training, head k at position t
    must predict f^k(x[t]) (a head trained one step off would predict f^(k+1) or f^(k-1) instead)."""
    V = 16
    g = torch.Generator().manual_seed(0)
    f = torch.randperm(V, generator=g)
    model = tiny(vocab_size=V, mtp_heads=2, init_std=0.05).train()
    loss_fn = ExtrasLoss(model, mtp_weight=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def batch(n=16, T=17):
        seq = torch.empty(n, T, dtype=torch.long)
        seq[:, 0] = torch.randint(0, V, (n,), generator=g)
        for t in range(1, T):
            seq[:, t] = f[seq[:, t - 1]]
        return seq[:, :-1], seq[:, 1:]

    for _ in range(150):
        out = loss_fn(model, batch())
        opt.zero_grad()
        out["objective"].backward()
        opt.step()
    model.eval()
    x, _ = batch(32)
    with torch.no_grad():
        h = model.hidden_states(x)
        main_pred = model.unembed(h).argmax(-1)
        heads = [lg.argmax(-1) for lg in model.mtp_logits(h)]
    assert (main_pred == f[x]).float().mean() > 0.95
    assert (heads[0] == f[f[x]]).float().mean() > 0.95  # head k=2: t+2
    assert (heads[1] == f[f[f[x]]]).float().mean() > 0.95  # head k=3: t+3
    assert out["mtp"][0] < 0.2 and out["mtp"][1] < 0.2


def test_mtp_losses_pair_position_t_with_target_t_plus_k():
    """Direct check of the indexing: with heads replaced by an oracle that puts all mass on the right token
    (token t+k = y[t+k-1]), the loss is ~0; shifted by one it is large."""
    model = tiny(mtp_heads=2)
    B, Tn, V = 2, 10, 48
    seq = torch.randint(0, V, (B, Tn + 3))
    y = seq[:, 1:Tn + 1]  # next-token targets of inputs seq[:, :Tn]

    def oracle(shift):
        def hidden(h):
            return [torch.nn.functional.one_hot(seq[:, k + shift:k + shift + Tn], V).float() * 50 for k in (2, 3)]
        return hidden

    model.unembed = lambda z: z  # the oracle already gives logits
    model.mtp_hidden = oracle(0)
    assert max(float(v) for v in mtp_losses(model, torch.zeros(B, Tn, 32), y)) < 1e-3
    model.mtp_hidden = oracle(1)
    assert min(float(v) for v in mtp_losses(model, torch.zeros(B, Tn, 32), y)) > 10


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_next_token_path_is_the_plain_models(arch):
    """The heads do not touch forward(): same seed, same base weights, same logits as the plain model."""
    plain, mtp = tiny(arch), tiny(arch, mtp_heads=3)
    x = torch.randint(0, 48, (2, 12))
    torch.testing.assert_close(plain(x), mtp(x), rtol=0, atol=0)
    assert mtp.num_parameters()["total"] > plain.num_parameters()["total"]


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_save_load_keeps_heads(tmp_path, arch):
    m = tiny(arch, mtp_heads=2)
    save_checkpoint(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["mtp_heads"] == 2
    m2 = load_model(tmp_path / "ck")
    x = torch.randint(0, 48, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x), rtol=0, atol=0)
        h = m.hidden_states(x)
        for a, b in zip(m.mtp_logits(h), m2.mtp_logits(h)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cache_rollback_restores_ring_and_full_layers():
    m = tiny(mtp_heads=1)
    ids = torch.randint(0, 48, (1, 30))
    with torch.no_grad():
        cache = m.new_cache(1)
        m(ids[:, :12], cache)  # past the window of 8: the ring buffer has wrapped
        snap = snapshot_cache(cache, 5)
        m(torch.randint(0, 48, (1, 5)), cache)
        rollback_cache(cache, snap, 0)
        assert cache.length == 12
        got = m(ids[:, 12:20], cache)
        ref = m(ids[:, :20])[:, 12:]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_greedy_speculative_equals_plain_greedy(arch):
    """Past the sliding window (8) and the context limit (40: trims), token for token."""
    m = tiny(arch, mtp_heads=3, init_std=0.3)
    params = SamplingParams(temperature=0.0, max_new_tokens=90)
    plain = plain_generate(m, [1, 2, 3], params)
    spec = speculative_generate(m, [1, 2, 3], params)
    assert spec.tokens == plain.tokens and len(plain.tokens) == 90
    assert spec.trims >= 1 and plain.trims == spec.trims
    with_penalty = SamplingParams(temperature=0.0, max_new_tokens=30, repetition_penalty=1.3)
    assert speculative_generate(m, [5], with_penalty).tokens == plain_generate(m, [5], with_penalty).tokens


def test_greedy_speculative_with_mostly_right_drafts():
    """An oracle drafter (the true greedy continuation, with some drafts made wrong) exercises partial acceptance
    and rollback on almost every round; the output must still be plain greedy's."""
    m = tiny(mtp_heads=3, init_std=0.3)
    params = SamplingParams(temperature=0.0, max_new_tokens=30)  # 2 + 30 < max_context 40: no trims
    prompt = [4, 5]
    truth = plain_generate(m, prompt, params).tokens
    full = prompt + truth
    seen: list[tuple[torch.Tensor, int]] = []  # hidden state row -> index of its token in `full`
    orig_hidden = m.hidden_states

    def hidden(ids, cache=None):
        start = cache.length if cache is not None else 0
        h = orig_hidden(ids, cache)
        seen.extend((h[0, j].clone(), start + j) for j in range(h.shape[1]))
        return h

    def drafts(h_last):
        pos = next(p for v, p in reversed(seen) if torch.equal(v, h_last[0]))
        out = []
        for k in range(2, 5):
            tok = full[pos + k] if pos + k < len(full) else 0
            if (pos + k) % 4 == 0:  # a wrong draft now and then
                tok = (tok + 1) % 48
            out.append(torch.nn.functional.one_hot(torch.tensor([tok]), 48).float() * 10)
        return out

    m.hidden_states = hidden
    m.mtp_logits = drafts
    spec = speculative_generate(m, prompt, params)
    assert len(truth) == 30 and spec.tokens == truth
    assert 0.3 < spec.acceptance_rate < 1.0 and spec.rounds < len(truth) * 0.7


def test_acceptance_rule_reproduces_the_target_distribution():
    """Draft from q, accept/resample against p: the first emitted token must follow p1 and (given acceptance
    of the first draft) the second p2, whatever q is."""
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.3, 0.5], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2], [0.4, 0.4, 0.1, 0.1]])
    g = make_generator(123)
    n = 12000
    first = torch.zeros(4)
    second = torch.zeros(4)
    n_second = 0
    for _ in range(n):
        d = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
        acc, nxt = accept_drafts(p, q, d, g)
        emitted = d[:acc] + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
            n_second += 1
    assert torch.allclose(first / n, p[0], atol=0.02)
    assert n_second > 1000 and torch.allclose(second / n_second, p[1], atol=0.03)


def test_sampling_speculative_runs_and_respects_stop_ids():
    m = tiny(mtp_heads=2, init_std=0.3)
    params = SamplingParams(temperature=1.0, top_k=10, max_new_tokens=50)
    a = speculative_generate(m, [1], params, generator=make_generator(5))
    b = speculative_generate(m, [1], params, generator=make_generator(5))
    assert a.tokens == b.tokens and len(a.tokens) == 50 and a.drafted > 0  # seeded: reproducible
    stop = a.tokens[10]
    c = speculative_generate(m, [1], params, stop_ids={stop}, generator=make_generator(5))
    assert c.stop_reason == "eos" and stop not in c.tokens and c.tokens == a.tokens[:a.tokens.index(stop)]


def test_speculative_refuses_a_model_without_heads():
    with pytest.raises(ValueError, match="mtp-heads"):
        speculative_generate(tiny(), [1], SamplingParams(temperature=0))


def test_trainer_flags_and_run_with_mtp(tmp_path, story_tokenizer, capsys):
    args = T.build_parser().parse_args(["--mtp-heads", "2", "--mtp-weight", "0.5", "--out", str(tmp_path / "r")])
    cfg = T.config_from_args(args)
    assert cfg.mtp_heads == 2 and cfg.mtp_weight == 0.5
    mc = cfg.model_config(100)
    assert mc.mtp_heads == 2 and mc.mtp_loss_weight == 0.5
    from tests.conftest import TINY_STORY_TEXT

    data = tmp_path / "d"
    data.mkdir()
    docs = TINY_STORY_TEXT.strip().split("\n")
    (data / "train.txt").write_text("\n<|endoftext|>\n".join(docs[:30]) + "\n")
    (data / "valid.txt").write_text("\n<|endoftext|>\n".join(docs[30:]) + "\n")
    out = tmp_path / "run"
    run_cfg = T.TrainConfig(preset="debug", model_size="toy", model_overrides={k: v for k, v in TINY.items()
                                                                               if k not in ("vocab_size",
                                                                                            "max_context")},
                            data=str(data), tokenizer=str(story_tokenizer_dir(story_tokenizer, tmp_path)),
                            cache_dir=str(tmp_path / "c"), batch_size=4, block_size=24, max_iters=4,
                            warmup_iters=1, eval_interval=4, eval_batches=1, log_interval=2, sample_interval=0,
                            out=str(out), device="cpu", dtype="float32", mtp_heads=2)
    assert T.Trainer(run_cfg).run() == "finished"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["mtp_losses"]) == 2 for r in recs if "loss" in r)
    model = load_model(out / "final")
    assert model.config.mtp_heads == 2 and model.mtp is not None
    assert main(["--model", str(out / "final"), "--prompt", "Once", "--max-new-tokens", "12", "--compare",
                 "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "acceptance" in err and "identical output" in err


def story_tokenizer_dir(tok, tmp_path):
    d = tmp_path / "tok"
    tok.save(d)
    return d
