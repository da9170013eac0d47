"""gpt-oss inference that fits: the native MXFP4 kernel, packed experts with it, the memory check, the budget
setting, and the benchmark's arithmetic. Logits parity with transformers is in test_parity_hf.py."""

from __future__ import annotations

import json

import pytest
import torch

from model.gptoss_weights import (
    GiB,
    InsufficientMemoryError,
    PackedExperts,
    check_memory,
    estimate_load_memory,
    expert_cache_bytes_from_env,
    load_gpt_oss,
)
from model.kernels import mxfp4_kernel
from model.layers import swiglu
from model.mxfp4 import dequantize_mxfp4, quantize_mxfp4

TINY = {"num_hidden_layers": 2, "num_experts": 4, "experts_per_token": 2, "vocab_size": 96, "hidden_size": 64,
        "intermediate_size": 64, "swiglu_limit": 7.0, "head_dim": 16, "num_attention_heads": 4,
        "num_key_value_heads": 2, "sliding_window": 8, "initial_context_length": 4096, "rope_theta": 150000,
        "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1.0, "rope_ntk_beta": 32.0}


@pytest.fixture(scope="module")
def kernel():
    k = mxfp4_kernel()
    assert k is not None, "the MXFP4 kernel must build on this machine (g++ is installed)"
    return k


def _packed(shape, gen):
    blocks = torch.randint(0, 256, (*shape[:-1], shape[-1] // 32, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 130, (*shape[:-1], shape[-1] // 32), dtype=torch.uint8, generator=gen)
    return blocks, scales


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("M", [1, 3, 9, 17])
def test_kernel_linear_matches_dequantize_then_matmul(kernel, M):
    g = torch.Generator().manual_seed(M)
    blocks, scales = _packed((70, 96), g)  # 70 rows: not a multiple of the 64-row chunk
    x, bias = torch.randn(M, 96, generator=g), torch.randn(70, generator=g)
    ref = x @ dequantize_mxfp4(blocks, scales, torch.float32).t() + bias
    assert _rel(kernel.linear(x, blocks, scales, bias), ref) < 1e-5
    assert _rel(kernel.linear(x, blocks, scales), ref - bias) < 1e-5


def test_kernel_experts_match_the_reference_swiglu_mlp(kernel):
    g = torch.Generator().manual_seed(0)
    E, D, I, C = 5, 64, 96, 3
    b1, s1 = _packed((E, 2 * I, D), g)
    b2, s2 = _packed((E, D, I), g)
    bias1, bias2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, D, generator=g)
    ids = torch.tensor([4, 0, 4])  # an expert may appear twice
    x = torch.randn(3, C, D, generator=g) * 0.3
    got = kernel.experts(x, ids, b1, s1, bias1, b2, s2, bias2, limit=7.0)
    for i, e in enumerate(ids.tolist()):
        w1, w2 = dequantize_mxfp4(b1[e], s1[e], torch.float32), dequantize_mxfp4(b2[e], s2[e], torch.float32)
        ref = swiglu(x[i] @ w1.t() + bias1[e], 7.0) @ w2.t() + bias2[e]
        assert _rel(got[i], ref) < 1e-5
    with pytest.raises(IndexError):
        kernel.experts(x, torch.tensor([0, 1, 5]), b1, s1, bias1, b2, s2, bias2, limit=7.0)
    with pytest.raises(ValueError):
        kernel.experts(x.double(), ids, b1, s1, bias1, b2, s2, bias2, limit=7.0)


def test_kernel_decode_is_bit_identical_to_torch_decoder(kernel):
    g = torch.Generator().manual_seed(1)
    blocks, scales = _packed((3, 40, 128), g)
    scales[0, 0, 0] = 0  # extreme exponents too
    scales[0, 0, 1] = 254
    ours = kernel.decode_bf16(blocks, scales)
    ref = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


def test_kernel_can_be_disabled_and_packed_experts_fall_back(monkeypatch):
    from model.config import ModelConfig
    from model.gptoss_weights import DecodedExpertCache

    cfg = ModelConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=4, experts_per_token=2, intermediate_size=64,
                      sliding_window=8, max_context=64)
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 128, 64), torch.randn(4, 64, 64) * 0.2
    m1, m2 = quantize_mxfp4(w1), quantize_mxfp4(w2)
    b1, b2 = torch.randn(4, 128) * 0.1, torch.randn(4, 64) * 0.1
    x = torch.randn(2, 1, 64)
    ids = torch.tensor([3, 1])
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("STORYFORGE_MXFP4_KERNEL", flag)
        cache = DecodedExpertCache(1 << 20)
        ex = PackedExperts(0, cfg, m1, m2, b1, b2, cache, torch.float32)
        results[flag] = (ex(x, ids), cache.stats())
    (k_out, k_stats), (t_out, t_stats) = results["1"], results["0"]
    assert k_stats["kernel_calls"] == 2 and k_stats["misses"] == 0  # decode step: straight from packed bytes
    assert t_stats["kernel_calls"] == 0 and t_stats["misses"] == 2  # torch path: decoded through the cache
    assert _rel(k_out, t_out) < 1e-5


