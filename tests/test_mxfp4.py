"""MXFP4 decode/encode (model/mxfp4.py) against hand-made bytes, round trips and transformers' decoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.mxfp4 import (
    FP4_VALUES,
    dequantize_mxfp4,
    dequantize_mxfp4_two_gathers,
    dequantize_rows,
    quantize_mxfp4,
)

ROOT = Path(__file__).resolve().parents[1]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view, so -0.0 != +0.0 and NaN == NaN in comparisons."""
    return t.view(torch.int16 if t.dtype in (torch.bfloat16, torch.float16) else torch.int32)


def _one_block(byte_values: list[int], scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = byte_values + [0] * (16 - len(byte_values))
    return torch.tensor([[data]], dtype=torch.uint8), torch.tensor([[scale]], dtype=torch.uint8)


def test_fp4_table() -> None:
    assert len(FP4_VALUES) == 16
    assert FP4_VALUES[:8] == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert all(FP4_VALUES[i + 8] == -FP4_VALUES[i] for i in range(8))


@pytest.mark.parametrize("decode", [dequantize_mxfp4, dequantize_mxfp4_two_gathers])
def test_hand_made_bytes(decode) -> None:
    # 0x21: low nibble 1 (=0.5) is the even element, high nibble 2 (=1.0) the odd one.
    blocks, scales = _one_block([0x21], 127)
    out = decode(blocks, scales, torch.float32)
    assert out.shape == (1, 32)
    assert out[0, :2].tolist() == [0.5, 1.0]
    assert out[0, 2:].abs().sum().item() == 0
    # negative codes: 0xF9 -> low 9 (-0.5), high 15 (-6.0); 0x8A -> low 10 (-1.0), high 8 (-0.0)
    blocks, scales = _one_block([0xF9, 0x8A, 0x7F], 127)
    out = decode(blocks, scales, torch.float32)[0]
    assert out[:6].tolist() == [-0.5, -6.0, -1.0, -0.0, -6.0, 6.0]
    assert torch.signbit(out[3]).item()  # code 8 is negative zero
    # scale 128 doubles, 126 halves, 127 + 10 multiplies by 1024
    for scale, factor in [(128, 2.0), (126, 0.5), (137, 1024.0), (117, 1 / 1024)]:
        blocks, scales = _one_block([0x21, 0x73], scale)
        out = decode(blocks, scales, torch.bfloat16)[0]
        assert out.dtype == torch.bfloat16
        assert out[:4].float().tolist() == [0.5 * factor, 1.0 * factor, 1.5 * factor, 6.0 * factor]


def test_every_byte_and_scale_matches_formula() -> None:
    byte = torch.arange(256, dtype=torch.uint8)
    blocks = byte.reshape(16, 16)[:, None, :].expand(16, 3, 16).contiguous()  # [16 rows, 3 blocks, 16]
    scales = torch.tensor([[100, 127, 140]], dtype=torch.uint8).expand(16, 3).contiguous()
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (16, 96)
    lut = torch.tensor(FP4_VALUES)
    for r in range(16):
        for g, u in enumerate([100, 127, 140]):
            row_bytes = blocks[r, g].long()
            expect = torch.stack([lut[row_bytes & 15], lut[row_bytes >> 4]], 1).reshape(32) * 2.0 ** (u - 127)
            assert torch.equal(out[r, 32 * g : 32 * g + 32], expect)


def test_real_layout_shapes_on_tiny_prefix() -> None:
    # gpt-oss-20b mlp1: blocks [32, 5760, 90, 16] -> [32, 5760, 2880]; check the mapping on a slice
    blocks = torch.randint(0, 256, (2, 8, 90, 16), dtype=torch.uint8)
    scales = torch.randint(120, 130, (2, 8, 90), dtype=torch.uint8)
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 8, 2880) and out.dtype == torch.bfloat16
    # the [E, rows] prefix decodes independently per row: slicing before == slicing after
    assert torch.equal(_bits(dequantize_mxfp4(blocks[1, 3:5], scales[1, 3:5])), _bits(out[1, 3:5]))
    with pytest.raises(ValueError, match="scales shape"):
        dequantize_mxfp4(blocks, scales[..., :-1])
    with pytest.raises(TypeError):
        dequantize_mxfp4(blocks.to(torch.int32), scales)


def test_chunking_and_out_buffer_do_not_change_result() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 7, 5, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(90, 160, (3, 7, 5), dtype=torch.uint8, generator=gen)
    ref = dequantize_mxfp4_two_gathers(blocks, scales)
    for chunk in (1, 4, 13, 1 << 16):
        assert torch.equal(_bits(dequantize_mxfp4(blocks, scales, chunk_blocks=chunk)), _bits(ref))
    buf = torch.full((3, 7, 160), 99.0, dtype=torch.bfloat16)
    res = dequantize_mxfp4(blocks, scales, out=buf)
    assert res.data_ptr() == buf.data_ptr() and torch.equal(_bits(buf), _bits(ref))
    # float16 goes through float32 and is cast once
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float16), ref.float().half())


