"""Checkpoints: our directory format, and gpt-oss's published layouts (HF and `original/`).

Our format: `config.json` (ModelConfig), `model.safetensors`, the tokenizer file(s), `card.json`. Written to a
temporary directory and renamed into place, so a crash never leaves a half-written checkpoint that looks whole.
Loading is strict: every missing, unexpected, misshapen or truncated tensor is an error naming file and tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "card.json"

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and tensor and what to do."""


# ---- safetensors reading with validation --------------------------------------------------------------------
def read_safetensors_header(path: Path):
    """The header of a safetensors file (`model.hub.SafetensorsHeader`: tensor table, where the data starts), after
    `model.hub`'s checks (byte ranges, overlaps, exact file length), as a CheckpointError naming the file."""
    from .hub import read_safetensors_header as parse

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return parse(path)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}. Re-download or re-save the checkpoint.") from None


def open_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map every tensor of a validated safetensors file (no copy until used)."""
    from safetensors.torch import safe_open

    read_safetensors_header(path)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
    return out


def _strict_load(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into the model, refusing anything missing, unexpected or misshapen."""
    params = dict(model.state_dict())
    tied = {k for k in params if k == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    missing = sorted(set(params) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(params))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
                              " (is the config.json right for these weights?)")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config expects "
                                  f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


# ---- our format ---------------------------------------------------------------------------------------------
def write_directory_atomically(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create `directory` by calling `fill(tmp)` on a temporary sibling, then swapping it into place (an existing
    directory is replaced only once the new one is complete). A crash leaves the old directory or nothing, never
    a half-written one; the result is world-readable like any ordinary directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_checkpoint(model: torch.nn.Module, directory: str | Path, tokenizer: Any | None = None,
                    card: dict[str, Any] | None = None) -> Path:
    """Write model (+ tokenizer, card) as our checkpoint directory, atomically (temp dir, then rename)."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "storyforge"})
        model.config.to_json(tmp / CONFIG_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)
        (tmp / CARD_FILE).write_text(json.dumps(card or {}, indent=2, default=str) + "\n")

    return write_directory_atomically(directory, fill)


def detect_format(path: str | Path) -> str:
    """'ours', 'hf', or 'original' for a checkpoint directory (a download root with original/ counts)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the path does not exist")
    if p.is_file():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory")
    cfg_path = p / CONFIG_FILE
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if "arch" in cfg:
            return "ours"
        if cfg.get("model_type") == "gpt_oss" and (
                (p / "model.safetensors.index.json").exists() or any(p.glob("model*.safetensors"))):
            return "hf"
        if "num_experts" in cfg and any(p.glob("*.safetensors")):
            return "original"
    if (p / "original" / CONFIG_FILE).exists():
        return "original"
    raise CheckpointError(f"{p} is not a checkpoint this project can read: expected our config.json + "
                          "model.safetensors, a gpt-oss HF directory, or a directory with original/")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load any supported checkpoint directory into a model on `device` (dtype: None keeps the stored one for
    our format and uses bf16 for gpt-oss)."""
    fmt = detect_format(path)
    if fmt == "ours":
        return _load_ours(Path(path), device, dtype)
    from .gptoss_weights import load_gpt_oss

    return load_gpt_oss(Path(path), fmt, device=device, dtype=dtype)


def _load_ours(path: Path, device, dtype):
    from .gptoss import build_model

    try:
        cfg = ModelConfig.from_json(path / CONFIG_FILE)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    tensors = open_tensors(path / WEIGHTS_FILE)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device="cpu")
    _strict_load(model, tensors, str(path / WEIGHTS_FILE))
    if cfg.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.wte.weight
    if hasattr(model, "rope"):  # buffers are not in the checkpoint: rebuild them
        from .layers import RotaryEmbedding

        model.rope = RotaryEmbedding(cfg)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, card) from a checkpoint directory; the tokenizer is whatever the directory holds."""
    from .tokenizer import load_tokenizer

    model = load_model(path, device=device, dtype=dtype)
    tok = load_tokenizer(path)
    card_path = Path(path) / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    return model, tok, card