def test_packed_model_with_kernel_matches_dense_experts_in_bf16_and_fp32(tmp_path):
    from model.hub import write_random_gpt_oss_checkpoint

    write_random_gpt_oss_checkpoint(tmp_path, TINY, "original", seed=3)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        dense = load_gpt_oss(tmp_path, "original", dtype=dtype, experts="dense")
        packed = load_gpt_oss(tmp_path, "original", dtype=dtype, experts="packed", expert_cache_bytes=0)
        with torch.no_grad():
            ref = dense(ids).float()
            cache = packed.new_cache(1)
            steps = [packed(ids[:, :4], cache)] + [packed(ids[:, t:t + 1], cache) for t in range(4, 20)]
            got = torch.cat(steps, 1).float()
        assert _rel(got, ref) < tol, dtype
        assert packed.expert_cache.kernel_calls > 0


def test_memory_estimate_counts_weights_cache_and_copies(tmp_path):
    from model.gptoss_weights import RUNTIME_OVERHEAD_BYTES
    from model.hub import write_random_gpt_oss_checkpoint

    write_random_gpt_oss_checkpoint(tmp_path, TINY, "original", seed=0)
    st = tmp_path / "original" / "model.safetensors"
    n = int.from_bytes(st.read_bytes()[:8], "little")
    header = json.loads(st.read_bytes()[8:8 + n])
    header.pop("__metadata__", None)
    total = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    packed = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                 if k.endswith((".blocks", ".scales")))
    base = estimate_load_memory(tmp_path, "original", expert_cache_bytes=0)
    assert base == total + RUNTIME_OVERHEAD_BYTES
    assert estimate_load_memory(tmp_path, "original", expert_cache_bytes=GiB) == base + GiB
    # fp32 copies the bf16 dense weights (twice the bytes); decoded experts cost 3*D*I weights each
    assert estimate_load_memory(tmp_path, "original", 0, dtype=torch.float32) == base + (total - packed)
    dense = estimate_load_memory(tmp_path, "original", 0, experts="dense")
    assert dense == total - packed + 2 * 4 * 3 * 64 * 64 * 2 + RUNTIME_OVERHEAD_BYTES