def test_dequantize_rows_selects_experts_only() -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (6, 4, 2, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(110, 140, (6, 4, 2), dtype=torch.uint8, generator=gen)
    full = dequantize_mxfp4(blocks, scales)
    picked = dequantize_rows(blocks, scales, torch.tensor([5, 0, 5, 2]))
    assert picked.shape == (4, 4, 64)
    assert torch.equal(_bits(picked), _bits(full[[5, 0, 5, 2]]))
    # the result depends on the selected experts only: corrupting an unselected one changes nothing
    blocks[1].fill_(0xFF)
    assert torch.equal(_bits(dequantize_rows(blocks, scales, [5, 0, 5, 2])), _bits(picked))
    with pytest.raises(IndexError):
        dequantize_rows(blocks, scales, [6])


def test_quantize_roundtrip_exact_for_representable_values() -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (2, 5, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(10, 240, (2, 5, 4), dtype=torch.uint8, generator=gen)
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    qb, qs = quantize_mxfp4(w)
    assert qb.shape == blocks.shape and qs.shape == scales.shape
    assert qb.dtype == torch.uint8 and qs.dtype == torch.uint8
    back = dequantize_mxfp4(qb, qs, torch.float32)
    assert torch.equal(back.abs(), w.abs())  # -0.0 may come back as +0.0
    assert torch.equal(back, w)
    # and from bf16 input as well
    back16 = dequantize_mxfp4(*quantize_mxfp4(w.to(torch.bfloat16)), torch.bfloat16)
    assert torch.equal(back16.float(), w)


def test_quantize_error_bounded_for_random_values() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 16, 128, generator=gen) * torch.logspace(-3, 2, 16).reshape(1, 16, 1)
    w[0, 0, :32] = 0.0  # an all-zero block
    qb, qs = quantize_mxfp4(w)
    assert qs[0, 0, 0].item() == 127
    q = dequantize_mxfp4(qb, qs, torch.float32)
    assert torch.equal(q[0, 0, :32], torch.zeros(32))
    x = w.reshape(3, 16, 4, 32)
    qx = q.reshape(3, 16, 4, 32)
    amax = x.abs().amax(-1, keepdim=True)
    step = (2.0 ** (qs.to(torch.float32) - 127)).unsqueeze(-1)  # 2**e per block (exact powers of two)
    # e = floor(log2 amax) - 2  <=>  4 * 2**e <= amax < 8 * 2**e
    nz = amax.squeeze(-1) > 0
    assert torch.all((4 * step.squeeze(-1) <= amax.squeeze(-1))[nz])
    assert torch.all((amax.squeeze(-1) < 8 * step.squeeze(-1))[nz])
    err = (x - qx).abs()
    y = x.abs() / step
    # FP4 grid spacing is 0.5 below 2, 1 in [2, 4], 2 in [4, 6]: nearest rounding errs by half of that
    assert torch.all(err[y <= 2] <= 0.25 * step.expand_as(y)[y <= 2])
    assert torch.all(err[y <= 4] <= 0.5 * step.expand_as(y)[y <= 4])
    assert torch.all(err[y <= 6] <= 1.0 * step.expand_as(y)[y <= 6])
    sat = y > 6  # beyond the largest code the value saturates to +-6 * 2**e
    assert torch.equal(qx[sat].abs(), (6 * step.expand_as(y))[sat])
    assert torch.all(err <= 0.25 * amax + 1e-30)  # overall: at most a quarter of the block maximum
    assert torch.equal(torch.sign(qx[qx != 0]), torch.sign(x[qx != 0]))
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_mxfp4(torch.zeros(4, 33))


def test_matches_transformers_decoder_bit_exact() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 12, 4, 16), dtype=torch.uint8, generator=gen)
    # every finite scale (255 = 2**128 overflows to inf in both implementations)
    scales = torch.randint(0, 255, (3, 12, 4), dtype=torch.uint8, generator=gen)
    scales[0, 0, :] = torch.tensor([0, 1, 253, 254], dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, out, in]
        assert theirs.shape == (3, 128, 12)
        assert torch.equal(_bits(ours.transpose(1, 2).contiguous()), _bits(theirs))


def test_bench_entry_point_prints_both_decoders() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "model.mxfp4", "bench", "--experts", "1", "--rows", "64", "--k", "256",
         "--repeats", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "pair table" in proc.stdout and "two gathers" in proc.stdout
    assert proc.stdout.count("ns/weight") == 2
    assert "bit-identical: True" in proc.stdout
