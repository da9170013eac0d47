"""Logits parity with transformers' GptOssForCausalLM on tiny random checkpoints in every published layout.

The HF model is the oracle (spec section 5): fp32, eager attention, `truncate: False`, weights with a realistic
scale so the SwiGLU clamp and the sinks matter, and more tokens than the sliding window."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # dev dependency; its absence fails the import below anyway
from safetensors.torch import save_file  # noqa: E402

from model.gptoss import Transformer  # noqa: E402
from model.gptoss_weights import DecodedExpertCache, PackedExperts  # noqa: E402
from model.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402

WINDOW = 8
SEQ = 37


def _hf_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=WINDOW,
        rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        attn_implementation="eager")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    m = GptOssForCausalLM(_hf_config()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "sinks" in name:
                p.copy_(0.5 * torch.randn_like(p))
            elif "gate_up_proj" in name and "bias" not in name:
                p.copy_(torch.randn_like(p) * 0.5)  # large enough that the +-7 clamp bites
            elif "bias" in name:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.2)
        # make expert weights exactly MXFP4-representable so the packed layouts are lossless
        ex = m.model.layers[0].mlp.experts
        for layer in m.model.layers:
            ex = layer.mlp.experts
            for attr in ("gate_up_proj", "down_proj"):
                w = getattr(ex, attr)  # [E, in, out]
                b, s = quantize_mxfp4(w.transpose(1, 2).contiguous())
                w.copy_(dequantize_mxfp4(b, s, torch.float32).transpose(1, 2))
    return m


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, SEQ), generator=g)


def _max_err(a, b):
    return (a - b).abs().max().item() / b.abs().max().item()


def _write_hf_mxfp4(hf_model, directory):
    """Rewrite an HF checkpoint with experts as MXFP4 `_blocks`/`_scales`, the way the Hub ships them."""
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            b, s = quantize_mxfp4(v.transpose(1, 2).contiguous())
            out[k + "_blocks"], out[k + "_scales"] = b, s
        else:
            out[k] = v
    n = len(out) // 2
    keys = sorted(out)
    shards = {"model-00000-of-00001.safetensors": keys[:n], "model-00001-of-00001.safetensors": keys[n:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: out[k] for k in ks}, str(directory / fname))
        weight_map.update({k: fname for k in ks})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = hf_model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(cfg))


def _write_original(hf_model, directory):
    """The same weights in OpenAI's original/ layout: fused qkv, renamed tensors, MXFP4 experts."""
    sd = hf_model.state_dict()
    c = hf_model.config
    out = {"embedding.weight": sd["model.embed_tokens.weight"], "norm.scale": sd["model.norm.weight"],
           "unembedding.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"block.{i}."
        out[q + "attn.norm.scale"] = sd[p + "input_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[q + f"attn.qkv.{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[q + f"attn.out.{kind}"] = sd[p + f"self_attn.o_proj.{kind}"]
            out[q + f"mlp.gate.{kind}"] = sd[p + f"mlp.router.{kind}"]
        out[q + "attn.sinks"] = sd[p + "self_attn.sinks"]
        out[q + "mlp.norm.scale"] = sd[p + "post_attention_layernorm.weight"]
        for ours, theirs in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            b, s = quantize_mxfp4(sd[p + f"mlp.experts.{theirs}"].transpose(1, 2).contiguous())
            out[q + f"mlp.{ours}_weight.blocks"], out[q + f"mlp.{ours}_weight.scales"] = b, s
            out[q + f"mlp.{ours}_bias"] = sd[p + f"mlp.experts.{theirs}_bias"]
    orig = directory / "original"
    orig.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(orig / "model.safetensors"))
    (orig / "config.json").write_text(json.dumps({
        "num_hidden_layers": c.num_hidden_layers, "num_experts": c.num_local_experts, "experts_per_token":
        c.num_experts_per_tok, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size":
        c.intermediate_size, "swiglu_limit": c.swiglu_limit, "head_dim": c.head_dim, "num_attention_heads":
        c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads, "sliding_window": c.sliding_window,
        "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1,
        "rope_ntk_beta": 32}))


def test_hf_layout_with_plain_experts_matches_transformers(hf_model, ids, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = Transformer.from_checkpoint(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert _max_err(ours(ids), hf_model(ids).logits) < 1e-4


def test_hf_layout_with_mxfp4_experts_matches_transformers(hf_model, ids, tmp_path):
    _write_hf_mxfp4(hf_model, tmp_path)
    ours = Transformer.from_checkpoint(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert _max_err(ours(ids), hf_model(ids).logits) < 1e-4


def test_original_layout_matches_transformers(hf_model, ids, tmp_path):
    _write_original(hf_model, tmp_path)
    ours = Transformer.from_checkpoint(tmp_path, dtype=torch.float32)  # the download root, holding original/
    with torch.no_grad():
        assert _max_err(ours(ids), hf_model(ids).logits) < 1e-4


@pytest.mark.parametrize("budget", [0, 3 * 64 * 64 * 4 * 2, 1 << 30])
def test_packed_experts_match_transformers_at_every_cache_budget(hf_model, ids, tmp_path, budget):
    from model.gptoss_weights import load_gpt_oss

    _write_original(hf_model, tmp_path)
    ours = load_gpt_oss(tmp_path, "original", dtype=torch.float32, experts="packed", expert_cache_bytes=budget)
    assert all(isinstance(b.mlp.experts, PackedExperts) for b in ours.block)
    with torch.no_grad():
        ref = hf_model(ids).logits
        assert _max_err(ours(ids), ref) < 1e-4
        # cached decoding through the packed experts (one token at a time, past the window)
        cache = ours.new_cache(2)
        steps = [ours(ids[:, :5], cache)] + [ours(ids[:, t:t + 1], cache) for t in range(5, SEQ)]
        assert _max_err(torch.cat(steps, 1), ref) < 1e-4
    stats: DecodedExpertCache = ours.expert_cache
    assert stats.used <= budget
    if budget == 0:
        assert stats.stats()["entries"] == 0
    if budget >= 1 << 30:
        assert stats.hits > 0


def test_hf_greedy_generation_matches_ours_with_cache(hf_model, ids, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = Transformer.from_checkpoint(tmp_path, dtype=torch.float32)
    prompt = ids[:1, :6]
    with torch.no_grad():
        hf_out = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, top_k=None, top_p=None,
                                   temperature=None)[0, 6:].tolist()
        cache = ours.new_cache(1)
        logits = ours(prompt, cache)
        got = []
        for _ in range(20):
            nxt = int(logits[0, -1].argmax())
            got.append(nxt)
            logits = ours(torch.tensor([[nxt]]), cache)
    assert got == hf_out


def test_export_to_transformers_round_trips_logits(ids):
    from model.config import ModelConfig
    from model.gptoss_weights import to_transformers

    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=16, num_experts=4, experts_per_token=2, intermediate_size=64,
                      sliding_window=WINDOW, max_context=128)
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.3 * torch.randn_like(p))
        assert _max_err(ours(ids), to_transformers(ours)(ids).logits) < 1e-4
