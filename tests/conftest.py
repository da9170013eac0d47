"""Shared fixtures: tiny checkpoints in our format, and model roots pointed at a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"))

# ../shared's TinyStories text (train/valid/test), beside the repository root.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
if not SHARED_DATA.exists():
    SHARED_DATA = Path("/work/shared/data/tinystories")

TINY_STORY_TEXT = (
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her red ball. "
    "One day, a big dog came and took the ball. Lily was sad, but the dog came back and gave it to her. "
    "They became good friends and played every day.\n"
) * 40


def build_tiny_checkpoint(directory: Path, tokenizer, card: dict | None = None, **config) -> Path:
    """Save a randomly initialised, very small GPT-OSS model with `tokenizer` as our checkpoint format."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import ModelConfig
    from model.gptoss import build_model

    cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, num_experts=2, experts_per_token=1, intermediate_size=32,
               sliding_window=32, max_context=128)
    cfg.update(config)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg))
    return save_checkpoint(model, directory, tokenizer, card or {"description": "tiny test model"})


def never_end(ckpt: Path, eos_id: int) -> Path:
    """Make a random model's replies run to their token budget: EOS gets logit 0 while the other logits are spread
    50x wider, so EOS never makes a top-k of 50 nor wins greedy decoding (a reply a test means to stop, continue or
    count could otherwise end by itself at a random first token)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    w = tensors["unembedding.weight"] * 50
    w[eos_id] = 0
    tensors["unembedding.weight"] = w
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


@pytest.fixture(scope="session")
def story_tokenizer(tmp_path_factory):
    """A 320-piece SentencePiece tokenizer trained in a fraction of a second on a repeated tiny story."""
    from model.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("sp")
    (d / "stories.txt").write_text(TINY_STORY_TEXT)
    return train_sentencepiece(d / "stories.txt", d / "tok", vocab_size=320, max_bytes=None)


@pytest.fixture(scope="session")
def tiny_story_checkpoint(tmp_path_factory, story_tokenizer) -> Path:
    """A tiny story model (random weights, ~30K parameters, never ends by itself) in our checkpoint format."""
    ckpt = build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "story", story_tokenizer,
                                 max_context=512, card={"description": "tiny story test model", "preset": "test"})
    return never_end(ckpt, story_tokenizer.eos_id)


@pytest.fixture(scope="session")
def tiny_harmony_checkpoint(tmp_path_factory) -> Path:
    """A tiny gpt-oss-format model with the real o200k_harmony tokenizer (vocab 201088, hidden 32: ~13M params)."""
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer("tiktoken:o200k_harmony")
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "harmony", tok, num_hidden_layers=1,
                                 max_context=256, card={"description": "tiny harmony test model"})


@pytest.fixture
def model_roots(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Empty weights/ and runs/ directories that the registry (STORYFORGE_*_DIR) reads instead of the repo's."""
    weights, runs = tmp_path / "weights", tmp_path / "runs"
    weights.mkdir()
    runs.mkdir()
    monkeypatch.setenv("STORYFORGE_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("STORYFORGE_RUNS_DIR", str(runs))
    return weights, runs
