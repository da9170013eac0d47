"""The GPT-OSS model and the GPT-2 baseline: the seeds' bugs as tests, and the architecture's exact math."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import ModelConfig, gpt2_matched, parameter_counts
from model.gptoss import Transformer, build_model
from model.layers import sink_attention, swiglu, yarn_inv_freq


def tiny(arch: str = "gptoss", **kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, num_experts=4, experts_per_token=2, intermediate_size=32, sliding_window=4,
                max_context=64)
    base.update(kw)
    cfg = ModelConfig(**base)
    return gpt2_matched(cfg) if arch == "gpt2" else cfg


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_fresh_model_has_finite_logits_and_every_parameter_initialised(arch):
    torch.manual_seed(0)
    m = build_model(tiny(arch))
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
        assert p.abs().max() < 10, f"{name} looks uninitialised"
    logits = m(torch.randint(0, 97, (3, 20)))
    assert logits.shape == (3, 20, 97)
    assert torch.isfinite(logits).all()


def test_sinks_are_learned_parameters_that_receive_gradient():
    torch.manual_seed(0)
    m = build_model(tiny())
    ids = torch.randint(0, 97, (2, 12))
    torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_position_matters(arch):
    """Permuting the input changes the output (the seed applied RoPE with the batch index as the position)."""
    torch.manual_seed(0)
    m = build_model(tiny(arch)).eval()
    ids = torch.arange(1, 11)[None]
    perm = ids[:, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7, 8, 9])]
    with torch.no_grad():
        a, b = m(ids)[0, -1], m(perm)[0, -1]
    assert not torch.allclose(a, b, atol=1e-6)


def test_batched_rows_are_independent():
    torch.manual_seed(0)
    m = build_model(tiny()).eval()
    ids = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        together = m(ids)
        alone = torch.cat([m(ids[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
def test_save_then_load_gives_identical_logits(arch, tmp_path):
    torch.manual_seed(0)
    m = build_model(tiny(arch)).eval()
    save_checkpoint(m, tmp_path / "ckpt", card={"note": "test"})
    assert not list(tmp_path.glob(".ckpt.tmp-*")), "temporary directory left behind"
    loaded = Transformer.from_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is type(m)
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert torch.equal(m(ids), loaded(ids))


def test_cached_decoding_equals_full_forward_past_the_window():
    torch.manual_seed(0)
    m = build_model(tiny(sliding_window=4)).eval()
    ids = torch.randint(0, 97, (2, 25))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2)
        steps = [m(ids[:, :7], cache)] + [m(ids[:, t:t + 1], cache) for t in range(7, 25)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache.layers[0].k.shape[2] == 4, "the windowed layer's cache must stay bounded by the window"
    assert cache.layers[1].filled == 25


def test_sliding_window_limits_what_even_layers_see():
    """With one layer (windowed, layer 0) a token more than `window` positions back cannot affect the output."""
    torch.manual_seed(0)
    m = build_model(tiny(num_hidden_layers=1, sliding_window=4)).eval()
    ids = torch.randint(1, 97, (1, 12))
    changed = ids.clone()
    changed[0, 2] = 0
    with torch.no_grad():
        a, b = m(ids), m(changed)
    assert torch.allclose(a[0, 6:], b[0, 6:], atol=1e-6)  # position 2 is out of every window from 6 on
    assert not torch.allclose(a[0, 3:6], b[0, 3:6], atol=1e-6)


@pytest.mark.parametrize("repeat_kv", [False, True], ids=["enable_gqa", "repeated-kv (the CUDA path)"])
def test_sink_attention_matches_the_written_formula(repeat_kv, monkeypatch):
    from model import layers

    monkeypatch.setattr(layers, "_repeat_kv_for_masked_gqa", lambda device: repeat_kv)
    torch.manual_seed(0)
    B, Hq, Hkv, T, hd = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, Hq, T, hd), torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    sinks = torch.randn(Hq)
    mask = torch.ones(T, T + 1, dtype=torch.bool)
    mask[:, 1:] = torch.ones(T, T, dtype=torch.bool).tril()
    got = sink_attention(q, k, v, sinks, mask)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~mask[:, 1:], float("-inf"))
    full = torch.cat([sinks[None, :, None, None].expand(B, Hq, T, 1), scores], -1)
    probs = torch.softmax(full, -1)[..., 1:]  # the sink's share is dropped: rows sum to < 1
    assert (probs.sum(-1) < 1).all()
    assert torch.allclose(got, probs @ vv, atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_attention_path_matches_the_fused_path(T):
    from model.layers import _sink_attention_few

    torch.manual_seed(1)
    B, Hq, Hkv, S, hd = 2, 8, 2, 11, 16
    q, k, v = torch.randn(B, Hq, T, hd), torch.randn(B, Hkv, S, hd), torch.randn(B, Hkv, S, hd)
    sinks = torch.randn(Hq)
    mask = torch.ones(T, S + 1, dtype=torch.bool)
    mask[:, 1:3] = False  # a couple of keys out of the window
    q_big = q.repeat(1, 1, 3, 1)  # >4 queries: the SDPA path
    fused = sink_attention(q_big, k, v, sinks, mask.repeat(3, 1))[:, :, :T]
    assert torch.allclose(_sink_attention_few(q, k, v, sinks, mask, 1 / math.sqrt(hd)), fused, atol=1e-5)


def test_yarn_inverse_frequencies_match_the_spec_vector():
    inv, c = yarn_inv_freq(ModelConfig.preset("gpt-oss-20b"))
    assert c == pytest.approx(1.3465735902799727)
    for i, want in {0: 1.0, 1: 0.68904430, 7: 0.07374457, 8: 0.05081327, 9: 0.03170570, 12: 0.00679496,
                    16: 4.5648392e-4, 17: 1.2931869e-4, 18: 3.8308812e-5, 31: 3.0235114e-7}.items():
        assert inv[i].item() == pytest.approx(want, rel=1e-5)


def test_swiglu_clamps_and_interleaves():
    h = torch.tensor([[10.0, 10.0, -1.0, -10.0]])  # (gate, lin) pairs: (10, 10), (-1, -10)
    out = swiglu(h, limit=7.0)
    assert out[0, 0].item() == pytest.approx(7 * torch.sigmoid(torch.tensor(1.702 * 7)).item() * 8, rel=1e-5)
    assert out[0, 1].item() == pytest.approx(-1 * torch.sigmoid(torch.tensor(-1.702)).item() * -6, rel=1e-5)


def test_moe_reports_aux_loss_and_expert_counts_without_changing_forward():
    torch.manual_seed(0)
    m = build_model(tiny()).train()
    ids = torch.randint(0, 97, (2, 10))
    out = m(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10, 97)
    counts = m.expert_counts
    assert counts.shape == (2, 4) and counts.sum(1).tolist() == [2 * 10 * 2] * 2
    aux = m.aux_loss
    assert aux.requires_grad and aux.item() >= 2 * 0.99  # >= 1 per layer; 1 only when perfectly balanced
    aux.backward()
    assert m.block[0].mlp.gate.weight.grad.abs().sum() > 0


def test_moe_router_takes_top_k_of_raw_logits_then_softmax_over_them():
    torch.manual_seed(0)
    cfg = tiny(num_hidden_layers=1)
    mlp = build_model(cfg).block[0].mlp.eval()
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        got = mlp(x) - x
        t = mlp.norm(x)[0]
        logits = mlp.gate(t)
        vals, idx = logits.topk(2, -1)
        w = vals.softmax(-1)
        ex = mlp.experts
        want = torch.zeros(3, 32)
        for n in range(3):
            for j in range(2):
                e = idx[n, j]
                h = ex.mlp1_weight[e] @ t[n] + ex.mlp1_bias[e]
                want[n] += w[n, j] * (ex.mlp2_weight[e] @ swiglu(h, 7.0) + ex.mlp2_bias[e])
    assert torch.allclose(got[0], want, atol=1e-5)


def test_bf16_autocast_training_step_keeps_fp32_master_weights():
    torch.manual_seed(0)
    m = build_model(tiny())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ids = torch.randint(0, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(ids).flatten(0, 1).float(), ids.flatten())
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.isfinite(loss)


def test_config_json_round_trip_and_unknown_keys(tmp_path):
    cfg = ModelConfig.preset("small")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


@pytest.mark.parametrize("name,low,high", [("toy", 1e6, 2.5e6), ("small", 5e6, 15e6), ("medium", 40e6, 60e6),
                                           ("large", 150e6, 250e6)])
def test_preset_sizes(name, low, high):
    total = parameter_counts(ModelConfig.preset(name))["total"]
    assert low <= total <= high


def test_published_sizes_and_analytic_counts_match_built_models():
    c20 = parameter_counts(ModelConfig.preset("gpt-oss-20b"))
    assert c20["total"] == 20_914_757_184  # spec section 1.1
    assert round(c20["active_excl_embedding"] / 1e9, 2) == 3.61  # the model card's "3.6B active"
    assert round(parameter_counts(ModelConfig.preset("gpt-oss-120b"))["active_excl_embedding"] / 1e9, 2) == 5.13
    assert parameter_counts(ModelConfig.preset("gpt-oss-120b"))["total"] == 116_829_156_672
    for name in ("toy", "gpt2-toy", "gpt2-toy-active"):
        cfg = ModelConfig.preset(name)
        assert sum(p.numel() for p in build_model(cfg).parameters()) == parameter_counts(cfg)["total"]


def test_gpt2_presets_match_gpt_oss_parameter_counts():
    for size in ("toy", "small"):
        ours = parameter_counts(ModelConfig.preset(size))
        total = parameter_counts(ModelConfig.preset(f"gpt2-{size}"))["total"]
        active = parameter_counts(ModelConfig.preset(f"gpt2-{size}-active"))["total"]
        assert abs(total - ours["total"]) / ours["total"] < 0.01
        assert abs(active - ours["active"]) / ours["active"] < 0.01


# ---- bad checkpoints: clear errors naming file and tensor ------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(build_model(tiny()), tmp_path / "ck")


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_truncated_weights_file_is_detected(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(saved)


def test_missing_weights_file_is_named(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(saved)


def _rewrite(saved, change):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(saved / "model.safetensors"))
    change(sd)
    save_file(sd, str(saved / "model.safetensors"))


def test_wrong_shape_missing_and_unexpected_tensors_are_named(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("block.0.attn.sinks", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"block\.0\.attn\.sinks.*shape"):
        load_model(saved)
    _rewrite(saved, lambda sd: sd.pop("block.0.attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*block\.0\.attn\.sinks"):
        load_model(saved)
    _rewrite(saved, lambda sd: sd.update({"block.0.attn.sinks": torch.zeros(4), "extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*extra\.weight"):
        load_model(saved)


def test_unknown_config_key_is_a_clear_error(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["mystery"] = 1
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mystery"):
        load_model(saved)


def test_not_a_checkpoint_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", ["gptoss", "gpt2"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "mtp"])
def test_last_logits_is_the_last_row_of_forward_and_advances_the_cache(arch, extras):
    """Generation prefills through last_logits, which unembeds only the last position."""
    torch.manual_seed(0)
    cfg = tiny(arch)
    m = build_model(cfg.replace(mtp_heads=1)) if extras else build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2)
        last = m.last_logits(ids, cache)
        assert last.shape == (2, cfg.vocab_size) and cache.length == 9
        assert torch.allclose(last, full[:, -1], atol=1e-5)
        nxt = torch.randint(0, cfg.vocab_size, (2, 1))
        assert torch.allclose(m.last_logits(nxt, cache), m(torch.cat([ids, nxt], 1))[:, -1], atol=1e-5)
