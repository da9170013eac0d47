"""The GPT-OSS vs GPT-2 study script: parameter matching of the cells, the trainer command it builds, the table and
conclusion from known numbers, and one --quick end-to-end run on a tiny corpus (3 trainings of 5 steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from model import benchmark_compare as B
from model.config import parameter_counts
from tests.conftest import SHARED_DATA

SHARED = SHARED_DATA


@pytest.mark.parametrize("size", sorted(B.SIZES))
def test_cells_match_parameters(size: str) -> None:
    oss = parameter_counts(B.cell_model_config(size, "gptoss", 4096, 128))
    tot = parameter_counts(B.cell_model_config(size, "gpt2", 4096, 128))
    act = parameter_counts(B.cell_model_config(size, "gpt2-active", 4096, 128))
    assert oss["active"] < oss["total"]
    assert abs(tot["total"] - oss["total"]) / oss["total"] < 0.001
    assert abs(act["total"] - oss["active"]) / oss["active"] < 0.001


def test_micro_is_smaller_than_toy() -> None:
    toy = parameter_counts(B.cell_model_config("toy", "gptoss", 4096, 128))["total"]
    micro = parameter_counts(B.cell_model_config("micro", "gptoss", 4096, 128))["total"]
    assert micro < 0.6 * toy


@pytest.mark.parametrize("arch", B.ARCH_LABELS)
def test_train_command_builds_the_cell_model(arch: str, tmp_path: Path) -> None:
    """The trainer, given the command's flags, must build exactly the cell's model (not its own GPT-2 match)."""
    from model.train import build_parser, config_from_args

    s = B.Settings(vocab_size=4096, block_size=64)
    cmd = B.train_command("micro", arch, 3, s, tmp_path / "run")
    assert cmd[:3] == [sys.executable, "-m", "model.train"]
    cfg = config_from_args(build_parser().parse_args(cmd[3:]))
    assert (cfg.seed, cfg.max_iters, cfg.block_size, cfg.sample_interval) == (3, s.max_iters, 64, 0)
    built = cfg.model_config(4096)
    want = B.cell_model_config("micro", arch, 4096, 64)
    assert built.arch == want.arch
    assert parameter_counts(built) == parameter_counts(want)


def _record(size: str, arch: str, seed: int, bpb: float) -> dict:
    return {"size": size, "arch": arch, "seed": seed, "params_total": 2_000_000, "params_active": 1_600_000,
            "test_loss": bpb * 2.7, "test_bpb": bpb, "final_val_loss": bpb * 2.8, "ckpt_bytes": 8 * 2 ** 20,
            "peak_rss_train": 500 * 2 ** 20, "peak_rss_infer": 300 * 2 ** 20, "train_tok_s": 4000.0,
            "decode_tok_s": 200.0 if arch == "gptoss" else 400.0,
            "curve": [{"step": 0, "tokens": 0, "val_loss": 8.3}, {"step": 10, "tokens": 100, "loss": 5.0},
                      {"step": 20, "tokens": 200, "val_loss": 4.0 + bpb}]}


def test_table_and_conclusion_from_known_numbers() -> None:
    recs = [_record("toy", "gptoss", 1, 1.50), _record("toy", "gptoss", 2, 1.52),
            _record("toy", "gpt2", 1, 1.40), _record("toy", "gpt2", 2, 1.42),
            _record("toy", "gpt2-active", 1, 1.505), _record("toy", "gpt2-active", 2, 1.53),
            _record("micro", "gptoss", 1, 1.8), _record("micro", "gpt2", 1, 1.9)]
    table = B.results_table(recs)
    rows = [ln for ln in table.splitlines()[2:] if ln.startswith("|")]
    assert len(rows) == 5  # toy x 3 archs, micro x 2
    assert "1.5100 ± 0.0100" in rows[0] and "2.000M" in rows[0] and "1.600M" in rows[0]
    assert "| 8.00 ± 0.00 |" in rows[0]  # checkpoint MB
    text = "\n".join(B.conclusions(recs))
    assert "toy, GPT-OSS vs GPT-2, equal total**: GPT-2 wins" in text
    assert "larger than the seed spread" in text  # 1.51 vs 1.41 with ±0.01 each
    assert "within the seed spread" in text  # gpt2-active 1.5175 ± 0.0125 vs 1.51 ± 0.01
    assert "micro, GPT-OSS vs GPT-2, equal total**: GPT-OSS wins" in text
    assert "one seed per model" in text
    assert "(GPT-OSS 0.50x)" in text  # decode 200 vs 400 tokens/s
    assert "at **toy** the best test bits/byte is GPT-2, equal total's (1.4100)" in B.headline(recs)
    assert "at **micro** the best test bits/byte is GPT-OSS (MoE)'s (1.8000)" in B.headline(recs)
    assert len(B.per_run_table(recs).splitlines()) == 2 + len(recs)
    note = B.gpt2_match_note(recs)
    assert len(note) == 1 and "outside the seed spread" in note[0] and "a lower loss" in note[0]  # toy only
    same = B.gpt2_match_note([_record("toy", "gpt2", 1, 1.40), _record("toy", "gpt2-active", 1, 1.40)])
    assert "buys nothing measurable" in same[0]
    assert "GPT-2 (both matched versions, every size) is ahead on: decode tokens/s." in B.headline(recs)


def test_svg_plot_has_a_line_per_run(tmp_path: Path) -> None:
    recs = [_record("toy", a, s, 1.5) for a in B.ARCH_LABELS for s in (1, 2)]
    B.write_svg(recs, tmp_path / "p.svg")
    svg = (tmp_path / "p.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 6


def test_quick_study_end_to_end(tmp_path: Path) -> None:
    """--quick on a tiny corpus: 3 trainings, 3 probes, then the report with every row and both plots; a second
    invocation reuses the finished runs."""
    text = (SHARED / "valid.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    data = tmp_path / "data"
    data.mkdir()
    for name, part in (("train", docs[:100]), ("valid", docs[100:115]), ("test", docs[115:125])):
        (data / f"{name}.txt").write_text("\n<|endoftext|>\n".join(part) + "\n<|endoftext|>\n")
    results = tmp_path / "docs" / "results.md"
    args = ["--quick", "--sizes", "micro", "--data", str(data), "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results)]
    assert B.main(args) == 0
    md = results.read_text()
    summary, _, per_run = md.partition("### Every run")
    for part in (summary, per_run):
        rows = [ln for ln in part.splitlines() if ln.startswith("| micro |")]
        assert [r.split("|")[2].strip() for r in rows] == [B.ARCH_TITLES[a] for a in B.ARCH_LABELS]
        assert all("n/a" not in r for r in rows)
    assert "## Conclusion" in md and "GPT-OSS vs GPT-2, equal active" in md
    assert "python -m model.benchmark_compare --quick --sizes micro" in md
    html = (results.parent / "results" / "loss_curves.html").read_text()
    assert "plotly" in html.lower() and "GPT-2, equal active seed 1" in html
    assert (results.parent / "results" / "loss_curves.svg").read_text().count("<polyline") == 3
    bench = json.loads((tmp_path / "runs" / "micro-gpt2-active-s1" / "bench.json").read_text())
    assert bench["decode_tokens"] == 16 and bench["peak_rss_train"] > 10 * 2 ** 20 and bench["test_bpb"] > 0
    final = tmp_path / "runs" / "micro-gptoss-s1" / "final" / "model.safetensors"
    mtime = final.stat().st_mtime_ns
    results.unlink()
    assert B.main(args) == 0  # resumed: nothing retrained
    assert final.stat().st_mtime_ns == mtime and results.exists()
