"""`python -m model.card` recomputes a checkpoint's card from the checkpoint and the data."""

from __future__ import annotations

import json

from model.card import main
from tests.conftest import build_tiny_checkpoint


def test_card_recomputes_numbers_and_writes_readme(tmp_path, story_tokenizer):
    ckpt = build_tiny_checkpoint(tmp_path / "m", story_tokenizer,
                                 card={"name": "m", "steps": 7, "tokens_seen": 700, "train_config": {"lr": 1e-3}})
    stories = "Lily had a red ball.\n<|endoftext|>\nTom saw a big dog.\n<|endoftext|>\n"
    (tmp_path / "valid.txt").write_text(stories)
    (tmp_path / "test.txt").write_text(stories * 2)
    card = main([str(ckpt), "--valid", str(tmp_path / "valid.txt"), "--test", str(tmp_path / "test.txt"),
                 "--name", "Tiny tale teller", "--note", "Trained in two legs."])
    assert card["name"] == "Tiny tale teller"
    saved = json.loads((ckpt / "card.json").read_text())
    assert saved == card
    assert card["steps"] == 7 and card["tokens_seen"] == 700  # training facts carried over
    assert card["valid_documents"] == 2 and card["test_documents"] == 4
    assert 0 < card["test_bits_per_byte"] < 20 and card["params_total"] > card["params_active"] > 0
    assert len(card["samples"]) == 3 and all(s["continuation"] for s in card["samples"])
    readme = (ckpt / "README.md").read_text()
    assert str(card["test_bits_per_byte"]) in readme and "Lily" in readme and readme.startswith("# Tiny tale teller")
    assert "Trained in two legs." in readme and card["note"] == "Trained in two legs."


def test_card_reports_missing_data_clearly(tmp_path, story_tokenizer):
    import pytest

    ckpt = build_tiny_checkpoint(tmp_path / "m", story_tokenizer)
    with pytest.raises(SystemExit, match="not found"):
        main([str(ckpt), "--valid", str(tmp_path / "nope.txt"), "--test", str(tmp_path / "nope.txt")])