def test_memory_check_refuses_with_a_clear_message(tmp_path, monkeypatch):
    from model.hub import write_random_gpt_oss_checkpoint

    monkeypatch.delenv("STORYFORGE_SKIP_MEMORY_CHECK", raising=False)
    with pytest.raises(InsufficientMemoryError, match=r"needs ~20\.0 GiB of RAM, 8\.0 GiB available.*"
                                                      r"--expert-cache-gb"):
        check_memory(20 * GiB, 4 * GiB, available=8 * GiB)
    check_memory(7 * GiB, 0, available=8 * GiB)  # fits: no error
    monkeypatch.setenv("STORYFORGE_SKIP_MEMORY_CHECK", "1")
    check_memory(20 * GiB, 4 * GiB, available=8 * GiB)  # override
    monkeypatch.delenv("STORYFORGE_SKIP_MEMORY_CHECK")

    # through the loader: a cache budget bigger than this machine's RAM is refused before loading
    import psutil

    write_random_gpt_oss_checkpoint(tmp_path, TINY, "original", seed=0)
    huge = psutil.virtual_memory().total * 2
    with pytest.raises(MemoryError, match="close other programs"):
        load_gpt_oss(tmp_path, "original", experts="packed", expert_cache_bytes=huge)
    model = load_gpt_oss(tmp_path, "original", experts="packed", expert_cache_bytes=huge,
                         check_available_memory=False)
    assert model.expert_cache.budget == huge


def test_expert_cache_budget_from_env(monkeypatch, tmp_path):
    from model.hub import write_random_gpt_oss_checkpoint

    monkeypatch.setenv("STORYFORGE_EXPERT_CACHE_GB", "0.5")
    assert expert_cache_bytes_from_env() == GiB // 2
    write_random_gpt_oss_checkpoint(tmp_path, TINY, "original", seed=0)
    assert load_gpt_oss(tmp_path, "original", experts="packed").expert_cache.budget == GiB // 2
    assert load_gpt_oss(tmp_path, "original", experts="packed", expert_cache_bytes=0).expert_cache.budget == 0
    monkeypatch.setenv("STORYFORGE_EXPERT_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="STORYFORGE_EXPERT_CACHE_GB"):
        expert_cache_bytes_from_env()
    monkeypatch.delenv("STORYFORGE_EXPERT_CACHE_GB")
    assert expert_cache_bytes_from_env() == 2 * GiB


def test_packed_tensors_follow_the_requested_device(tmp_path):
    """Device handling without a GPU: the meta device stands in for 'not the CPU' (bytes are copied over)."""
    from model.config import ModelConfig
    from model.gptoss_weights import DecodedExpertCache

    cfg = ModelConfig(vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_experts=2, experts_per_token=1, intermediate_size=64,
                      sliding_window=8, max_context=64)
    m1, m2 = quantize_mxfp4(torch.randn(2, 128, 64)), quantize_mxfp4(torch.randn(2, 64, 64))
    ex = PackedExperts(0, cfg, m1, m2, torch.zeros(2, 128), torch.zeros(2, 64), DecodedExpertCache(0),
                       torch.bfloat16, device="meta")
    assert ex.mlp1_blocks.device.type == "meta" and ex.mlp2_scales.device.type == "meta"
    assert ex.mlp1_bias.device.type == "meta" and not ex.use_kernel
    cpu = PackedExperts(0, cfg, m1, m2, torch.zeros(2, 128), torch.zeros(2, 64), DecodedExpertCache(0),
                        torch.bfloat16)
    assert cpu.mlp1_blocks.data_ptr() == m1[0].data_ptr()  # CPU: zero-copy views of the (mapped) bytes


def test_benchmark_bandwidth_arithmetic_matches_the_issue():
    from model.benchmark_gptoss import bytes_per_checkpoint, bytes_per_decoded_token, gpt_oss_20b_config

    cfg = gpt_oss_20b_config()
    assert 3.6e9 < bytes_per_decoded_token(cfg) < 3.8e9  # "about 3.7 GB must be read per decoded token"
    assert abs(bytes_per_checkpoint(cfg) - 13.761e9) < 0.01e9  # spec 1.1: 13.761 GB checkpoint


def test_benchmark_refuses_to_write_inside_the_repo():
    from pathlib import Path

    from model.benchmark_gptoss import REPO, ensure_checkpoint, gpt_oss_20b_config

    with pytest.raises(SystemExit, match="inside the repository"):
        ensure_checkpoint(Path(REPO) / "weights" / "bench", gpt_oss_20b_config())
